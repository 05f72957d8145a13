"""The element-wise unit: what a training step needs besides GEMMs, on tensor memory.

Three operations (:class:`rtl.formats.VecOp`) over a ``rows`` x ``cols`` element matrix:

TRANSPOSE
    ``B[c][r] = A[r][c]`` with 1-nibble elements (activation codes) or, with ``pair``,
    2-nibble LOG4 code pairs. The engine writes results k-major (out^T); backward-weight
    reads the same tensors the other way round, and this makes that copy on the device.
UPDATE
    Momentum SGD on fixed-point master weights (8-nibble elements, see
    :data:`rtl.formats.MASTER_FRAC`): with G the RAW gradient accumulators at ``a``, W at
    ``b`` and V at ``c`` (W and V share ``b_stride``)::

        v' = sat((v * mu + 2^15) >> 16  +  round(g * M >> s))
        w' = sat(w - v')

    where ``M / 2^s`` is ``lr`` times the real unit of an accumulator, in master units,
    ``round(x >> s)`` adds ``2^(s-1)`` first (nothing for s = 0), ``>>`` floors and ``sat``
    saturates to MASTER_BITS. While it writes, the unit sums ``|t|`` and ``t^2`` of
    ``t = w' >> SAWB_SHIFT``: the SAWB statistics of the new weights (STATS reports them).
REQUANT
    INT4 codes ``clamp(round(w * M >> s), -7, 7)`` of the master weights at ``a`` into a
    1-nibble buffer at ``b`` (same rows and cols): the range-rescale rule of
    :func:`nibble.host.golden.numerics.rescale`, with ``M / 2^s`` = 1 / (SAWB step in master units).

Each operation is a small sequential machine on the unit's :class:`~rtl.memory.TensorBus`
(three read ports: A or G, W, V; the write port), with no multipliers in the address path:
:class:`VectorWalk` keeps the row and column pointers by adding strides. It takes 2
(TRANSPOSE), 5 (REQUANT) or 8 (UPDATE) cycles per element, plus one, while the memory grants
every request (a state that reads or writes waits for the grant). Every multiplier has
registered operands and a registered product (the ECP5 build missed 45 MHz by a third while
one multiplied a memory word straight after its read). Buffers are checked by the same
:class:`~rtl.bounds.BoundsCheck` as a GEMM's (``OUT_OF_RANGE`` when any lies outside the
memory, a dimension is 0, or a written row overlaps the next); overlapping buffers give an
undefined result.
"""

from amaranth.hdl import Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .bounds import DIM_BITS, BoundsCheck
from .formats import (
    MASTER_BITS,
    MASTER_MAX,
    MASTER_MIN,
    MOMENTUM_BITS,
    RAW_BITS,
    RAW_NIBBLES,
    RESCALE_M_BITS,
    RESCALE_SHIFT_MAX,
    SAWB_SHIFT,
    SAWB_SQ_BITS,
    SAWB_SUM_BITS,
    SAWB_T_BITS,
    WEIGHT_MAX,
    WEIGHT_MIN,
    VecOp,
    word_nibbles,
)
from .memory import ADDR_BITS, STRIDE_BITS, TensorBus, read_ports, write_request

__all__ = ["VEC_CFG", "VectorUnit", "VectorWalk"]

#: The VECTOR command's payload.
VEC_CFG = data.StructLayout({
    "op": VecOp,
    "pair": 1,            # TRANSPOSE: 2-nibble elements (LOG4 pairs)
    "rows": DIM_BITS, "cols": DIM_BITS,
    "a_addr": ADDR_BITS, "a_stride": STRIDE_BITS,
    "b_addr": ADDR_BITS, "b_stride": STRIDE_BITS,
    "c_addr": ADDR_BITS,
    "mu": MOMENTUM_BITS,  # UPDATE: momentum mu / 2^16
    "m": RESCALE_M_BITS,  # UPDATE: gradient factor; REQUANT: weight factor (M / 2^s)
    "s": range(RESCALE_SHIFT_MAX + 1),
})

_E_LOG = RAW_NIBBLES.bit_length() - 1       # log2 of a master's nibbles
_PROD = MASTER_BITS + RESCALE_M_BITS + 1


def _round_shift(p, s):
    """``(p + 2^(s-1)) >> s`` (plain ``p`` for s = 0), arithmetic, for ``s`` in 0..63."""
    return (p + Mux(s == 0, 0, (Const(1, 64) << (s - 1)[:6])[:64])) >> s


