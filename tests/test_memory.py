"""Tensor memory's ports and arbiter, and the shared range check, in the Amaranth simulator."""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from nibble.rtl.bounds import BUFFER, DIM_BITS, BoundsCheck
from nibble.rtl.memory import BlockRAM, TensorArbiter, TensorBus


class Shared(wiring.Component):
    """Two buses through the arbiter onto block RAM."""

    def __init__(self, words=16, nibbles=8):
        sig = TensorBus.Signature(addr_width=(words - 1).bit_length(), nibbles=nibbles)
        self.arbiter = TensorArbiter(sig, 2)
        self.ram = BlockRAM(words, nibbles)
        super().__init__({"a": wiring.In(sig), "b": wiring.In(sig)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.arbiter, m.submodules.ram = self.arbiter, self.ram
        wiring.connect(m, wiring.flipped(self.a), self.arbiter.units[0])
        wiring.connect(m, wiring.flipped(self.b), self.arbiter.units[1])
        wiring.connect(m, self.arbiter.mem, self.ram.bus)
        return m


def test_the_claiming_unit_owns_every_port():
    """The first claiming unit's writes and reads are taken; the other's are not (its
    ``ready`` stays low and memory is untouched) until the owner lets go."""
    dut = Shared()

    async def tb(ctx):
        a, b = dut.a, dut.b
        for bus, addr, value in ((a, 3, 0xAAAA5555), (b, 4, 0x12345678)):
            ctx.set(bus.wr.addr, addr)
            ctx.set(bus.wr.data, value)
            ctx.set(bus.wr.en, 0xFF)
        ctx.set(b.claim, 1)
        ctx.set(a.claim, 1)                       # a comes first in the arbiter's list
        *_, a_ready, b_ready = await ctx.tick().sample(a.wr.ready, b.wr.ready)
        assert (a_ready, b_ready) == (1, 0)
        ctx.set(a.claim, 0)                       # b's turn
        ctx.set(a.wr.en, 0)
        *_, a_ready, b_ready = await ctx.tick().sample(a.wr.ready, b.wr.ready)
        assert (a_ready, b_ready) == (0, 1)
        ctx.set(b.wr.en, 0)
        for bus in (a, b):                        # a non-owner reads nothing
            ctx.set(bus.rd0.en, 1)
        ctx.set(a.rd0.addr, 4)
        ctx.set(b.rd0.addr, 3)
        *_, a_ready = await ctx.tick().sample(a.rd0.ready)
        assert not a_ready and ctx.get(b.rd0.data) == 0xAAAA5555
        assert ctx.get(dut.ram.copies[1].data[4]) == 0x12345678

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
        rows = int(rng.choice([1, 2, 3, int(rng.integers(1, 1 << 16))]))
        stride = int(rng.choice([0, 1, int(rng.integers(0, 1 << 16))]))
        words = int(rng.integers(1, 1 << 17))
        span = (rows - 1) * stride + words
        addr = int(rng.choice([0, max(0, mem_words - span), max(0, mem_words - span + 1),
                               int(rng.integers(0, 1 << 24))]))
        out.append({"addr": addr, "stride": stride, "rows": rows, "words": words,
                    "written": int(rng.integers(2)), "used": int(rng.random() < 0.9)})
    return out


@pytest.mark.parametrize("mem_words", [512, 1 << 19])
def test_bounds_check_is_the_rule(mem_words):
    """Random buffers placed at, just past and far beyond the end of memory, strides shorter
    than rows, unused buffers: the verdict is the rule's, in at most 19 cycles a buffer."""
    rng = np.random.default_rng(mem_words)
    dut = BoundsCheck(3, mem_words)
    cases = [random_buffers(rng, mem_words, 3) for _ in range(60)]
    cases.append([{"addr": 0, "stride": 0, "rows": 1, "words": 1, "written": 1, "used": 1},
                  {"addr": mem_words - 1, "stride": 9, "rows": 1, "words": 1, "written": 0,
                   "used": 1},
                  {"addr": mem_words, "stride": 1, "rows": 1, "words": 1, "written": 0,
                   "used": 0}])

    async def tb(ctx):
        for bufs in cases:
            for k, b in enumerate(bufs):
                ctx.set(dut.buffers[k], BUFFER.const(b))
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
