"""The long volumes through the driver: the Verilator system model on a socket (built once per
source change, about a minute) and 10,000 faulty frames on ``emu://``. ``make test-all``.

``tests/test_driver.py`` runs the same checks, smaller, on ``pysim://`` in ``make test``.
"""

import numpy as np
import pytest

from nibble.host.device.commands import lane_cfg
from nibble.host.device.driver import Device
from nibble.rtl.formats import Operand, OutputPath
from nibble.sim.stimuli import random_gemm
from tests.support import (
    chain_results,
    every_error_reply,
    expected,
    fault_run,
    run_random_gemms,
)

pytestmark = pytest.mark.long


def test_random_gemms_bit_exact_on_the_simulated_device(simdev):
    with Device.open(simdev) as dev:
        assert (dev.rows, dev.cols, dev.word_nibbles) == (2, 4, 8)
        run_random_gemms(dev, np.random.default_rng(11), 45, 40)


def test_large_gemm_and_full_utilization(simdev):
    """Dims that are multiples of the array: the engine is busy for the beats plus a
    fixed fill and drain."""
    rng = np.random.default_rng(3)
    gemm = random_gemm(rng, (Operand.UINT4, Operand.INT4), 64, 200, 32)
    lane = lane_cfg(OutputPath.RESCALE, m=50000, s=20, relu=1)
    with Device.open(simdev) as dev:
        got, stats = dev.matmul(gemm, lane)
    np.testing.assert_array_equal(got, expected(gemm, lane, None)[0])
    assert stats["beats"] == 64 * 200 * 32 // (2 * 4)
    assert stats["gemm_cycles"] - stats["beats"] < 40


def test_results_stay_on_the_device_for_the_next_gemm(simdev):
    with Device.open(simdev) as dev:
        chain_results(dev, np.random.default_rng(4))


def test_every_error_reply_reaches_the_api(simdev):
    big = random_gemm(np.random.default_rng(0), (Operand.UINT4, Operand.INT4), 64, 512, 64)
    every_error_reply(simdev, big)


def test_faults_on_the_emulator_never_corrupt_silently():
    """10,000 frames at 1e-3 per byte (flips, drops and duplicates, both directions)."""
    ops, exact, raised, faults = fault_run("emu://", 10_000, 1e-3, seed=1, timeout=0.05)
    assert exact + raised == ops and exact >= 0.95 * ops
    assert sum(faults.values()) > 100


def test_faults_on_the_simulated_device_never_corrupt_silently(simdev):
    ops, exact, raised, faults = fault_run(simdev, 1_000, 1e-3, seed=2, timeout=0.1)
    assert exact + raised == ops and exact >= 0.9 * ops
    assert sum(faults.values()) > 10
