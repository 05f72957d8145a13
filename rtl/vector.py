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

Each operation is a small sequential machine on three read ports (the GEMM engine's: the
two never run together) and the write port, with no
multipliers in the address path: row and column pointers are kept by adding strides. It
takes 2 (TRANSPOSE), 5 (REQUANT) or 8 (UPDATE) cycles per element, plus one. Every
multiplier has registered operands and a registered product (the ECP5 build missed 45 MHz
by a third while one multiplied a memory word straight after its read). Buffers are checked
like a GEMM's (``OUT_OF_RANGE`` when any lies outside the memory, a dimension is 0, or a
written row overlaps the next); overlapping buffers give an undefined result.
"""

from amaranth.hdl import Array, Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .engine import ADDR, DIM, STRIDE, read_port_signature, word_nibbles
from .formats import (
    MASTER_BITS,
    MASTER_MAX,
    MASTER_MIN,
    MOMENTUM_BITS,
    RESCALE_M_BITS,
    SAWB_SHIFT,
    SAWB_SQ_BITS,
    SAWB_SUM_BITS,
    SAWB_T_BITS,
    WEIGHT_MAX,
    WEIGHT_MIN,
    VecOp,
)

__all__ = ["VEC_CFG", "VectorUnit"]

#: The VECTOR command's payload.
VEC_CFG = data.StructLayout({
    "op": 2,              # a VecOp
    "pair": 1,            # TRANSPOSE: 2-nibble elements (LOG4 pairs)
    "rows": DIM, "cols": DIM,
    "a_addr": ADDR, "a_stride": STRIDE,
    "b_addr": ADDR, "b_stride": STRIDE,
    "c_addr": ADDR,
    "mu": MOMENTUM_BITS,  # UPDATE: momentum mu / 2^16
    "m": RESCALE_M_BITS,  # UPDATE: gradient factor; REQUANT: weight factor (M / 2^s)
    "s": 6,
})

_ELEM = 8                 # nibbles of a master weight, a momentum or a RAW accumulator
_PROD = MASTER_BITS + RESCALE_M_BITS + 1


def _round_shift(m, p, s, name):
    """``(p + 2^(s-1)) >> s`` (plain ``p`` for s = 0), arithmetic, for ``s`` in 0..63."""
    half = Signal(64, name=f"{name}_half")
    m.d.comb += half.eq(Mux(s == 0, 0, Const(1, 64) << (s - 1)[:6]))
    return (p + half) >> s


def _sat(m, x, name):
    out = Signal(signed(MASTER_BITS), name=name)
    m.d.comb += out.eq(Mux(x > MASTER_MAX, MASTER_MAX, Mux(x < MASTER_MIN, MASTER_MIN, x)))
    return out


class VectorUnit(wiring.Component):
    """Runs one VEC_CFG operation at a time on tensor memory.

    Ports: ``cfg`` (held constant while busy, like the engine's), ``start``, ``checked``,
    ``ok``, ``busy``, ``cycles`` (of the last operation), ``sum_abs``/``sum_sq`` (SAWB
    statistics of the last UPDATE), ``rd`` (three read ports: A, W and V) and the write port
    ``wr_*``.
    """

    def __init__(self, rows, cols, mem_words):
        self.mem_words = mem_words
        self.nib = word_nibbles(rows, cols)
        super().__init__({
            "cfg": In(VEC_CFG),
            "start": In(1),
            "checked": Out(1),
            "ok": Out(1),
            "busy": Out(1),
            "cycles": Out(32),
            "sum_abs": Out(SAWB_SUM_BITS),
            "sum_sq": Out(SAWB_SQ_BITS),
            "rd": Out(read_port_signature(mem_words, self.nib)).array(3),
            "wr_addr": Out(range(mem_words)),
            "wr_data": Out(4 * self.nib),
            "wr_en": Out(self.nib),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, NIB = self.cfg, self.nib
        lnib = NIB.bit_length() - 1
        aw = self.mem_words.bit_length() - 1
        op = cfg.op
        # log2 of the read element's nibbles: TRANSPOSE 0/1, UPDATE and REQUANT 3
        e_log = Mux(op == VecOp.TRANSPOSE, cfg.pair, 3)

        # -- the range check: buffer by buffer, three cycles each (select, multiply, add) ---
        def words(nibbles):
            return (nibbles + NIB - 1) >> lnib

        cols8 = cfg.cols << 3
        bufs = [  # (addr, stride, rows, row words, written, used)
            (cfg.a_addr, cfg.a_stride, cfg.rows, words(cfg.cols << e_log), 0, 1),
            (cfg.b_addr, cfg.b_stride,
             Mux(op == VecOp.TRANSPOSE, cfg.cols, cfg.rows),
             words(Mux(op == VecOp.TRANSPOSE, cfg.rows << cfg.pair,
                       Mux(op == VecOp.UPDATE, cols8, cfg.cols))), 1, 1),
            (cfg.c_addr, cfg.b_stride, cfg.rows, words(cols8), 1, op == VecOp.UPDATE),
        ]
        n = len(bufs)
        idx = Signal(range(n))

        def pick(i):
            return Array(Value.cast(b[i]) for b in bufs)[idx]

        c_addr, c_stride, c_rows, c_words = (Signal(ADDR), Signal(STRIDE), Signal(DIM),
                                             Signal(DIM + 1))
        c_written, c_used = Signal(), Signal()
        c_prod = Signal(DIM + STRIDE)
        end = Signal(ADDR + DIM + STRIDE + 1)
        phase = Signal(range(3))
        bad = Signal()
        checking = Signal()
        dims_ok = (cfg.rows != 0) & (cfg.cols != 0) & (op <= VecOp.REQUANT)
        fail = Signal()
        m.d.comb += [
            end.eq(c_addr + c_prod + c_words),
            fail.eq(c_used & ((end > self.mem_words) | (c_written & (c_stride < c_words)))),
        ]
        with m.If(self.start & ~self.busy):
            m.d.sync += [self.busy.eq(1), checking.eq(1), idx.eq(0), phase.eq(0),
                         bad.eq(~dims_ok)]
        with m.Elif(checking):
            with m.Switch(phase):
                with m.Case(0):
                    m.d.sync += [c_addr.eq(pick(0)), c_stride.eq(pick(1)),
                                 c_rows.eq(pick(2) - 1), c_words.eq(pick(3)),
                                 c_written.eq(pick(4)), c_used.eq(pick(5)), phase.eq(1)]
                with m.Case(1):
                    m.d.sync += [c_prod.eq(c_rows * c_stride), phase.eq(2)]
                with m.Default():
                    m.d.sync += [bad.eq(bad | fail), idx.eq(idx + 1), phase.eq(0)]
                    with m.If(idx == n - 1):
                        m.d.sync += checking.eq(0)
                        m.d.comb += [self.checked.eq(1), self.ok.eq(~bad & ~fail)]

        # -- the element walk -------------------------------------------------------------------
        r = Signal(DIM)
        c = Signal(DIM)
        a_row = Signal(aw)            # a_addr + r * a_stride
        b_row = Signal(aw)            # b_addr + r * b_stride
        c_row = Signal(aw)            # c_addr + r * b_stride
        t_col = Signal(aw)            # TRANSPOSE: b_addr + c * b_stride
        cnib = Signal(DIM + 3)        # c * (read element nibbles)
        rnib = Signal(DIM + 1)        # TRANSPOSE: r * (element nibbles)
        cyc = Signal(32)
        launch = Signal()
        step = Signal()               # the current element is done
        last = Signal()
        m.d.comb += [launch.eq(self.checked & self.ok),
                     last.eq((c == cfg.cols - 1) & (r == cfg.rows - 1))]
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)
        with m.If(launch):
            m.d.sync += [r.eq(0), c.eq(0), cnib.eq(0), rnib.eq(0), a_row.eq(cfg.a_addr),
                         b_row.eq(cfg.b_addr), c_row.eq(cfg.c_addr), t_col.eq(cfg.b_addr),
                         cyc.eq(0)]
            with m.If(op == VecOp.UPDATE):
                m.d.sync += [self.sum_abs.eq(0), self.sum_sq.eq(0)]
        with m.Elif(self.busy & ~checking):
            m.d.sync += cyc.eq(cyc + 1)
        with m.If(step):
            with m.If(c == cfg.cols - 1):
                m.d.sync += [c.eq(0), cnib.eq(0), r.eq(r + 1), rnib.eq(rnib + (1 << e_log)),
                             a_row.eq(a_row + cfg.a_stride), b_row.eq(b_row + cfg.b_stride),
                             c_row.eq(c_row + cfg.b_stride), t_col.eq(cfg.b_addr)]
            with m.Else():
                m.d.sync += [c.eq(c + 1), cnib.eq(cnib + (1 << e_log)),
                             t_col.eq(t_col + cfg.b_stride)]

        off = cnib[:lnib]                 # nibble offset of element (r, c) in its word
        at = {"a": a_row + (cnib >> lnib), "w": b_row + (cnib >> lnib),
              "v": c_row + (cnib >> lnib)}
        q_at = b_row + (c >> lnib)        # REQUANT: code (r, c)
        elems = []
        for k in range(3):
            e = Signal(signed(MASTER_BITS), name=f"elem{k}")
            data_ = self.rd[k].data
            m.d.comb += e.eq(data_.word_select(off >> 3, 32) if NIB > 8 else data_)
            elems.append(e)

        def write(addr, value, nibbles, at_):
            m.d.comb += [self.wr_addr.eq(addr), self.wr_data.eq(value << (at_ << 2)),
                         self.wr_en.eq(Const((1 << nibbles) - 1, NIB) << at_)]

        # every multiplier has registered operands and a registered product
        g = Signal(signed(MASTER_BITS))
        w = Signal(signed(MASTER_BITS))
        v = Signal(signed(MASTER_BITS))
        pv = Signal(signed(MASTER_BITS + MOMENTUM_BITS + 1))
        pg = Signal(signed(_PROD))
        a_part = Signal(signed(MASTER_BITS + 1))
        b_part = Signal(signed(_PROD))
        v_new = Signal(signed(MASTER_BITS))
        w_new = Signal(signed(MASTER_BITS))
        t = Signal(signed(SAWB_T_BITS))
        mag = Signal(SAWB_T_BITS)
        sq = Signal(2 * SAWB_T_BITS)
        acc = Signal()                    # mag and sq hold an element to add to the sums
        m.d.sync += acc.eq(0)
        with m.If(acc):
            m.d.sync += [self.sum_abs.eq(self.sum_abs + mag), self.sum_sq.eq(self.sum_sq + sq)]
        m.d.comb += self.wr_en.eq(0)

        def next_element():
            m.d.comb += step.eq(1)
            m.next = "READ"
            with m.If(last):
                m.next = "DONE"

        with m.FSM():
            with m.State("IDLE"):
                with m.If(launch):
                    m.next = "READ"
            with m.State("READ"):                 # element (r, c) of A, W and V
                for k, name in enumerate("awv"):
                    m.d.comb += [self.rd[k].addr.eq(at[name]), self.rd[k].en.eq(1)]
                with m.Switch(op):
                    with m.Case(VecOp.TRANSPOSE):
                        m.next = "T_WRITE"
                    with m.Case(VecOp.UPDATE):
                        m.next = "U_LATCH"
                    with m.Default():
                        m.next = "Q_LATCH"
            # TRANSPOSE
            with m.State("T_WRITE"):
                pair = self.rd[0].data.bit_select(off << 2, 8)
                t_off = rnib[:lnib]
                t_at = t_col + (rnib >> lnib)
                with m.If(cfg.pair):
                    write(t_at, pair[:8], 2, t_off)
                with m.Else():
                    write(t_at, pair[:4], 1, t_off)
                next_element()
            # REQUANT
            with m.State("Q_LATCH"):
                m.d.sync += w.eq(elems[0])
                m.next = "Q_MUL"
            with m.State("Q_MUL"):
                m.d.sync += pg.eq(w * cfg.m)
                m.next = "Q_SHIFT"
            with m.State("Q_SHIFT"):
                m.d.sync += b_part.eq(_round_shift(m, pg, cfg.s, "q"))
                m.next = "Q_WRITE"
            with m.State("Q_WRITE"):
                code = Mux(b_part > WEIGHT_MAX, WEIGHT_MAX,
                           Mux(b_part < WEIGHT_MIN, WEIGHT_MIN, b_part))
                write(q_at, code[:4], 1, c[:lnib])
                next_element()
            # UPDATE
            with m.State("U_LATCH"):
                m.d.sync += [g.eq(elems[0]), w.eq(elems[1]), v.eq(elems[2])]
                m.next = "U_MUL"
            with m.State("U_MUL"):
                m.d.sync += [pv.eq(v * cfg.mu), pg.eq(g * cfg.m)]
                m.next = "U_SHIFT"
            with m.State("U_SHIFT"):
                m.d.sync += [a_part.eq((pv + (1 << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS),
                             b_part.eq(_round_shift(m, pg, cfg.s, "u"))]
                m.next = "U_ADD"
            with m.State("U_ADD"):
                m.d.sync += v_new.eq(_sat(m, a_part + b_part, "v_sat"))
                m.next = "U_SUB"
            with m.State("U_SUB"):
                m.d.sync += w_new.eq(_sat(m, w - v_new, "w_sat"))
                m.next = "U_WRITE_V"
            with m.State("U_WRITE_V"):
                write(at["v"], v_new.as_unsigned(), _ELEM, off)
                m.d.sync += t.eq(w_new >> SAWB_SHIFT)
                m.next = "U_WRITE_W"
            with m.State("U_WRITE_W"):
                write(at["w"], w_new.as_unsigned(), _ELEM, off)
                m.d.sync += [mag.eq(Mux(t < 0, -t, t)), sq.eq((t * t).as_unsigned()),
                             acc.eq(1)]
                next_element()
            with m.State("DONE"):                 # the last sums are in
                m.d.sync += [self.busy.eq(0), self.cycles.eq(cyc + 1)]
                m.next = "IDLE"
        return m
