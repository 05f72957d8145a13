"""SDR SDRAM: chips, timings, the pins, and a controller that streams bursts.

Chips
    :class:`SdramChip` holds a part's geometry (banks, row and column bits, a 16-bit data
    bus) and its timings in nanoseconds; :meth:`SdramChip.cycles` turns them into clock
    cycles at a frequency. The ULX3S carries one of :data:`CHIPS` depending on its revision
    (32 MB parts with 9 column bits, a 64 MB part with 10).

Pins
    :class:`SdramPins` is the controller's side of the chip's pins with active-high command
    bits (``cs``, ``ras``, ``cas``, ``we``; the board inverts them) and the data bus split into
    ``dq_o``, ``dq_oe`` and ``dq_i``. The chip model (:mod:`nibble.sim.sdram_model`) and the
    board's IO buffers both take this signature.

Controller
    :class:`SdramController` serves one burst at a time from a stream of requests. A request
    is a burst address (8 beats of 16 bits: 16 bytes, aligned) and, for a write, the burst's
    128 bits and a mask per byte (DQM); a read's 128 bits come back on a second stream, in
    request order. The controller runs the power-up sequence (wait, PRECHARGE ALL, auto
    refreshes, LOAD MODE: burst length 8, sequential, the CAS latency), refreshes every
    ``tREFI`` (closing open rows first), keeps one row open per bank (a request to the open
    row goes straight to READ or WRITE: consecutive bursts of a row stream at one beat per
    cycle), and honours every timing: tRCD, tRP, tRAS, tRC, tRRD, tWR, tRFC, tMRD and the
    CAS latency, with a cycle of bus turnaround between a read burst and a write burst. Its
    commands go out through two registers (the decision's, then the IO register of a
    board), and read data come back through one (``read_latency`` = CL + 3 cycles after a
    READ is decided) into a ring of two bursts, which a READ starts only with a free entry
    for. Requests come in through a register slice
    (:class:`~rtl.memory.RegisterSlice`, a cycle of latency): the controller decides from
    registered addresses, and takes a request the cycle after it decides a READ or WRITE
    for it, so that the slice's ``ready`` and a write's data capture are flip-flops' fanout,
    not the open-row compare's (the 8x32 ULX3S build's critical path, 22.5 ns of routing:
    docs/results.md). A burst takes 8 cycles of the bus, so that cycle costs no bandwidth.
    The decision itself is made from flags registered the cycle before (per command:
    whether the request's row is open, its bank's timers and the bus allow it), and the
    cycle after a decision decides nothing, so that those flags need not see it: a cycle
    that the burst, tRCD or tRP hide (the SDRAM domain's critical path at 90 MHz once was
    the open-row compare, 79.05 MHz; at 100 MHz the decision into a bank's timers).

The address of a beat is ``(row, bank, column)``, column lowest: linear streams stay in one
row for ``2^col_bits`` beats, then move to the next bank.
"""

import math
from dataclasses import dataclass

from amaranth.hdl import Array, Cat, Const, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .memory import RegisterSlice

__all__ = ["BEATS", "BURST_BITS", "CHIPS", "SdramChip", "SdramController", "SdramPins",
           "burst_request"]

#: Beats per burst (the mode register's burst length) and the bits of a burst.
BEATS = 8
BURST_BITS = 16 * BEATS


