"""What the tests share: stream drivers, memory benches, device runs, reply comparison.

Every expectation here comes from the golden model (``nibble.host.golden``) or the emulator
(``nibble.host.device.emu``); nothing is derived from the RTL under test.
"""

import numpy as np
import pytest
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from nibble.gateware.device import Device
from nibble.gateware.protocol import (
    GEMM_ARGS,
    READ_ARGS,
    STATS_LAYOUT,
    WRITE_HEADER,
    Op,
)
from nibble.host.device.commands import lane_cfg, plan_gemm, vector_args
from nibble.host.device.driver import (
    BadCrcError,
    BadLengthError,
    BusyError,
    DeviceError,
    OutOfRangeError,
    UnknownOpError,
)
from nibble.host.device.driver import Device as Driver
from nibble.host.device.emu import Emulator
from nibble.host.device.faults import FaultyTransport
from nibble.host.device.layout import row_words
from nibble.host.device.link import Frame, FrameDecoder, encode_frame
from nibble.host.device.packing import pack_fields, to_int, unpack_fields
from nibble.host.golden.lanes import golden_acc
from nibble.host.golden.tiling import Gemm, assemble, beats, lane_streams
from nibble.rtl.formats import GemmMode, MaskMode, Operand, OutputPath, VecOp, word_nibbles
from nibble.rtl.memory import BlockRAM, TensorBus, read_ports
from nibble.sim.stimuli import MODE_KINDS, lane_value, random_gemm

# -- streams in the Amaranth simulator ----------------------------------------------------------


async def put(ctx, stream, payload, rng, p_bubble):
    """Offer ``payload`` on ``stream`` after random bubbles; returns once it is taken."""
    while rng.random() < p_bubble:
        await ctx.tick()
    ctx.set(stream.payload, payload)
    ctx.set(stream.valid, 1)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def get(ctx, stream, rng, p_stall):
    """Take one payload from ``stream`` after random stalls."""
    while rng.random() < p_stall:
        await ctx.tick()
    ctx.set(stream.ready, 1)
    (payload,) = await ctx.tick().sample(stream.payload).until(stream.valid)
    ctx.set(stream.ready, 0)
    return payload


def run_stream_unit(dut, cfg, inputs, seed=0, p_bubble=0.2, p_stall=0.3):
    """Push ``inputs`` through a unit with ``cfg``, ``i`` and ``o`` streams; its outputs."""
    rng = np.random.default_rng(seed)
    out = []

    async def feed(ctx):
        ctx.set(dut.cfg, cfg)
        for x in inputs:
            await put(ctx, dut.i, x, rng, p_bubble)

    async def collect(ctx):
        for _ in inputs:
            out.append(await get(ctx, dut.o, rng, p_stall))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(feed, background=True)
    sim.add_testbench(collect)
    sim.run()
    return out


def run_datapath(dut, gemm, lane, mask_matrix=None, seed=0, p_bubble=0.2, p_stall=0.3,
                 clear=True):
    """Run one GEMM through ``dut`` (a Datapath); returns (M x N results, (absmax,
    clip_sum), cycles)."""
    R, C = dut.rows, dut.cols
    rng = np.random.default_rng(seed)
    path = OutputPath(lane["path"])
    counts = [len(s) for s in lane_streams(gemm, R, C, np.zeros(gemm.shape[::2], int))]
    masks = None
    if path is OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        masks = lane_streams(gemm, R, C, mask_matrix)
    results = [[] for _ in range(R)]
    cycles = [0]
    absmax = [0]

    async def setup_and_feed(ctx):
        ctx.set(dut.cfg, {"operands": gemm.operands, "lane": lane})
        if clear:
            ctx.set(dut.clear, 1)
            await ctx.tick()
            ctx.set(dut.clear, 0)
        for a, b, last in beats(gemm, R, C):
            await put(ctx, dut.beat, {"a": [int(x) for x in a], "b": [int(x) for x in b],
                                      "last": int(last)}, rng, p_bubble)

    def feeder(g):
        async def proc(ctx):
            for code in masks[g]:
                await put(ctx, dut.mask[g], int(code), rng, p_bubble / 2)
        return proc

    def collector(g):
        async def proc(ctx):
            for _ in range(counts[g]):
                payload = await get(ctx, dut.out[g], rng, p_stall)
                results[g].append(lane_value(payload, path))
        return proc

    async def timer(ctx):
        while any(len(results[g]) < counts[g] for g in range(R)):
            await ctx.tick()
            cycles[0] += 1
        for _ in range(8):          # the absmax tree's latency
            await ctx.tick()
        absmax[0] = (ctx.get(dut.absmax), ctx.get(dut.clip_sum))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(setup_and_feed)
    sim.add_testbench(timer)
    for g in range(R):
        sim.add_testbench(collector(g), background=True)
        if masks is not None:
            sim.add_testbench(feeder(g), background=True)
    sim.run()
    return assemble(gemm, R, C, results), absmax[0], cycles[0]


