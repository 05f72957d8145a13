"""Tensor memory's ports and arbiter, and the shared range check, in the Amaranth simulator."""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from nibble.rtl.bounds import DIM_BITS, BoundsCheck
from nibble.rtl.memory import (
    BlockRAM,
    ForwardRegister,
    RegisterSlice,
    TensorArbiter,
    TensorBus,
    read_ports,
)


class Shared(wiring.Component):
    """Three buses through the arbiter onto block RAM."""

    def __init__(self, words=16, nibbles=8, n=3, write_first=None, held=None):
        sig = TensorBus.Signature(addr_width=(words - 1).bit_length(), nibbles=nibbles)
        self.arbiter = TensorArbiter(sig, n, write_first, held)
        self.ram = BlockRAM(words, nibbles)
        super().__init__({"units": wiring.In(sig).array(n)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.arbiter, m.submodules.ram = self.arbiter, self.ram
        for unit, port in zip(self.units, self.arbiter.units, strict=True):
            wiring.connect(m, wiring.flipped(unit), port)
        wiring.connect(m, self.arbiter.mem, self.ram.bus)
        return m


@pytest.mark.parametrize("write_first,held", [(None, None), (2, None),
                                               (None, [("rd0", "rd1"), (), ("rd2",)])])
def test_ports_go_to_the_first_asker_and_each_unit_keeps_its_words(write_first, held):
    """Three units ask for random ports at random: each cycle every port goes to the first
    unit asking for it (on the write port ``write_first`` before the others; the others see
    ``ready`` low and change nothing), writes land with their nibble enables, and each
    unit's read port shows the word of its own last granted read, however many reads of
    other units came since; a port not in the unit's ``held`` shows the word in the cycle
    it arrives."""
    words, nib, n = 16, 8, 3
    dut = Shared(words, nib, n, write_first, held)
    held = held or [("rd0", "rd1", "rd2")] * n
    w_order = list(range(n))
    if write_first is not None:
        w_order.insert(0, w_order.pop(write_first))
    rng = np.random.default_rng(5)
    mem = [0] * words
    last = [[None] * 3 for _ in range(n)]          # each unit's word on each read port

    async def tb(ctx):
        for _ in range(600):
            reqs = []
            for unit in dut.units:
                wr = (int(rng.integers(words)), int(rng.integers(1 << 32)),
                      int(rng.integers(1 << nib)) if rng.random() < 0.4 else 0)
                rds = [(int(rng.integers(words)), rng.random() < 0.4) for _ in range(3)]
                ctx.set(unit.wr.addr, wr[0])
                ctx.set(unit.wr.data, wr[1])
                ctx.set(unit.wr.en, wr[2])
                for port, (addr, en) in zip(read_ports(unit), rds, strict=True):
                    ctx.set(port.addr, addr)
                    ctx.set(port.en, en)
                reqs.append((wr, rds))
            # the grants this cycle, from the rule
            w_owner = next((k for k in w_order if reqs[k][0][2]), None)
            r_owner = [next((k for k, (_, rds) in enumerate(reqs) if rds[j][1]), None)
                       for j in range(3)]
            for k, unit in enumerate(dut.units):          # nobody before k asks
                ahead = w_order[:w_order.index(k)]
                assert ctx.get(unit.wr.ready) == (w_owner is None or w_owner not in ahead)
                for j, port in enumerate(read_ports(unit)):
                    assert ctx.get(port.ready) == (r_owner[j] is None or r_owner[j] >= k)
            before = list(mem)
            await ctx.tick()
            if w_owner is not None:
                addr, data, en = reqs[w_owner][0]
                mask = sum(0xF << (4 * i) for i in range(nib) if en >> i & 1)
                mem[addr] = (mem[addr] & ~mask) | (data & mask)
            for k in range(n):
                for j in range(3):
                    if f"rd{j}" not in held[k]:
                        last[k][j] = None               # only the cycle it arrives
            for j, k in enumerate(r_owner):
                if k is not None:
                    last[k][j] = before[reqs[k][1][j][0]]
            for k, unit in enumerate(dut.units):
                for j, port in enumerate(read_ports(unit)):
                    if last[k][j] is not None:
                        assert ctx.get(port.data) == last[k][j], (k, j)
        assert [dut.ram.peek(ctx, a) for a in range(words)] == mem

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def in_range(buf, mem_words):
    """The rule, in Python."""
    if not buf["used"]:
        return True
    end = buf["addr"] + (buf["rows"] - 1) * buf["stride"] + buf["words"]
    return end <= mem_words and not (buf["written"] and buf["stride"] < buf["words"])


def random_buffers(rng, mem_words, n):
    out = []
    for _ in range(n):
        rows = int(rng.choice([0, 1, 2, 3, int(rng.integers(1, 1 << 16))]))
        stride = int(rng.choice([0, 1, int(rng.integers(0, 1 << 16))]))
        words = int(rng.integers(1, 1 << 17))
        span = (rows - 1) * stride + words
        addr = int(rng.choice([0, max(0, mem_words - span), max(0, mem_words - span + 1),
                               int(rng.integers(0, 1 << 24))]))
        out.append({"addr": addr, "stride": stride, "rows": rows, "words": words,
                    "written": int(rng.integers(2)), "used": int(rng.random() < 0.9)})
    return out


@pytest.mark.parametrize("mem_words,per_word", [(512, 1), (1 << 14, 8), (1 << 19, 1),
                                                (1 << 24, 4)])
def test_bounds_check_is_the_rule(mem_words, per_word):
    """Random buffers placed at, just past and far beyond the end of memory, strides shorter
    than rows, unused buffers, rows given in items ``per_word`` to a word (a row of ``w``
    words as anything from ``(w - 1) per_word + 1`` to ``w per_word`` items): the verdict
    is the rule's, in at most 19 cycles a buffer."""
    rng = np.random.default_rng(mem_words)
    dut = BoundsCheck(3, mem_words, per_word)
    cases = [random_buffers(rng, mem_words, 3) for _ in range(60)]
    # at the edge of each term's saturation: a stride or a product just under, at and
    # just over the memory, and a sum of in-range terms that passes its end
    for stride, rows, words, addr in ((mem_words // 2, 3, 1, 0), (mem_words // 2, 2, 1, 0),
                                      (mem_words - 1, 2, 1, 0), (mem_words, 2, 1, 0),
                                      (mem_words, 3, 1, 0), (2 * mem_words + 1, 2, 1, 0),
                                      (3, mem_words // 3 + 1, 1, 0), (0, 1, mem_words, 0),
                                      (0, 1, mem_words, 1), (0, 1, 1, mem_words - 1),
                                      (mem_words // 4, 3, mem_words // 4, mem_words // 4)):
        cases.append([{"addr": addr, "stride": min(stride, (1 << 16) - 1),
                       "rows": min(rows, (1 << 16) - 1), "words": min(words, (1 << 17) - 1),
                       "written": 0, "used": 1}] * 3)
    cases.append([{"addr": 0, "stride": 0, "rows": 1, "words": 1, "written": 1, "used": 1},
                  {"addr": mem_words - 1, "stride": 9, "rows": 1, "words": 1, "written": 0,
                   "used": 1},
                  {"addr": mem_words, "stride": 1, "rows": 1, "words": 1, "written": 0,
                   "used": 0}])

    async def tb(ctx):
        for bufs in cases:
            for k, b in enumerate(bufs):
                items = b["words"] * per_word - int(rng.integers(per_word))
                fields = {name: v for name, v in b.items() if name != "words"}
                ctx.set(dut.buffers[k], dut.layout.const({**fields, "items": items}))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                cycles += 1
            assert ctx.get(dut.ok) == all(in_range(b, mem_words) for b in bufs), bufs
            assert cycles <= 1 + 3 * (DIM_BITS + 3)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("kind", [RegisterSlice, ForwardRegister])
@pytest.mark.parametrize("p_in, p_out", [(1.0, 1.0), (0.7, 0.5), (0.3, 0.9)])
def test_register_stages_pass_every_transfer_in_order(kind, p_in, p_out):
    """A producer and a consumer that each stall at random: everything offered comes out,
    once, in order; with neither stalling, one transfer a cycle after one of latency."""
    rng = np.random.default_rng(int(10 * p_in + p_out))
    dut = kind(16)
    sent, got, n = [], [], 400
    cycles = []

    async def tb(ctx):
        k = t = 0
        while len(got) < n:
            offer = k < n and rng.random() < p_in
            ctx.set(dut.i.valid, offer)
            ctx.set(dut.i.payload, (k * 7919) & 0xFFFF)
            ctx.set(dut.o.ready, rng.random() < p_out)
            await ctx.delay(1e-7)
            if offer and ctx.get(dut.i.ready):
                sent.append((k * 7919) & 0xFFFF)
                k += 1
            if ctx.get(dut.o.valid) and ctx.get(dut.o.ready):
                got.append(ctx.get(dut.o.payload))
                cycles.append(t)
            await ctx.tick()
            t += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert got == sent == [(k * 7919) & 0xFFFF for k in range(n)]
    if p_in == p_out == 1.0:
        assert cycles == list(range(1, n + 1))


class _ReaderOnRam(wiring.Component):
    """A Reader on a block RAM read port that grants only when ``grant`` is high."""

    def __init__(self, contents, nibbles=4, skid=None):
        from nibble.rtl.memory import Reader
        self.contents = contents
        self.reader = Reader((len(contents) - 1).bit_length(), nibbles, 8, skid)
        from amaranth.lib import stream
        super().__init__({"i": wiring.In(stream.Signature(self.reader.request)),
                          "o": wiring.Out(stream.Signature(self.reader.word)),
                          "grant": wiring.In(1)})

    def elaborate(self, platform):
        from amaranth.hdl import unsigned
        from amaranth.lib import memory
        m = Module()
        m.submodules.reader = r = self.reader
        m.submodules.mem = mem = memory.Memory(shape=unsigned(16), depth=len(self.contents),
                                               init=[int(v) for v in self.contents])
        rd = mem.read_port()
        wiring.connect(m, wiring.flipped(self.i), r.i)
        wiring.connect(m, r.o, wiring.flipped(self.o))
        m.d.comb += [r.port.ready.eq(self.grant), rd.addr.eq(r.port.addr),
                     rd.en.eq(r.port.en & self.grant), r.port.data.eq(rd.data)]
        return m


@pytest.mark.parametrize("skid", [None, False])
@pytest.mark.parametrize("p_in, p_out, p_grant", [(1.0, 1.0, 1.0), (0.8, 0.4, 0.7),
                                                  (0.5, 0.9, 1.0), (1.0, 0.2, 0.5)])
def test_reader_hands_out_every_word_in_order_and_never_waits_on_its_consumer(
        p_in, p_out, p_grant, skid):
    """Random requests, grants and consumer stalls: every word once, in order, with its tag.
    The reader issues from its own state: with the consumer stalled it takes at most one
    read beyond the word it holds (into its skid register), and at full speed one a cycle,
    each word a cycle after its request. Without the skid register (the iCE40's reader)
    the same words come out, and no read is taken beyond the word it holds."""
    rng = np.random.default_rng(int(100 * p_in + 10 * p_out + p_grant))
    contents = rng.integers(0, 1 << 16, 32)
    dut = _ReaderOnRam(contents, skid=skid)
    reqs = [(int(a), k & 0xFF) for k, a in enumerate(rng.integers(0, 32, 300))]
    got, taken_while_stalled, cycles = [], [], []

    async def tb(ctx):
        k = t = 0
        stall_run = 0
        while len(got) < len(reqs):
            offer = k < len(reqs) and rng.random() < p_in
            ready = rng.random() < p_out
            ctx.set(dut.i.valid, offer)
            if k < len(reqs):
                ctx.set(dut.i.payload, {"addr": reqs[k][0], "tag": reqs[k][1]})
            ctx.set(dut.o.ready, ready)
            ctx.set(dut.grant, rng.random() < p_grant)
            await ctx.delay(1e-7)
            if offer and ctx.get(dut.i.ready):
                k += 1
                stall_run += 1
            if ctx.get(dut.o.valid) and ready:
                got.append((ctx.get(dut.o.payload.data), ctx.get(dut.o.payload.tag)))
                cycles.append(t)
                stall_run = 0
            taken_while_stalled.append(stall_run)
            await ctx.tick()
            t += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert got == [(int(contents[a]), tag) for a, tag in reqs]
    assert max(taken_while_stalled) <= (2 if skid is None else 1) + (p_out == 1.0) * len(reqs)
    if p_in == p_out == p_grant == 1.0:
        assert cycles == list(range(1, len(reqs) + 1))


@pytest.mark.parametrize("words", [2048, 4096, 8192, 16384])
def test_block_ram_slices_keep_every_nibble(words):
    """From 4,096 words on a copy is slices of 16K/words bits (4, 2, 1), each its own
    memory: writes with random nibble enables and reads on all three ports through them
    agree with a plain model, and peek/poke see the same words."""
    ram = BlockRAM(words, 8)
    assert ram.slice_bits == {2048: 32, 4096: 4, 8192: 2, 16384: 1}[words]
    assert all(len(copy) == 32 // ram.slice_bits for copy in ram.copies)
    rng = np.random.default_rng(words)
    addrs = [int(a) for a in rng.integers(0, words, 24)]
    model = {}

    async def tb(ctx):
        ram.poke(ctx, addrs[0], 0x89ABCDEF)
        model[addrs[0]] = 0x89ABCDEF
        for _ in range(120):
            addr, data = addrs[int(rng.integers(len(addrs)))], int(rng.integers(1 << 32))
            en = int(rng.integers(1 << 8))
            ctx.set(ram.bus.wr.addr, addr)
            ctx.set(ram.bus.wr.data, data)
            ctx.set(ram.bus.wr.en, en)
            reads = [addrs[int(rng.integers(len(addrs)))] for _ in range(3)]
            for port, a in zip(read_ports(ram.bus), reads, strict=True):
                ctx.set(port.addr, a)
                ctx.set(port.en, 1)
            before = dict(model)
            await ctx.tick()
            mask = sum(0xF << (4 * i) for i in range(8) if en >> i & 1)
            model[addr] = (model.get(addr, 0) & ~mask) | (data & mask)
            for port, a in zip(read_ports(ram.bus), reads, strict=True):
                assert ctx.get(port.data) == before.get(a, 0)
        ctx.set(ram.bus.wr.en, 0)
        for a, v in model.items():
            assert ram.peek(ctx, a) == v

    sim = Simulator(ram)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
