"""The SDRAM test bench the controller's tests share (tests/test_sdram.py, and the
clock-crossing's, tests/test_sdram_clock.py): a controller on the chip model, random
traffic, a driver that feeds it, and the reads a Python shadow memory expects."""

from amaranth.hdl import DomainRenamer, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from nibble.rtl.sdram import BEATS, BURST_BITS, CHIPS, SdramController
from nibble.rtl.sdram_clock import SdramCrossing
from nibble.sim.sdram_model import Flag, SdramChipModel

TINY = CHIPS["tiny"]
CLK = 50_000_000


class Bench(wiring.Component):
    """A controller (which may believe different timings: ``believed``) on a chip model;
    with ``sdram_hz`` the controller behind its clock crossing
    (:class:`~nibble.rtl.sdram_clock.SdramCrossing`), it and the model in ``sdram``."""

    def __init__(self, chip=TINY, believed=None, clk_hz=CLK, sdram_hz=None):
        if sdram_hz:
            self.ctrl = SdramCrossing(believed or chip, sdram_hz)
            self.model = DomainRenamer("sdram")(SdramChipModel(chip, sdram_hz))
        else:
            self.ctrl = SdramController(believed or chip, clk_hz)
            self.model = SdramChipModel(chip, clk_hz)
        self.controller = self.ctrl.ctrl if sdram_hz else self.ctrl
        super().__init__({
            "req": In(self.ctrl.req.signature.flip()), "rdata": Out(self.ctrl.rdata.signature),
            "ready": Out(1), "flags": Out(16), "violations": Out(32), "refreshes": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.ctrl, m.submodules.model = self.ctrl, self.model
        wiring.connect(m, self.ctrl.pins, self.model.pins)
        wiring.connect(m, wiring.flipped(self.req), self.ctrl.req)
        wiring.connect(m, self.ctrl.rdata, wiring.flipped(self.rdata))
        m.d.comb += [self.ready.eq(self.ctrl.ready), self.flags.eq(self.model.flags),
                     self.violations.eq(self.model.violations),
                     self.refreshes.eq(self.controller.refreshes)]
        return m


def traffic(chip, n, rng):
    """``n`` requests: (burst address, write, data, mask) with row hits, bank conflicts
    (same bank, another row) and random addresses, over a few hot bursts."""
    bursts = chip.beats // BEATS
    per_row = 1 << (chip.col_bits - 3)
    rows_banks = bursts // per_row
    addr, out = 0, []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:                       # the next burst (mostly the same row)
            addr = (addr + 1) % bursts
        elif kind < 0.65:                     # the same bank, another row: a conflict
            rb = (addr // per_row + chip.banks * rng.integers(1, 4)) % rows_banks
            addr = rb * per_row + rng.integers(per_row)
        elif kind < 0.8:                      # a few hot bursts: read after write
            addr = int(rng.integers(8))
        else:
            addr = int(rng.integers(bursts))
        write = bool(rng.random() < 0.5)
        data = int.from_bytes(rng.bytes(BURST_BITS // 8), "little")
        mask = int(rng.integers(1 << 16)) if rng.random() < 0.3 else 0
        out.append((int(addr), write, data, mask))
    return out


def run(bench, requests, rng, p_stall=0.1, settle=200, clk_hz=CLK, domains=None):
    """Feed ``requests`` (reads stall the consumer at random); returns the read bursts in
    order and the bench's final (flags, violations, refreshes). ``domains``: other clock
    domains and their frequencies."""
    reads = []
    n_reads = sum(not w for _, w, _, _ in requests)
    end = {}

    async def producer(ctx):
        await ctx.tick().until(bench.ready)
        for addr, write, data, mask in requests:
            ctx.set(bench.req.payload, {"addr": addr, "write": write, "data": data,
                                        "mask": mask})
            ctx.set(bench.req.valid, 1)
            await ctx.tick().until(bench.req.ready)
            ctx.set(bench.req.valid, 0)
            if rng.random() < 0.05:
                await ctx.tick().repeat(int(rng.integers(1, 40)))

    async def consumer(ctx):
        while len(reads) < n_reads:
            ctx.set(bench.rdata.ready, int(rng.random() >= p_stall))
            _, _, valid, ready, data = await ctx.tick().sample(
                bench.rdata.valid, bench.rdata.ready, bench.rdata.payload)
            if valid and ready:
                reads.append(data)
        await ctx.tick().repeat(settle)
        end["v"] = (ctx.get(bench.flags), ctx.get(bench.violations),
                    ctx.get(bench.refreshes))

    sim = Simulator(bench)
    sim.add_clock(1 / clk_hz)
    for domain, hz in (domains or {}).items():
        sim.add_clock(1 / hz, domain=domain)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return reads, end["v"]


def shadow_reads(requests):
    """What each read must return, from a Python model of the memory (byte masks)."""
    mem, out = {}, []
    for addr, write, data, mask in requests:
        old = mem.get(addr, 0)
        if write:
            keep = 0
            for byte in range(BURST_BITS // 8):
                if mask >> byte & 1:
                    keep |= 0xFF << (8 * byte)
            mem[addr] = (old & keep) | (data & ~keep)
        else:
            out.append(old)
    return out


def flag_names(flags):
    return [f.name for f in Flag if flags >> f & 1]