# -- units on tensor memory -----------------------------------------------------------------


class FlakyGrants(wiring.Component):
    """Between a unit's bus and a memory: grants each request only on some cycles (a 16-bit
    LFSR per port, about ``1 - 2^-bits`` of the cycles), as a banked or shared memory does.
    A request that is not granted does not reach the memory."""

    def __init__(self, signature, seed=1, bits=2):
        self.seed, self.bits = seed, bits
        super().__init__({"unit": In(signature), "mem": Out(signature)})

    def elaborate(self, platform):
        m = Module()
        unit, mem = self.unit, self.mem
        pairs = [*zip(read_ports(unit), read_ports(mem), strict=True), (unit.wr, mem.wr)]
        m.d.comb += mem.wr.data.eq(unit.wr.data)
        for k, (u, p) in enumerate(pairs):
            lfsr = Signal(16, init=(self.seed * 40503 + k * 9973) & 0xFFFF or 1)
            m.d.sync += lfsr.eq((lfsr << 1) | (lfsr[15] ^ lfsr[14] ^ lfsr[12] ^ lfsr[3]))
            grant = lfsr[:self.bits].any()
            m.d.comb += [p.addr.eq(u.addr), p.en.eq(Mux(grant, u.en, 0)),
                         u.ready.eq(grant & p.ready)]
        for u, p in pairs[:-1]:
            m.d.comb += u.data.eq(p.data)            # a read port's word
        return m


class MemoryBench(wiring.Component):
    """A unit (with a ``bus``) on block RAM, optionally through :class:`FlakyGrants`."""

    def __init__(self, unit, words, flaky=None):
        self.unit, self.flaky = unit, flaky
        self.mem = BlockRAM(words, unit.nib)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.mem = self.mem
        if self.flaky is None:
            wiring.connect(m, self.unit.bus, self.mem.bus)
        else:
            sig = TensorBus.Signature(addr_width=self.unit.aw, nibbles=self.unit.nib)
            m.submodules.flaky = flaky = FlakyGrants(sig, seed=self.flaky)
            wiring.connect(m, self.unit.bus, flaky.unit)
            wiring.connect(m, flaky.mem, self.mem.bus)
        return m


def preload(ctx, ram, mem_bytes):
    """Fill every copy of a BlockRAM with ``mem_bytes`` (from a testbench)."""
    wb = ram.nibbles // 2
    for addr in range(ram.words):
        word = int.from_bytes(mem_bytes[addr * wb:(addr + 1) * wb], "little")
        if word:
            ram.poke(ctx, addr, word)


def dump(ctx, ram):
    """The bytes of a BlockRAM (its first copy; the copies are written together)."""
    wb = ram.nibbles // 2
    return b"".join(ram.peek(ctx, addr).to_bytes(wb, "little") for addr in range(ram.words))


