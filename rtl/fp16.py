"""An FP16 multiply-accumulate PE, the reference nibble's INT4 x FP4 PE is measured against.

The paper (Sun et al., NeurIPS 2020) claims more than 7x over FP16 hardware from an area
model: an INT4 x FP4 MAC at 55 % of an FP16 FPU's area with 4x its throughput. This PE is
the FP16 side of that comparison on the same FPGAs (``make bench-density``), built the way
nibble's :class:`~nibble.rtl.array.PE` is: the same systolic ports (operands registered and
passed on, a ``last`` flag that publishes the sum and restarts it), one multiply-accumulate
per cycle.

Dataflow (every arrow a register)::

    a, b (IEEE half) -> 11 x 11 product -> FP32 pack -> align -> add -> round -> acc
                                                          ^                       |
                                                          +-- three sums in turn -+

* **the product** of two halves is exact in FP32 (11 x 11 significand bits fit its 24, and
  every half product's exponent fits its range), so it needs no rounding: an 11 x 11
  multiply, a leading-one search over its 22 bits (subnormal halves) and a shift;
  infinities and NaNs follow IEEE (inf x 0 is NaN);
* **the accumulation** is an FP32 adder rounding to nearest, ties to even, in three
  stages (swap by magnitude and align with guard, round and sticky bits; add or subtract
  and find the leading one; normalize, round, overflow to infinity). Its result returns to
  its input three cycles later, so three sums are in flight, one beat of each in turn: the
  way pipelined floating-point accumulators keep one MAC a cycle (a single sum would need
  the whole adder in one cycle: 20 MHz on the ECP5 measured, against ~50 MHz in three
  stages; ``make bench-density`` has the figures). Every value the accumulator reaches
  from products of halves is a multiple of 2^-48, so the sum of an accumulator and a
  nonzero product is never subnormal: the adder does not round subnormal results (an
  accumulator loaded with a subnormal passes through a zero product exactly).

``host/golden/fp16.py`` is its golden model (numpy's float32 arithmetic); the tests compare
bit for bit on random, special and tie-rounding operands.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["FP32_NAN", "Fp16MacPE", "fp32_add", "half_product"]

#: The NaN the PE produces (the quiet NaN with an empty payload).
FP32_NAN = 0x7FC00000


def _leading_one(m, value, name):
    """The index of ``value``'s highest set bit (0 when ``value`` is 0), as a signal."""
    pos = Signal(range(len(value)), name=name)
    for i in range(len(value)):
        with m.If(value[i]):
            m.d.comb += pos.eq(i)
    return pos


def _stage(m, values, name, en=None):
    """Signals holding ``values`` (a dict of Values): wires, or with ``en`` registers that
    load while it is high."""
    out = {}
    for key, v in values.items():
        v = Value.cast(v)
        sig = Signal(v.shape(), name=f"{name}_{key}")
        if en is None:
            m.d.comb += sig.eq(v)
        else:
            with m.If(en):
                m.d.sync += sig.eq(v)
        out[key] = sig
    return out


def _unpack_half(x):
    e, f = x[10:15], x[:10]
    return x[15], e, f, Cat(f, e != 0), Mux(e == 0, 1, e)     # sign, exp, frac, sig, eff


def product_raw(a, b):
    """Stage 1 of the product: the 11 x 11 significand product and the flags."""
    sa, ea, fa, siga, xa = _unpack_half(a)
    sb, eb, fb, sigb, xb = _unpack_half(b)
    nan_a, nan_b = (ea == 31) & (fa != 0), (eb == 31) & (fb != 0)
    inf_a, inf_b = (ea == 31) & (fa == 0), (eb == 31) & (fb == 0)
    zero_a, zero_b = siga == 0, sigb == 0
    return {"prod": siga * sigb, "exp": xa + xb, "sign": sa ^ sb,
            "nan": nan_a | nan_b | (inf_a & zero_b) | (inf_b & zero_a),
            "inf": inf_a | inf_b, "zero": zero_a | zero_b}


