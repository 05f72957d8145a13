"""Tensor memory and the GEMM engine: the datapath fed straight from on-chip memory.

Memory
    :class:`TensorMemory` is ``words`` words of ``word_nibbles`` 4-bit codes (nibble 0 in
    the low bits). It has one write port with a per-nibble enable and several read ports;
    each read port is a copy of the memory (block RAM), written together.

Layouts
    Every operand is stored *k-major*: row ``k`` of a buffer holds the codes of reduction
    step ``k``, rows ``stride`` words apart. So A (M x L) is stored as A^T (L rows of M
    codes) and B (L x N) as itself (L rows of N codes). Results are stored the way the lanes
    produce them, as out^T (N rows of M elements): that is the k-major layout of the next
    layer's A operand, so a forward output feeds the next forward GEMM as it is. Element
    sizes: RESCALE 1 nibble; LOG4 2 nibbles (phase-0 code low, phase-1 code high; an A
    operand stored that way is read with ``a_pair`` and ``a_sel``); RAW 8 nibbles (the
    30-bit accumulator sign-extended to 32 bits).

Engine
    The engine walks the output tiles in row-major order, and for each tile reads L operand
    rows, one A group (R codes) and one B group (C codes) per cycle from two read ports,
    into the datapath: one beat per cycle, back to back across tiles, with no gap between
    tiles (the array restarts its accumulators on ``last``). Each lane gathers its R
    elements of an output column and writes them as one word (RAW: one word per element)
    through a shared write port; a third read port feeds the LOG4 mask codes. Because the
    operands come from memory at beat rate there is nothing to double-buffer: the only
    idle array cycles are the fill and drain of a GEMM (tens of cycles) and tiles shorter
    than C beats.
"""

from amaranth.hdl import Array, Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from .datapath import Datapath
from .formats import LANE_BITS, MAX_REDUCTION, OPERAND_CFG, MaskMode, OutputPath
from .lane import LANE_CFG

__all__ = ["GEMM_CFG", "GemmEngine", "TensorMemory", "element_nibbles", "word_nibbles"]

ADDR = 24
STRIDE = 16
DIM = 16

#: Everything one GEMM needs; the GEMM command's payload is exactly this layout.
GEMM_CFG = data.StructLayout({
    "a_addr": ADDR, "a_stride": STRIDE,
    "b_addr": ADDR, "b_stride": STRIDE,
    "out_addr": ADDR, "out_stride": STRIDE,
    "mask_addr": ADDR, "mask_stride": STRIDE,
    "m": DIM, "l": DIM, "n": DIM,
    "a_pair": 1,        # A codes are stored as LOG4 pairs (2 nibbles per element)
    "a_sel": 1,         # ... and this nibble of each pair is the operand
    "operands": OPERAND_CFG,
    "lane": LANE_CFG,
})


def word_nibbles(rows, cols):
    """Codes per memory word: a B group (C codes) and a paired A group (2R) fit in one
    aligned word, and a RAW element (8 nibbles) too."""
    return max(cols, 2 * rows, 8)


def element_nibbles(path):
    """Nibbles of one stored output element for an OutputPath."""
    return {OutputPath.RAW: 8, OutputPath.RESCALE: 1, OutputPath.LOG4: 2}[OutputPath(path)]


def _pow2(x):
    return x >= 1 and x & (x - 1) == 0


def read_port_signature(words, nibbles):
    """A synchronous read port, from the reader's side."""
    return wiring.Signature({"addr": Out(range(words)), "en": Out(1), "data": In(4 * nibbles)})


class TensorMemory(wiring.Component):
    """``words`` x ``nibbles`` codes; one write port (per-nibble enable), ``ports`` read
    ports (each a copy of the memory, one cycle of latency, ``en`` holds the data)."""

    def __init__(self, words, nibbles, ports):
        self.words, self.nibbles, self.ports = words, nibbles, ports
        rd = read_port_signature(words, nibbles)
        super().__init__({
            "wr_addr": In(range(words)), "wr_data": In(4 * nibbles), "wr_en": In(nibbles),
            "rd": In(rd).array(ports),
        })
        #: The copies (tests read and write them directly through ``.data``).
        self.copies = [memory.Memory(shape=unsigned(4 * nibbles), depth=words, init=[])
                       for _ in range(ports)]

    def elaborate(self, platform):
        m = Module()
        for p, mem in enumerate(self.copies):
            m.submodules[f"copy{p}"] = mem
            wr = mem.write_port(granularity=4)
            rd = mem.read_port()
            m.d.comb += [wr.addr.eq(self.wr_addr), wr.data.eq(self.wr_data),
                         wr.en.eq(self.wr_en),
                         rd.addr.eq(self.rd[p].addr), rd.en.eq(self.rd[p].en),
                         self.rd[p].data.eq(rd.data)]
        return m