def run_commands(unit, layout, words, mem_bytes, cfgs, results, flaky=None):
    """Run commands (values of ``layout``) on ``unit`` (a GemmEngine or VectorUnit) over a
    memory holding ``mem_bytes``; ``results(ctx, ok)`` reads each one's outcome. Returns
    (memory bytes after, [outcome])."""
    bench = MemoryBench(unit, words, flaky)
    out, got = bytearray(mem_bytes), []

    async def tb(ctx):
        preload(ctx, bench.mem, mem_bytes)
        for cfg in cfgs:
            ctx.set(unit.cfg.as_value(), to_int(layout, cfg))
            ctx.set(unit.start, 1)
            await ctx.tick()
            ctx.set(unit.start, 0)
            (ok,) = await ctx.tick().sample(unit.ok).until(unit.checked)
            if ok:
                await ctx.tick().until(~unit.busy)
                await ctx.tick().repeat(4)        # the absmax tree
            got.append(results(ctx, int(ok)))
        out[:] = dump(ctx, bench.mem)

    sim = Simulator(bench)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return bytes(out), got


def random_memory(rng, words, rows, cols):
    return bytearray(rng.integers(0, 256, words * word_nibbles(rows, cols) // 2,
                                  dtype=np.uint8).tobytes())


# -- the device as a byte stream ------------------------------------------------------------

#: STATS fields the emulator cannot reproduce: it has no clock.
CLOCKED = ("cycles", "gemm_cycles", "beats", "vec_cycles", "dma_cycles")


def frame(seq, op, payload=b""):
    return encode_frame(Frame(seq, op, payload))


def run_device(wire_chunks, replies, rows=2, cols=4, words=256, max_cycles=200_000,
               timeout=None):
    """Feed byte chunks (an int is a pause of that many cycles) to the RTL device; returns
    every byte it sent once ``replies`` frames came back."""
    dut = Device(rows, cols, words, clk_hz=1_000_000, timeout=timeout)
    out = bytearray()

    async def feeder(ctx):
        for chunk in wire_chunks:
            if isinstance(chunk, int):
                await ctx.tick().repeat(chunk)
                continue
            for byte in chunk:
                ctx.set(dut.i.payload, byte)
                ctx.set(dut.i.valid, 1)
                await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)

    async def reader(ctx):
        ctx.set(dut.o.ready, 1)
        dec = FrameDecoder()
        got = []
        for _ in range(max_cycles):
            *_, valid, byte = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if valid:
                out.append(byte)
                got += dec.feed(bytes([byte]))
                if len(got) >= replies:
                    return
        raise AssertionError(f"{len(got)} of {replies} replies after {max_cycles} cycles")

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(feeder, background=True)
    sim.add_testbench(reader)
    sim.run()
    return bytes(out)


def emulate(wire_chunks, rows=2, cols=4, words=256):
    """The emulator's reply bytes to the same chunks (pauses ignored)."""
    emu = Emulator(rows, cols, words, clk_hz=1_000_000)
    for chunk in wire_chunks:
        if not isinstance(chunk, int):
            emu.feed(chunk)
    return bytes(emu.out)


def comparable(frames, ignore=CLOCKED):
    """Replies as comparable tuples, STATS without the ``ignore`` fields."""
    out = []
    for f in frames:
        if f.op == Op.STATS:
            fields = unpack_fields(STATS_LAYOUT, f.payload)
            for key in ignore:
                fields.pop(key)
            out.append((f.seq, f.op, tuple(sorted(fields.items()))))
        else:
            out.append((f.seq, f.op, f.payload))
    return out


# -- through the driver ---------------------------------------------------------------------


def random_lane(rng, path, phase, top):
    """Lane settings for ``path`` that put accumulators of magnitude up to ``top`` to use."""
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
    """What ``Driver.matmul`` returns for ``gemm``, from the golden model."""
    from nibble.host.golden.lanes import golden_lane
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


def run_random_gemms(dev, rng, count, max_dim, base=0):
    """``count`` random GEMMs of every mode and path through ``dev``, bit for bit (their
    buffers laid out from word ``base``)."""
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
        got, stats = dev.matmul(gemm, lane, mask=mask, base=base)
        want, absmax = expected(gemm, lane, mask)
        if path is OutputPath.LOG4:
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        else:
            np.testing.assert_array_equal(got, want)
        assert stats["absmax"] == absmax, (case, mode, path)


