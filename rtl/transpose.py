"""TRANSPOSE alone: the element-wise unit of a device whose master weights stay on the host.

A device without UPDATE and REQUANT (the iCEBreaker's: its master weights live on the host,
INFO's ``vec_ops`` says so) still transposes on the device: the forward pass's activation
codes and the backward pass's FP4 pairs are read the other way round by the next GEMM, and
copying them over the link would more than double a step's link bytes (the digits MLP on the
iCEBreaker's configuration: 18.9 KB a step with the device's TRANSPOSE, 43.4 KB with the
driver's, ``host_vector``). :class:`~nibble.rtl.vector.VectorUnit` built with TRANSPOSE alone
does it in ~1,700 of the UP5K's LCs, most of them its general machinery: three operand
streams, a six-stage pipeline and an eight-entry queue, walks that keep three rows. This unit
does only ``B[c][r] = A[r][c]`` (1-nibble codes or, with ``pair``, 2-nibble FP4 pairs), with
the same ports, the same command (``VEC_CFG``, :mod:`rtl.vector`) and the same verdicts.

Dataflow: a walk over A row by row keeps the element's read address (``a_addr + r *
a_stride``, plus its word in the row) and its write address (``b_addr + c * b_stride``, plus
``r``'s word) by adding strides. Each cycle the unit reads the next element's word while it
has room for it; a cycle later the element's nibbles, with where they go, enter a three-entry
queue, whose head is the write port's request (its nibble enables select the element in the
word). The queue's room is counted with the read in flight, so a stalled write port stops the
reads and nothing is lost; with a memory that grants every request an operation of ``n``
elements takes ``n + 3`` cycles. Buffers are checked by :class:`~nibble.rtl.bounds.BoundsCheck`
(A read, B written), as the full unit checks them; any other operation fails the check.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .bounds import DIM_BITS, BoundsCheck
from .formats import SAWB_SQ_BITS, SAWB_SUM_BITS, VecOp, word_nibbles
from .memory import TensorBus
from .vector import VEC_CFG

__all__ = ["Transposer"]


class Transposer(wiring.Component):
    """Runs VECTOR TRANSPOSE commands (see the module docstring); the ports are
    :class:`~nibble.rtl.vector.VectorUnit`'s (``sum_abs`` and ``sum_sq`` stay 0)."""

    def __init__(self, rows, cols, mem_words):
        self.mem_words = mem_words
        self.nib = word_nibbles(rows, cols)
        self.aw = (mem_words - 1).bit_length()
        self.held_reads = ()        # a word's element enters the queue as it arrives
        self.entry = data.StructLayout({"val": 8, "addr": self.aw,
                                        "off": range(self.nib)})
        super().__init__({
            "cfg": In(VEC_CFG), "start": In(1), "checked": Out(1), "ok": Out(1),
            "busy": Out(1), "cycles": Out(32),
            "sum_abs": Out(SAWB_SUM_BITS), "sum_sq": Out(SAWB_SQ_BITS),
            "bus": Out(TensorBus.Signature(addr_width=self.aw, nibbles=self.nib)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, nib, aw = self.cfg, self.nib, self.aw
        lnib = nib.bit_length() - 1
        rd, wr = self.bus.rd0, self.bus.wr

        # -- the check, then the launch (as VectorUnit's)
        m.submodules.check = check = BoundsCheck(2, self.mem_words, per_word=nib)
        for b, (addr, stride, rows, elems, written) in zip(check.buffers, (
                (cfg.a_addr, cfg.a_stride, cfg.rows, cfg.cols, 0),
                (cfg.b_addr, cfg.b_stride, cfg.cols, cfg.rows, 1)), strict=True):
            m.d.comb += [b.addr.eq(addr), b.stride.eq(stride), b.rows.eq(rows),
                         b.items.eq(elems << cfg.pair),
                         b.written.eq(written), b.used.eq(1)]
        go, launch = Signal(), Signal()
        m.d.sync += go.eq(self.start & ~self.busy)
        m.d.comb += [check.start.eq(go), self.checked.eq(check.done),
                     self.ok.eq(check.ok & (cfg.rows != 0) & (cfg.cols != 0)
                                & (cfg.op == VecOp.TRANSPOSE)),
                     launch.eq(self.checked & self.ok)]
        with m.If(self.start & ~self.busy):
            m.d.sync += self.busy.eq(1)
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)

        # -- the walk: element (r, c), its word in A and its place in B
        r, c = Signal(DIM_BITS), Signal(DIM_BITS)
        a_row, t_col = Signal(aw), Signal(aw)        # a_addr + r * a_stride; b_addr + c * ...
        cnib, rnib = c << cfg.pair, r << cfg.pair          # c, r in nibbles
        running, reading, inflight = Signal(), Signal(), Signal()
        m.submodules.queue = queue = SyncFIFO(width=self.entry.size, depth=3)
        m.d.comb += [rd.addr.eq(a_row + (cnib >> lnib)),
                     rd.en.eq(reading & (queue.level + inflight < queue.depth))]
        taken = rd.en & rd.ready
        m.d.sync += inflight.eq(taken)
        with m.If(launch):
            m.d.sync += [r.eq(0), c.eq(0), a_row.eq(cfg.a_addr), t_col.eq(cfg.b_addr),
                         running.eq(1), reading.eq(1), self.cycles.eq(0)]
        with m.Elif(running):                     # the cycles of the last operation
            m.d.sync += self.cycles.eq(self.cycles + 1)
        with m.If(~launch & taken):
            with m.If(c == cfg.cols - 1):
                m.d.sync += [c.eq(0), r.eq(r + 1), a_row.eq(a_row + cfg.a_stride),
                             t_col.eq(cfg.b_addr)]
                with m.If(r == cfg.rows - 1):
                    m.d.sync += reading.eq(0)
            with m.Else():
                m.d.sync += [c.eq(c + 1), t_col.eq(t_col + cfg.b_stride)]

        # -- a cycle later the element enters the queue; the queue's head is the write
        roff, waddr, woff = Signal(range(nib)), Signal(aw), Signal(range(nib))
        with m.If(taken):
            m.d.sync += [roff.eq(cnib[:lnib]), waddr.eq(t_col + (rnib >> lnib)),
                         woff.eq(rnib[:lnib])]
        new, head = Signal(self.entry), data.View(self.entry, queue.r_data)
        m.d.comb += [new.val.eq(rd.data.bit_select(roff << 2, 8)), new.addr.eq(waddr),
                     new.off.eq(woff), queue.w_data.eq(new), queue.w_en.eq(inflight),
                     wr.addr.eq(head.addr), wr.data.eq(head.val << (head.off << 2)),
                     wr.en.eq(Mux(queue.r_rdy, Mux(cfg.pair, 0b11, 0b1) << head.off, 0)),
                     queue.r_en.eq(wr.ready)]
        with m.If(running & ~reading & ~inflight & ~queue.r_rdy):
            m.d.sync += [running.eq(0), self.busy.eq(0)]
        return m
