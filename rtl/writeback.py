"""The GEMM engine's result side: per output lane, a writer and a mask reader.

Lane ``g`` emits, for every tile, the elements ``(i, g + R*q)`` (``rtl.array.lane_order``):
the R rows of one column, then the lane's next column. Results are stored as out^T (N rows of
M elements), so the R elements of one column are neighbours in one row of out^T.

:class:`LaneWalker` follows that order: the column, the tile's first row ``r0``, the row
``i`` inside the tile, and the word address of the column's row in a buffer, kept by adding
the stride (no multiplier). The writer and the mask reader each have one.

:class:`LaneWriter` gathers a column's R elements and issues them as one write request of a
partial word (RESCALE: R codes, LOG4: R code pairs; RAW: as many 8-nibble elements as a word
holds, two on the 8 x 16 array), with a nibble enable for each real element, so padding rows
and columns are never written. The requests of the R writers share the write port through a
:class:`~rtl.memory.StreamArbiter`, one word per cycle. A tile of L beats makes R * C
elements: R * C / R = C requests for RESCALE and LOG4, and R * C * 8 / NIB for RAW, so a
tile keeps the array at full rate from L >= C beats on (RESCALE, LOG4) and from
L >= R * C * 8 / NIB (RAW: 64 on the 8 x 16 array, the backward-weight GEMM at batch 64,
which took 129 cycles a tile when RAW was one element a request).

:class:`MaskReader` feeds the LOG4 path the stored activation code of each element: one read
request per column group (R codes in one word), one word in flight and one prefetched. The R
mask readers share one read port the same way.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .bounds import DIM_BITS
from .formats import CODE_BITS, RAW_BITS, RAW_NIBBLES, UINT4, OutputPath
from .lane import LANE_OUT
from .memory import ADDR_BITS, STRIDE_BITS, write_request

__all__ = ["LaneWalker", "LaneWriter", "MaskReader"]

#: What a lane's walker needs from the GEMM's settings.
WALK_CFG = data.StructLayout({
    "base": ADDR_BITS, "stride": STRIDE_BITS, "m": DIM_BITS,
    "n_pad": DIM_BITS + 1,        # N rounded up to whole column tiles
})


class LaneWalker(wiring.Component):
    """Lane ``lane``'s element sequence and the word address of its column's row.

    Ports: ``cfg`` (In ``WALK_CFG``), ``launch`` (In: restart), ``step`` (In: the current
    element is done), ``col``, ``r0``, ``i`` (Out: its column, tile row, row in the tile),
    ``active`` (Out: elements remain), ``row_addr`` (Out: word address of row ``col``).
    """

    def __init__(self, rows, lane, addr_width):
        self.rows, self.lane = rows, lane
        super().__init__({
            "cfg": In(WALK_CFG), "launch": In(1), "step": In(1),
            "col": Out(DIM_BITS + 1), "r0": Out(DIM_BITS + 1), "i": Out(range(rows)),
            "active": Out(1), "row_addr": Out(addr_width),
        })

    def elaborate(self, platform):
        m = Module()
        R, g, cfg = self.rows, self.lane, self.cfg
        # stride * g as shifts and adds: a constant factor still becomes a DSP block in
        # yosys' ECP5 flow, and the array's PE pairs need those.
        first = cfg.base + sum((cfg.stride << k for k in range(g.bit_length()) if g >> k & 1),
                               Const(0, 1))
        with m.If(self.launch):
            m.d.sync += [self.col.eq(g), self.r0.eq(0), self.i.eq(0), self.active.eq(1),
                         self.row_addr.eq(first)]
        with m.Elif(self.step):
            with m.If(self.i == R - 1):
                m.d.sync += self.i.eq(0)
                with m.If(self.col + R < cfg.n_pad):
                    m.d.sync += [self.col.eq(self.col + R),
                                 self.row_addr.eq(self.row_addr
                                                  + (cfg.stride << (R.bit_length() - 1)))]
                with m.Else():
                    m.d.sync += [self.col.eq(g), self.r0.eq(self.r0 + R),
                                 self.row_addr.eq(first)]
                    with m.If(self.r0 + R >= cfg.m):
                        m.d.sync += self.active.eq(0)
            with m.Else():
                m.d.sync += self.i.eq(self.i + 1)
        return m


class LaneWriter(wiring.Component):
    """One lane's results in, write requests out.

    Ports: ``walk`` (In ``WALK_CFG``: the out^T buffer), ``path`` (In ``OutputPath``), ``n``
    (In: N), ``launch`` (In), ``i`` (In stream of ``LANE_OUT``), ``o`` (Out stream of write
    requests, one registered request at a time), ``done`` (Out: every element taken).
    """

    def __init__(self, rows, lane, addr_width, nibbles):
        self.rows, self.lane, self.aw, self.nib = rows, lane, addr_width, nibbles
        super().__init__({
            "walk": In(WALK_CFG), "path": In(OutputPath), "n": In(DIM_BITS), "launch": In(1),
            "i": In(stream.Signature(LANE_OUT)),
            "o": Out(stream.Signature(write_request(addr_width, nibbles))),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        R, NIB, g4 = self.rows, self.nib, CODE_BITS
        lnib = NIB.bit_length() - 1
        m.submodules.walker = w = LaneWalker(R, self.lane, self.aw)
        raw = self.path == OutputPath.RAW
        take = Signal()
        m.d.comb += [w.cfg.eq(self.walk), w.launch.eq(self.launch), w.step.eq(take),
                     self.done.eq(~w.active)]

        elem = Signal(RAW_BITS)                    # the element, in nibbles
        with m.Switch(self.path):
            with m.Case(OutputPath.RAW):
                m.d.comb += elem.eq(self.i.payload.raw)
            with m.Case(OutputPath.RESCALE):
                m.d.comb += elem.eq(self.i.payload.code)
            with m.Default():
                m.d.comb += elem.eq(self.i.payload.fp4.as_value())
        gather = Signal(2 * g4 * R)               # up to R code pairs of one column
        gvalid = Signal(R)                         # ... and which rows are real
        pw = max(1, min(NIB // RAW_NIBBLES, R))    # RAW elements a request carries
        slot = w.i[:pw.bit_length() - 1]           # ... this one's place in it
        rawbuf, rawvalid = Signal(RAW_BITS * pw), Signal(pw)
        push = Signal()                            # this element completes a request
        m.d.comb += [
            push.eq(Mux(raw, slot == pw - 1, w.i == R - 1)),
            # With several lanes a completing element waits for the request register to be
            # empty, not for it being emptied this cycle: the write arbiter's grant, through
            # this ready, into the lane's stages and FIFO was the 8x16 ULX3S build's
            # critical path (49.92 MHz). One lane has no arbiter, and every element of it
            # completes a request: it keeps the grant's bypass, one element a cycle.
            self.i.ready.eq(w.active & (~push | ~self.o.valid
                                        | (self.o.ready if R == 1 else 0))),
            take.eq(self.i.valid & self.i.ready),
        ]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        row_ok = (w.r0 + w.i) < self.walk.m
        col_ok = w.col < self.n
        new_gather = Signal.like(gather)
        new_valid = Signal.like(gvalid)
        m.d.comb += [new_gather.eq(gather), new_valid.eq(gvalid)]
        for idx in range(R):
            with m.If(w.i == idx):
                m.d.comb += [new_gather.word_select(idx, 2 * g4).eq(elem[:2 * g4]),
                             new_valid[idx].eq(row_ok)]
        new_raw, new_rawvalid = Signal.like(rawbuf), Signal.like(rawvalid)
        m.d.comb += [new_raw.eq(rawbuf), new_rawvalid.eq(rawvalid)]
        for idx in range(pw):
            with m.If(slot == idx):
                m.d.comb += [new_raw.word_select(idx, RAW_BITS).eq(elem),
                             new_rawvalid[idx].eq(row_ok)]
        e_log = Mux(raw, RAW_NIBBLES.bit_length() - 1, Mux(self.path == OutputPath.LOG4, 1, 0))
        first_row = Mux(raw, w.r0 + w.i - slot, w.r0)  # the request's first element's row
        nib = first_row << e_log                     # ... its nibble in the out^T row
        off = nib[:lnib]
        # The request's nibbles, its unit (R codes, R code pairs or pw RAW elements) repeated
        # across the word: the unit starts at a multiple of its own size (``off``: the tile's
        # first row times the element's nibbles), so every copy but the enabled one is
        # ignored and the data needs no shifter; only the enables are shifted.
        unit = Signal(g4 * NIB)
        uen = Signal(NIB)                         # the enables, at 0
        with m.Switch(self.path):
            with m.Case(OutputPath.RAW):
                m.d.comb += [unit.eq(new_raw.replicate(NIB // (RAW_NIBBLES * pw))),
                             uen.eq(Cat(*[v.replicate(RAW_NIBBLES) for v in new_rawvalid]))]
            with m.Case(OutputPath.RESCALE):
                m.d.comb += [unit.eq(Cat(*[new_gather.word_select(x, 2 * g4)[:g4]
                                           for x in range(R)]).replicate(NIB // R)),
                             uen.eq(new_valid)]
            with m.Default():
                m.d.comb += [unit.eq(new_gather.replicate(NIB // (2 * R))),
                             uen.eq(Cat(*[Cat(v, v) for v in new_valid]))]
        with m.If(take):
            m.d.sync += [gather.eq(new_gather), gvalid.eq(new_valid), rawbuf.eq(new_raw),
                         rawvalid.eq(new_rawvalid)]
            with m.If(push):
                m.d.sync += [
                    gvalid.eq(0), rawvalid.eq(0),
                    self.o.valid.eq(col_ok & Mux(raw, new_rawvalid.any(), new_valid.any())),
                    self.o.payload.addr.eq(w.row_addr + (nib >> lnib)),
                    self.o.payload.data.eq(unit),
                    self.o.payload.en.eq(uen << off),
                ]
        return m


class MaskReader(wiring.Component):
    """One lane's activation codes: read requests out, words in, codes out.

    Ports: ``walk`` (In ``WALK_CFG``: the act^T buffer), ``on`` (In: this GEMM masks),
    ``launch`` (In), ``req`` (Out stream: word addresses), ``word`` (In stream: the words,
    in request order), ``o`` (Out stream of UINT4 codes, one per element).
    """

    def __init__(self, rows, lane, addr_width, nibbles):
        self.rows, self.lane, self.aw, self.nib = rows, lane, addr_width, nibbles
        super().__init__({
            "walk": In(WALK_CFG), "on": In(1), "launch": In(1),
            "req": Out(stream.Signature(addr_width)),
            "word": In(stream.Signature(CODE_BITS * nibbles)),
            "o": Out(stream.Signature(UINT4)),
        })

    def elaborate(self, platform):
        m = Module()
        R, NIB, g4 = self.rows, self.nib, CODE_BITS
        lnib = NIB.bit_length() - 1
        # The walker runs one column group ahead of the codes handed out: after each
        # request it steps R times, to the next request's address.
        m.submodules.walker = w = LaneWalker(R, self.lane, self.aw)
        steps = Signal(range(R + 1))
        buf = Signal(g4 * R)                      # the current group's codes
        nxt = Signal(g4 * R)                      # the prefetched group
        have, nxt_have, waiting = Signal(), Signal(), Signal()
        idx = Signal(range(R))                    # the code handed out next
        off = Signal(range(NIB))                  # where the requested group starts
        asked = Signal()
        fill = Signal()
        word = Signal(g4 * R)
        take = Signal()
        m.d.comb += [
            w.cfg.eq(self.walk), w.launch.eq(self.launch),
            w.step.eq(~self.launch & (steps != 0)),
            self.req.valid.eq(self.on & w.active & ~nxt_have & ~waiting & (steps == 0)),
            self.req.payload.eq(w.row_addr + (w.r0 >> lnib)),
            asked.eq(self.req.valid & self.req.ready),
            self.word.ready.eq(1),
            fill.eq(self.word.valid & waiting),
            word.eq(self.word.payload >> (off << 2)),
            self.o.valid.eq(have), self.o.payload.eq(buf.word_select(idx, g4)),
            take.eq(self.o.valid & self.o.ready),
        ]
        with m.If(self.launch):
            m.d.sync += [have.eq(0), nxt_have.eq(0), waiting.eq(0), steps.eq(0), idx.eq(0)]
        with m.Else():
            with m.If(asked):
                m.d.sync += [waiting.eq(1), steps.eq(R), off.eq(w.r0[:lnib])]
            with m.Elif(steps != 0):
                m.d.sync += steps.eq(steps - 1)
            with m.If(fill):
                m.d.sync += waiting.eq(0)
            with m.If(take):
                m.d.sync += idx.eq(Mux(idx == R - 1, 0, idx + 1))
            with m.If(take & (idx == R - 1)):       # the group is used up
                with m.If(nxt_have):
                    m.d.sync += [buf.eq(nxt), nxt_have.eq(0)]
                with m.Elif(fill):
                    m.d.sync += buf.eq(word)
                with m.Else():
                    m.d.sync += have.eq(0)
            with m.Elif(fill):
                with m.If(~have):
                    m.d.sync += [buf.eq(word), have.eq(1)]
                with m.Else():
                    m.d.sync += [nxt.eq(word), nxt_have.eq(1)]
        return m