@dataclass(frozen=True)
class SdramChip:
    """A 16-bit SDR SDRAM part: geometry and timings (ns unless said otherwise)."""

    name: str
    banks: int = 4
    row_bits: int = 13
    col_bits: int = 9
    tRCD: float = 20.0       # ACTIVATE to READ/WRITE
    tRP: float = 20.0        # PRECHARGE to ACTIVATE
    tRAS: float = 44.0       # ACTIVATE to PRECHARGE
    tRC: float = 66.0        # ACTIVATE to ACTIVATE, same bank
    tRRD: float = 15.0       # ACTIVATE to ACTIVATE, another bank
    tWR: float = 15.0        # last write data to PRECHARGE
    tRFC: float = 66.0       # AUTO REFRESH to anything
    tREFI: float = 7_812.5   # the average refresh interval (64 ms / 8192 rows)
    tMRD: int = 2            # LOAD MODE to anything (cycles)
    t_init: float = 200_000.0  # power-up wait before the first command
    init_refreshes: int = 8
    cl: int = 2              # CAS latency (cycles)
    #: the fastest clock the part runs at that CAS latency (the ULX3S's -7 and -75 parts:
    #: 100 MHz at CL 2, tCK >= 10 ns; CL 3 goes to 133-143 MHz)
    cl_max_hz: float = 100e6

    @property
    def bank_bits(self):
        return (self.banks - 1).bit_length()

    @property
    def beats(self):
        """16-bit beats in the part."""
        return self.banks << (self.row_bits + self.col_bits)

    @property
    def bytes(self):
        return 2 * self.beats

    def cycles(self, clk_hz):
        """The timings in clock cycles at ``clk_hz`` (each rounded up, at least 1)."""
        ns = 1e9 / clk_hz
        out = {k: max(1, math.ceil(getattr(self, k) / ns - 1e-9))
               for k in ("tRCD", "tRP", "tRAS", "tRC", "tRRD", "tWR", "tRFC", "t_init")}
        # refresh a little early: the interval is an average the chip allows to slip
        out["tREFI"] = int(self.tREFI / ns) - 16
        out["tMRD"], out["cl"] = self.tMRD, self.cl
        return out


#: The ULX3S's parts (its revisions differ) and a small one for fast simulation.
CHIPS = {
    "is42s16160": SdramChip("is42s16160", tRCD=15, tRP=15, tRAS=42, tRC=60, tRRD=14,
                            tWR=14, tRFC=60),
    "mt48lc16m16": SdramChip("mt48lc16m16", tRCD=18, tRP=18, tRAS=42, tRC=60, tRRD=12,
                             tWR=12, tRFC=60),
    "as4c32m16sb": SdramChip("as4c32m16sb", col_bits=10, tRCD=21, tRP=21, tRAS=42, tRC=63,
                             tRRD=14, tWR=14, tRFC=63),
    # 4 banks x 64 rows x 64 columns (32 KB): the same rules, simulated in seconds
    "tiny": SdramChip("tiny", row_bits=6, col_bits=6, t_init=2_000.0, init_refreshes=2),
}


class SdramPins:
    """The chip's pins, from the controller's side (command bits active high)."""

    class Signature(wiring.Signature):
        def __init__(self, chip):
            self.chip = chip
            super().__init__({
                "cke": Out(1), "cs": Out(1), "ras": Out(1), "cas": Out(1), "we": Out(1),
                "ba": Out(chip.bank_bits), "a": Out(max(chip.row_bits, 11)),
                "dqm": Out(2), "dq_o": Out(16), "dq_oe": Out(1), "dq_i": In(16),
            })


def burst_request(chip):
    """A burst request: its address (in bursts), read or write, and a write's data and
    byte mask (a set bit masks the byte: DQM)."""
    return data.StructLayout({
        "addr": (chip.beats // BEATS - 1).bit_length(), "write": 1,
        "data": BURST_BITS, "mask": 2 * BEATS,
    })


# SDRAM commands: (ras, cas, we) with cs high
NOP, ACT, READ, WRITE, PRE, REF, MRS = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1))


