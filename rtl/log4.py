"""The radix-4 log gradient quantizer: mask, GradScale offset, both TPR phases, one per cycle.

Bit-exact with :func:`nibble.host.golden.numerics.log_quantize_tpr` applied to the masked
accumulators (``docs/numerics.md`` §3). With ``a = |x|`` and ``L`` the index of its leading one, the
number ``c`` of the 14 merged thresholds below ``a`` has a closed form, because the
thresholds are ``2^(g-1)``, ``2^g`` and then ``5 * 2^(g-3+n)`` for ``n = 2..13`` with
``g = exp - 12``. With ``u = L - exp + 12``:

* ``[u >= 0]  + [u == -1 and a is not a power of two]``   (threshold ``2^(g-1)``)
* ``[u >= 1]  + [u ==  0 and a is not a power of two]``   (threshold ``2^g``)
* ``clamp(u - 1, 0, 12)``                                 (the ``5 * 2^m`` below ``2^L``)
* ``[1 <= u <= 12 and 4a > 5 * 2^L]``                      (the one between ``2^L`` and
  ``2^(L+1)``, an exact tie ``4a == 5 * 2^L`` goes to the smaller magnitude)

so the hardware is a leading-one detector, a power-of-two test and one compare. Phase 0
takes exponent field ``(c + 1) >> 1``, phase 1 ``c >> 1``; a zero result has sign 0.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .formats import (
    FP4,
    FP4_EXP_MAX,
    FP4_TOP_LOG2,
    LANE_BITS,
    LOG4_EXP_BITS,
    UINT4,
    UINT4_MAX,
    UINT4_MIN,
    MaskMode,
)

__all__ = ["LOG4_CFG", "LOG4_IN", "LOG4_OUT", "Log4Quantizer", "leading_one",
           "leading_one_groups", "mask_passes"]

#: Settings of the log4 quantizer, constant while a tensor streams through.
LOG4_CFG = data.StructLayout({
    "exp": signed(LOG4_EXP_BITS),   # GradScale exponent in accumulator units
    "mask": MaskMode,
})
#: One input element: the accumulator and the stored activation code that masks it.
LOG4_IN = data.StructLayout({"value": signed(LANE_BITS), "code": UINT4})
#: One output element: the FP4 codes for phase 0 (backward-data) and phase 1 (weights).
LOG4_OUT = data.ArrayLayout(FP4, 2)


def _merge(lo, hi):
    """Combine the leading-one summaries (nonzero, index, several) of two halves."""
    lo_nz, lo_ix, lo_multi = lo
    hi_nz, hi_ix, hi_multi = hi
    return (lo_nz | hi_nz, Cat(Mux(hi_nz, hi_ix, lo_ix), hi_nz),
            lo_multi | hi_multi | (lo_nz & hi_nz))


def _tree(nodes):
    while len(nodes) > 1:
        nodes = [_merge(nodes[k], nodes[k + 1]) for k in range(0, len(nodes), 2)]
    return nodes[0]


def leading_one_groups(value, group=8):
    """Leading-one summaries ``(nonzero, index, more than one bit set)`` of each ``group``
    bits of ``value`` (zero-padded to a power-of-two number of groups): balanced trees of
    2:1 choices, so the depth is log2(group)."""
    n = 1 << max((len(value) + group - 1) // group - 1, 1).bit_length()
    bits = [value[k] if k < len(value) else Const(0, 1) for k in range(n * group)]
    out = []
    for g in range(n):
        pairs = [(bits[k] | bits[k + 1], bits[k + 1], bits[k] & bits[k + 1])
                 for k in range(g * group, (g + 1) * group, 2)]
        out.append(_tree(pairs))
    return out


def leading_one(nodes):
    """Combine group summaries into (nonzero, index of the highest set bit, several)."""
    return _tree(list(nodes))


def mask_passes(mode, code):
    """Hardware :func:`rtl.formats.mask_pass`: 1 where the gradient passes."""
    return Mux(mode == MaskMode.NONE, 1,
               Mux(mode == MaskMode.RELU, code > UINT4_MIN,
                   (code > UINT4_MIN) & (code < UINT4_MAX)))


class Log4Quantizer(wiring.Component):
    """Log4 quantizer stream: masked accumulators in, FP4 pairs out, 6-cycle latency.

    Ports
    -----
    cfg : In(LOG4_CFG)
        GradScale exponent (the phase-0 top code is ``2^exp`` accumulator units) and mask.
    i : In(stream.Signature(LOG4_IN))
        Accumulator (signed, LANE_BITS) and activation code. ``ready = ~o.valid | o.ready``.
    o : Out(stream.Signature(LOG4_OUT))
        ``o.payload[0]``: phase-0 FP4 code, ``o.payload[1]``: phase-1 FP4 code.
    """

    LATENCY = 6

    def __init__(self):
        super().__init__({
            "cfg": In(LOG4_CFG),
            "i": In(stream.Signature(LOG4_IN)),
            "o": Out(stream.Signature(LOG4_OUT)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        advance = Signal()
        m.d.comb += [advance.eq(~self.o.valid | self.o.ready), self.i.ready.eq(advance)]

        # Stage 1: the mask. Stage 2: magnitude and sign (its carry chain gets a cycle).
        code, x = self.i.payload.code, self.i.payload.value
        xm = Signal(signed(LANE_BITS))
        v0 = Signal()
        mag_in = Signal(unsigned(LANE_BITS))
        m.d.comb += mag_in.eq(Mux(xm < 0, -xm, xm))
        a = Signal(unsigned(LANE_BITS))
        neg1 = Signal()
        v1 = Signal()

        # Stages 3-4: leading one and the more-than-one-bit flag: per 8-bit group, then
        # across the groups (two short trees instead of one deep one).
        groups = leading_one_groups(a)
        g_regs = [(Signal(name=f"g{k}_nz"), Signal(len(ix), name=f"g{k}_ix"),
                   Signal(name=f"g{k}_multi")) for k, (_, ix, _) in enumerate(groups)]
        a_g, neg_g, v_g = Signal.like(a, name="a_g"), Signal(name="neg_g"), Signal(name="v_g")
        nz, lead, several = leading_one(g_regs)
        a2 = Signal.like(a, name="a2")
        nz2, lead2, lownz2, neg2, v2 = (Signal(name="nz2"), Signal(len(lead), name="lead2"),
                                        Signal(name="lownz2"), Signal(name="neg2"),
                                        Signal(name="v2"))
        # Stage 5: the one compare, 4a > 5 * 2^L, and the four terms of the count from
        # u = L - exp + 12 (exp - 12 depends only on the settings: decoded into a register).
        five_l = Signal(unsigned(LANE_BITS + 2))     # 5 * 2^L, decoded in stage 4
        base = Signal(signed(LOG4_EXP_BITS + 1))
        m.d.sync += base.eq(cfg.exp - FP4_TOP_LOG2)
        u = Signal(signed(LOG4_EXP_BITS + 3))
        m.d.comb += u.eq(lead2 - base)
        top = 2 * (FP4_EXP_MAX - 1)                       # 12 thresholds of the 5*2^m kind
        c1 = (u >= 0) | ((u == -1) & lownz2)
        c2 = (u >= 1) | ((u == 0) & lownz2)
        c3 = Mux(u < 1, 0, Mux(u > top + 1, top, u - 1))
        c4 = (u >= 1) & (u <= top) & ((a2 << 2) > five_l)
        t1, t2, t4 = Signal(name="t1"), Signal(name="t2"), Signal(name="t4")
        t3 = Signal(range(top + 1))
        nz3, neg3, v3 = Signal(name="nz3"), Signal(name="neg3"), Signal(name="v3")
        # Stage 6: the count and the two codes.
        count = Signal(range(2 * FP4_EXP_MAX + 1))
        m.d.comb += count.eq(Mux(nz3, t1 + t2 + t3 + t4, 0))
        e0 = (count + 1) >> 1
        e1 = count >> 1
        with m.If(advance):
            m.d.sync += [
                xm.eq(Mux(mask_passes(cfg.mask, code), x, 0)), v0.eq(self.i.valid),
                a.eq(mag_in), neg1.eq(xm < 0), v1.eq(v0),
                *[r.eq(e) for reg, node in zip(g_regs, groups, strict=True)
                  for r, e in zip(reg, node, strict=True)],
                a_g.eq(a), neg_g.eq(neg1), v_g.eq(v1),
                a2.eq(a_g), nz2.eq(nz), lead2.eq(lead), lownz2.eq(several), neg2.eq(neg_g),
                five_l.eq(Const(5, 3) << lead),
                v2.eq(v_g),
                t1.eq(c1), t2.eq(c2), t3.eq(c3), t4.eq(c4), nz3.eq(nz2), neg3.eq(neg2),
                v3.eq(v2),
                self.o.payload[0].exp.eq(e0), self.o.payload[0].sign.eq(neg3 & (e0 != 0)),
                self.o.payload[1].exp.eq(e1), self.o.payload[1].sign.eq(neg3 & (e1 != 0)),
                self.o.valid.eq(v3),
            ]
        return m
