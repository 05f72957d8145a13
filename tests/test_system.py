"""End to end through the driver: the Verilator system model on a socket, and emu://.

The model is built once (cached by source hash, about 30 s the first time) and served for
the whole module.
"""

import socket
import threading
import time

import numpy as np
import pytest

from nibble.gateware.protocol import GEMM_ARGS, READ_ARGS, WRITE_HEADER, Op
from nibble.host.device.commands import plan_gemm
from nibble.host.device.driver import (
    BadCrcError,
    BadLengthError,
    BusyError,
    Device,
    DeviceError,
    LinkTimeout,
    OutOfRangeError,
    UnknownOpError,
)
from nibble.host.device.faults import FaultyTransport
from nibble.host.device.packing import pack_fields
from nibble.host.golden.lanes import golden_acc, golden_lane
from nibble.host.golden.tiling import Gemm
from nibble.rtl.formats import GemmMode, MaskMode, Operand, OutputPath
from nibble.sim.stimuli import MODE_KINDS, lane_cfg, random_gemm


def random_lane(rng, path, phase, top):
    if path is OutputPath.RAW:
        return lane_cfg(OutputPath.RAW, phase=phase)
    if path is OutputPath.RESCALE:
        # M / 2^s maps the largest accumulator to about the top code
        s = max(0, int(np.ceil(np.log2(max(top, 1)))) + 12)
        return lane_cfg(OutputPath.RESCALE, phase=phase, m=int(rng.integers(1 << 15, 1 << 16)),
                        s=min(s, 63), relu=int(rng.integers(2)), out_signed=int(rng.integers(2)))
    exp = max(-3, int(np.log2(max(top, 1))) - 11)
    return lane_cfg(OutputPath.LOG4, phase=phase, exp=exp,
                    mask=MaskMode(int(rng.integers(3))))


def expected(gemm, lane, mask):
    acc = golden_acc(gemm, lane["phase"])
    values, absmax = golden_lane(acc, lane, mask)
    path = OutputPath(lane["path"])
    if path is OutputPath.LOG4:
        p0 = np.vectorize(lambda v: v[0], otypes=[np.int64])(values)
        p1 = np.vectorize(lambda v: v[1], otypes=[np.int64])(values)
        return (p0, p1), absmax
    if path is OutputPath.RESCALE and lane["rescale"]["out_signed"]:
        values = np.where(values >= 8, values - 16, values)
    return np.asarray(values, np.int64), absmax


