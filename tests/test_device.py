"""The whole device (framing, decoder, memory, engine) in the Amaranth simulator: its reply
bytes equal the emulator's, request for request."""

import numpy as np
from amaranth.sim import Simulator

from nibble.gateware.device import Device
from nibble.gateware.protocol import (
    ESC,
    FLAG,
    GEMM_ARGS,
    MAX_PAYLOAD,
    READ_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VEC_ARGS,
    WRITE_HEADER,
    Op,
    Status,
)
from nibble.host.device.commands import lane_cfg, plan_gemm, vector_args
from nibble.host.device.layout import low16
from nibble.host.device.link import Frame, FrameDecoder
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.rtl.formats import Operand, OutputPath, VecOp
from nibble.sim.stimuli import random_gemm
from tests.support import comparable, emulate, frame, run_device

ROWS, COLS, WORDS = 2, 4, 256       # the defaults of run_device and emulate


def test_commands_match_the_emulator():
    rng = np.random.default_rng(1)
    data = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
    data = data[:10] + bytes([FLAG, ESC]) + data[12:]          # stuffing both ways
    wire = [
        frame(1, Op.PING, b"hello" + bytes([FLAG, ESC, 0])),
        frame(2, Op.INFO),
        frame(3, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 5}) + data),
        frame(4, Op.READ, pack_fields(READ_ARGS, {"addr": 4, "words": 18})),
        frame(5, Op.STATS),
        # errors
        frame(6, 0x55),
        frame(7, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 5}) + data[:5]),
        frame(8, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": WORDS - 1}) + data[:8]),
        frame(9, Op.READ, pack_fields(READ_ARGS, {"addr": 0, "words": 0})),
        frame(10, Op.READ, pack_fields(READ_ARGS, {"addr": WORDS - 2, "words": 3})),
        frame(11, Op.INFO, b"x"),
        frame(12, Op.GEMM, b"short"),
        # a region's sums: a device with SDRAM only (tests/test_device_dma.py)
        frame(13, Op.STATS, pack_fields(STATS_ARGS, {"addr": 5, "count": 37})),
        # a retried WRITE (same seq and op) is answered, not redone
        frame(14, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 0}) + data[:8]),
        frame(14, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 100}) + data[:8]),
        frame(15, Op.READ, pack_fields(READ_ARGS, {"addr": 100, "words": 2})),
    ]
    bad = bytearray(frame(16, Op.PING, b"abc"))
    bad[3] ^= 0x01
    wire.append(bytes(bad))                                    # BAD_CRC
    wire.append(b"\x01\x02" + bytes([FLAG]))                   # garbage: dropped silently
    wire.append(frame(17, Op.PING, bytes(range(40))))
    # low16: the low 2 of every 4 bytes, up to twice the words of a READ without it
    wire += [frame(18, Op.READ, pack_fields(READ_ARGS, {"addr": 4, "words": 18, "low16": 1})),
             frame(19, Op.READ, pack_fields(READ_ARGS, {"addr": 0, "words": 257, "low16": 1})),
             frame(20, Op.READ, pack_fields(READ_ARGS, {"addr": 0, "words": 257})),
             frame(21, Op.READ, pack_fields(READ_ARGS, {"addr": 0, "words": 513, "low16": 1}))]
    want = FrameDecoder().feed(emulate(wire))
    replies = FrameDecoder().feed(run_device(wire, replies=len(wire) - 1))
    assert comparable(replies) == comparable(want)
    ops = [r.op for r in replies]
    assert ops[5:13] == [Status.UNKNOWN_OP, Status.BAD_LENGTH, Status.OUT_OF_RANGE,
                         Status.BAD_LENGTH, Status.OUT_OF_RANGE, Status.BAD_LENGTH,
                         Status.BAD_LENGTH, Status.BAD_LENGTH]
    assert replies[15].payload == bytes(8)          # the retry did not write at 100
    assert replies[16].op == Status.BAD_CRC and replies[16].seq == 16
    stats = unpack_fields(STATS_LAYOUT, replies[4].payload)
    assert stats["cycles"] > 0              # the free-running counter, sampled at the STATS
    assert replies[18].op == Op.READ and replies[18].payload == low16(replies[3].payload)
    assert len(replies[18].payload) == 18 * 4 // 2
    assert [r.op for r in replies[19:22]] == [Status.OUT_OF_RANGE, Status.BAD_LENGTH,
                                              Status.BAD_LENGTH]


def test_too_long_frame_and_watchdog():
    long = bytes([FLAG]) + bytes(MAX_PAYLOAD + 20) + bytes([FLAG])
    half = frame(2, Op.PING, b"lost")[:-3]
    wire = [long, half, 3000, frame(3, Op.PING, b"ok")]
    got = run_device(wire, replies=2, timeout=1000)
    replies = FrameDecoder().feed(got)
    assert replies[0].op == Status.BAD_LENGTH
    assert replies[1] == Frame(3, Op.PING, b"ok")