def _sat(x):
    return Mux(x > MASTER_MAX, MASTER_MAX, Mux(x < MASTER_MIN, MASTER_MIN, x))


class VectorWalk(wiring.Component):
    """Element ``(r, c)`` of a VECTOR command and where it lives, kept by adding strides.

    Ports: ``cfg`` (In ``VEC_CFG``), ``launch`` and ``step`` (In: start over; the current
    element is done), ``last`` (Out: it is the last element), ``off`` (Out: its nibble
    offset in its word of A, W and V), ``a_at``, ``w_at``, ``v_at`` (Out: the words of
    A (or G), W and V), ``q_at``, ``q_off`` (REQUANT: where its code goes), ``t_at``,
    ``t_off`` (TRANSPOSE: where ``B[c][r]`` goes).
    """

    def __init__(self, addr_width, nibbles):
        self.nib = nibbles
        super().__init__({
            "cfg": In(VEC_CFG), "launch": In(1), "step": In(1), "last": Out(1),
            "off": Out(range(nibbles)), "a_at": Out(addr_width), "w_at": Out(addr_width),
            "v_at": Out(addr_width), "q_at": Out(addr_width), "q_off": Out(range(nibbles)),
            "t_at": Out(addr_width), "t_off": Out(range(nibbles)),
        })
        self.aw = addr_width

    def elaborate(self, platform):
        m = Module()
        cfg, lnib = self.cfg, self.nib.bit_length() - 1
        # log2 of the read element's nibbles: TRANSPOSE 0/1, UPDATE and REQUANT a master's
        e_log = Mux(cfg.op == VecOp.TRANSPOSE, cfg.pair, _E_LOG)
        r, c = Signal(DIM_BITS), Signal(DIM_BITS)
        a_row, b_row, c_row = Signal(self.aw), Signal(self.aw), Signal(self.aw)  # + r * stride
        t_col = Signal(self.aw)           # TRANSPOSE: b_addr + c * b_stride
        cnib = Signal(DIM_BITS + 3)       # c * (read element nibbles)
        rnib = Signal(DIM_BITS + 1)       # TRANSPOSE: r * (element nibbles)
        m.d.comb += [
            self.last.eq((c == cfg.cols - 1) & (r == cfg.rows - 1)),
            self.off.eq(cnib[:lnib]),
            self.a_at.eq(a_row + (cnib >> lnib)), self.w_at.eq(b_row + (cnib >> lnib)),
            self.v_at.eq(c_row + (cnib >> lnib)), self.q_at.eq(b_row + (c >> lnib)),
            self.q_off.eq(c[:lnib]),
            self.t_at.eq(t_col + (rnib >> lnib)), self.t_off.eq(rnib[:lnib]),
        ]
        with m.If(self.launch):
            m.d.sync += [r.eq(0), c.eq(0), cnib.eq(0), rnib.eq(0), a_row.eq(cfg.a_addr),
                         b_row.eq(cfg.b_addr), c_row.eq(cfg.c_addr), t_col.eq(cfg.b_addr)]
        with m.Elif(self.step):
            with m.If(c == cfg.cols - 1):
                m.d.sync += [c.eq(0), cnib.eq(0), r.eq(r + 1), rnib.eq(rnib + (1 << e_log)),
                             a_row.eq(a_row + cfg.a_stride), b_row.eq(b_row + cfg.b_stride),
                             c_row.eq(c_row + cfg.b_stride), t_col.eq(cfg.b_addr)]
            with m.Else():
                m.d.sync += [c.eq(c + 1), cnib.eq(cnib + (1 << e_log)),
                             t_col.eq(t_col + cfg.b_stride)]
        return m