def product_pack(m, r):
    """Stage 2: the FP32 bit pattern of the product (exact)."""
    lead = _leading_one(m, r["prod"][:22], "half_lead")
    # value = prod * 2^(xa + xb - 50); with the leading one at bit L it is
    # 1.f * 2^(L + xa + xb - 50): the FP32 exponent field is L + xa + xb + 77
    up = Signal(range(24), name="half_up")
    m.d.comb += up.eq(23 - lead)
    frac = (r["prod"][:22] << up)[:23]
    exp = (lead + r["exp"] + 77)[:8]
    return Mux(r["nan"], FP32_NAN,
               Mux(r["inf"], Cat(Const(0, 23), Const(0xFF, 8), r["sign"]),
                   Mux(r["zero"], Cat(Const(0, 31), r["sign"]),
                       Cat(frac, exp, r["sign"]))))


def half_product(m, a, b):
    """The FP32 bit pattern of ``a * b`` (half bit patterns), exact; combinational."""
    return product_pack(m, _stage(m, product_raw(a, b), "hp"))


def add_align(m, x, y):
    """Stage 1 of ``x + y``: specials, the larger magnitude first, the smaller aligned with
    guard, round and sticky bits."""
    ex, ey = x[23:31], y[23:31]
    nan_x, nan_y = (ex == 255) & (x[:23] != 0), (ey == 255) & (y[:23] != 0)
    inf_x, inf_y = (ex == 255) & (x[:23] == 0), (ey == 255) & (y[:23] == 0)
    zero_x, zero_y = x[:31] == 0, y[:31] == 0
    swap = y[:31] > x[:31]
    big, small = Mux(swap, y, x), Mux(swap, x, y)
    eb, es = big[23:31], small[23:31]
    xb = Mux(eb == 0, 1, eb)                                      # effective exponents
    d = Signal(8, name="add_shift")
    m.d.comb += d.eq(xb - Mux(es == 0, 1, es))
    sig_s = Cat(Const(0, 3), small[:23], es != 0)
    aligned = Mux(d >= 27, 0, sig_s >> d)
    sticky = Mux(d >= 27, sig_s != 0, (sig_s & ((Const(1, 28) << d) - 1)[:27]) != 0)
    # what the sum is when it is not the rounded one: NaN, infinity, a zero's other operand
    special = Signal(32, name="add_special")
    is_special = Signal(name="add_is_special")
    m.d.comb += is_special.eq(1)
    with m.If(nan_x | nan_y | (inf_x & inf_y & (x[31] != y[31]))):
        m.d.comb += special.eq(FP32_NAN)
    with m.Elif(inf_x):
        m.d.comb += special.eq(x)
    with m.Elif(inf_y):
        m.d.comb += special.eq(y)
    with m.Elif(zero_x & zero_y):
        m.d.comb += special.eq(Cat(Const(0, 31), x[31] & y[31]))
    with m.Elif(zero_y):
        m.d.comb += special.eq(x)
    with m.Elif(zero_x):
        m.d.comb += special.eq(y)
    with m.Else():
        m.d.comb += is_special.eq(0)
    return {"sig_b": Cat(Const(0, 3), big[:23], eb != 0),
            "sig_s": Cat(aligned[0] | sticky, aligned[1:27]),
            "sub": big[31] != small[31], "sign": big[31], "exp": xb,
            "special": special, "is_special": is_special}


def add_sum(m, r):
    """Stage 2: the aligned sum or difference and its leading one."""
    total = Mux(r["sub"], r["sig_b"] - r["sig_s"], r["sig_b"] + r["sig_s"])[:28]
    lead = _leading_one(m, total, "add_lead")
    return {"total": total, "lead": lead, "sign": r["sign"], "exp": r["exp"],
            "special": r["special"], "is_special": r["is_special"]}


