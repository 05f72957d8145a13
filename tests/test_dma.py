"""The DMA between tensor memory and the SDRAM, in the Amaranth simulator: the real controller
on the chip model (``tiny`` part), against the emulator's ``dma_apply`` and ``dma_check``."""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from nibble.host.device.emu import dma_apply, dma_check
from nibble.host.device.packing import to_int
from nibble.rtl.dma import DMA_CFG, Dma, words_per_burst
from nibble.rtl.memory import BlockRAM, TensorBus
from nibble.rtl.sdram import BURST_BITS, CHIPS, SdramController
from nibble.sim.sdram_model import SdramChipModel
from tests.support import FlakyGrants, dump, preload

TINY = CHIPS["tiny"]
CLK = 50_000_000


class DmaBench(wiring.Component):
    """The DMA on block RAM (optionally through FlakyGrants) and on an SDRAM controller
    driving the chip model."""

    def __init__(self, nib, words, flaky=None):
        aw = (words - 1).bit_length()
        self.dma = Dma(aw, nib, words, TINY)
        self.mem = BlockRAM(words, nib)
        self.ctrl = SdramController(TINY, CLK)
        self.model = SdramChipModel(TINY, CLK)
        self.flaky = flaky and FlakyGrants(TensorBus.Signature(addr_width=aw, nibbles=nib),
                                           seed=flaky)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.dma, m.submodules.mem = self.dma, self.mem
        m.submodules.ctrl, m.submodules.model = self.ctrl, self.model
        if self.flaky:
            m.submodules.flaky = self.flaky
            wiring.connect(m, self.dma.bus, self.flaky.unit)
            wiring.connect(m, self.flaky.mem, self.mem.bus)
        else:
            wiring.connect(m, self.dma.bus, self.mem.bus)
        wiring.connect(m, self.dma.req, self.ctrl.req)
        wiring.connect(m, self.ctrl.rdata, self.dma.rdata)
        wiring.connect(m, self.ctrl.pins, self.model.pins)
        return m


def random_cfgs(rng, nib, words, n, ext_window=48):
    """Tiles both ways over a small SDRAM window (so loads find what stores put there),
    with a few out of range."""
    wpb = words_per_burst(nib)
    cfgs = []
    for k in range(n):
        store = int(k < n // 2 or rng.random() < 0.3)
        rows, bursts = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        mem_stride = bursts * wpb + int(rng.integers(0, 3)) - (int(rng.integers(0, 2))
                                                                if store else 0)
        ext_stride = bursts + int(rng.integers(0, 3))
        cfg = {"store": store, "rows": rows, "bursts": bursts,
               "mem_addr": int(rng.integers(0, words - rows * mem_stride - bursts * wpb)),
               "mem_stride": max(mem_stride, 0),
               "ext_addr": int(rng.integers(0, ext_window)), "ext_stride": ext_stride}
        if rng.random() < 0.15:                          # out of range, one way or another
            cfg[str(rng.choice(["mem_addr", "ext_addr", "rows"]))] = (1 << 15) + 7
        cfgs.append(cfg)
    return cfgs


def run(nib, words, mem, cfgs, flaky=None):
    bench = DmaBench(nib, words, flaky)
    dma, got = bench.dma, {}

    async def tb(ctx):
        preload(ctx, bench.mem, mem)
        oks = []
        for cfg in cfgs:
            ctx.set(dma.cfg.as_value(), to_int(DMA_CFG, cfg))
            ctx.set(dma.start, 1)
            await ctx.tick()
            ctx.set(dma.start, 0)
            ctx.set(dma.cfg.as_value(), 0)              # the DMA keeps its own copy
            (ok,) = await ctx.tick().sample(dma.ok).until(dma.checked)
            oks.append(int(ok))
            await ctx.tick().until(~dma.busy)
        got.update(mem=dump(ctx, bench.mem), oks=oks, flags=ctx.get(bench.model.flags),
                   violations=ctx.get(bench.model.violations))

    sim = Simulator(bench)
    sim.add_clock(1 / CLK)
    sim.add_testbench(tb)
    sim.run()
    return got


@pytest.mark.parametrize("nib,flaky,seed", [(8, None, 1), (16, 3, 2), (32, None, 3)])
def test_dma_matches_emulator(nib, flaky, seed):
    """Random tiles stored to the SDRAM and loaded back elsewhere (words of 8, 16 and 32
    codes, one run with memory grants withheld at random): tensor memory and every verdict
    match the emulator's, and the chip model flags nothing."""
    words = 256
    rng = np.random.default_rng(seed)
    mem = bytearray(rng.integers(0, 256, words * nib // 2, dtype=np.uint8).tobytes())
    cfgs = random_cfgs(rng, nib, words, 14)
    want, ext = bytearray(mem), bytearray(TINY.bytes)
    oks = []
    for cfg in cfgs:
        oks.append(int(dma_check(cfg, nib, words, TINY.bytes // (BURST_BITS // 8))))
        if oks[-1]:
            dma_apply(want, ext, cfg, nib)
    assert 0 < sum(oks) < len(oks)
    got = run(nib, words, mem, cfgs, flaky)
    assert got["oks"] == oks
    assert got["flags"] == 0 and got["violations"] == 0
    assert got["mem"] == bytes(want)
