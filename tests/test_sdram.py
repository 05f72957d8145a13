"""The SDRAM controller against the chip model, in the Amaranth simulator.

Random traffic (row hits, bank conflicts, random addresses; writes with byte masks) through
:class:`~nibble.rtl.sdram.SdramController` onto :class:`~nibble.sim.sdram_model.SdramChipModel`
(the ``tiny`` part: the real rules, a small array): every read must return what a Python
shadow memory says, and the model must flag nothing. And the model's checks themselves:
each timing, run with a controller that believes it shorter, is flagged; so are commands
in a wrong state.
"""

import dataclasses

import numpy as np
import pytest
from amaranth.hdl import Module, Shape
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from nibble.rtl.sdram import (
    ACT,
    BEATS,
    CHIPS,
    MRS,
    NOP,
    PRE,
    READ,
    REF,
    WRITE,
    SdramPins,
    burst_request,
)
from nibble.sim.sdram_model import Flag, SdramChipModel
from tests.sdram_bench import CLK, TINY, Bench, flag_names, run, shadow_reads, traffic

FAST = 125_000_000


def test_random_traffic_is_exact_and_breaks_no_rule():
    """2,000 bursts of mixed traffic, refreshes falling among them: every read exact, no
    flag; the refreshes keep up with tREFI."""
    rng = np.random.default_rng(1)
    requests = traffic(TINY, 2000, rng)
    bench = Bench()
    reads, (flags, violations, refreshes) = run(bench, requests, rng)
    assert flag_names(flags) == [] and violations == 0
    expect = shadow_reads(requests)
    assert len(reads) == len(expect)
    bad = [i for i, (a, b) in enumerate(zip(reads, expect, strict=True)) if a != b]
    assert not bad, f"{len(bad)} wrong reads, the first #{bad[0]}"
    assert refreshes >= 5


def test_streams_run_at_one_beat_per_cycle():
    """Consecutive reads of one row stream at 8 cycles a burst once the row is open."""
    rng = np.random.default_rng(2)
    per_row = 1 << (TINY.col_bits - 3)
    requests = [(a, False, 0, 0) for a in range(per_row)]
    bench = Bench()
    cycles = {}

    async def tb(ctx):
        await ctx.tick().until(bench.ready)
        ctx.set(bench.rdata.ready, 1)
        t0 = None
        got = 0
        for t in range(2000):
            ctx.set(bench.req.valid, len(requests) > 0)
            if requests:
                ctx.set(bench.req.payload, {"addr": requests[0][0], "write": 0})
            _, _, taken, valid = await ctx.tick().sample(bench.req.ready, bench.rdata.valid)
            if taken and requests:
                requests.pop(0)
            if valid:
                got += 1
                if got == 1:
                    t0 = t
                if got == per_row:
                    cycles["n"] = t - t0
                    break

    sim = Simulator(bench)
    sim.add_clock(1 / CLK)
    sim.add_testbench(tb)
    sim.run()
    # bursts 2 .. per_row arrive 8 cycles apart (a refresh may cost one gap)
    assert cycles["n"] <= BEATS * (per_row - 1) + 12, cycles
    del rng


@pytest.mark.parametrize("timing,flag", [
    ("tRCD", Flag.T_RCD), ("tRP", Flag.T_RP), ("tRAS", Flag.T_RAS), ("tRC", Flag.T_RC),
    ("tRRD", Flag.T_RRD), ("tWR", Flag.T_WR), ("tRFC", Flag.T_RFC),
])
def test_the_model_flags_a_controller_that_cuts_a_timing_short(timing, flag):
    """A controller that believes ``timing`` is a third of what the part needs is caught
    under traffic that exercises it (at 125 MHz, where each timing is several cycles; with
    400 requests the cut tRAS went unexercised once requests passed a register slice)."""
    rng = np.random.default_rng(3)
    # one request at a time spaces ACTIVATEs beyond the tiny part's tRC and tRRD, and a
    # PRECHARGE a cycle after the bus's last write beat beyond its tWR (2 cycles): give it
    # longer ones to cut
    longer = {"tRC": 160, "tRRD": 60, "tWR": 60}
    chip = dataclasses.replace(TINY, **{timing: longer[timing]}) if timing in longer else TINY
    believed = dataclasses.replace(chip, **{timing: getattr(chip, timing) / 3})
    requests = traffic(chip, 800, rng)
    bench = Bench(chip, believed=believed, clk_hz=FAST)
    _, (flags, violations, _) = run(bench, requests, rng, settle=20, clk_hz=FAST)
    assert flags >> flag & 1, flag_names(flags)
    assert violations > 0