class VectorUnit(wiring.Component):
    """Runs one VEC_CFG operation at a time on tensor memory.

    Ports: ``cfg`` (held constant while busy, like the engine's), ``start``, ``checked``,
    ``ok``, ``busy``, ``cycles`` (of the last operation), ``sum_abs``/``sum_sq`` (SAWB
    statistics of the last UPDATE) and ``bus`` (``rd0`` A or G, ``rd1`` W, ``rd2`` V,
    ``wr``).
    """

    def __init__(self, rows, cols, mem_words):
        self.mem_words = mem_words
        self.nib = word_nibbles(rows, cols)
        self.aw = (mem_words - 1).bit_length()
        super().__init__({
            "cfg": In(VEC_CFG), "start": In(1), "checked": Out(1), "ok": Out(1),
            "busy": Out(1), "cycles": Out(32),
            "sum_abs": Out(SAWB_SUM_BITS), "sum_sq": Out(SAWB_SQ_BITS),
            "bus": Out(TensorBus.Signature(addr_width=self.aw, nibbles=self.nib)),
        })

    def _buffers(self, m, check):
        """The check's view of A (or G), B (W, or the codes) and V."""
        cfg, lnib = self.cfg, self.nib.bit_length() - 1
        op = cfg.op
        t, u = op == VecOp.TRANSPOSE, op == VecOp.UPDATE
        masters = cfg.cols << _E_LOG
        bufs = [  # addr, stride, rows, nibbles per row, written, used
            (cfg.a_addr, cfg.a_stride, cfg.rows, Mux(t, cfg.cols << cfg.pair, masters), 0, 1),
            (cfg.b_addr, cfg.b_stride, Mux(t, cfg.cols, cfg.rows),
             Mux(t, cfg.rows << cfg.pair, Mux(u, masters, cfg.cols)), 1, 1),
            (cfg.c_addr, cfg.b_stride, cfg.rows, masters, 1, u),
        ]
        for b, (addr, stride, rows, nibbles, written, used) in zip(check.buffers, bufs,
                                                                    strict=True):
            m.d.comb += [b.addr.eq(addr), b.stride.eq(stride), b.rows.eq(rows),
                         b.words.eq((nibbles + self.nib - 1) >> lnib), b.written.eq(written),
                         b.used.eq(used)]

    def elaborate(self, platform):
        m = Module()
        cfg, NIB, bus = self.cfg, self.nib, self.bus
        op = cfg.op
        m.submodules.check = check = BoundsCheck(3, self.mem_words)
        self._buffers(m, check)
        m.submodules.walk = walk = VectorWalk(self.aw, NIB)
        launch, step, cyc = Signal(), Signal(), Signal(32)
        dims_ok = (cfg.rows != 0) & (cfg.cols != 0) & (Value.cast(op) <= VecOp.REQUANT)
        go = Signal()
        m.d.sync += go.eq(self.start & ~self.busy)
        m.d.comb += [check.start.eq(go), self.checked.eq(check.done),
                     self.ok.eq(check.ok & dims_ok), launch.eq(self.checked & self.ok),
                     walk.cfg.eq(cfg), walk.launch.eq(launch), walk.step.eq(step)]
        with m.If(self.start & ~self.busy):
            m.d.sync += self.busy.eq(1)
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)
        with m.If(launch):
            m.d.sync += cyc.eq(0)
            with m.If(op == VecOp.UPDATE):
                m.d.sync += [self.sum_abs.eq(0), self.sum_sq.eq(0)]
        with m.Elif(self.busy & ~go):
            m.d.sync += cyc.eq(cyc + 1)

        elems = [Signal(signed(MASTER_BITS), name=f"elem_{n}") for n in "awv"]
        for e, rd in zip(elems, read_ports(bus), strict=True):
            m.d.comb += e.eq(rd.data.word_select(walk.off >> _E_LOG, RAW_BITS)
                             if NIB > RAW_NIBBLES else rd.data)

        # Writes go through a register: a write lands the cycle after its state, while the
        # machine moves on (a TRANSPOSE read, its nibble select, the write shift, the
        # arbiter and the memory's data input in one cycle limited the ECP5 to 44.7 MHz).
        wreq = Signal(write_request(self.aw, NIB))
        wvalid = Signal()
        free = Signal()
        m.d.comb += [bus.wr.addr.eq(wreq.addr), bus.wr.data.eq(wreq.data),
                     bus.wr.en.eq(Mux(wvalid, wreq.en, 0)),
                     free.eq(~wvalid | bus.wr.ready)]
        with m.If(bus.wr.ready):
            m.d.sync += wvalid.eq(0)

        def write(addr, value, nibbles, at):
            """Issue a write (once the register is free); returns whether it was."""
            with m.If(free):
                m.d.sync += [wreq.addr.eq(addr), wreq.data.eq(value << (at << 2)),
                             wreq.en.eq(Const((1 << nibbles) - 1, NIB) << at), wvalid.eq(1)]
            return free

        # every multiplier has registered operands and a registered product
        g, w, v = (Signal(signed(MASTER_BITS), name=n) for n in ("g", "w", "v"))
        pv = Signal(signed(MASTER_BITS + MOMENTUM_BITS + 1))
        pg = Signal(signed(_PROD))
        a_part, b_part = Signal(signed(MASTER_BITS + 1)), Signal(signed(_PROD))
        v_new, w_new = Signal(signed(MASTER_BITS)), Signal(signed(MASTER_BITS))
        t = Signal(signed(SAWB_T_BITS))
        mag, sq = Signal(SAWB_T_BITS), Signal(2 * SAWB_T_BITS)
        acc = Signal()                    # mag and sq hold an element to add to the sums
        m.d.sync += acc.eq(0)
        with m.If(acc):
            m.d.sync += [self.sum_abs.eq(self.sum_abs + mag), self.sum_sq.eq(self.sum_sq + sq)]

        def next_element(done=1):
            with m.If(done):
                m.d.comb += step.eq(1)
                m.next = "DONE"
                with m.If(~walk.last):
                    m.next = "READ"

        with m.FSM():
            with m.State("IDLE"):
                with m.If(launch):
                    m.next = "READ"
            with m.State("READ"):                 # element (r, c) of A, W and V
                u = op == VecOp.UPDATE
                ats = (walk.a_at, walk.w_at, walk.v_at)
                for rd, at, used in zip(read_ports(bus), ats, (1, u, u), strict=True):
                    m.d.comb += [rd.addr.eq(at), rd.en.eq(used)]
                granted = bus.rd0.ready & (~u | (bus.rd1.ready & bus.rd2.ready))
                with m.If(granted):
                    with m.Switch(op):
                        with m.Case(VecOp.TRANSPOSE):
                            m.next = "T_WRITE"
                        with m.Case(VecOp.UPDATE):
                            m.next = "U_LATCH"
                        with m.Default():
                            m.next = "Q_LATCH"
            with m.State("T_WRITE"):
                pair = bus.rd0.data.bit_select(walk.off << 2, 8)
                with m.If(cfg.pair):
                    next_element(write(walk.t_at, pair[:8], 2, walk.t_off))
                with m.Else():
                    next_element(write(walk.t_at, pair[:4], 1, walk.t_off))
            with m.State("Q_LATCH"):
                m.d.sync += w.eq(elems[0])
                m.next = "Q_MUL"
            with m.State("Q_MUL"):
                m.d.sync += pg.eq(w * cfg.m)
                m.next = "Q_SHIFT"
            with m.State("Q_SHIFT"):
                m.d.sync += b_part.eq(_round_shift(pg, cfg.s))
                m.next = "Q_WRITE"
            with m.State("Q_WRITE"):
                code = Mux(b_part > WEIGHT_MAX, WEIGHT_MAX,
                           Mux(b_part < WEIGHT_MIN, WEIGHT_MIN, b_part))
                next_element(write(walk.q_at, code[:4], 1, walk.q_off))
            with m.State("U_LATCH"):
                m.d.sync += [g.eq(elems[0]), w.eq(elems[1]), v.eq(elems[2])]
                m.next = "U_MUL"
            with m.State("U_MUL"):
                m.d.sync += [pv.eq(v * cfg.mu), pg.eq(g * cfg.m)]
                m.next = "U_SHIFT"
            with m.State("U_SHIFT"):
                m.d.sync += [a_part.eq((pv + (1 << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS),
                             b_part.eq(_round_shift(pg, cfg.s))]
                m.next = "U_ADD"
            with m.State("U_ADD"):
                m.d.sync += v_new.eq(_sat(a_part + b_part))
                m.next = "U_SUB"
            with m.State("U_SUB"):
                m.d.sync += w_new.eq(_sat(w - v_new))
                m.next = "U_WRITE_V"
            with m.State("U_WRITE_V"):
                with m.If(write(walk.v_at, v_new.as_unsigned(), RAW_NIBBLES, walk.off)):
                    m.d.sync += t.eq(w_new >> SAWB_SHIFT)
                    m.next = "U_WRITE_W"
            with m.State("U_WRITE_W"):
                done = write(walk.w_at, w_new.as_unsigned(), RAW_NIBBLES, walk.off)
                with m.If(done):
                    m.d.sync += [mag.eq(Mux(t < 0, -t, t)), sq.eq((t * t).as_unsigned()),
                                 acc.eq(1)]
                next_element(done)
            with m.State("DONE"):                 # the last sums are in, the last write out
                with m.If(~wvalid | bus.wr.ready):
                    m.d.sync += [self.busy.eq(0), self.cycles.eq(cyc + 1)]
                    m.next = "IDLE"
        return m
