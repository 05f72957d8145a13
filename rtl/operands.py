"""The GEMM engine's operand side: which words each beat needs, and the beats themselves.

:class:`OperandWalker` walks the output tiles in row-major order and, for each tile, its L
reduction steps: one request per beat with the word address of the A group (R codes of
A^T's row k) and of the B group (C codes of B's row k), where in those words the groups
start, how many rows and columns of the tile are real (the rest is padding) and whether the
beat is the tile's last. Pointers are kept by adding strides: no multiplier.

:class:`OperandFetch` reads both words through two read ports (a :class:`~rtl.memory.Reader`
each, the request's fields travelling as the tag), waits for both, selects the groups, zeroes
the padding and hands the beat to the datapath. At full speed that is one beat per cycle,
back to back across tiles: the walker issues a request in the cycle the datapath takes the
previous beat, exactly the pipeline of the engine before it was split into components.

A fork in front of the readers lets each take its half of a request on its own, so a memory
that grants the A read and not the B read (a banked one) stalls the beat, not the bus.
"""

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .array import array_beat_layout
from .bounds import DIM_BITS
from .formats import CODE_BITS
from .memory import Reader, ReadPort

__all__ = ["OperandFetch", "OperandWalker", "beat_request"]


def beat_request(addr_width, nibbles):
    """One beat's operand request."""
    return data.StructLayout({
        "a_addr": addr_width, "b_addr": addr_width,
        "a_off": range(nibbles), "b_off": range(nibbles),   # nibble offsets in the words
        "m_left": signed(DIM_BITS + 2),   # rows of A from this tile's first on
        "n_left": signed(DIM_BITS + 2),   # columns of B from this tile's first on
        "last": 1,
    })


class OperandWalker(wiring.Component):
    """Beat requests of one GEMM: from ``launch`` until its last beat is taken.

    Ports: ``cfg`` (In ``GEMM_CFG``, constant meanwhile), ``launch`` (In, a pulse), ``o``
    (Out stream of :func:`beat_request`; ``o.valid`` is high while beats remain).
    """

    def __init__(self, rows, cols, addr_width, nibbles, cfg_layout):
        self.rows, self.cols, self.nib = rows, cols, nibbles
        super().__init__({
            "cfg": In(cfg_layout), "launch": In(1),
            "o": Out(stream.Signature(beat_request(addr_width, nibbles))),
        })

    def elaborate(self, platform):
        m = Module()
        R, C, cfg = self.rows, self.cols, self.cfg
        lnib = self.nib.bit_length() - 1
        n_pad = Signal(DIM_BITS + 1)               # N rounded up to whole column tiles
        m.d.comb += n_pad.eq((cfg.n + C - 1) & ~(C - 1))
        a_nib = Signal(DIM_BITS + 2)   # r0 * (A nibbles per element): into an A^T row
        b_nib = Signal(DIM_BITS + 1)   # c0: into a B row
        k = Signal(DIM_BITS)
        req = self.o.payload
        m.d.comb += [req.a_off.eq(a_nib[:lnib]), req.b_off.eq(b_nib[:lnib]),
                     req.last.eq(k == cfg.l - 1)]
        a_base = cfg.a_addr + (a_nib >> lnib)
        with m.If(self.launch):
            m.d.sync += [self.o.valid.eq(1), a_nib.eq(0), b_nib.eq(0), k.eq(0),
                         req.m_left.eq(cfg.m), req.n_left.eq(cfg.n),
                         req.a_addr.eq(cfg.a_addr), req.b_addr.eq(cfg.b_addr)]
        with m.Elif(self.o.valid & self.o.ready):
            with m.If(~req.last):
                m.d.sync += [k.eq(k + 1), req.a_addr.eq(req.a_addr + cfg.a_stride),
                             req.b_addr.eq(req.b_addr + cfg.b_stride)]
            with m.Else():
                m.d.sync += k.eq(0)
                next_col = b_nib + C
                with m.If(next_col < n_pad):           # the next tile in this tile row
                    m.d.sync += [b_nib.eq(next_col), req.n_left.eq(req.n_left - C),
                                 req.a_addr.eq(a_base),
                                 req.b_addr.eq(cfg.b_addr + (next_col >> lnib))]
                with m.Else():                          # the next tile row
                    next_a = a_nib + (R << cfg.a_pair)
                    m.d.sync += [b_nib.eq(0), req.n_left.eq(cfg.n),
                                 req.m_left.eq(req.m_left - R), a_nib.eq(next_a),
                                 req.a_addr.eq(cfg.a_addr + (next_a >> lnib)),
                                 req.b_addr.eq(cfg.b_addr)]
                    with m.If(req.m_left <= R):
                        m.d.sync += self.o.valid.eq(0)
        return m