def test_gemm_through_the_device():
    rng = np.random.default_rng(2)
    gemm = random_gemm(rng, (Operand.UINT4, Operand.INT4), 5, 9, 6)
    lane = lane_cfg(OutputPath.RESCALE, m=45000, s=17, relu=1)
    plan = plan_gemm(gemm, lane, 8, ROWS, COLS, base=3)
    wire = [frame(1, Op.INFO)]
    seq = 2
    for buf, raw in plan.uploads:
        wire.append(frame(seq, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": buf.addr}) + raw))
        seq += 1
    wire.append(frame(seq, Op.GEMM, pack_fields(GEMM_ARGS, plan.cfg)))
    wire.append(frame(seq + 1, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 0}) + bytes(4)))
    wire.append(2000)
    out = plan.out
    wire.append(frame(seq + 2, Op.READ, pack_fields(READ_ARGS, {"addr": out.addr,
                                                               "words": out.words})))
    got = FrameDecoder().feed(run_device(wire, replies=len(wire) - 1))
    want = FrameDecoder().feed(emulate([w for w in wire if not isinstance(w, int)]))
    assert got[-3].op == Op.GEMM
    assert got[-2].op == Status.BUSY           # the WRITE right after the GEMM
    assert got[-1] == want[-1]


def test_vector_through_the_device():
    """VECTOR commands (UPDATE, REQUANT, TRANSPOSE) through the decoder: replies, the SAWB
    sums in STATS, BUSY while the unit runs, a retried UPDATE not redone, a bad command."""
    rng = np.random.default_rng(3)
    data = bytes(rng.integers(0, 256, 4 * 36, dtype=np.uint8))
    upd = pack_fields(VEC_ARGS, vector_args(VecOp.UPDATE, 3, 4, (0, 4), (12, 4), 24, mu=58982,
                                        m=40000, s=9))
    wire = [
        frame(1, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 0}) + data),
        frame(2, Op.VECTOR, upd),
        frame(2, Op.VECTOR, upd),                                  # a retry: not redone
        2000,
        frame(4, Op.STATS),
        frame(5, Op.VECTOR, pack_fields(VEC_ARGS, vector_args(VecOp.REQUANT, 3, 4, (12, 4),
                                                          (40, 1), m=50000, s=30))),
        100,
        frame(6, Op.VECTOR, pack_fields(VEC_ARGS, vector_args(VecOp.TRANSPOSE, 3, 4, (40, 1),
                                                          (44, 1)))),
        100,
        frame(7, Op.VECTOR, pack_fields(VEC_ARGS, vector_args(VecOp.TRANSPOSE, 3, 4, (40, 1),
                                                          (WORDS - 2, 1)))),
        frame(8, Op.VECTOR, b"short"),
        frame(9, Op.READ, pack_fields(READ_ARGS, {"addr": 0, "words": 48})),
        frame(10, Op.VECTOR, pack_fields(VEC_ARGS, vector_args(VecOp.TRANSPOSE, 16, 8,
                                                           (100, 1), (120, 2)))),
        frame(11, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 60}) + bytes(4)),  # BUSY
        2000,
        frame(12, Op.STATS),
    ]
    got = FrameDecoder().feed(run_device(wire, replies=len(wire) - 4))
    want = FrameDecoder().feed(emulate([w for w in wire if not isinstance(w, int)]))
    assert [f.op for f in got] == [Op.WRITE, Op.VECTOR, Op.VECTOR, Op.STATS, Op.VECTOR,
                                   Op.VECTOR, Status.OUT_OF_RANGE, Status.BAD_LENGTH,
                                   Op.READ, Op.VECTOR, Status.BUSY, Op.STATS]
    skip = {10}                                      # the emulator is never busy
    assert [c for i, c in enumerate(comparable(got)) if i not in skip] == \
        [c for i, c in enumerate(comparable(want)) if i not in skip]
    stats = unpack_fields(STATS_LAYOUT, got[3].payload)
    assert stats["w_sum_sq"] > 0 and stats["vec_cycles"] == 2 * 12 + 11


def test_listening_only_between_frames():
    """``listening`` (and so ``idle``, which lets the system harness sleep) is low from a
    frame's first byte until the last byte of its reply is out: through parsing, dispatch,
    a unit's check and the reply. (The harness once slept with a GEMM's check pending.)"""
    rng = np.random.default_rng(6)
    gemm = random_gemm(rng, (Operand.UINT4, Operand.INT4), 4, 8, 4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW), 8, ROWS, COLS, base=3)
    frames = [frame(1, Op.INFO), frame(2, Op.GEMM, pack_fields(GEMM_ARGS, plan.cfg)),
              frame(3, Op.STATS), frame(4, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 0})
                                             + bytes(8))]
    dut = Device(ROWS, COLS, WORDS, clk_hz=1_000_000)

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        for wire in frames:
            for byte in wire:
                ctx.set(dut.i.payload, byte)
                ctx.set(dut.i.valid, 1)
                await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            dec, seen, cycles = FrameDecoder(), [], 0
            while not seen:
                *_, listening, valid, byte = await ctx.tick().sample(
                    dut.listening, dut.o.valid, dut.o.payload)
                assert not listening, (wire[:4].hex(), cycles)
                if valid:
                    seen = dec.feed(bytes([byte]))
                cycles += 1
            for _ in range(4):                  # then it listens again
                await ctx.tick()
            assert ctx.get(dut.listening)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_bench_system_measures_the_element_wise_unit():
    """bench-system's element-wise figures on the RTL device (pysim://): UPDATE two cycles
    a weight (this device's 8-nibble words hold one master: V and W two writes), REQUANT
    and TRANSPOSE one an element, each plus its pipeline's fill."""
    from nibble.host.bench.system import measure_vector
    from nibble.host.device.driver import Device as Driver
    with Driver.open("pysim://?words=4096") as dev:
        runs = measure_vector(dev, k=24, n=16, batch=8)
    assert [r["cycles"] for r in runs] == [2 * 384 + 11, 384 + 9, 192 + 6]
    with Driver.open("pysim://?words=256") as dev:
        assert measure_vector(dev, k=24, n=16, batch=8) is None      # does not fit
