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

The unit is a pipeline on its :class:`~rtl.memory.TensorBus` (three read ports: A or G, W,
V; the write port), with no multipliers in the address path: :class:`VectorWalk` keeps the
row and column pointers by adding strides, and each cycle the unit reads the next element's
words (A; for UPDATE also W and V, all three in one cycle) while the memory grants them.
The element then goes down six registered stages (pick its nibbles; the two products;
the rounding shifts; ``v'``; ``w'``), every multiplier with registered operands and a
registered product (the ECP5 build missed 45 MHz by a third while one multiplied a memory
word straight after its read), into a :data:`QUEUE`-deep queue of finished elements.
Elements are written in the order they are read, so the write side keeps its own
:class:`VectorWalk`, stepped as each element leaves the queue, and neither the stages nor
the queue carry addresses: on the UP5K that took the unit from 3,884 to 3,491 LCs; on the
ECP5 it trades 130 flip-flops for 104 LUTs (``gateware/budget.py``'s measurement of the
unit alone). The write side writes **whole words**: REQUANT's codes and UPDATE's masters
and momenta go along rows, so an element that does not start a word joins the word of the
one before in a register, which goes out (UPDATE: its V and W words) when the next element
starts a new word, through a small FIFO and a register onto the port. One element leaves
the queue a cycle: with a memory that grants every request an operation of ``n`` elements
takes ``n + 6`` (TRANSPOSE), ``n + 9`` (REQUANT) or, where a word holds two masters (the
ULX3S's 16 nibbles), ``n + 12`` (UPDATE) cycles; ``2n + 11`` where it holds one. Writing
one element a write cycle, UPDATE took two cycles a weight (V, then W) and REQUANT a write
cycle a code: in a paged step both shared the scratchpad's one write port with the DMA's
loads, and it bound them (the sequential machine before the pipeline took 2, 5 and 8 cycles
per element; on the ULX3S configuration the element-wise unit was 59 % of a Fashion-MNIST
step). The unit reads an element only while fewer than QUEUE are pending, so a write port
that stalls stops the reads, never the pipeline, and the
queue cannot overflow. UPDATE reads and writes the same words, but each element's nibbles
are read once, before its own writes, so the pipeline needs no hazard check.

A unit may be built with only some operations (``ops``; INFO's ``vec_ops`` tells the host,
whose driver runs the others itself, bit for bit, on buffers it reads back): with TRANSPOSE
alone it is 1,367 UP5K LCs and no DSP against 3,491 LCs and all 8 DSPs with the arithmetic.
A device with TRANSPOSE alone (the UP5K's) builds :class:`~nibble.rtl.transpose.Transposer`
instead, which does only that in 903 LCs with its range check.

Buffers are checked by the same :class:`~rtl.bounds.BoundsCheck` as a GEMM's
(``OUT_OF_RANGE`` when any lies outside the memory, a dimension is 0, or a written row
overlaps the next); overlapping buffers give an undefined result.
"""

from amaranth.hdl import Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
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
    VEC_OPS_ALL,
    WEIGHT_MAX,
    WEIGHT_MIN,
    VecOp,
    word_nibbles,
)
from .memory import ADDR_BITS, STRIDE_BITS, TensorBus, read_ports, write_request

__all__ = ["QUEUE", "VEC_CFG", "VectorUnit", "VectorWalk"]

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


def _half(s):
    """The rounding term of ``round(p >> s)``: ``2^(s-1)``, 0 for s = 0 (s in 0..63);
    ``(p + _half(s)) >> s`` is the rounded arithmetic shift."""
    return Mux(s == 0, 0, (Const(1, 64) << (s - 1)[:6])[:64])


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
        cnib = Signal(DIM_BITS + 3)       # c * (read element nibbles)
        rnib = Signal(DIM_BITS + 1)       # TRANSPOSE: r * (element nibbles)
        # The addresses are registers, each next one worked out beside it from the row
        # starts and counters (the 8x16 ULX3S build on the DMA's and SDRAM's cuts missed
        # 48 MHz on a row-start-plus-column adder between this walk and the arbiter).
        m.d.comb += [
            self.last.eq((c == cfg.cols - 1) & (r == cfg.rows - 1)),
            self.off.eq(cnib[:lnib]), self.q_off.eq(c[:lnib]), self.t_off.eq(rnib[:lnib]),
        ]
        with m.If(self.launch):
            m.d.sync += [r.eq(0), c.eq(0), cnib.eq(0), rnib.eq(0), a_row.eq(cfg.a_addr),
                         b_row.eq(cfg.b_addr), c_row.eq(cfg.c_addr),
                         self.a_at.eq(cfg.a_addr), self.w_at.eq(cfg.b_addr),
                         self.v_at.eq(cfg.c_addr), self.q_at.eq(cfg.b_addr),
                         self.t_at.eq(cfg.b_addr)]
        with m.Elif(self.step):
            with m.If(c == cfg.cols - 1):
                next_rnib = rnib + (1 << e_log)
                next_a, next_b = a_row + cfg.a_stride, b_row + cfg.b_stride
                next_c = c_row + cfg.b_stride
                m.d.sync += [c.eq(0), cnib.eq(0), r.eq(r + 1), rnib.eq(next_rnib),
                             a_row.eq(next_a), b_row.eq(next_b), c_row.eq(next_c),
                             self.a_at.eq(next_a), self.w_at.eq(next_b),
                             self.v_at.eq(next_c), self.q_at.eq(next_b),
                             self.t_at.eq(cfg.b_addr + (next_rnib >> lnib))]
            with m.Else():
                next_cnib = cnib + (1 << e_log)
                col = next_cnib >> lnib
                m.d.sync += [c.eq(c + 1), cnib.eq(next_cnib),
                             self.a_at.eq(a_row + col), self.w_at.eq(b_row + col),
                             self.v_at.eq(c_row + col), self.q_at.eq(b_row + ((c + 1) >> lnib)),
                             self.t_at.eq(self.t_at + cfg.b_stride)]
        return m


#: Elements read and not yet written that the unit holds: its pipeline (six stages) and the
#: queue behind it. The queue takes what the write port cannot yet; the unit reads an element
#: only while fewer than QUEUE are pending, so the queue never overflows and a stalled write
#: port stops the reads instead of the pipeline.
QUEUE = 8
#: Whole-word writes (one word, or UPDATE's V and W words) waiting for the write port.
WRITES = 4


class VectorUnit(wiring.Component):
    """Runs one VEC_CFG operation at a time on tensor memory (see the module docstring).

    Ports: ``cfg`` (held constant while busy, like the engine's), ``start``, ``checked``,
    ``ok``, ``busy``, ``cycles`` (of the last operation), ``sum_abs``/``sum_sq`` (SAWB
    statistics of the last UPDATE) and ``bus`` (``rd0`` A or G, ``rd1`` W, ``rd2`` V,
    ``wr``).

    ``ops`` (a :data:`~rtl.formats.VEC_OPS_ALL`-style mask) are the operations it is built
    with; any other fails its check, like an unknown one. Without UPDATE and REQUANT there
    is no arithmetic, only the walks, the nibble select and a queue of bytes (the UP5K's
    configuration: its master weights stay on the host).
    """

    def __init__(self, rows, cols, mem_words, ops=VEC_OPS_ALL):
        self.ops = ops
        self.mem_words = mem_words
        self.nib = word_nibbles(rows, cols)
        self.aw = (mem_words - 1).bit_length()
        self.held_reads = ()        # stage 1 takes the words in the cycle they arrive
        #: A queue entry: one element's values (UPDATE: v', then w'; else one value). Where
        #: they go is the write side's own walk (elements are written in the order read).
        arith = self.has(VecOp.UPDATE) or self.has(VecOp.REQUANT)
        self.entry = data.StructLayout({"val": MASTER_BITS if arith else 8,
                                        **({"val2": MASTER_BITS} if self.has(VecOp.UPDATE)
                                           else {})})
        super().__init__({
            "cfg": In(VEC_CFG), "start": In(1), "checked": Out(1), "ok": Out(1),
            "busy": Out(1), "cycles": Out(32),
            "sum_abs": Out(SAWB_SUM_BITS), "sum_sq": Out(SAWB_SQ_BITS),
            "bus": Out(TensorBus.Signature(addr_width=self.aw, nibbles=self.nib)),
        })

    def has(self, op):
        """Whether the unit is built with ``op``."""
        return bool(self.ops >> op & 1)

    def _buffers(self, m, check):
        """The check's view of A (or G), B (W, or the codes) and V."""
        cfg = self.cfg
        op = cfg.op
        t, u = op == VecOp.TRANSPOSE, op == VecOp.UPDATE
        masters = cfg.cols << _E_LOG
        bufs = [  # addr, stride, rows, nibbles per row, written, used
            (cfg.a_addr, cfg.a_stride, cfg.rows, Mux(t, cfg.cols << cfg.pair, masters), 0, 1),
            (cfg.b_addr, cfg.b_stride, Mux(t, cfg.cols, cfg.rows),
             Mux(t, cfg.rows << cfg.pair, Mux(u, masters, cfg.cols)), 1, 1),
            (cfg.c_addr, cfg.b_stride, cfg.rows, masters, 1, u),
        ]
        check.drive(m, bufs)

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        m.submodules.check = check = BoundsCheck(3, self.mem_words, per_word=self.nib)
        self._buffers(m, check)
        m.submodules.walk = walk = VectorWalk(self.aw, self.nib)
        m.submodules.wwalk = wwalk = VectorWalk(self.aw, self.nib)
        m.submodules.queue = queue = SyncFIFO(width=self.entry.size, depth=QUEUE)

        launch, go, cyc = Signal(), Signal(), Signal(32)
        built = (Const(self.ops, len(VecOp) + 1) >> Value.cast(cfg.op))[0]
        dims_ok = (cfg.rows != 0) & (cfg.cols != 0) & built
        m.d.sync += go.eq(self.start & ~self.busy)
        m.d.comb += [check.start.eq(go), self.checked.eq(check.done),
                     self.ok.eq(check.ok & dims_ok), launch.eq(self.checked & self.ok),
                     walk.cfg.eq(cfg), walk.launch.eq(launch),
                     wwalk.cfg.eq(cfg), wwalk.launch.eq(launch)]
        with m.If(self.start & ~self.busy):
            m.d.sync += self.busy.eq(1)
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)
        with m.If(launch):
            m.d.sync += cyc.eq(0)
            with m.If(cfg.op == VecOp.UPDATE):
                m.d.sync += [self.sum_abs.eq(0), self.sum_sq.eq(0)]
        with m.Elif(self.busy & ~go):
            m.d.sync += cyc.eq(cyc + 1)

        running, reading = Signal(), Signal()     # an operation runs; it still reads
        pending = Signal(range(QUEUE + 1))        # elements read and not out of the queue
        read = self._read(m, walk, reading & (pending < QUEUE))
        with m.If(launch):
            m.d.sync += [running.eq(1), reading.eq(1)]
        with m.If(read & walk.last):
            m.d.sync += reading.eq(0)
        stats_busy = self._pipeline(m, queue, read, walk.off)
        # no element is on its way into the queue: the last word goes out
        popped, write_done = self._write(m, queue, wwalk, running & ~reading & (pending == 0))
        m.d.sync += pending.eq(pending + read - popped)
        with m.If(running & ~reading & (pending == 0) & write_done & ~stats_busy):
            m.d.sync += [running.eq(0), self.busy.eq(0), self.cycles.eq(cyc + 1)]
        return m

    def _read(self, m, walk, want):
        """Reads the walk's element (A, and for UPDATE W and V) when ``want``; returns
        whether the reads were taken this cycle."""
        # UPDATE's reads of W and V, registered beside the walk (the decoder's argument
        # register is across the chip; the settings are held from before the start)
        bus, u = self.bus, Signal()
        m.d.sync += u.eq(self.cfg.op == VecOp.UPDATE)
        for rd, at, used in zip(read_ports(bus), (walk.a_at, walk.w_at, walk.v_at),
                                (1, u, u), strict=True):
            m.d.comb += [rd.addr.eq(at), rd.en.eq(want & used)]
        taken = Signal()
        m.d.comb += [
            taken.eq(want & bus.rd0.ready & (~u | (bus.rd1.ready & bus.rd2.ready))),
            walk.step.eq(taken),
        ]
        return taken

    def _pipeline(self, m, queue, read, off):
        """The element's arithmetic, one stage a cycle, into the queue: TRANSPOSE after
        stage 2, REQUANT after 4, UPDATE after 6 (every multiplier has registered operands
        and a registered product); ``off`` is the read element's nibble offset in its words.
        Returns whether the SAWB sums are still adding."""
        cfg, NIB = self.cfg, self.nib
        op = cfg.op
        valid = [Signal(name=f"valid{k}") for k in range(7)]   # stage k holds an element
        roff = Signal.like(off)
        m.d.sync += [valid[1].eq(read), roff.eq(off)]
        for k in range(2, 7):
            m.d.sync += valid[k].eq(valid[k - 1])

        # stage 1: the words arrive; the element's nibbles are picked out
        elems = [rd.data.word_select(roff >> _E_LOG, RAW_BITS).as_signed()
                 if NIB > RAW_NIBBLES else rd.data.as_signed() for rd in read_ports(self.bus)]
        g, w, v = (Signal(signed(MASTER_BITS), name=n) for n in ("g", "w", "v"))
        pair = Signal(8)
        m.d.sync += [g.eq(elems[0]), w.eq(elems[1]), v.eq(elems[2]),
                     pair.eq(self.bus.rd0.data.bit_select(roff << 2, 8))]
        # The settings the arithmetic uses, registered beside it: constant during an
        # operation (set before its start, many cycles before its first element), and from
        # the decoder's argument register across the chip the rounding term was the ULX3S's
        # critical path (7.2 ns of routing into its adder, placement seed 3).
        mu, mul = Signal.like(cfg.mu), Signal.like(cfg.m)
        shift, half = Signal.like(cfg.s), Signal(64)
        m.d.sync += [mu.eq(cfg.mu), mul.eq(cfg.m), shift.eq(cfg.s), half.eq(_half(cfg.s))]
        # stage 2: the products (REQUANT's weight is in g: it reads A)
        pv = Signal(signed(MASTER_BITS + MOMENTUM_BITS + 1))
        pg = Signal(signed(_PROD))
        w3 = Signal(signed(MASTER_BITS))
        m.d.sync += [pv.eq(v * mu), pg.eq(g * mul), w3.eq(w)]
        # stage 3: rounding shifts
        a_part, b_part = Signal(signed(MASTER_BITS + 1)), Signal(signed(_PROD))
        w4 = Signal(signed(MASTER_BITS))
        m.d.sync += [a_part.eq((pv + (1 << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS),
                     b_part.eq((pg + half) >> shift), w4.eq(w3)]
        code = Mux(b_part > WEIGHT_MAX, WEIGHT_MAX, Mux(b_part < WEIGHT_MIN, WEIGHT_MIN, b_part))
        # stage 4, 5: v' = sat(a + b), w' = sat(w - v')
        v_new, v_out = Signal(signed(MASTER_BITS)), Signal(signed(MASTER_BITS))
        w5, w_new = Signal(signed(MASTER_BITS)), Signal(signed(MASTER_BITS))
        m.d.sync += [v_new.eq(_sat(a_part + b_part)), w5.eq(w4),
                     w_new.eq(_sat(w5 - v_new)), v_out.eq(v_new)]

        entry = Signal(self.entry)
        with m.Switch(op):          # only the operations it is built with (the rest go)
            if self.has(VecOp.TRANSPOSE):
                with m.Case(VecOp.TRANSPOSE):
                    m.d.comb += [queue.w_stream.valid.eq(valid[2]), entry.val.eq(pair)]
            if self.has(VecOp.UPDATE):
                with m.Case(VecOp.UPDATE):
                    m.d.comb += [queue.w_stream.valid.eq(valid[6]),
                                 entry.val.eq(v_out.as_unsigned()),
                                 entry.val2.eq(w_new.as_unsigned())]
            if self.has(VecOp.REQUANT):
                with m.Case(VecOp.REQUANT):
                    m.d.comb += [queue.w_stream.valid.eq(valid[4]), entry.val.eq(code[:4])]
        m.d.comb += queue.w_stream.payload.eq(entry)
        if not self.has(VecOp.UPDATE):
            return Const(0)
        return self._sums(m, valid[6] & (op == VecOp.UPDATE), w_new)

    def _sums(self, m, new, w_new):
        """SAWB sums of ``t = w' >> SAWB_SHIFT`` over the new weights (``new``: ``w_new``
        holds one); returns whether an element is still on its way into them."""
        t = Signal(signed(SAWB_T_BITS))
        mag, sq = Signal(SAWB_T_BITS), Signal(2 * SAWB_T_BITS)
        has_t, acc = Signal(), Signal()
        m.d.sync += [has_t.eq(new), t.eq(w_new >> SAWB_SHIFT), acc.eq(has_t),
                     mag.eq(Mux(t < 0, -t, t)), sq.eq((t * t).as_unsigned())]
        with m.If(acc):
            m.d.sync += [self.sum_abs.eq(self.sum_abs + mag), self.sum_sq.eq(self.sum_sq + sq)]
        return new | has_t | acc

    def _write(self, m, queue, walk, drain):
        """The queue's head into whole words, and those onto the write port (see the
        module): returns (an element left the queue this cycle, the last write is out).

        REQUANT and UPDATE write along rows, so an element whose nibble offset is not 0
        goes into the word of the element before (of its stream: UPDATE's V and W): the
        *word* register collects a word's codes (REQUANT) or a word's two masters and two
        momenta (UPDATE) and goes out when the next element starts a new word, or at the
        end. TRANSPOSE writes each element to another row: its writes go out one by one.
        Out means into a small FIFO of *writes* (one word, or UPDATE's V and W words), which
        a register behind it puts on the port one word a cycle (a read, its nibble select,
        the write shift, the arbiter and the memory's data input in one cycle limited the
        ECP5 to 44.7 MHz). One element leaves the queue a cycle: UPDATE's two words a
        weight are then one write cycle a weight, REQUANT's codes one a word."""
        cfg, NIB, wr = self.cfg, self.nib, self.bus.wr
        op = cfg.op
        t, u = op == VecOp.TRANSPOSE, op == VecOp.UPDATE
        head = data.View(self.entry, queue.r_stream.payload)
        req = write_request(self.aw, NIB)
        pair = data.StructLayout({"a": req, "b": req, "two": 1})
        nibbles = Mux(u, (1 << RAW_NIBBLES) - 1, Mux(t & cfg.pair, 0b11, 0b1))
        at = Mux(t, walk.t_at, Mux(u, walk.v_at, walk.q_at))
        woff = Mux(t, walk.t_off, Mux(u, walk.off, walk.q_off))
        en = (nibbles << woff)[:NIB]
        shift = woff << 2
        val2 = head.val2 if self.has(VecOp.UPDATE) else Const(0, MASTER_BITS)
        new = Signal(pair)                  # the element as a write
        m.d.comb += [new.a.addr.eq(at), new.a.data.eq(head.val << shift), new.a.en.eq(en),
                     new.b.addr.eq(walk.w_at), new.b.data.eq(val2 << shift),
                     new.b.en.eq(en), new.two.eq(u)]

        m.submodules.writes = writes = SyncFIFOBuffered(width=pair.size, depth=WRITES)
        word, has_word = Signal(pair), Signal()
        joins = ~t & has_word & (woff != 0)      # the element goes into the word
        direct = t                               # TRANSPOSE: each element a write
        ends = ~queue.r_stream.valid & drain     # nothing more is coming
        push_word = has_word & ((queue.r_stream.valid & ~t & ~joins) | ends)
        take = queue.r_stream.valid & (joins | ~has_word & ~direct | writes.w_rdy)
        m.d.comb += [
            writes.w_en.eq(Mux(direct, take, push_word & writes.w_rdy)),
            writes.w_data.eq(Mux(direct, new.as_value(), word.as_value())),
            queue.r_stream.ready.eq(take), walk.step.eq(take),
        ]
        with m.If(push_word & writes.w_rdy):
            m.d.sync += has_word.eq(0)
        with m.If(take & ~direct):
            with m.If(joins):
                m.d.sync += [word.a.data.eq(word.a.data | new.a.data),
                             word.a.en.eq(word.a.en | new.a.en),
                             word.b.data.eq(word.b.data | new.b.data),
                             word.b.en.eq(word.b.en | new.b.en)]
            with m.Else():
                m.d.sync += [word.eq(new), has_word.eq(1)]

        # the port: a write (one word, or two) from the FIFO through a register
        cur, has_cur, second = Signal(pair), Signal(), Signal()
        out = Mux(second, cur.b.as_value(), cur.a.as_value())
        outv = data.View(req, out)
        done_cur = has_cur & wr.ready & (second | ~cur.two)
        m.d.comb += [wr.addr.eq(outv.addr), wr.data.eq(outv.data),
                     wr.en.eq(Mux(has_cur, outv.en, 0)),
                     writes.r_en.eq(~has_cur | done_cur)]
        with m.If(has_cur & wr.ready):
            m.d.sync += second.eq(~second & cur.two)
        with m.If(done_cur):
            m.d.sync += has_cur.eq(0)
        with m.If(writes.r_rdy & (~has_cur | done_cur)):
            m.d.sync += [cur.eq(writes.r_data), has_cur.eq(1), second.eq(0)]
        return take, ~has_word & (writes.r_level == 0) & (~has_cur | done_cur)