def add_round(m, r):
    """Stage 3: normalize (the leading one to bit 26), round to nearest even, pack."""
    total, lead = r["total"], r["lead"]
    up = Signal(range(27), name="add_up")
    m.d.comb += up.eq(26 - lead)
    carry = total[27]
    norm = Mux(carry, Cat(total[0] | total[1], total[2:28]), (total << up)[:27])
    exp = Signal(signed(11), name="add_exp")
    m.d.comb += exp.eq(Mux(carry, r["exp"] + 1, r["exp"] + lead - 26))
    keep = norm[3:27]                          # 24 bits with the leading one
    rounded = Signal(25, name="add_rounded")
    m.d.comb += rounded.eq(keep + (norm[2] & (norm[1] | norm[0] | keep[0])))
    exp_r = Signal(signed(11), name="add_exp_r")
    m.d.comb += exp_r.eq(exp + rounded[24])
    mant = Mux(rounded[24], rounded[1:24], rounded[:23])
    return Mux(r["is_special"], r["special"],
               Mux(total == 0, 0,                            # exact cancellation: +0
                   Mux(exp_r >= 255, Cat(Const(0, 23), Const(0xFF, 8), r["sign"]),
                       Cat(mant, exp_r[:8], r["sign"]))))


def fp32_add(m, x, y):
    """The FP32 bit pattern of ``x + y`` rounded to nearest even (see the module for the
    operands it is exact on); combinational: the adder's three stages as wires."""
    return add_round(m, _stage(m, add_sum(m, _stage(m, add_align(m, x, y), "a1")), "a2"))


#: Sums in flight in the accumulator's pipeline (its three stages): the PE interleaves
#: that many sums, one beat of each in turn.
ADD_STAGES = 3


class Fp16MacPE(wiring.Component):
    """One FP16 processing element with the systolic ports of nibble's PE.

    One multiply-accumulate a cycle: the product in two stages, the FP32 accumulation in
    :data:`ADD_STAGES`, so :data:`ADD_STAGES` sums are in flight, one beat of each in turn
    (beat ``t`` belongs to sum ``t mod 3``: the array interleaves three output tiles, as
    pipelined floating-point accumulators do). A sum's result appears on ``result`` the
    cycle it leaves the adder.

    Ports
    -----
    en : In(1)
        Clock enable.
    a_in, b_in : In(16)
        IEEE half operands, from the left and from above.
    last_in : In(1)
        Travels with A: this beat is the last of its sum.
    a_out, b_out, last_out : Out
        The registered operands, passed on.
    result : Out(32)
        A finished FP32 sum; 0 otherwise.
    result_valid : Out(1)
    """

    def __init__(self):
        super().__init__({
            "en": In(1), "a_in": In(16), "b_in": In(16), "last_in": In(1),
            "a_out": Out(16), "b_out": Out(16), "last_out": Out(1),
            "result": Out(32), "result_valid": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        en = self.en
        a, b, last = Signal(16), Signal(16), Signal()
        m.d.comb += [self.a_out.eq(a), self.b_out.eq(b), self.last_out.eq(last)]
        with m.If(en):
            m.d.sync += [a.eq(self.a_in), b.eq(self.b_in), last.eq(self.last_in)]
        raw = _stage(m, product_raw(a, b), "p1", en)
        l1 = _stage(m, {"last": last}, "l1", en)
        p = _stage(m, {"p": product_pack(m, raw), "last": l1["last"]}, "p2", en)
        # the accumulator's feedback: the sum leaving the adder, or 0 after a sum's last beat
        done, done_last = Signal(32), Signal()
        acc = Mux(done_last, 0, done)
        s1 = _stage(m, {**add_align(m, acc, p["p"]), "last": p["last"]}, "s1", en)
        s2 = _stage(m, {**add_sum(m, s1), "last": s1["last"]}, "s2", en)
        with m.If(en):
            m.d.sync += [done.eq(add_round(m, s2)), done_last.eq(s2["last"])]
        m.d.comb += [self.result.eq(Mux(done_last, done, 0)), self.result_valid.eq(done_last)]
        return m