class SdramController(wiring.Component):
    """One 16-bit SDR SDRAM behind a stream of burst requests.

    Parameters
    ----------
    chip : SdramChip
    clk_hz : int
        The controller's clock (the chip runs at the same rate).

    Ports
    -----
    req : In(stream.Signature(burst_request(chip)))
    rdata : Out(stream.Signature(BURST_BITS))
        Read bursts, in request order; a READ is only started with room for its data.
    pins : Out(SdramPins.Signature(chip))
    ready : Out(1)
        The power-up sequence is done.
    refreshes : Out(32)
        Auto refreshes issued.

    Timing convention: a command decided in cycle T is on the pins in cycle T + 2 (the
    decision's register and the IO register), so the spacing the chip sees between two
    commands is the difference of their decision cycles; a write's beat k is on the pins
    with the command + k cycles, and a read's beat k reaches the controller's logic
    ``read_latency + k`` cycles after the decision (the two command registers, CL, the
    input register).
    """

    def __init__(self, chip, clk_hz):
        self.chip, self.clk_hz = chip, clk_hz
        self.t = chip.cycles(clk_hz)
        self.read_latency = chip.cl + 3
        super().__init__({
            "req": In(stream.Signature(burst_request(chip))),
            "rdata": Out(stream.Signature(BURST_BITS)),
            "pins": Out(SdramPins.Signature(chip)),
            "ready": Out(1), "refreshes": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        chip, t, pins = self.chip, self.t, self.pins
        nb, rl = chip.banks, self.read_latency
        # -- the command register -----------------------------------------------------------
        # A command is decided in cycle T, registered in T + 1 (``cmd_q``: the decision's
        # logic reaches no IO register, and a WRITE's data are taken from the request in
        # T + 1 by a flip-flop's enable), and on the pins in T + 2.
        cmd = Signal(3)                      # (ras, cas, we) decided this cycle; 0: none
        ba, a = Signal(chip.bank_bits), Signal(len(pins.a))
        cmd_q, ba_q, a_q = Signal.like(cmd), Signal.like(ba), Signal.like(a)
        m.d.sync += [cmd_q.eq(cmd), ba_q.eq(ba), a_q.eq(a),
                     pins.cs.eq(cmd_q != 0), Cat(pins.we, pins.cas, pins.ras).eq(cmd_q),
                     pins.ba.eq(ba_q), pins.a.eq(a_q), pins.cke.eq(1)]

        def issue(c, bank=0, addr=0):
            m.d.comb += [cmd.eq(Cat(Const(c[2], 1), Const(c[1], 1), Const(c[0], 1))),
                         ba.eq(bank), a.eq(addr)]

        # -- timers: cycles since an event's decision, saturating -------------------------
        lim = max(t["tRC"], t["tRAS"], t["tRP"], t["tRCD"], t["tRRD"],
                  BEATS - 1 + t["tWR"]) + 1

        def timer(name):
            s = Signal(range(lim + 1), name=name, init=lim)
            with m.If(s != lim):
                m.d.sync += s.eq(s + 1)
            return s

        since_act = Array([timer(f"since_act{b}") for b in range(nb)])
        since_pre = Array([timer(f"since_pre{b}") for b in range(nb)])
        since_wr = Array([timer(f"since_wr{b}") for b in range(nb)])   # a WRITE's decision
        since_any_act = timer("since_any_act")
        hold = Signal(range(max(t["tRFC"], t["tRP"], t["tMRD"]) + 1))  # no command until 0
        with m.If(hold != 0):
            m.d.sync += hold.eq(hold - 1)
        open_ = Signal(nb)
        row = Array([Signal(chip.row_bits, name=f"row{b}") for b in range(nb)])

        # -- the data bus ---------------------------------------------------------------------
        wr_wait = Signal(range(chip.cl + BEATS + 1))   # cycles until a WRITE may be decided
        rd_wait = Signal(range(BEATS))                 # cycles until a READ may be decided
        with m.If(wr_wait != 0):
            m.d.sync += wr_wait.eq(wr_wait - 1)
        with m.If(rd_wait != 0):
            m.d.sync += rd_wait.eq(rd_wait - 1)
        # write data: beat 0 with the command, the rest one a cycle
        wshift, wmask = Signal(BURST_BITS - 16), Signal(2 * BEATS - 2)
        wleft = Signal(range(BEATS))
        m.d.sync += [pins.dq_o.eq(wshift[:16]), pins.dqm.eq(wmask[:2]),
                     pins.dq_oe.eq(wleft != 0), wshift.eq(wshift >> 16), wmask.eq(wmask >> 2)]
        with m.If(wleft != 0):
            m.d.sync += wleft.eq(wleft - 1)
        # read data: the input register, then a burst assembled beat by beat
        dq_in = Signal(16)
        m.d.sync += dq_in.eq(pins.dq_i)
        starts = Signal(rl - 1 + BEATS)                # a 1 per READ decided, shifted along
        m.d.sync += starts.eq(starts << 1)
        beat = starts[rl - 1:].any()                   # dq_in holds a read beat
        # ... and its burst's last: READs are a burst apart, so that is the top bit alone (a
        # flip-flop: the FIFO's 128-bit write enables hang off nothing wider; as a count of
        # beats it was the 90 MHz SDRAM domain's critical path, docs/results.md)
        burst = starts[-1]
        rbuf = Signal(BURST_BITS)
        with m.If(beat):
            m.d.sync += rbuf.eq(Cat(rbuf[16:], dq_in))
        # Read bursts wait in a ring of DEPTH entries, written at ``wptr`` and read at ``rptr``
        # (an entry's enable is one register's compare, not the fill level's). A READ starts
        # only with a free entry for its burst: ``free`` counts the entries neither filled nor
        # promised to a READ in flight.
        depth = 2                                      # a power of 2: the pointers wrap
        fifo = Array([Signal(BURST_BITS, name=f"rfifo{k}") for k in range(depth)])
        wptr, rptr = Signal(range(depth)), Signal(range(depth))
        level, free = Signal(range(depth + 1)), Signal(range(depth + 1), init=depth)
        pop = self.rdata.valid & self.rdata.ready
        read_go = Signal()
        m.d.comb += [self.rdata.valid.eq(level != 0), self.rdata.payload.eq(fifo[rptr])]
        with m.If(burst):
            m.d.sync += [fifo[wptr].eq(Cat(rbuf[16:], dq_in)), wptr.eq(wptr + 1)]
        with m.If(pop):
            m.d.sync += rptr.eq(rptr + 1)
        m.d.sync += [level.eq(level + burst - pop), free.eq(free - read_go + pop)]
        inflight = Signal()                            # a READ's data still to come
        m.d.comb += inflight.eq(starts.any())

        # -- refresh: due every tREFI ---------------------------------------------------------
        ref_timer = Signal(range(t["tREFI"] + 1))
        due = Signal()
        with m.If(ref_timer != 0):
            m.d.sync += ref_timer.eq(ref_timer - 1)
        with m.Else():
            m.d.sync += due.eq(1)

        # -- the request ----------------------------------------------------------------------
        # requests are decided from a register: the ULX3S build missed 45 MHz (44.3) on the
        # path from the DMA's address walker through the open-row compare to the capture of
        # a write's data, 19 ns of it routing across the chip
        m.submodules.req_slice = req_slice = RegisterSlice(burst_request(chip))
        wiring.connect(m, wiring.flipped(self.req), req_slice.i)
        inp = req_slice.o
        req = inp.payload
        # A READ or WRITE decided in T takes its request from the slice in T + 1 (a registered
        # ``ready``: the open-row compare reaches no wide enable); T + 1 decides nothing for it.
        taken, taken_write = Signal(), Signal()
        m.d.comb += inp.ready.eq(taken)
        m.d.sync += [taken.eq(0), taken_write.eq(0)]
        with m.If(taken_write):                        # beat 0 on the pins with the WRITE
            m.d.sync += [pins.dq_o.eq(req.data[:16]), pins.dqm.eq(req.mask[:2]),
                         pins.dq_oe.eq(1), wshift.eq(req.data[16:]), wmask.eq(req.mask[2:]),
                         wleft.eq(BEATS - 1)]
        cb, bb = chip.col_bits - 3, chip.bank_bits
        col = Cat(Const(0, 3), req.addr[:cb])
        bank = req.addr[cb:cb + bb]
        r_row = req.addr[cb + bb:]
        # Every decision in RUN is made from flags registered the cycle before, and a cycle
        # in which a command is decided is followed by one that decides nothing
        # (``decided``): the flags of T - 1 then describe T exactly, or conservatively,
        # without the decision of T - 1 in their logic, since only a decision changes the
        # request, a bank, ``hold`` or the bus. (Bursts are 8 cycles apart, and tRCD and tRP
        # are a cycle or more: the gap costs nothing.) For the request (``known``: it was
        # there a cycle ago and not taken), per command whether it could go now: WRITE or
        # READ to its open row past tRCD with the bus free for it (a READ with a free ring
        # entry), PRECHARGE of another open row past tRAS and tWR with the bus idle, ACT of
        # a closed bank past tRP, tRC and tRRD. A timer only grows until a decision resets
        # it, so a limit met a cycle ago is met now (one met only now waits a cycle). The
        # compare through the bank's row into the FSM and a bank's timers was the SDRAM
        # domain's critical path at 90 MHz (79.05 MHz, seed 3); then, with the compare
        # registered, the request's ``valid`` through the decision into a bank's ACT timer
        # at 100 MHz (98.78 MHz, seed 1).
        is_open, same_row = open_.bit_select(bank, 1), row[bank] == r_row
        bus_idle = (wr_wait == 0) & (inflight == 0) & ~taken_write & (wleft <= 1)
        known, decided, quiet = Signal(), Signal(), Signal(init=1)
        can_write, can_read, can_close, can_open = Signal(), Signal(), Signal(), Signal()
        closable, idle_then = Signal(), Signal()
        m.d.sync += [
            known.eq(inp.valid & ~inp.ready), decided.eq(cmd != 0), quiet.eq(hold <= 1),
            can_write.eq(is_open & same_row & req.write & (since_act[bank] >= t["tRCD"])
                         & (wr_wait <= 1)),
            can_read.eq(is_open & same_row & ~req.write & (since_act[bank] >= t["tRCD"])
                        & (rd_wait <= 1) & (free != 0)),
            can_close.eq(is_open & ~same_row & (since_act[bank] >= t["tRAS"])
                         & (since_wr[bank] >= BEATS - 1 + t["tWR"]) & bus_idle),
            can_open.eq(~is_open & (since_pre[bank] >= t["tRP"])
                        & (since_act[bank] >= t["tRC"]) & (since_any_act >= t["tRRD"])),
            # every open bank past tRAS and tWR, for a refresh's PRECHARGE ALL
            closable.eq(Cat(*[~open_[b] | ((since_act[b] >= t["tRAS"])
                                           & (since_wr[b] >= BEATS - 1 + t["tWR"]))
                              for b in range(nb)]).all()),
            idle_then.eq(bus_idle),
        ]
        # (a write's data leave the pins a cycle after its decision's spacing says: wleft
        # counts from T + 1, and its last beat, wleft == 1, is the decision's T + 7)

        init_wait = Signal(range(t["t_init"] + 1), init=t["t_init"])
        init_refs = Signal(range(chip.init_refreshes + 1))
        with m.FSM():
            with m.State("POWER_UP"):
                with m.If(init_wait != 0):
                    m.d.sync += init_wait.eq(init_wait - 1)
                with m.Else():
                    issue(PRE, addr=1 << 10)                      # PRECHARGE ALL
                    m.d.sync += hold.eq(t["tRP"] - 1)
                    m.next = "INIT_REFRESH"
            with m.State("INIT_REFRESH"):
                with m.If(hold == 0):
                    issue(REF)
                    m.d.sync += [init_refs.eq(init_refs + 1), hold.eq(t["tRFC"] - 1)]
                    with m.If(init_refs == chip.init_refreshes - 1):
                        m.next = "INIT_MODE"
            with m.State("INIT_MODE"):
                with m.If(hold == 0):
                    # burst length 8, sequential, the CAS latency, burst writes
                    issue(MRS, addr=(chip.cl << 4) | 0b011)
                    m.d.sync += [hold.eq(t["tMRD"] - 1), ref_timer.eq(t["tREFI"]), due.eq(0)]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.ready.eq(1)
                with m.If(decided | ~quiet):
                    pass                          # the cycle after a decision, or hold
                with m.Elif(due):
                    with m.If(open_.any()):       # close every bank, then refresh
                        with m.If(closable & idle_then):
                            issue(PRE, addr=1 << 10)
                            m.d.sync += [open_.eq(0), hold.eq(t["tRP"] - 1)]
                            m.d.sync += [since_pre[b].eq(1) for b in range(nb)]
                    with m.Elif(idle_then):
                        issue(REF)
                        m.d.sync += [due.eq(0), ref_timer.eq(t["tREFI"]),
                                     hold.eq(t["tRFC"] - 1),
                                     self.refreshes.eq(self.refreshes + 1)]
                with m.Elif(known):
                    with m.If(can_write):
                        issue(WRITE, bank, col)
                        m.d.sync += [taken.eq(1), taken_write.eq(1),
                                     wr_wait.eq(BEATS - 1), rd_wait.eq(BEATS - 1),
                                     since_wr[bank].eq(1)]
                    with m.Elif(can_read):
                        issue(READ, bank, col)
                        m.d.comb += read_go.eq(1)
                        m.d.sync += [taken.eq(1), starts.eq((starts << 1) | 1),
                                     rd_wait.eq(BEATS - 1), wr_wait.eq(chip.cl + BEATS)]
                    with m.Elif(can_close):                     # another row: close it
                        issue(PRE, bank, 0)
                        m.d.sync += [open_.eq(open_ & ~(1 << bank)), since_pre[bank].eq(1)]
                    with m.Elif(can_open):                      # open the row
                        issue(ACT, bank, r_row)
                        m.d.sync += [open_.eq(open_ | (1 << bank)), row[bank].eq(r_row),
                                     since_act[bank].eq(1), since_any_act.eq(1)]
        return m
