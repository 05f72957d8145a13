"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def simdev():
    """The simulated device (Verilator, built once per source change), served for the whole
    session: its ``socket://`` URL."""
    from nibble.sim.system import serve
    with serve() as url:
        yield url
