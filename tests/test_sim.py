"""The cocotb suites on Verilator, and the Verilator lint of every unit, inside pytest.

Each suite builds its unit once (cached under build/sim/) and checks it against the golden
model; see sim/test_*.py for what each one covers. ``make test`` lints every unit and runs a
smoke of two suites (the device top through its UART pins, and every PE code pair);
``make test-all`` runs every suite at full volume (at least 100,000 vectors each).
"""

import pytest

from nibble.sim import runner
from nibble.sim.vectors import totals

UNITS = list(runner.units())
#: The fast tier's cocotb runs: unit -> its tests (None: the whole suite).
SMOKE = {"top": None, "pe": ["every_code_pair"]}


@pytest.mark.parametrize("unit", UNITS)
def test_verilator_lint(unit):
    runner.lint(runner.units()[unit])


@pytest.mark.parametrize("unit", list(SMOKE))
def test_cocotb_smoke(unit):
    (passed, failed), _ = runner.run(runner.units()[unit], testcase=SMOKE[unit])
    assert failed == 0 and passed > 0, f"{failed} cocotb test(s) of {unit} failed"
    assert totals([unit])[unit] > 0


@pytest.mark.long
@pytest.mark.parametrize("unit", UNITS)
def test_cocotb_suite(unit):
    (passed, failed), _ = runner.run(runner.units()[unit])
    assert failed == 0 and passed > 0, f"{failed} cocotb test(s) of {unit} failed"
    least = runner.MIN_VECTORS.get(unit, 100_000)
    assert totals([unit])[unit] >= least, f"fewer than {least:,} vectors checked"
