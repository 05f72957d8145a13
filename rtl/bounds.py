"""The range check of a command's buffers, shared by the GEMM engine and the element-wise unit.

A buffer is ``rows`` rows of ``words`` words, ``stride`` words apart, from word ``addr``.
It is in range when its last word lies inside the memory::

    addr + (rows - 1) * stride + words <= mem_words

and, for a buffer the command writes, when its rows do not overlap (``stride >= words``).
A unit lists its buffers (those it does not use this time have ``used`` low) and pulses
``start``; the check walks them one at a time with one adder: the product is a shift-and-add
over the bits of ``rows - 1``, lowest first, that stops after the highest set bit, so a
buffer takes ``3 + bits(rows - 1)`` cycles (at most ``DIM_BITS + 3``) and no multiplier
(the UP5K has eight). The GEMM engine used to add the stride once per row (up to 16,000
cycles for a 4096-step GEMM) and the element-wise unit used a 16 x 16 multiplier: two
circuits for one rule, now one.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .memory import ADDR_BITS, STRIDE_BITS

__all__ = ["BUFFER", "DIM_BITS", "WORDS_BITS", "BoundsCheck"]

#: GEMM dimensions and element counts in commands are DIM_BITS wide.
DIM_BITS = 16
#: Words of one buffer row: up to 2^DIM_BITS elements of 8 nibbles in words of 8 or more.
WORDS_BITS = DIM_BITS + 1

#: One buffer of a command, as the check sees it.
BUFFER = data.StructLayout({
    "addr": ADDR_BITS, "stride": STRIDE_BITS, "rows": DIM_BITS, "words": WORDS_BITS,
    "written": 1,       # the command writes it: its rows must not overlap
    "used": 1,          # the command touches it at all
})


class BoundsCheck(wiring.Component):
    """Checks ``n`` buffers against a memory of ``mem_words`` words.

    Ports
    -----
    buffers : In(ArrayLayout(BUFFER, n))
        Held from ``start`` until ``done``.
    start : In(1)
    done : Out(1)
        One-cycle pulse; ``ok`` is the verdict in the same cycle.
    ok : Out(1)
    """

    def __init__(self, n, mem_words):
        self.n, self.mem_words = n, mem_words
        super().__init__({"buffers": In(data.ArrayLayout(BUFFER, n)), "start": In(1),
                          "done": Out(1), "ok": Out(1)})

    def elaborate(self, platform):
        m = Module()
        idx = Signal(range(max(self.n, 2)))
        buf = Signal(BUFFER)                    # the buffer being checked
        k = Signal(DIM_BITS)                    # rows - 1, shifted out from the bottom
        part = Signal(DIM_BITS + STRIDE_BITS)   # stride << (bits of k done)
        prod = Signal(DIM_BITS + STRIDE_BITS)   # (rows - 1) * stride, built LSB first
        bad = Signal()
        end = Signal(max(ADDR_BITS, DIM_BITS + STRIDE_BITS, WORDS_BITS) + 2)
        fail = Signal()
        m.d.comb += [
            end.eq(buf.addr + prod + buf.words),
            fail.eq(buf.used & ((end > self.mem_words)
                                | (buf.written & (buf.stride < buf.words)))),
        ]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [idx.eq(0), bad.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                b = self.buffers[idx]
                m.d.sync += [buf.eq(b), k.eq(b.rows - 1), part.eq(b.stride), prod.eq(0)]
                m.next = "MULTIPLY"
            with m.State("MULTIPLY"):
                with m.If(k == 0):
                    m.next = "COMPARE"
                with m.Else():
                    m.d.sync += [prod.eq(prod + Mux(k[0], part, 0)), part.eq(part << 1),
                                 k.eq(k >> 1)]
            with m.State("COMPARE"):
                m.d.sync += [bad.eq(bad | fail), idx.eq(idx + 1)]
                with m.If(idx == self.n - 1):
                    m.d.comb += [self.done.eq(1), self.ok.eq(~bad & ~fail)]
                    m.next = "IDLE"
                with m.Else():
                    m.next = "LOAD"
        return m