class OperandFetch(wiring.Component):
    """Beat requests in, operand beats out, through two read ports.

    Ports: ``i`` (In stream of :func:`beat_request`), ``a_pair`` and ``a_sel`` (In: A is
    stored as LOG4 code pairs and this nibble of each pair is the operand), ``beat`` (Out
    stream of :func:`~rtl.array.array_beat_layout`), ``rd_a`` and ``rd_b`` (read ports),
    ``idle`` (Out: no beat inside).
    """

    def __init__(self, rows, cols, addr_width, nibbles):
        self.rows, self.cols, self.nib, self.aw = rows, cols, nibbles, addr_width
        port = ReadPort.Signature(addr_width=addr_width, nibbles=nibbles)
        req = beat_request(addr_width, nibbles)
        super().__init__({
            "i": In(stream.Signature(req)), "a_pair": In(1), "a_sel": In(1),
            "beat": Out(stream.Signature(array_beat_layout(rows, cols))),
            "rd_a": Out(port), "rd_b": Out(port), "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        R, C, NIB = self.rows, self.cols, self.nib
        req = self.i.payload
        # The tags carry the real rows (columns) of the group, at most R (C), not the 18-bit
        # rows left: the readers' slots hold them.
        a_tag = data.StructLayout({"off": range(NIB), "left": range(R + 1), "last": 1})
        b_tag = data.StructLayout({"off": range(NIB), "left": range(C + 1)})
        m.submodules.read_a = ra = Reader(self.aw, NIB, a_tag)
        m.submodules.read_b = rb = Reader(self.aw, NIB, b_tag)
        wiring.connect(m, ra.port, wiring.flipped(self.rd_a))
        wiring.connect(m, rb.port, wiring.flipped(self.rd_b))

        # fork: each reader takes its half of a request once
        taken = Signal(2)
        m.d.comb += [
            ra.i.payload.addr.eq(req.a_addr), ra.i.payload.tag.off.eq(req.a_off),
            ra.i.payload.tag.left.eq(Mux(req.m_left >= R, R, req.m_left)),
            ra.i.payload.tag.last.eq(req.last),
            rb.i.payload.addr.eq(req.b_addr), rb.i.payload.tag.off.eq(req.b_off),
            rb.i.payload.tag.left.eq(Mux(req.n_left >= C, C, req.n_left)),
            ra.i.valid.eq(self.i.valid & ~taken[0]), rb.i.valid.eq(self.i.valid & ~taken[1]),
            self.i.ready.eq((taken[0] | ra.i.ready) & (taken[1] | rb.i.ready)),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += taken.eq(0)
        with m.Elif(self.i.valid):
            m.d.sync += [taken[0].eq(taken[0] | ra.i.ready), taken[1].eq(taken[1] | rb.i.ready)]

        # join: a beat when both words are in; select the groups, zero the padding
        both = ra.o.valid & rb.o.valid
        fire = both & self.beat.ready
        m.d.comb += [self.beat.valid.eq(both), ra.o.ready.eq(fire), rb.o.ready.eq(fire),
                     self.idle.eq(~ra.o.valid & ~rb.o.valid),
                     self.beat.payload.last.eq(ra.o.payload.tag.last)]
        a_word, a_t = ra.o.payload.data, ra.o.payload.tag
        b_word, b_t = rb.o.payload.data, rb.o.payload.tag
        lr, lc = R.bit_length() - 1, C.bit_length() - 1
        g = CODE_BITS
        a_plain = a_word.word_select(a_t.off >> lr, g * R) if NIB > R else a_word
        a_pairs = (a_word.word_select(a_t.off >> (lr + 1), 2 * g * R) if NIB > 2 * R
                   else a_word[:2 * g * R])
        b_group = b_word.word_select(b_t.off >> lc, g * C) if NIB > C else b_word
        for i in range(R):
            code = Mux(self.a_pair, a_pairs.word_select(2 * i + self.a_sel, g),
                       a_plain.word_select(i, g))
            m.d.comb += self.beat.payload.a[i].eq(Mux(a_t.left > i, code, 0))
        for j in range(C):
            m.d.comb += self.beat.payload.b[j].eq(Mux(b_t.left > j, b_group.word_select(j, g),
                                                      0))
        return m