class GemmEngine(wiring.Component):
    """Runs one GEMM at a time from tensor memory into tensor memory.

    Ports
    -----
    cfg : In(GEMM_CFG)
        Read from ``start`` until ``busy`` falls: hold it constant meanwhile (the command
        decoder does; a second copy would cost 250 flip-flops).
    start : In(1)
        Pulse while ``busy`` is low: check ``cfg``, then run it if it is in range.
    checked : Out(1)
        One-cycle pulse after ``start`` once the check is done; ``ok`` tells the verdict.
    ok : Out(1)
    busy : Out(1)
        From ``start`` until the last result is written.
    cycles, beats : Out(32)
        Of the last GEMM: cycles from start to the last write, beats sent into the array.
    absmax : Out(LANE_BITS)
        The datapath's output statistic (cleared on start).
    rd_a, rd_b, rd_m : Out(read port)
        Read ports of the tensor memory (A operand, B operand, mask codes).
    wr_addr, wr_data, wr_en : Out
        The tensor memory's write port (``wr_en`` all zero when not writing).
    """

    def __init__(self, rows, cols, mem_words):
        for x in (rows, cols, mem_words):
            if not _pow2(x):
                raise ValueError(f"rows, cols and mem_words must be powers of two, got {x}")
        self.rows, self.cols, self.mem_words = rows, cols, mem_words
        self.nib = word_nibbles(rows, cols)
        rd = read_port_signature(mem_words, self.nib)
        super().__init__({
            "cfg": In(GEMM_CFG),
            "start": In(1),
            "checked": Out(1),
            "ok": Out(1),
            "busy": Out(1),
            "cycles": Out(32),
            "beats": Out(32),
            "absmax": Out(LANE_BITS),
            "rd_a": Out(rd), "rd_b": Out(rd), "rd_m": Out(rd),
            "wr_addr": Out(range(mem_words)),
            "wr_data": Out(4 * self.nib),
            "wr_en": Out(self.nib),
        })

    # -- the range check ----------------------------------------------------------------
    def _check(self, m, cfg, n_pad, go, done, ok):
        """A sequential check with one adder (no multipliers): buffer by buffer, the last
        word each touches is found by adding its stride once per row, and must lie inside
        the memory. Takes ``2 L + 2 N + 4`` cycles at most."""
        R, NIB = self.rows, self.nib
        lnib = NIB.bit_length() - 1
        aw = self.mem_words.bit_length() - 1
        # `end` stops growing once its top bit is set (past any memory), so it never wraps
        width = max(aw, DIM + 1) + 2
        path = cfg.lane.path
        # element sizes are powers of two: shifts, not multipliers
        out_nibbles = Signal(DIM + 3)
        m.d.comb += out_nibbles.eq(Mux(path == OutputPath.RAW, cfg.m << 3,
                                       Mux(path == OutputPath.LOG4, cfg.m << 1, cfg.m)))
        m_pad = Signal(DIM + 1)
        m.d.comb += m_pad.eq((cfg.m + R - 1) & ~(R - 1))

        def words(nibbles):
            return (nibbles + NIB - 1) >> lnib

        bufs = [  # (addr, stride, rows, words per row, used)
            (cfg.a_addr, cfg.a_stride, cfg.l, words(m_pad << cfg.a_pair), 1),
            (cfg.b_addr, cfg.b_stride, cfg.l, words(n_pad), 1),
            (cfg.out_addr, cfg.out_stride, cfg.n, words(out_nibbles), 1),
            (cfg.mask_addr, cfg.mask_stride, cfg.n, words(m_pad),
             (path == OutputPath.LOG4) & (cfg.lane.log4.mask != MaskMode.NONE)),
        ]
        idx = Signal(range(len(bufs)))
        addr = Array(b[0] for b in bufs)[idx]
        stride = Array(b[1] for b in bufs)[idx]
        rows = Array(b[2] for b in bufs)[idx]
        row_words = Array(b[3] for b in bufs)[idx]
        used = Array(Value.cast(b[4]) for b in bufs)[idx]
        count = Signal(DIM)
        end = Signal(width)
        bad = Signal()
        # RESCALE takes forward accumulators (RESCALE_IN_BITS): not an FP4 GEMM's
        dims_ok = ((cfg.m != 0) & (cfg.n != 0) & (cfg.l != 0) & (cfg.l <= MAX_REDUCTION)
                   & (path <= OutputPath.LOG4) & (cfg.lane.log4.mask <= MaskMode.PACT)
                   & ~((path == OutputPath.RESCALE) & cfg.operands.a_fp4))
        # result rows must not overlap: the stride covers a row
        rows_ok = (cfg.out_stride << lnib) >= out_nibbles
        m.d.comb += done.eq(0)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(go):
                    m.d.sync += [idx.eq(0), bad.eq(~dims_ok | ~rows_ok)]
                    m.next = "START"
            with m.State("START"):
                m.d.sync += [end.eq(addr[:width - 1] + row_words), count.eq(1),
                             bad.eq(bad | (used & (addr >= self.mem_words)))]
                m.next = "ROWS"
            with m.State("ROWS"):
                with m.If((count < rows) & ~end[-1]):
                    m.d.sync += [end.eq(end + stride), count.eq(count + 1)]
                with m.Else():
                    fail = used & (end > self.mem_words)
                    m.d.sync += [bad.eq(bad | fail), idx.eq(idx + 1)]
                    with m.If(idx == len(bufs) - 1):
                        m.d.comb += [done.eq(1), ok.eq(~bad & ~fail)]
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "START"


    def elaborate(self, platform):
        m = Module()
        R, C, NIB = self.rows, self.cols, self.nib
        lnib = NIB.bit_length() - 1
        lr = R.bit_length() - 1
        aw = self.mem_words.bit_length() - 1
        m.submodules.dp = dp = Datapath(R, C)
        cfg = self.cfg
        m.d.comb += [dp.cfg.operands.eq(cfg.operands), dp.cfg.lane.eq(cfg.lane),
                     self.absmax.eq(dp.absmax)]

        # -- control ----------------------------------------------------------------------
        check_go, check_done, check_ok = Signal(), Signal(), Signal()
        n_pad = Signal(DIM + 1)                     # N rounded up to whole column tiles
        m.d.comb += n_pad.eq((cfg.n + C - 1) & ~(C - 1))
        self._check(m, cfg, n_pad, check_go, check_done, check_ok)
        run = Signal()            # beats still to issue
        lanes_done = Signal()
        with m.If(self.start & ~self.busy):
            m.d.sync += [self.busy.eq(1), check_go.eq(1)]
        with m.Else():
            m.d.sync += check_go.eq(0)
        m.d.comb += [self.checked.eq(check_done), self.ok.eq(check_ok)]
        launch = Signal()
        m.d.comb += launch.eq(check_done & check_ok)
        with m.If(check_done & ~check_ok):
            m.d.sync += self.busy.eq(0)
        m.d.comb += dp.clear.eq(launch)
        with m.If(launch):
            m.d.sync += [self.cycles.eq(0), self.beats.eq(0)]
        with m.Elif(self.busy & ~check_go):
            m.d.sync += self.cycles.eq(self.cycles + 1)

        path = cfg.lane.path
        ea_log = cfg.a_pair                         # log2 of A nibbles per element
        eo_log = Mux(path == OutputPath.RAW, 3, Mux(path == OutputPath.LOG4, 1, 0))

        # -- operand reads: stage 1 walks (tile row, tile col, k), stage 2 is the memory --
        a_nib = Signal(DIM + 2)       # r0 * Ea (nibbles into an A row)
        b_nib = Signal(DIM + 1)       # c0
        m_left = Signal(signed(DIM + 2))
        n_left = Signal(signed(DIM + 2))
        k = Signal(DIM)
        # word pointers wrap at the memory size: the check keeps every buffer inside it
        a_ptr = Signal(aw)
        b_ptr = Signal(aw)
        s2_valid = Signal()
        s2 = Signal(data.StructLayout({
            "a_off": range(NIB), "b_off": range(NIB), "m_left": signed(DIM + 2),
            "n_left": signed(DIM + 2), "last": 1}))
        advance = Signal()
        m.d.comb += advance.eq(~s2_valid | dp.beat.ready)
        a_base = cfg.a_addr + (a_nib >> lnib)
        m.d.comb += [
            self.rd_a.addr.eq(a_ptr), self.rd_b.addr.eq(b_ptr),
            self.rd_a.en.eq(advance), self.rd_b.en.eq(advance),
        ]
        with m.If(launch):
            m.d.sync += [run.eq(1), a_nib.eq(0), b_nib.eq(0), k.eq(0),
                         m_left.eq(cfg.m), n_left.eq(cfg.n),
                         a_ptr.eq(cfg.a_addr), b_ptr.eq(cfg.b_addr)]
        with m.If(advance):
            m.d.sync += s2_valid.eq(run)
            with m.If(run):
                last = k == cfg.l - 1
                m.d.sync += [
                    s2.a_off.eq(a_nib[:lnib]), s2.b_off.eq(b_nib[:lnib]),
                    s2.m_left.eq(m_left), s2.n_left.eq(n_left), s2.last.eq(last),
                    self.beats.eq(self.beats + 1),
                ]
                with m.If(~last):
                    m.d.sync += [k.eq(k + 1), a_ptr.eq(a_ptr + cfg.a_stride),
                                 b_ptr.eq(b_ptr + cfg.b_stride)]
                with m.Else():
                    m.d.sync += k.eq(0)
                    next_col = b_nib + C
                    with m.If(next_col < n_pad):          # next tile in this tile row
                        m.d.sync += [b_nib.eq(next_col), n_left.eq(n_left - C),
                                     a_ptr.eq(a_base),
                                     b_ptr.eq(cfg.b_addr + (next_col >> lnib))]
                    with m.Else():                         # next tile row
                        next_a = a_nib + (R << ea_log)
                        m.d.sync += [b_nib.eq(0), n_left.eq(cfg.n), m_left.eq(m_left - R),
                                     a_nib.eq(next_a),
                                     a_ptr.eq(cfg.a_addr + (next_a >> lnib)),
                                     b_ptr.eq(cfg.b_addr)]
                        with m.If(m_left <= R):
                            m.d.sync += run.eq(0)

        # stage 2: select the groups, zero the padding, send the beat
        a_word, b_word = self.rd_a.data, self.rd_b.data
        a_plain = a_word.word_select(s2.a_off >> lr, 4 * R) if NIB > R else a_word
        pair_groups = NIB // (2 * R)
        a_pairs = (a_word.word_select(s2.a_off >> (lr + 1), 8 * R) if pair_groups > 1
                   else a_word[:8 * R])
        lc = C.bit_length() - 1
        b_group = b_word.word_select(s2.b_off >> lc, 4 * C) if NIB > C else b_word
        m.d.comb += [dp.beat.valid.eq(s2_valid), dp.beat.payload.last.eq(s2.last)]
        for i in range(R):
            code = Mux(cfg.a_pair, a_pairs.word_select(2 * i + cfg.a_sel, 4),
                       a_plain.word_select(i, 4))
            m.d.comb += dp.beat.payload.a[i].eq(Mux(s2.m_left > i, code, 0))
        for j in range(C):
            m.d.comb += dp.beat.payload.b[j].eq(Mux(s2.n_left > j, b_group.word_select(j, 4), 0))

        # -- result writers: one per lane, a fixed-priority shared write port -------------
        wr_req = []
        done_bits = []
        mask_on = (path == OutputPath.LOG4) & (cfg.lane.log4.mask != MaskMode.NONE)
        m_req = []
        for g in range(R):
            wr_req.append(self._lane_writer(m, g, dp, cfg, launch, eo_log, n_pad, done_bits))
            m_req.append(self._mask_reader(m, g, dp, cfg, launch, n_pad, mask_on))

        # write port arbitration
        m.d.comb += self.wr_en.eq(0)
        granted = Signal(range(R + 1))
        m.d.comb += granted.eq(R)
        for g in reversed(range(R)):
            with m.If(wr_req[g]["valid"]):
                m.d.comb += granted.eq(g)
        for g in range(R):
            req = wr_req[g]
            with m.If(granted == g):
                m.d.comb += [self.wr_addr.eq(req["addr"]), self.wr_data.eq(req["data"]),
                             self.wr_en.eq(req["en"]), req["grant"].eq(1)]

        # mask read port arbitration (data returns one cycle later to the granted lane)
        mgrant = Signal(range(R + 1))
        mgrant_q = Signal(range(R + 1), init=R)
        m.d.comb += [mgrant.eq(R), self.rd_m.en.eq(1)]
        for g in reversed(range(R)):
            with m.If(m_req[g]["valid"]):
                m.d.comb += mgrant.eq(g)
        for g in range(R):
            with m.If(mgrant == g):
                m.d.comb += [self.rd_m.addr.eq(m_req[g]["addr"]), m_req[g]["grant"].eq(1)]
            m.d.comb += m_req[g]["fill"].eq(mgrant_q == g)
            m.d.comb += m_req[g]["data"].eq(self.rd_m.data)
        m.d.sync += mgrant_q.eq(mgrant)

        m.d.comb += lanes_done.eq(Cat(*done_bits).all())
        finishing = Signal()
        m.d.comb += finishing.eq(self.busy & ~run & ~s2_valid & lanes_done
                                 & ~Cat(*[r["valid"] for r in wr_req]).any())
        started = Signal()
        with m.If(launch):
            m.d.sync += started.eq(1)
        with m.If(finishing & started & ~launch):
            m.d.sync += [self.busy.eq(0), started.eq(0)]
        return m

    def _walker(self, m, g, cfg, launch, n_pad, step, name, base, stride):
        """Per lane: the (column, tile row) sequence of its elements, and the word address
        of the current column's row in a buffer at ``base`` with rows ``stride`` apart,
        kept incrementally (no multiplier)."""
        R = self.rows
        col = Signal(DIM + 1, name=f"{name}{g}_col")
        r0 = Signal(DIM + 1, name=f"{name}{g}_r0")
        i = Signal(range(R), name=f"{name}{g}_i")
        active = Signal(name=f"{name}{g}_active")
        cptr = Signal(self.mem_words.bit_length() - 1, name=f"{name}{g}_cptr")
        first = base + stride * g
        with m.If(launch):
            m.d.sync += [col.eq(g), r0.eq(0), i.eq(0), active.eq(1), cptr.eq(first)]
        with m.Elif(step):
            with m.If(i == R - 1):
                m.d.sync += i.eq(0)
                with m.If(col + R < n_pad):
                    m.d.sync += [col.eq(col + R),
                                 cptr.eq(cptr + (stride << (R.bit_length() - 1)))]
                with m.Else():
                    m.d.sync += [col.eq(g), r0.eq(r0 + R), cptr.eq(first)]
                    with m.If(r0 + R >= cfg.m):
                        m.d.sync += active.eq(0)
            with m.Else():
                m.d.sync += i.eq(i + 1)
        return col, r0, i, active, cptr

    def _lane_writer(self, m, g, dp, cfg, launch, eo_log, n_pad, done_bits):
        R, NIB = self.rows, self.nib
        lnib = NIB.bit_length() - 1
        out = dp.out[g]
        path = cfg.lane.path
        raw = path == OutputPath.RAW
        take = Signal(name=f"w{g}_take")
        col, r0, i, active, cptr = self._walker(m, g, cfg, launch, n_pad, take, "w",
                                                cfg.out_addr, cfg.out_stride)
        done_bits.append(~active)

        # the element as nibbles
        elem = Signal(32, name=f"w{g}_elem")
        with m.Switch(path):
            with m.Case(OutputPath.RAW):
                m.d.comb += elem.eq(out.payload.raw)
            with m.Case(OutputPath.RESCALE):
                m.d.comb += elem.eq(out.payload.code)
            with m.Default():
                m.d.comb += elem.eq(out.payload.fp4.as_value())
        gather = Signal(8 * R, name=f"w{g}_gather")     # up to R pairs
        gvalid = Signal(R, name=f"w{g}_gvalid")

        pend = {"valid": Signal(name=f"w{g}_pvalid"), "addr": Signal(range(self.mem_words),
                name=f"w{g}_paddr"), "data": Signal(4 * NIB, name=f"w{g}_pdata"),
                "en": Signal(NIB, name=f"w{g}_pen"), "grant": Signal(name=f"w{g}_grant")}
        push = Signal(name=f"w{g}_push")
        m.d.comb += [
            push.eq(raw | (i == R - 1)),
            out.ready.eq(active & (~push | ~pend["valid"] | pend["grant"])),
            take.eq(out.valid & out.ready),
        ]
        with m.If(pend["grant"]):
            m.d.sync += pend["valid"].eq(0)

        row_ok = (r0 + i) < cfg.m
        col_ok = col < cfg.n
        with m.If(take):
            new_gather = Signal.like(gather, name=f"w{g}_ng")
            new_valid = Signal.like(gvalid, name=f"w{g}_nv")
            m.d.comb += [new_gather.eq(gather), new_valid.eq(gvalid)]
            for idx in range(R):
                with m.If(i == idx):
                    m.d.comb += [new_gather.word_select(idx, 8).eq(elem[:8]),
                                 new_valid[idx].eq(row_ok)]
            m.d.sync += [gather.eq(new_gather), gvalid.eq(new_valid)]
            with m.If(push):
                m.d.sync += [gvalid.eq(0)]
                # nibble position of the unit inside its out^T row
                first = Mux(raw, r0 + i, r0)
                nib = (first << eo_log)
                m.d.sync += [
                    pend["valid"].eq(col_ok & Mux(raw, row_ok, new_valid.any())),
                    pend["addr"].eq(cptr + (nib >> lnib)),
                ]
                off = nib[:lnib]
                # place the unit's nibbles and enables at `off` (4-bit units)
                unit = Signal(4 * NIB, name=f"w{g}_unit")
                uen = Signal(NIB, name=f"w{g}_uen")
                with m.Switch(path):
                    with m.Case(OutputPath.RAW):
                        m.d.comb += [unit.eq(elem), uen.eq(Mux(row_ok, 0xFF, 0))]
                    with m.Case(OutputPath.RESCALE):
                        m.d.comb += [unit.eq(Cat(*[new_gather.word_select(x, 8)[:4]
                                                  for x in range(R)])),
                                     uen.eq(new_valid)]
                    with m.Default():
                        m.d.comb += [unit.eq(new_gather),
                                     uen.eq(Cat(*[Cat(v, v) for v in new_valid]))]
                m.d.sync += [pend["data"].eq(unit << (off << 2)), pend["en"].eq(uen << off)]
        return pend

    def _mask_reader(self, m, g, dp, cfg, launch, n_pad, mask_on):
        """Per lane: read the R mask codes of each column group, one word, and hand them out
        one per element."""
        R, NIB = self.rows, self.nib
        lnib = NIB.bit_length() - 1
        ms = dp.mask[g]
        take = Signal(name=f"m{g}_take")
        # request side walks one column group ahead of the codes handed out
        req_step = Signal(name=f"m{g}_rstep")
        _, r0, _, active, cptr = self._walker(m, g, cfg, launch, n_pad, req_step, "mr",
                                              cfg.mask_addr, cfg.mask_stride)
        req = {"valid": Signal(name=f"m{g}_rvalid"), "addr": Signal(range(self.mem_words),
               name=f"m{g}_raddr"), "grant": Signal(name=f"m{g}_grant"),
               "fill": Signal(name=f"m{g}_fill"), "data": Signal(4 * NIB, name=f"m{g}_data")}
        buf = Signal(4 * R, name=f"m{g}_buf")
        nxt = Signal(4 * R, name=f"m{g}_nxt")
        have = Signal(name=f"m{g}_have")
        nxt_have = Signal(name=f"m{g}_nxt_have")
        waiting = Signal(name=f"m{g}_wait")
        idx = Signal(range(R), name=f"m{g}_idx")
        # One read in flight and one word prefetched; after each grant the walker steps R
        # times (one column group) to the next request's address.
        steps = Signal(range(R + 1), name=f"m{g}_steps")
        m.d.comb += [
            req["valid"].eq(mask_on & active & ~nxt_have & ~waiting & (steps == 0)),
            req["addr"].eq(cptr + (r0 >> lnib)),
            req_step.eq(~launch & (steps != 0)),
        ]
        off_q = Signal(range(NIB), name=f"m{g}_offq")
        fill = Signal(name=f"m{g}_fill_now")
        fin = Signal(name=f"m{g}_fin")
        word = Signal(4 * R, name=f"m{g}_word")
        m.d.comb += [fill.eq(req["fill"] & waiting), word.eq(req["data"] >> (off_q << 2)),
                     ms.valid.eq(have), ms.payload.eq(buf.word_select(idx, 4)),
                     take.eq(ms.valid & ms.ready), fin.eq(take & (idx == R - 1))]
        with m.If(launch):
            m.d.sync += [have.eq(0), nxt_have.eq(0), waiting.eq(0), steps.eq(0), idx.eq(0)]
        with m.Else():
            with m.If(req["grant"]):
                m.d.sync += [waiting.eq(1), steps.eq(R), off_q.eq(r0[:lnib])]
            with m.Elif(steps != 0):
                m.d.sync += steps.eq(steps - 1)
            with m.If(fill):
                m.d.sync += waiting.eq(0)
            with m.If(take):
                m.d.sync += idx.eq(Mux(idx == R - 1, 0, idx + 1))
            with m.If(fin):
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
        return req

