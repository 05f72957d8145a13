"""The driver on ``emu://`` (the golden model) and ``pysim://`` (the device's RTL in Amaranth's
simulator): GEMMs bit for bit, results chained on the device, every error reply, BUSY, and
retries through a faulty link. The Verilator system model repeats these at volume
(``tests/test_system.py``, ``make test-all``)."""

import socket
import threading
import time

import numpy as np
import pytest

from nibble.gateware.protocol import Op
from nibble.host.device.commands import lane_cfg
from nibble.host.device.driver import (
    MAX_IN_FLIGHT,
    Device,
    DeviceError,
    LinkTimeout,
)
from nibble.rtl.formats import Operand, OutputPath
from nibble.sim.stimuli import random_gemm
from tests.support import chain_results, every_error_reply, fault_run, run_random_gemms

PYSIM = "pysim://?words=4096"


def test_random_gemms_on_the_emulator():
    with Device.open("emu://") as dev:
        run_random_gemms(dev, np.random.default_rng(12), 45, 60)


def test_random_gemms_on_the_rtl():
    """Every mode and path on the device's RTL, through the driver."""
    with Device.open(PYSIM) as dev:
        assert (dev.rows, dev.cols, dev.word_nibbles, dev.mem_words) == (2, 4, 8, 4096)
        run_random_gemms(dev, np.random.default_rng(13), 9, 12)


def test_random_gemms_on_the_rtl_in_spram():
    """The iCEBreaker's configuration behind the driver (a 1x8 array, six of its PEs DSP
    blocks, tensor memory in two SPRAM banks): every mode and path bit for bit, the
    buffers laid out from just below the banks' boundary, so that streams collide in either
    bank and some buffers straddle it."""
    with Device.open("pysim://?rows=1&cols=8&dsp_pes=6&memory=spram&words=32768"
                     "&vec_ops=1") as dev:
        run_random_gemms(dev, np.random.default_rng(14), 9, 12, base=16384 - 24)


@pytest.mark.parametrize("url", ["emu://", PYSIM])
def test_the_three_training_gemms(url):
    """forward, backward_data and backward_weight against host.gemm's golden GEMMs."""
    from nibble.host.golden.gemm import gemm_backward_data, gemm_backward_weight, gemm_forward
    rng = np.random.default_rng(21)
    x = rng.integers(0, 16, (13, 27)).astype(np.uint8)
    w = rng.integers(-7, 8, (11, 27))
    dy = rng.integers(0, 16, (13, 11)).astype(np.uint8)
    with Device.open(url) as dev:
        y, _ = dev.forward(x, w, lane_cfg(OutputPath.RAW))
        np.testing.assert_array_equal(y, gemm_forward(x, w))
        dx, _ = dev.backward_data(dy, w, lane_cfg(OutputPath.RAW))
        np.testing.assert_array_equal(dx, gemm_backward_data(dy, 0, w))
        dw, _ = dev.backward_weight(dy, x)
        np.testing.assert_array_equal(dw, gemm_backward_weight(dy, 1, x))


def test_results_stay_on_the_device_for_the_next_gemm():
    with Device.open(PYSIM) as dev:
        chain_results(dev, np.random.default_rng(4))


def test_every_error_reply_reaches_the_api():
    big = random_gemm(np.random.default_rng(0), (Operand.UINT4, Operand.INT4), 16, 512, 8)
    every_error_reply(PYSIM, big)