class PinDriver(wiring.Component):
    """Pins straight onto the chip model, for hand-made command sequences."""

    def __init__(self, chip=TINY):
        self.model = SdramChipModel(chip, CLK)
        super().__init__({"pins": In(SdramPins.Signature(chip)), "flags": Out(16)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.model = self.model
        wiring.connect(m, wiring.flipped(self.pins), self.model.pins)
        m.d.comb += self.flags.eq(self.model.flags)
        return m


def sequence(commands, drive=()):
    """Flags after ``commands``: (cycle, command tuple, bank, address); NOP elsewhere. The
    controller drives DQ in the cycles of ``drive``."""
    dut = PinDriver()
    out = {}

    async def tb(ctx):
        p = dut.pins
        ctx.set(p.cke, 1)
        last = max([c for c, *_ in commands] + list(drive)) + 10
        byc = {c: rest for c, *rest in commands}
        for t in range(last + 3):
            cmd, bank, addr = byc.get(t, (NOP, 0, 0))
            ras, cas, we = cmd
            ctx.set(p.cs, cmd != NOP)
            ctx.set(p.ras, ras)
            ctx.set(p.cas, cas)
            ctx.set(p.we, we)
            ctx.set(p.ba, bank)
            ctx.set(p.a, addr)
            ctx.set(p.dq_oe, t in drive)
            await ctx.tick()
        out["flags"] = ctx.get(dut.flags)

    sim = Simulator(dut)
    sim.add_clock(1 / CLK)
    sim.add_testbench(tb)
    sim.run()
    return flag_names(out["flags"])


def init(t0=120):
    """A correct power-up sequence from cycle ``t0`` (the tiny part: 100 cycles' wait,
    2 refreshes); returns it and the first free cycle."""
    seq = [(t0, PRE, 0, 1 << 10), (t0 + 2, REF, 0, 0), (t0 + 6, REF, 0, 0),
           (t0 + 10, MRS, 0, (2 << 4) | 0b011)]
    return seq, t0 + 13


def test_a_correct_hand_sequence_is_clean():
    seq, t = init()
    seq += [(t, ACT, 1, 5), (t + 1, READ, 1, 0), (t + 9, READ, 1, 8), (t + 20, PRE, 1, 0),
            (t + 30, ACT, 2, 5), (t + 31, READ, 2, 0), (t + 39, PRE, 2, 0)]  # burst's end
    assert sequence(seq) == []


@pytest.mark.parametrize("case,expect", [
    ("early", "INIT"),                 # a command before the power-up wait
    ("no_mode", "INIT"),               # ACTIVATE before LOAD MODE
    ("closed", "BANK_CLOSED"),         # READ of a bank with no open row
    ("act_open", "BANK_OPEN"),         # ACTIVATE of an open bank
    ("ref_open", "BANK_OPEN"),         # REFRESH with a bank open
    ("mode", "MODE"),                  # burst length 4
    ("cut", "BURST_CUT"),              # READ 4 cycles after READ
    ("pre_cut", "BURST_CUT"),          # PRECHARGE of its bank 7 cycles after a READ
    ("pre_all_cut", "BURST_CUT"),      # PRECHARGE ALL likewise
    ("autopre", "UNSUPPORTED"),        # READ with auto precharge
    ("undriven", "BUS"),               # WRITE without its data on DQ
    ("contention", "BUS"),             # DQ driven in a read's turnaround cycle
])
def test_the_model_flags_commands_in_a_wrong_state(case, expect):
    seq, t = init()
    good_mode = (2 << 4) | 0b011
    if case == "early":
        seq = [(5, PRE, 0, 1 << 10)]
    elif case == "no_mode":
        seq = [*seq[:-1], (t, ACT, 0, 0)]
    elif case == "closed":
        seq += [(t, READ, 2, 0)]
    elif case == "act_open":
        seq += [(t, ACT, 0, 0), (t + 10, ACT, 0, 1)]
    elif case == "ref_open":
        seq += [(t, ACT, 0, 0), (t + 10, REF, 0, 0)]
    elif case == "mode":
        seq = [*seq[:-1], (seq[-1][0], MRS, 0, good_mode - 1)]
    elif case == "cut":
        seq += [(t, ACT, 0, 0), (t + 2, READ, 0, 0), (t + 6, READ, 0, 8)]
    elif case in ("pre_cut", "pre_all_cut"):
        seq += [(t, ACT, 0, 0), (t + 10, READ, 0, 0),
                (t + 17, PRE, 0, 1 << 10 if case == "pre_all_cut" else 0)]
    elif case == "autopre":
        seq += [(t, ACT, 0, 0), (t + 2, READ, 0, 1 << 10)]
    drive = ()
    if case == "undriven":
        seq += [(t, ACT, 0, 0), (t + 2, WRITE, 0, 0)]
        drive = range(t + 2, t + 9)               # beat 7 not driven
    elif case == "contention":
        seq += [(t, ACT, 0, 0), (t + 2, READ, 0, 0)]
        drive = (t + 2 + 2 + 8,)                   # CL 2: beats end at t + 11
    assert expect in sequence(seq, drive)


def test_the_model_flags_missed_refreshes():
    """A controller that refreshes 20 times too rarely owes more than 8: flagged."""
    chip = dataclasses.replace(TINY, tREFI=1000)
    believed = dataclasses.replace(chip, tREFI=20_000)
    rng = np.random.default_rng(4)
    _, (flags, _, _) = run(Bench(chip, believed=believed), traffic(chip, 300, rng), rng)
    assert flag_names(flags) == ["REFRESH"]


def test_burst_request_layout_fits_the_part():
    for chip in CHIPS.values():
        layout = burst_request(chip)
        assert 1 << Shape.cast(layout["addr"].shape).width == chip.beats // BEATS