def fault_run(url, frames, rate, seed, timeout, addrs=4096, base=8192, max_words=200):
    """Random WRITE/READ round trips and GEMMs through a link that flips, drops and
    duplicates bytes at ``rate`` per byte both ways, until ``frames`` requests were sent;
    returns (operations, exact, raised, faults). Every result is exact or an exception."""
    rng = np.random.default_rng(seed)
    faulty = {}

    def wrap(t):
        faulty["t"] = FaultyTransport(t, rate, seed=seed)
        return faulty["t"]

    dev = None
    while dev is None:
        try:
            dev = Driver.open(url, timeout=timeout, retries=12, wrap=wrap)
        except DeviceError:
            continue
    ops = exact = raised = 0
    while dev.frames_sent < frames:
        ops += 1
        try:
            if ops % 3:
                words = int(rng.integers(1, max_words))
                addr = int(rng.integers(0, addrs))
                data = rng.integers(0, 256, words * dev.word_bytes, dtype=np.uint8).tobytes()
                dev.write(addr, data)
                back = dev.read(addr, words)
                assert back == data, "silent corruption in a WRITE/READ round trip"
            else:
                kinds = MODE_KINDS[GemmMode.FORWARD][0]
                gemm = random_gemm(rng, kinds, *[int(x) for x in rng.integers(1, 17, 3)])
                got, _ = dev.matmul(gemm, lane_cfg(OutputPath.RAW), base=base)
                np.testing.assert_array_equal(got, golden_acc(gemm, 0))
            exact += 1
        except DeviceError:
            raised += 1
    dev.close()
    return ops, exact, raised, faulty["t"].faults


def gemm_plan(rng, rows, cols, mode, path, shape, base=0, spacing=0):
    """A random GEMM command of ``mode`` and ``path`` with its operands placed from ``base``
    (A sometimes as LOG4 pairs, the mask codes random)."""
    if path is OutputPath.RESCALE:
        mode = GemmMode.FORWARD           # the rescale unit takes forward accumulators
    kinds = MODE_KINDS[mode][int(rng.integers(len(MODE_KINDS[mode])))]
    phase = 1 if mode is GemmMode.BACKWARD_WEIGHT else 0
    gemm = random_gemm(rng, kinds, *shape)
    if path is OutputPath.RAW:
        lane = lane_cfg(OutputPath.RAW, phase=phase)
    elif path is OutputPath.RESCALE:
        lane = lane_cfg(OutputPath.RESCALE, phase=phase, m=int(rng.integers(1 << 15, 1 << 16)),
                        s=int(rng.integers(14, 22)), relu=int(rng.integers(2)),
                        out_signed=int(rng.integers(2)))
    else:
        lane = lane_cfg(OutputPath.LOG4, phase=phase, exp=int(rng.integers(-3, 12)),
                        mask=MaskMode(int(rng.integers(3))))
    mask = rng.integers(0, 16, (shape[0], shape[2]))
    a_pair = None
    if kinds[0] is Operand.FP4 and rng.random() < 0.5:
        sel = int(rng.integers(2))
        other = rng.integers(0, 16, gemm.a.shape)
        pairs = np.where(sel, other | (gemm.a << 4), gemm.a | (other << 4))
        a_pair = (pairs, sel)
    return plan_gemm(gemm, lane, word_nibbles(rows, cols), rows, cols, base=base,
                     mask_codes=mask, a_pair=a_pair, spacing=spacing)


