"""A 16-bit SDR SDRAM chip in Amaranth: it stores data and flags every broken rule.

:class:`SdramChipModel` takes the pins of :class:`nibble.rtl.sdram.SdramPins` (the
controller's side, command bits active high) and behaves like the part it is given: four
banks of rows of columns, a mode register (burst length 8, sequential, CAS latency 2 or 3),
bursts with byte masks, auto refresh. It is written from the datasheet rules, not from the
controller, and checks them all, setting a bit of ``flags`` (sticky, one per
:class:`Flag`) for each kind of violation and counting them in ``violations``:

* timing, in cycles of the model's clock against the part's nanoseconds: tRCD, tRP, tRAS,
  tRC, tRRD, tWR (last write beat to PRECHARGE), tRFC and tMRD;
* state: READ or WRITE to a bank with no open row, ACTIVATE to an open bank, REFRESH or
  LOAD MODE while a bank is open, a command while CKE is low, auto precharge (A10 on READ
  or WRITE, which the controller never uses);
* initialisation: a command before the power-up wait, ACTIVATE before the mode register
  is set or before ``init_refreshes`` refreshes, a mode the model does not implement;
* refresh: more than 8 refreshes owed (every ``tREFI`` adds one, every REFRESH pays one,
  up to 8 ahead), i.e. a row's retention window missed;
* the data bus: a READ or WRITE that cuts a burst short (or a PRECHARGE a read burst of
  its bank), the controller driving DQ while
  the chip drives it (or in the cycle after, the turnaround), write beats not driven.

Timing of the pins (a zero-delay simulation of the board's clocking, where the SDRAM clock
lags the FPGA's by 90 degrees): the model sees a command in the cycle its pins show it,
takes write beat ``k`` from ``dq_o`` in the command's cycle + ``k``, and drives read beat
``k`` on ``dq_i`` in the command's cycle + CL + ``k``, so that the FPGA's input register
holds it one cycle later, as on the board.

Storage: an Amaranth memory for small parts (the ``tiny`` chip of the unit tests), or for
parts too large for Amaranth's in-memory initial values (32 MB: a Python list of sixteen
million constants), an instance of ``nibble_sdram_array`` from ``sdram_array.v`` next to
this file, for the Verilator system model.
"""

import math
from pathlib import Path

from amaranth.hdl import Array, Cat, ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import enum, memory, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.sdram import BEATS, SdramPins

__all__ = ["ARRAY_VERILOG", "Flag", "SdramChipModel"]

#: The Verilog storage array of large parts (see the module docstring).
ARRAY_VERILOG = Path(__file__).with_name("sdram_array.v")


class Flag(enum.IntEnum):
    """Kinds of violation (bit numbers of ``flags``)."""

    T_RCD = 0
    T_RP = 1
    T_RAS = 2
    T_RC = 3
    T_RRD = 4
    T_WR = 5
    T_RFC = 6
    T_MRD = 7
    BANK_CLOSED = 8      # READ or WRITE with no open row
    BANK_OPEN = 9        # ACTIVATE to an open bank; REFRESH or LOAD MODE with one open
    INIT = 10            # a command too early in the power-up sequence
    MODE = 11            # a mode register value the model does not implement
    REFRESH = 12         # more than 8 refreshes owed
    BURST_CUT = 13       # READ, WRITE or a bank's PRECHARGE before the last burst ended
    BUS = 14             # both ends drive DQ, or a write beat is not driven
    UNSUPPORTED = 15     # auto precharge, CKE low, burst terminate