def test_unreachable_devices_fail_with_one_clear_error():
    with pytest.raises(DeviceError, match="cannot open /dev/nibble-nonexistent"):
        Device.open("/dev/nibble-nonexistent")
    with pytest.raises(DeviceError, match=r"bad device URL pysim://.*unknown parameter"):
        Device.open("pysim://?wrods=12")
    # a port that accepts but never answers
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept():
        conn, _ = server.accept()
        stop.wait(10)
        conn.close()

    threading.Thread(target=accept, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(LinkTimeout, match="no answer from socket://"):
        Device.open(f"socket://127.0.0.1:{port}", timeout=0.1, retries=2)
    stop.set()
    server.close()
    assert time.monotonic() - t0 < 5


def test_faults_on_the_emulator_never_corrupt_silently():
    """1,000 frames at 1e-3 per byte (flips, drops and duplicates, both directions)."""
    ops, exact, raised, faults = fault_run("emu://", 1_000, 1e-3, seed=1, timeout=0.05)
    assert exact + raised == ops and exact >= 0.95 * ops
    assert sum(faults.values()) > 10


def test_faults_on_the_rtl_never_corrupt_silently():
    """The same through the device's RTL: its CRC, resynchronization, watchdog and
    exactly-once rules against the driver's retries."""
    ops, exact, raised, faults = fault_run(PYSIM, 100, 1e-3, seed=3, timeout=0.05,
                                           addrs=2048, base=2048, max_words=32)
    assert exact + raised == ops and exact >= 0.9 * ops
    assert sum(faults.values()) > 10


def test_long_frames_on_a_noisy_link_are_halved_until_they_pass(monkeypatch):
    """At 4e-3 damaged bytes a 1 KB frame gets through one time in 60: the driver halves a
    WRITE or READ that failed every retry, so 8 KB still arrive exact (without halving they
    do not); a device that never answers is not split (one LinkTimeout, at once)."""
    from nibble.host.device import driver
    from nibble.host.device.faults import FaultyTransport

    data = np.random.default_rng(0).integers(0, 256, 8192, np.uint8).tobytes()

    def roundtrip():
        with Device.open("emu://", wrap=lambda t: FaultyTransport(t, rate=4e-3, seed=2)) as d:
            d.write(100, data)
            return d.read(100, len(data) // d.word_bytes)

    assert roundtrip() == data
    monkeypatch.setattr(driver, "MIN_SPLIT_WORDS", 1 << 20)
    with pytest.raises((driver.BadCrcError, driver.BadLengthError, LinkTimeout)):
        roundtrip()

    class Silent:
        instant = True

        def write(self, data):
            return len(data)

        def read(self, size=1):
            return b""

        def close(self):
            pass

    with Device.open("emu://") as dev:
        dev.t = Silent()
        frames = dev.frames_sent
        with pytest.raises(LinkTimeout) as e:
            dev.write(0, bytes(1024))
        assert not e.value.heard and dev.frames_sent - frames == dev.retries + 1


def test_wire_bytes_by_command():
    """``wire_by_op`` splits the link's bytes (requests and replies) by command, and adds
    up to the totals."""
    with Device.open("emu://") as dev:
        start = dict(dev.wire_by_op)
        dev.write(0, bytes(dev.word_bytes * 4))
        dev.ping(b"xy")
        dev.stats()
        new = {k: v - start.get(k, 0) for k, v in dev.wire_by_op.items()}
        assert new["WRITE"] > 4 * dev.word_bytes and new["PING"] > 2 and new["STATS"] > 0
        assert sum(dev.wire_by_op.values()) == dev.wire_sent + dev.wire_received


def test_an_operation_the_unit_lacks_runs_on_the_host_bit_for_bit():
    """On a device whose element-wise unit has TRANSPOSE alone (INFO vec_ops 1), UPDATE and
    REQUANT run in the driver (read back, the unit's arithmetic, written back): the same
    memory and SAWB sums as a device that runs them; TRANSPOSE still goes to the device."""
    from nibble.host.device.driver import Device
    from nibble.rtl.formats import VecOp
    from tests.support import random_memory, random_vector_cfgs
    rng = np.random.default_rng(3)
    words, mem = 256, random_memory(rng, 256, 2, 4)
    cfgs = random_vector_cfgs(rng, 2, 4, words)
    runs = []
    for url in (f"emu://?words={words}", f"emu://?words={words}&vec_ops=1"):
        with Device.open(url) as dev:
            dev.write(0, mem)
            sums = [(s["w_sum_abs"], s["w_sum_sq"]) for s, c in
                    ((dev.vector(c), c) for c in cfgs) if c["op"] == VecOp.UPDATE]
            runs.append((dev.read(0, words), sums, dev.host_vectors, dev.vec_ops))
    (mem0, sums0, host0, ops0), (mem1, sums1, host1, ops1) = runs
    assert mem0 == mem1 and mem0 != bytes(mem) and sums0 == sums1
    assert (ops0, ops1) == (7, 1)
    assert host0 == 0 and host1 == sum(c["op"] != VecOp.TRANSPOSE for c in cfgs) == 4


class _DropReply:
    """A transport that loses the ``n``-th reply frame the device sends (counting FLAG
    pairs), whole."""

    def __init__(self, inner, n):
        self.inner, self.n, self.instant = inner, n, True
        self.frames = 0

    def write(self, data):
        return self.inner.write(data)

    def read(self, size=1):
        data = self.inner.read(size)
        out = bytearray()
        for frame in [f for f in data.split(b"\x7e") if f]:
            if self.frames != self.n:
                out += b"\x7e" + frame + b"\x7e"
            self.frames += 1
        return bytes(out)

    def close(self):
        self.inner.close()


def test_posted_requests_are_answered_each_its_own():
    """Requests sent without waiting (``post``) are each answered with their own reply,
    whatever order the host takes them in; a trace records the sends and the waits."""
    with Device.open("emu://") as dev:
        trace = dev.start_trace()
        posted = [dev.post(Op.PING, bytes([k]) * (k + 1)) for k in range(8)]
        assert [p.result() for p in reversed(posted)] == [bytes([k]) * (k + 1)
                                                          for k in reversed(range(8))]
        assert [kind for kind, *_ in trace] == ["send"] * 8 + ["wait"] * 8
        assert all(p.reply_wire > 6 for p in posted)
        assert sum(dev.wire_by_op.values()) == dev.wire_sent + dev.wire_received
        # more than MAX_IN_FLIGHT: the oldest is waited for first
        many = [dev.post(Op.PING, b"x") for _ in range(MAX_IN_FLIGHT + 5)]
        assert all(p.result() == b"x" for p in many)


def test_a_reply_lost_behind_later_requests_is_one_clear_error():
    """The device carries a posted request out once: its lost reply cannot be asked for
    again behind later requests, so the driver says so; the newest request alone is
    resent as before. On a link that may lose bytes (a wrapped transport says nothing of
    it) the driver sends a request only once the one before is answered, and resends."""
    with Device.open("emu://", timeout=0.01, wrap=lambda t: _DropReply(t, 1)) as dev:
        assert not dev.pipeline
        dev.pipeline = True
        first, second = dev.post(Op.PING, b"a"), dev.post(Op.PING, b"b")
        with pytest.raises(LinkTimeout, match="cannot be resent behind them"):
            first.result()
        assert second.result() == b"b"
    with Device.open("emu://", timeout=0.01, wrap=lambda t: _DropReply(t, 1)) as dev:
        first, second = dev.post(Op.PING, b"a"), dev.post(Op.PING, b"b")
        assert (first.result(), second.result(), dev.resends) == (b"a", b"b", 1)
    with Device.open("emu://") as dev:
        assert dev.pipeline