def run_random_gemms(dev, rng, count, max_dim):
    for case in range(count):
        mode = list(GemmMode)[case % 3]
        path = list(OutputPath)[(case // 3) % 3]
        if path is OutputPath.RESCALE:
            mode = GemmMode.FORWARD          # the rescale unit takes forward accumulators
        kinds = MODE_KINDS[mode][int(rng.integers(len(MODE_KINDS[mode])))]
        shape = tuple(int(x) for x in rng.integers(1, max_dim + 1, 3))
        gemm = random_gemm(rng, kinds, *shape)
        phase = 1 if mode is GemmMode.BACKWARD_WEIGHT else 0
        top = int(np.abs(golden_acc(gemm, phase)).max())
        lane = random_lane(rng, path, phase, top)
        mask = rng.integers(0, 16, (shape[0], shape[2]))
        got, stats = dev.matmul(gemm, lane, mask=mask)
        want, absmax = expected(gemm, lane, mask)
        if path is OutputPath.LOG4:
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        else:
            np.testing.assert_array_equal(got, want)
        assert stats["absmax"] == absmax, (case, mode, path)


def test_random_gemms_bit_exact_on_the_simulated_device(simdev):
    with Device.open(simdev) as dev:
        assert (dev.rows, dev.cols, dev.word_nibbles) == (2, 4, 8)
        run_random_gemms(dev, np.random.default_rng(11), 45, 40)


def test_random_gemms_bit_exact_on_the_emulator():
    with Device.open("emu://") as dev:
        run_random_gemms(dev, np.random.default_rng(12), 45, 60)


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
    """A forward output (out^T) is the next forward GEMM's A operand as stored, and a LOG4
    output (code pairs) is a backward GEMM's FP4 operand with ``a_pair``."""
    rng = np.random.default_rng(4)
    nib = 8
    with Device.open(simdev) as dev:
        x = random_gemm(rng, (Operand.UINT4, Operand.INT4), 6, 20, 10)
        lane1 = lane_cfg(OutputPath.RESCALE, m=40000, s=19, relu=1)
        plan1 = plan_gemm(x, lane1, nib, 2, 4)
        for buf, raw in plan1.uploads:
            dev.upload(buf, raw)
        dev.gemm(plan1.cfg)
        h = expected(x, lane1, None)[0]                     # 6 x 10 UINT4
        w2 = rng.integers(-8, 8, (10, 7))
        g2 = Gemm(h, w2, Operand.UINT4, Operand.INT4)
        lane2 = lane_cfg(OutputPath.RAW)
        plan2 = plan_gemm(g2, lane2, nib, 2, 4, base=plan1.out.end + 5)
        # use layer 1's output buffer in place as A; upload only B
        cfg = dict(plan2.cfg, a_addr=plan1.out.addr, a_stride=plan1.out.stride)
        dev.upload(plan2.b, dict(plan2.uploads)[plan2.b])
        dev.gemm(cfg)
        got = dev.download(plan2.out, 32).T
        np.testing.assert_array_equal(got, golden_acc(g2, 0))

        dy = random_gemm(rng, (Operand.FP4, Operand.INT4), 6, 9, 5)
        lane3 = lane_cfg(OutputPath.LOG4, exp=2)
        plan3 = plan_gemm(dy, lane3, nib, 2, 4, base=plan2.out.end + 3)
        for buf, raw in plan3.uploads:
            dev.upload(buf, raw)
        dev.gemm(plan3.cfg)
        (p0, p1), _ = expected(dy, lane3, None)
        for sel, codes in ((0, p0), (1, p1)):
            wn = rng.integers(-8, 8, (5, 3))
            g4 = Gemm(codes, wn, Operand.FP4, Operand.INT4)
            plan4 = plan_gemm(g4, lane_cfg(OutputPath.RAW, phase=sel), nib, 2, 4,
                              base=plan3.out.end + 2)
            cfg = dict(plan4.cfg, a_addr=plan3.out.addr, a_stride=plan3.out.stride,
                       a_pair=1, a_sel=sel)
            dev.upload(plan4.b, dict(plan4.uploads)[plan4.b])
            dev.gemm(cfg)
            got = dev.download(plan4.out, 32).T
            np.testing.assert_array_equal(got, golden_acc(g4, sel))


@pytest.mark.parametrize("where", ["emu", "sim"])
def test_the_three_training_gemms(where, simdev):
    """forward, backward_data and backward_weight against nibble.host.golden.gemm's golden GEMMs."""
    from nibble.host.golden.gemm import gemm_backward_data, gemm_backward_weight, gemm_forward
    rng = np.random.default_rng(21)
    x = rng.integers(0, 16, (13, 27)).astype(np.uint8)
    w = rng.integers(-7, 8, (11, 27))
    dy = rng.integers(0, 16, (13, 11)).astype(np.uint8)
    with Device.open("emu://" if where == "emu" else simdev) as dev:
        y, _ = dev.forward(x, w, lane_cfg(OutputPath.RAW))
        np.testing.assert_array_equal(y, gemm_forward(x, w))
        dx, _ = dev.backward_data(dy, w, lane_cfg(OutputPath.RAW))
        np.testing.assert_array_equal(dx, gemm_backward_data(dy, 0, w))
        dw, _ = dev.backward_weight(dy, x)
        np.testing.assert_array_equal(dw, gemm_backward_weight(dy, 1, x))


def test_every_error_reply_reaches_the_api(simdev):
    with Device.open(simdev, timeout=0.5) as dev:
        with pytest.raises(UnknownOpError, match="does not know opcode 0x55"):
            dev.request(0x55)
        with pytest.raises(BadLengthError, match="length of a READ"):
            dev.request(Op.READ, b"\x00")
        with pytest.raises(OutOfRangeError, match="out of range"):
            dev.request(Op.READ, pack_fields(READ_ARGS, {"addr": dev.mem_words - 1,
                                                         "words": 2}))
        with pytest.raises(OutOfRangeError):          # the driver's own check, same class
            dev.read(dev.mem_words, 1)
        rng = np.random.default_rng(0)
        big = random_gemm(rng, (Operand.UINT4, Operand.INT4), 64, 512, 64)
        plan = plan_gemm(big, lane_cfg(OutputPath.RAW), 8, 2, 4)
        with pytest.raises(OutOfRangeError, match="GEMM is out of range"):
            dev.gemm(dict(plan.cfg, l=5000))
        for buf, raw in plan.uploads:
            dev.upload(buf, raw)
        dev.gemm(plan.cfg, wait=False)
        with pytest.raises(BusyError, match="busy with a GEMM"):
            dev.request(Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 0}) + bytes(4),
                        wait_busy=False)
        assert dev.stats()["busy"] == 1
        dev.write(0, bytes(4))                         # waits the GEMM out
        assert dev.wait()["busy"] == 0
        with pytest.raises(BadLengthError):
            dev.request(Op.GEMM, pack_fields(GEMM_ARGS, plan.cfg)[:-1])

    # every copy corrupted: BAD_CRC replies until the driver gives up
    class Corrupt(FaultyTransport):
        def write(self, data):
            data = bytearray(data)
            data[3] ^= 0x10
            return self.inner.write(bytes(data))

    with Device.open(simdev, retries=3) as dev:
        dev.t = Corrupt(dev.t, 0)
        with pytest.raises(BadCrcError, match="corrupted"):
            dev.ping(b"x")