def chain_results(dev, rng):
    """A forward output (out^T) is the next forward GEMM's A operand as stored, and a LOG4
    output (code pairs) is a backward GEMM's FP4 operand with ``a_pair``."""
    nib = dev.word_nibbles
    x = random_gemm(rng, (Operand.UINT4, Operand.INT4), 6, 20, 10)
    lane1 = lane_cfg(OutputPath.RESCALE, m=40000, s=19, relu=1)
    plan1 = plan_gemm(x, lane1, nib, 2, 4)
    for buf, raw in plan1.uploads:
        dev.upload(buf, raw)
    dev.gemm(plan1.cfg)
    h = expected(x, lane1, None)[0]                     # 6 x 10 UINT4
    w2 = rng.integers(-8, 8, (10, 7))
    g2 = Gemm(h, w2, Operand.UINT4, Operand.INT4)
    plan2 = plan_gemm(g2, lane_cfg(OutputPath.RAW), nib, 2, 4, base=plan1.out.end + 5)
    # layer 1's output buffer in place as A; upload only B
    cfg = dict(plan2.cfg, a_addr=plan1.out.addr, a_stride=plan1.out.stride)
    dev.upload(plan2.b, dict(plan2.uploads)[plan2.b])
    dev.gemm(cfg)
    np.testing.assert_array_equal(dev.download(plan2.out, 32).T, golden_acc(g2, 0))

    dy = random_gemm(rng, (Operand.FP4, Operand.INT4), 6, 9, 5)
    lane3 = lane_cfg(OutputPath.LOG4, exp=2)
    plan3 = plan_gemm(dy, lane3, nib, 2, 4, base=plan2.out.end + 3)
    for buf, raw in plan3.uploads:
        dev.upload(buf, raw)
    dev.gemm(plan3.cfg)
    (p0, p1), _ = expected(dy, lane3, None)
    for sel, codes in ((0, p0), (1, p1)):
        g4 = Gemm(codes, rng.integers(-8, 8, (5, 3)), Operand.FP4, Operand.INT4)
        plan4 = plan_gemm(g4, lane_cfg(OutputPath.RAW, phase=sel), nib, 2, 4,
                          base=plan3.out.end + 2)
        cfg = dict(plan4.cfg, a_addr=plan3.out.addr, a_stride=plan3.out.stride, a_pair=1,
                   a_sel=sel)
        dev.upload(plan4.b, dict(plan4.uploads)[plan4.b])
        dev.gemm(cfg)
        np.testing.assert_array_equal(dev.download(plan4.out, 32).T, golden_acc(g4, sel))


def every_error_reply(url, big_gemm):
    """Each error status reaches the API as its exception; BUSY is waited out."""
    with Driver.open(url, timeout=0.5) as dev:
        with pytest.raises(UnknownOpError, match="does not know opcode 0x55"):
            dev.request(0x55)
        with pytest.raises(BadLengthError, match="length of a READ"):
            dev.request(Op.READ, b"\x00")
        with pytest.raises(OutOfRangeError, match="out of range"):
            dev.request(Op.READ, pack_fields(READ_ARGS, {"addr": dev.mem_words - 1,
                                                         "words": 2}))
        with pytest.raises(OutOfRangeError):          # the driver's own check, same class
            dev.read(dev.mem_words, 1)
        plan = plan_gemm(big_gemm, lane_cfg(OutputPath.RAW), 8, 2, 4)
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

    with Driver.open(url, retries=3) as dev:
        dev.t = Corrupt(dev.t, 0)
        with pytest.raises(BadCrcError, match="corrupted"):
            dev.ping(b"x")


def random_vector_cfgs(rng, rows, cols, words):
    """In-range commands of every operation, laid out one after another in memory."""
    nib = word_nibbles(rows, cols)
    cfgs = []
    for op in (VecOp.TRANSPOSE, VecOp.TRANSPOSE, VecOp.UPDATE, VecOp.REQUANT, VecOp.UPDATE,
               VecOp.REQUANT):
        r, c = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        pair = int(rng.integers(2))
        e = (2 if pair else 1) if op == VecOp.TRANSPOSE else 8
        sa = row_words(c, e, nib) + int(rng.integers(0, 2))
        if op == VecOp.TRANSPOSE:
            sb = row_words(r, e, nib) + int(rng.integers(0, 2))
            nb = c
        else:
            sb = row_words(c, 8 if op == VecOp.UPDATE else 1, nib) + int(rng.integers(0, 2))
            nb = r
        a = int(rng.integers(0, words // 4))
        b = a + r * sa + int(rng.integers(0, 3))
        cc = b + nb * sb + int(rng.integers(0, 3))
        cfgs.append(vector_args(op, r, c, (a, sa), (b, sb), cc, pair=pair,
                            mu=int(rng.integers(0, 1 << 16)),
                            m=int(rng.integers(1 << 15, 1 << 16)),
                            s=int(rng.choice([0, 1, 5, 17, 30, 46, 62, 63]))))
    return cfgs