class SdramChipModel(wiring.Component):
    """Parameters
    ----------
    chip : nibble.rtl.sdram.SdramChip
    clk_hz : int
        The clock the model runs at (its timing checks convert the part's ns to it).
    storage : "memory" or "verilog"
        Where the data live (module docstring); by default "memory" up to 2^20 beats.

    Ports
    -----
    pins : In(SdramPins.Signature(chip))
    flags : Out(16)
        One sticky bit per :class:`Flag` seen.
    violations : Out(32)
        Violations counted (several in one cycle count once).
    commands : Out(32)
        Commands seen (ACTIVATE, READ, WRITE, PRECHARGE, REFRESH, LOAD MODE).
    """

    def __init__(self, chip, clk_hz, storage=None):
        self.chip, self.clk_hz = chip, clk_hz
        self.storage = storage or ("memory" if chip.beats <= 1 << 20 else "verilog")
        ns = 1e9 / clk_hz
        # the fewest cycles between two commands that a timing in ns allows (own rounding,
        # written apart from the controller's)
        self.min = {k: math.ceil(getattr(chip, k) / ns - 1e-6)
                    for k in ("tRCD", "tRP", "tRAS", "tRC", "tRRD", "tWR", "tRFC")}
        self.min["tMRD"] = chip.tMRD
        self.init_cycles = math.ceil(chip.t_init / ns)
        self.refi_cycles = int(chip.tREFI / ns)
        super().__init__({"pins": In(SdramPins.Signature(chip)), "flags": Out(16),
                          "violations": Out(32), "commands": Out(32)})

    def elaborate(self, platform):
        m = Module()
        chip, p, t = self.chip, self.pins, self.min
        nb, cb, rb = chip.banks, chip.col_bits, chip.row_bits
        bad = Signal(16)                       # violations seen this cycle
        m.d.sync += self.flags.eq(self.flags | bad)
        with m.If(bad != 0):
            m.d.sync += self.violations.eq(self.violations + 1)

        def flag(kind, cond):
            with m.If(cond):
                m.d.comb += bad[kind].eq(1)

        # -- the command on the pins ---------------------------------------------------------
        on = p.cs & p.cke
        is_ = {name: on & (Cat(p.we, p.cas, p.ras) == code) for name, code in
               (("act", 0b100), ("read", 0b010), ("write", 0b011), ("pre", 0b101),
                ("ref", 0b110), ("mrs", 0b111), ("bst", 0b001))}
        any_cmd = on & (Cat(p.we, p.cas, p.ras) != 0)
        with m.If(any_cmd):
            m.d.sync += self.commands.eq(self.commands + 1)
        bank, a10 = p.ba, p.a[10]
        col = p.a[:cb]

        # -- counters: cycles since events, saturating ------------------------------------
        top = max(t.values()) + BEATS + 2

        def since(name):
            s = Signal(range(top + 1), name=name, init=top)
            with m.If(s != top):
                m.d.sync += s.eq(s + 1)
            return s

        act = [since(f"since_act{b}") for b in range(nb)]
        pre = [since(f"since_pre{b}") for b in range(nb)]
        wr_end = [since(f"since_wr_end{b}") for b in range(nb)]    # the last write beat
        any_act, ref, mrs = since("since_any_act"), since("since_ref"), since("since_mrs")
        open_ = Signal(nb)
        row = [Signal(rb, name=f"row{b}") for b in range(nb)]

        # -- initialisation -----------------------------------------------------------------
        age = Signal(range(self.init_cycles + 1))
        with m.If(age != self.init_cycles):
            m.d.sync += age.eq(age + 1)
        refs = Signal(range(chip.init_refreshes + 1))
        mode_set, cl = Signal(), Signal(2)
        flag(Flag.INIT, any_cmd & (age != self.init_cycles))
        flag(Flag.UNSUPPORTED, (age == self.init_cycles) & ~p.cke)
        flag(Flag.UNSUPPORTED, is_["bst"] | ((is_["read"] | is_["write"]) & a10))

        # -- refresh debt: one owed every tREFI once the mode is set, up to 8 ahead ---------
        refi = Signal(range(self.refi_cycles + 1))
        debt = Signal(range(-9, 10))
        tick = mode_set & (refi == self.refi_cycles - 1)
        with m.If(mode_set):
            m.d.sync += refi.eq(Mux(tick, 0, refi + 1))
        with m.If(tick & ~is_["ref"] & (debt < 9)):
            m.d.sync += debt.eq(debt + 1)
        with m.Elif(is_["ref"] & ~tick & (debt > -8)):
            m.d.sync += debt.eq(debt - 1)
        flag(Flag.REFRESH, debt > 8)

        # -- the commands ---------------------------------------------------------------------
        for b in range(nb):
            here = bank == b
            with m.If(is_["act"] & here):
                flag(Flag.BANK_OPEN, open_[b])
                flag(Flag.T_RP, pre[b] < t["tRP"])
                flag(Flag.T_RC, act[b] < t["tRC"])
                m.d.sync += [open_[b].eq(1), row[b].eq(p.a[:rb]), act[b].eq(1)]
            with m.If((is_["read"] | is_["write"]) & here):
                flag(Flag.BANK_CLOSED, ~open_[b])
                flag(Flag.T_RCD, act[b] < t["tRCD"])
            with m.If(is_["pre"] & (here | a10)):
                with m.If(open_[b]):
                    flag(Flag.T_RAS, act[b] < t["tRAS"])
                    flag(Flag.T_WR, wr_end[b] < t["tWR"])
                m.d.sync += [open_[b].eq(0), pre[b].eq(1)]
        with m.If(is_["act"]):
            flag(Flag.T_RRD, any_act < t["tRRD"])
            flag(Flag.INIT, ~mode_set | (refs != chip.init_refreshes))
            m.d.sync += any_act.eq(1)
        with m.If(is_["ref"]):
            flag(Flag.BANK_OPEN, open_ != 0)
            flag(Flag.T_RP, Cat(*[pre[b] < t["tRP"] for b in range(nb)]).any())
            m.d.sync += ref.eq(1)
            with m.If(refs != chip.init_refreshes):
                m.d.sync += refs.eq(refs + 1)
        with m.If(is_["mrs"]):
            flag(Flag.BANK_OPEN, open_ != 0)
            # burst length 8, sequential, CL 2 or 3, burst writes, no test mode
            ok = ((p.a[:4] == 0b0011) & ((p.a[4:7] == 2) | (p.a[4:7] == 3))
                  & (p.a[7:] == 0))
            flag(Flag.MODE, ~ok)
            m.d.sync += [mode_set.eq(1), cl.eq(p.a[4:6]), mrs.eq(1)]
        flag(Flag.T_RFC, any_cmd & (ref < t["tRFC"]))
        flag(Flag.T_MRD, any_cmd & (mrs < t["tMRD"]))
        flag(Flag.INIT, (is_["read"] | is_["write"]) & ~mode_set)

        # -- bursts ---------------------------------------------------------------------------
        # the storage: (bank, row, column) -> one 16-bit beat
        aw = chip.bank_bits + rb + cb
        raddr, waddr = Signal(aw), Signal(aw)
        wdata, wbe, we, rdata = Signal(16), Signal(2), Signal(), Signal(16)
        self._storage(m, aw, raddr, rdata, waddr, wdata, wbe, we)
        row_of = Array(row)[bank]

        def burst_col(start, k):        # sequential bursts wrap within 8 columns
            return Cat((start[:3] + k)[:3], start[3:])

        # a READ or WRITE less than 8 cycles after the last one cuts its burst short
        since_rw = since("since_rw")
        rw = is_["read"] | is_["write"]
        flag(Flag.BURST_CUT, rw & (since_rw < BEATS))
        with m.If(rw):
            m.d.sync += since_rw.eq(1)
        # writes: beat k from dq_o in the command's cycle + k
        w_left = Signal(range(BEATS))
        w_bank, w_row, w_col, w_k = Signal(chip.bank_bits), Signal(rb), Signal(cb), Signal(3)
        with m.If(is_["write"]):
            m.d.comb += [waddr.eq(Cat(col, row_of, bank)), wdata.eq(p.dq_o),
                         wbe.eq(~p.dqm), we.eq(open_.bit_select(bank, 1))]
            flag(Flag.BUS, ~p.dq_oe)
            m.d.sync += [w_left.eq(BEATS - 1), w_bank.eq(bank), w_row.eq(row_of),
                         w_col.eq(col), w_k.eq(1)]
        with m.Elif(w_left != 0):
            m.d.comb += [waddr.eq(Cat(burst_col(w_col, w_k), w_row, w_bank)),
                         wdata.eq(p.dq_o), wbe.eq(~p.dqm), we.eq(1)]
            flag(Flag.BUS, ~p.dq_oe)
            m.d.sync += [w_left.eq(w_left - 1), w_k.eq(w_k + 1)]
            with m.If(w_left == 1):                 # the last beat: tWR counts from it
                for b in range(nb):
                    with m.If(w_bank == b):
                        m.d.sync += wr_end[b].eq(1)
        # reads: the storage is read from the command's cycle on (beat k's address in the
        # command's cycle + k, its data the cycle after), and the data are delayed to drive
        # beat k on dq_i in the command's cycle + CL + k
        r_left = Signal(range(BEATS))
        r_bank, r_row, r_col, r_k = Signal(chip.bank_bits), Signal(rb), Signal(cb), Signal(3)
        reading = Signal()
        with m.If(is_["read"]):
            m.d.comb += [reading.eq(1), raddr.eq(Cat(col, row_of, bank))]
            m.d.sync += [r_left.eq(BEATS - 1), r_bank.eq(bank), r_row.eq(row_of),
                         r_col.eq(col), r_k.eq(1)]
        with m.Elif(r_left != 0):
            m.d.comb += [reading.eq(1), raddr.eq(Cat(burst_col(r_col, r_k), r_row, r_bank))]
            m.d.sync += [r_left.eq(r_left - 1), r_k.eq(r_k + 1)]
        # a PRECHARGE of the reading bank ends its burst CL - 1 cycles later: before the
        # READ's cycle + 8 it cuts the burst short
        flag(Flag.BURST_CUT, is_["pre"] & (r_left != 0) & (a10 | (bank == r_bank)))
        got = Signal()                          # rdata holds a beat
        d1, d2, v1, v2 = Signal(16), Signal(16), Signal(), Signal()
        m.d.sync += [got.eq(reading), d1.eq(rdata), v1.eq(got), d2.eq(d1), v2.eq(v1)]
        m.d.comb += p.dq_i.eq(Mux(cl == 3, Mux(v2, d2, 0), Mux(v1, d1, 0)))
        # the chip drives DQ for the 8 beats, and the cycle after is the turnaround
        drive = Signal(BEATS + 4)              # bit j: the chip drives in j cycles
        m.d.sync += drive.eq(drive >> 1)
        with m.If(is_["read"]):
            span = (1 << (BEATS + 1)) - 1
            m.d.sync += drive.eq((drive >> 1) | Mux(cl == 3, span << 2, span << 1))
        flag(Flag.BUS, p.dq_oe & drive[0])
        return m

    def _storage(self, m, aw, raddr, rdata, waddr, wdata, wbe, we):
        if self.storage == "memory":
            m.submodules.array = mem = memory.Memory(shape=16, depth=1 << aw, init=[])
            self.array = mem
            r = mem.read_port()
            w = mem.write_port(granularity=8)
            m.d.comb += [r.addr.eq(raddr), rdata.eq(r.data), w.addr.eq(waddr),
                         w.data.eq(wdata), w.en.eq(Mux(we, wbe, 0))]
        else:
            m.submodules.array = Instance(
                "nibble_sdram_array", p_AW=aw, i_clk=ClockSignal("sync"),
                i_raddr=raddr, o_rdata=rdata, i_waddr=waddr, i_wdata=wdata, i_wbe=wbe,
                i_we=we)

