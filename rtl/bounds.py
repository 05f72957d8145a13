"""The range check of a command's buffers, shared by the GEMM engine and the element-wise unit.

A buffer is ``rows`` rows of ``words`` words, ``stride`` words apart, from word ``addr``
(a unit gives a row's length in its own items, nibbles or words, and the check rounds it
up to words).
It is in range when its last word lies inside the memory::

    addr + (rows - 1) * stride + words <= mem_words

and, for a buffer the command writes, when its rows do not overlap (``stride >= words``).
A unit lists its buffers (those it does not use this time have ``used`` low) and pulses
``start``; the check walks them one at a time with one adder: the product is a shift-and-add
over the bits of ``rows - 1``, lowest first, that stops after the highest set bit, so a
buffer takes ``3 + bits(rows - 1)`` cycles (at most ``DIM_BITS + 3``), the verdict one
more (the sum, the compare and the verdict are registered one after the other: the
unregistered chain was the UP5K system's critical path), and no multiplier
(the UP5K has eight). The GEMM engine used to add the stride once per row (up to 16,000
cycles for a 4096-step GEMM) and the element-wise unit used a 16 x 16 multiplier: two
circuits for one rule, now one.

The arithmetic is as wide as the memory, not as the commands' fields: a term (the address,
the words, the stride times a power of two, the partial product) of ``2^B`` or more, ``B``
the bits of ``mem_words``, puts the buffer past the end on its own, so it only sets a flag,
and the rest add in ``B + 2`` bits (17 instead of 34 on the UP5K's 32K words: 170 fewer LCs
for the engine's check there, ``make bitstream BOARD=icebreaker``).
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .memory import ADDR_BITS, STRIDE_BITS

__all__ = ["BUFFER", "DIM_BITS", "WORDS_BITS", "BoundsCheck", "buffer_layout"]

#: GEMM dimensions and element counts in commands are DIM_BITS wide.
DIM_BITS = 16
#: Words of one buffer row: up to 2^DIM_BITS elements of 8 nibbles in words of 8 or more.
WORDS_BITS = DIM_BITS + 1



def buffer_layout(per_word=1):
    """One buffer of a command, as the check sees it: a row is ``items`` items, of which
    ``per_word`` fill a word (a GEMM's rows are counted in nibbles, a DMA's in words)."""
    return data.StructLayout({
        "addr": ADDR_BITS, "stride": STRIDE_BITS, "rows": DIM_BITS,
        "items": WORDS_BITS + (per_word.bit_length() - 1),
        "written": 1,       # the command writes it: its rows must not overlap
        "used": 1,          # the command touches it at all
    })


#: A buffer whose rows are counted in words.
BUFFER = buffer_layout()


class BoundsCheck(wiring.Component):
    """Checks ``n`` buffers against a memory of ``mem_words`` words, their rows counted in
    items of which ``per_word`` (a power of two) fill a word: the check rounds a row up to
    whole words itself, once, after it has picked the buffer (on the UP5K four roundings in
    front of its multiplexer were 60 LCs more).

    Ports
    -----
    buffers : In(ArrayLayout(buffer_layout(per_word), n))
        Held from ``start`` until ``done``.
    start : In(1)
    done : Out(1)
        One-cycle pulse (from a register); ``ok`` is the verdict, held until the next.
    ok : Out(1)
    """

    def __init__(self, n, mem_words, per_word=1):
        if per_word & (per_word - 1):
            raise ValueError(f"per_word must be a power of two, got {per_word}")
        self.n, self.mem_words, self.per_word = n, mem_words, per_word
        self.layout = buffer_layout(per_word)
        super().__init__({"buffers": In(data.ArrayLayout(self.layout, n)), "start": In(1),
                          "done": Out(1), "ok": Out(1)})

    def drive(self, m, buffers):
        """Drive :attr:`buffers` in ``m`` from ``(addr, stride, rows, items, written,
        used)`` tuples, one a buffer (the engine's and the element-wise unit's checks)."""
        for b, (addr, stride, rows, items, written, used) in zip(self.buffers, buffers,
                                                                strict=True):
            m.d.comb += [b.addr.eq(addr), b.stride.eq(stride), b.rows.eq(rows),
                         b.items.eq(items), b.written.eq(written), b.used.eq(used)]

    def elaborate(self, platform):
        m = Module()
        # Every term of the sum is checked in the memory's own width: a term of 2^B or more
        # (B bits hold mem_words) ends past the memory whatever the others are, so it sets
        # ``big`` and is not added; the rest add in B + 2 bits. The verdict is the rule's
        # for every input, and the registers and adders are B wide, not 24 to 34.
        B = self.mem_words.bit_length()
        idx = Signal(range(max(self.n, 2)))
        k = Signal(DIM_BITS)                    # rows - 1, shifted out from the bottom
        part = Signal(B)                        # stride << (bits of k done), while < 2^B
        part_big = Signal()                     # ... and from when it is not
        prod = Signal(B)                        # (rows - 1) * stride, built LSB first
        big = Signal()                          # a term of 2^B or more
        addr, words = Signal(B), Signal(B)
        written, used, overlap = Signal(), Signal(), Signal()
        bad = Signal()
        end = Signal(B + 2)                     # the sum, registered: the compare and the
        fail = Signal()                         # verdict each get a cycle of their own
        m.d.comb += fail.eq(used & (big | (end > self.mem_words) | (written & overlap)))
        m.d.sync += self.done.eq(0)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [idx.eq(0), bad.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                b = self.buffers[idx]
                row = Signal(WORDS_BITS)        # the row in whole words
                m.d.comb += row.eq((b.items + self.per_word - 1)
                                   >> (self.per_word.bit_length() - 1))
                m.d.sync += [addr.eq(b.addr), words.eq(row), k.eq(b.rows - 1),
                             part.eq(b.stride), part_big.eq(b.stride[B:].any()), prod.eq(0),
                             big.eq(b.addr[B:].any() | row[B:].any()),
                             written.eq(b.written), used.eq(b.used),
                             overlap.eq(b.stride < row)]
                m.next = "MULTIPLY"
            with m.State("MULTIPLY"):
                with m.If(k == 0):
                    m.d.sync += end.eq(addr + prod + words)
                    m.next = "COMPARE"
                with m.Else():
                    total = prod + part               # B + 1 bits
                    with m.If(k[0]):
                        m.d.sync += [prod.eq(total), big.eq(big | part_big | total[B])]
                    m.d.sync += [part.eq(part << 1), part_big.eq(part_big | part[B - 1]),
                                 k.eq(k >> 1)]
            with m.State("COMPARE"):
                m.d.sync += [bad.eq(bad | fail), idx.eq(idx + 1)]
                with m.If(idx == self.n - 1):
                    m.d.sync += [self.done.eq(1), self.ok.eq(~bad & ~fail)]
                    m.next = "IDLE"
                with m.Else():
                    m.next = "LOAD"
        return m