def test_unreachable_devices_fail_with_one_clear_error():
    with pytest.raises(DeviceError, match="cannot open /dev/nibble-nonexistent"):
        Device.open("/dev/nibble-nonexistent")
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


def fault_run(url, frames, rate, seed, timeout):
    """Random operations through a faulty link until ``frames`` requests were sent;
    returns (operations, exact, raised, faults)."""
    rng = np.random.default_rng(seed)
    faulty = {}

    def wrap(t):
        faulty["t"] = FaultyTransport(t, rate, seed=seed)
        return faulty["t"]

    dev = None
    while dev is None:
        try:
            dev = Device.open(url, timeout=timeout, retries=12, wrap=wrap)
        except DeviceError:
            continue
    ops = exact = raised = 0
    while dev.frames_sent < frames:
        ops += 1
        try:
            if ops % 3:
                words = int(rng.integers(1, 200))
                addr = int(rng.integers(0, 4096))
                data = rng.integers(0, 256, words * dev.word_bytes, dtype=np.uint8).tobytes()
                dev.write(addr, data)
                back = dev.read(addr, words)
                assert back == data, "silent corruption in a WRITE/READ round trip"
            else:
                kinds = MODE_KINDS[GemmMode.FORWARD][0]
                gemm = random_gemm(rng, kinds, *[int(x) for x in rng.integers(1, 17, 3)])
                lane = lane_cfg(OutputPath.RAW)
                got, _ = dev.matmul(gemm, lane, base=8192)
                np.testing.assert_array_equal(got, golden_acc(gemm, 0))
            exact += 1
        except DeviceError:
            raised += 1
    dev.close()
    return ops, exact, raised, faulty["t"].faults


def test_faults_on_the_emulator_never_corrupt_silently():
    """10,000 frames at 1e-3 per byte (flips, drops and duplicates, both directions)."""
    ops, exact, raised, faults = fault_run("emu://", 10_000, 1e-3, seed=1, timeout=0.05)
    assert exact + raised == ops and exact >= 0.95 * ops
    assert sum(faults.values()) > 100


def test_faults_on_the_simulated_device_never_corrupt_silently(simdev):
    ops, exact, raised, faults = fault_run(simdev, 1_000, 1e-3, seed=2, timeout=0.1)
    assert exact + raised == ops and exact >= 0.9 * ops
    assert sum(faults.values()) > 10
