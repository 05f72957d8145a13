"""DMA: tiles between the SDRAM and tensor memory, beside the compute units.

The SDRAM (:mod:`nibble.rtl.sdram`) holds what tensor memory cannot (the training state, the
dataset); tensor memory is the scratchpad the GEMM engine and the element-wise unit work
on. :class:`Dma` moves one tile per command between them, while the other units run: it
holds its own copy of its settings, and reaches tensor memory through a
:class:`~nibble.rtl.memory.TensorBus` of its own (the arbiter lends it the ports the
compute units leave free: they come first).

A tile is ``rows`` rows of ``bursts`` SDRAM bursts (16 bytes each, aligned), row ``r``
starting at burst ``ext_addr + r * ext_stride`` in the SDRAM and at word
``mem_addr + r * mem_stride`` in tensor memory, where it occupies ``bursts * wpb``
consecutive words (``wpb``: words per burst, 128 bits over the word's width: 4 words of
8 codes, 2 of 16, 1 of 32). LOAD copies SDRAM to tensor memory, STORE the other way.
Both regions are range-checked before anything moves, by the same
:class:`~nibble.rtl.bounds.BoundsCheck` as GEMM and VECTOR buffers (a written region's rows
must not overlap); an out-of-range tile moves nothing (``ok`` low with ``checked``).

Dataflow::

    LOAD:  TileWalker(bursts) -> read requests -> SdramController -> bursts
           bursts -> wpb words -> Writer -> tensor memory   (TileWalker(words) addresses)
    STORE: TileWalker(words) -> Reader -> words -> a burst (wpb words) -> write requests
           (TileWalker(bursts) addresses) -> SdramController

The controller streams one beat per cycle on an open row, so a burst takes 8 cycles of the
16-bit SDRAM bus; its words take ``wpb`` <= 4 cycles of a tensor-memory port. The SDRAM is
the bound, by design: 2 bytes a cycle (100 MB/s at 50 MHz), which is what the
architecture's bandwidth arithmetic counts on (docs/architecture.md).
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .bounds import DIM_BITS, WORDS_BITS, BoundsCheck
from .formats import CODE_BITS
from .memory import ADDR_BITS, STRIDE_BITS, Reader, TensorBus, Writer, read_ports
from .sdram import BURST_BITS, burst_request

__all__ = ["DMA_CFG", "EXT_ADDR_BITS", "Dma", "TileWalker", "words_per_burst"]

#: SDRAM addresses in commands are in bursts of 16 bytes: 2^24 of them is 256 MB.
EXT_ADDR_BITS = 24

#: The DMA command's settings.
DMA_CFG = data.StructLayout({
    "store": 1,                     # 0: LOAD (SDRAM -> tensor memory); 1: STORE
    "rows": DIM_BITS,
    "bursts": WORDS_BITS - 2,       # per row (its words, up to 4 per burst, fit WORDS_BITS)
    "mem_addr": ADDR_BITS, "mem_stride": STRIDE_BITS,       # words
    "ext_addr": EXT_ADDR_BITS, "ext_stride": STRIDE_BITS,   # bursts
})


def words_per_burst(nibbles):
    """Tensor-memory words of ``nibbles`` codes in one SDRAM burst."""
    word = CODE_BITS * nibbles
    if BURST_BITS % word:
        raise ValueError(f"a word of {nibbles} codes does not divide a {BURST_BITS}-bit burst")
    return BURST_BITS // word


class TileWalker(wiring.Component):
    """The addresses of a tile, one per ``step``: ``rows`` rows of ``cols`` consecutive
    addresses, row starts ``stride`` apart, from ``base`` (held from ``launch`` on).
    ``valid`` from ``launch`` until the ``last`` address is stepped past. ``addr`` is a
    register (the next one is worked out beside it): the 8x16 ULX3S build's critical path
    went through a row-start-plus-column adder into the tensor memory's arbiter."""

    def __init__(self, addr_width, cols_width):
        super().__init__({
            "base": In(addr_width), "stride": In(STRIDE_BITS), "rows": In(DIM_BITS),
            "cols": In(cols_width), "launch": In(1), "step": In(1),
            "valid": Out(1), "addr": Out(addr_width), "last": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        row_at = Signal.like(self.addr)
        col, row = Signal.like(self.cols), Signal(DIM_BITS)
        end_col, end_row = col == self.cols - 1, row == self.rows - 1
        m.d.comb += self.last.eq(self.valid & end_col & end_row)
        with m.If(self.launch):
            m.d.sync += [self.valid.eq(1), row_at.eq(self.base), self.addr.eq(self.base),
                         col.eq(0), row.eq(0)]
        with m.Elif(self.step & self.valid):
            with m.If(end_col):
                next_row = row_at + self.stride
                m.d.sync += [col.eq(0), row.eq(row + 1), row_at.eq(next_row),
                             self.addr.eq(next_row)]
                with m.If(end_row):
                    m.d.sync += self.valid.eq(0)
            with m.Else():
                m.d.sync += [col.eq(col + 1), self.addr.eq(self.addr + 1)]
        return m


class Dma(wiring.Component):
    """Parameters
    ----------
    addr_width, nibbles, mem_words : tensor memory (its address bits, codes per word, size).
    chip : SdramChip

    Ports
    -----
    cfg : In(DMA_CFG)
        Read at ``start``; the DMA keeps its own copy.
    start : In(1)
    busy : Out(1)
        From ``start`` until the last word is written (LOAD) or the last burst is handed to
        the controller (STORE: the controller keeps requests in order, so a later LOAD of
        the same burst reads the new data).
    checked, ok : Out(1)
        The range check's pulse and verdict.
    cycles : Out(32)
        Cycles of the last transfer.
    bus : Out(TensorBus.Signature)
    req : Out(stream.Signature(burst_request(chip))); rdata : In(stream.Signature(128))
        To the SDRAM controller.
    """

    def __init__(self, addr_width, nibbles, mem_words, chip):
        self.aw, self.nib, self.mem_words, self.chip = addr_width, nibbles, mem_words, chip
        self.wpb = words_per_burst(nibbles)
        self.ext_bursts = chip.bytes // (BURST_BITS // 8)
        self.held_reads = ("rd2",)  # a STORE's words wait in its reader for the burst
        super().__init__({
            "cfg": In(DMA_CFG), "start": In(1), "busy": Out(1), "checked": Out(1),
            "ok": Out(1), "cycles": Out(32),
            "bus": Out(TensorBus.Signature(addr_width=addr_width, nibbles=nibbles)),
            "req": Out(stream.Signature(burst_request(chip))),
            "rdata": In(stream.Signature(BURST_BITS)),
        })

    def elaborate(self, platform):
        m = Module()
        aw, wpb, word = self.aw, self.wpb, CODE_BITS * self.nib
        cfg = Signal(DMA_CFG)
        go = Signal()
        with m.If(self.start & ~self.busy):
            m.d.sync += [cfg.eq(self.cfg), self.busy.eq(1), self.cycles.eq(0)]
        with m.Elif(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        m.d.sync += go.eq(self.start & ~self.busy)
        row_words = cfg.bursts * wpb

        # -- both regions in range (same rows: the two checks finish together) ----------
        m.submodules.mem_check = mc = BoundsCheck(1, self.mem_words)
        m.submodules.ext_check = ec = BoundsCheck(1, self.ext_bursts)
        for check, addr, stride, words, written in (
                (mc, cfg.mem_addr, cfg.mem_stride, row_words, ~cfg.store),
                (ec, cfg.ext_addr, cfg.ext_stride, cfg.bursts, cfg.store)):
            b = check.buffers[0]
            m.d.comb += [check.start.eq(go), b.addr.eq(addr), b.stride.eq(stride),
                         b.rows.eq(cfg.rows), b.items.eq(words), b.written.eq(written),
                         b.used.eq(1)]
        launch = Signal()
        m.d.comb += [self.checked.eq(mc.done),
                     self.ok.eq(mc.ok & ec.ok & (cfg.rows != 0) & (cfg.bursts != 0)),
                     launch.eq(self.checked & self.ok)]
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)

        # -- the two address streams ----------------------------------------------------
        m.submodules.ext_walk = ew = TileWalker(len(self.req.payload.addr), WORDS_BITS)
        m.submodules.mem_walk = mw = TileWalker(aw, WORDS_BITS)
        m.d.comb += [ew.base.eq(cfg.ext_addr), ew.stride.eq(cfg.ext_stride),
                     ew.rows.eq(cfg.rows), ew.cols.eq(cfg.bursts), ew.launch.eq(launch),
                     mw.base.eq(cfg.mem_addr), mw.stride.eq(cfg.mem_stride),
                     mw.rows.eq(cfg.rows), mw.cols.eq(row_words), mw.launch.eq(launch)]
        m.d.comb += self.req.payload.addr.eq(ew.addr)

        # -- tensor memory: a writer (LOAD) on wr, a reader (STORE) on rd2 ------------------
        # (rd2 is what the compute units use least, the engine's mask and UPDATE's V: on
        # rd0, which REQUANT, TRANSPOSE and every GEMM read each cycle, a part's stores
        # waited for the part beside them to end, and the next part's loads behind them)
        m.submodules.writer = wr = Writer(aw, self.nib)
        m.submodules.reader = rd = Reader(aw, self.nib, 1)
        wiring.connect(m, wr.port, wiring.flipped(self.bus.wr))
        wiring.connect(m, rd.port, wiring.flipped(self.bus.rd2))
        for port in read_ports(self.bus)[:2]:
            m.d.comb += port.en.eq(0)
        k = Signal(range(wpb))                        # the word of the burst at hand
        burst = Signal(BURST_BITS)                    # STORE: the burst being gathered
        have = Signal(range(wpb + 1))                 # ... its words so far

        with m.If(~cfg.store):                        # LOAD
            m.d.comb += [
                self.req.valid.eq(ew.valid), ew.step.eq(self.req.ready),
                wr.i.valid.eq(mw.valid & self.rdata.valid),
                wr.i.payload.addr.eq(mw.addr),
                wr.i.payload.data.eq(self.rdata.payload.word_select(k, word)),
                wr.i.payload.en.eq(-1),
                mw.step.eq(wr.i.ready & wr.i.valid),
                self.rdata.ready.eq(mw.step & (k == wpb - 1)),
            ]
            with m.If(mw.step):
                m.d.sync += k.eq(k + 1 if wpb == 1 else (k + 1) % wpb)
                with m.If(mw.last):
                    m.d.sync += self.busy.eq(0)
        with m.Else():                                # STORE
            m.d.comb += [
                rd.i.valid.eq(mw.valid), rd.i.payload.addr.eq(mw.addr),
                mw.step.eq(rd.i.ready),
                rd.o.ready.eq(have != wpb),
                self.req.valid.eq(ew.valid & (have == wpb)),
                self.req.payload.write.eq(1), self.req.payload.data.eq(burst),
                ew.step.eq(self.req.ready & self.req.valid),
            ]
            with m.If(rd.o.valid & rd.o.ready):
                m.d.sync += [burst.eq(Cat(burst[word:], rd.o.payload.data)), have.eq(have + 1)]
            with m.If(ew.step):
                m.d.sync += have.eq(0)
                with m.If(ew.last):
                    m.d.sync += self.busy.eq(0)
        with m.If(launch):
            m.d.sync += [k.eq(0), have.eq(0)]
        return m
