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

The compare needs no adder: with ``a = 2^L + r``, ``4a > 5 * 2^L`` is ``r > 2^(L-2)``, that
is bit ``L-1`` of ``a``, or bit ``L-2`` and any bit below it. The leading-one tree finds
those bits beside ``L`` (each node keeps the two bits under its leading one and whether any
lies lower, and its own top two bits for the node above), so ``a`` is not carried along
the pipeline to a 32-bit compare with a decoded ``5 * 2^L``.
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

__all__ = ["LOG4_CFG", "LOG4_IN", "LOG4_OUT", "SUMMARY", "Log4Quantizer", "leading_one",
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


#: A leading-one summary of a node of ``2^k`` bits: whether any is set, the index of the
#: highest (``ix``), the two bits under it and whether any bit lies lower (``d1``, ``d2``,
#: ``rest``; 0 where the node ends first), and the node's own top two bits and whether any
#: lies lower (``t1``, ``t2``, ``trest``: what a node above needs from it as its lower half).
SUMMARY = ("nz", "ix", "d1", "d2", "rest", "t1", "t2", "trest")


def _merge(lo, hi):
    """The summary of two halves: ``lo`` the lower bits, ``hi`` the upper."""
    lo, hi = dict(zip(SUMMARY, lo, strict=True)), dict(zip(SUMMARY, hi, strict=True))
    at0, at1 = hi["ix"] == 0, hi["ix"] == 1       # hi's leading one at its bottom bits
    d1 = Mux(at0, lo["t1"], hi["d1"])
    d2 = Mux(at0, lo["t2"], Mux(at1, lo["t1"], hi["d2"]))
    rest = Mux(at0, lo["trest"], Mux(at1, lo["t2"] | lo["trest"], hi["rest"] | lo["nz"]))
    return (lo["nz"] | hi["nz"], Cat(Mux(hi["nz"], hi["ix"], lo["ix"]), hi["nz"]),
            Mux(hi["nz"], d1, lo["d1"]), Mux(hi["nz"], d2, lo["d2"]),
            Mux(hi["nz"], rest, lo["rest"]), hi["t1"], hi["t2"], hi["trest"] | lo["nz"])


def _tree(nodes):
    while len(nodes) > 1:
        nodes = [_merge(nodes[k], nodes[k + 1]) for k in range(0, len(nodes), 2)]
    return nodes[0]


def leading_one_groups(value, group=8):
    """Leading-one summaries (:data:`SUMMARY`) of each ``group`` bits of ``value``
    (zero-padded to a power-of-two number of groups): balanced trees of 2:1 choices, so the
    depth is log2(group)."""
    n = 1 << max((len(value) + group - 1) // group - 1, 1).bit_length()
    bits = [value[k] if k < len(value) else Const(0, 1) for k in range(n * group)]
    out = []
    for g in range(n):
        pairs = [(lo | hi, hi, hi & lo, Const(0, 1), Const(0, 1), hi, lo, Const(0, 1))
                 for lo, hi in zip(bits[g * group:(g + 1) * group:2],
                                   bits[g * group + 1:(g + 1) * group:2], strict=True)]
        out.append(_tree(pairs))
    return out


def leading_one(nodes):
    """Combine group summaries into the whole value's (:data:`SUMMARY`)."""
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
        g_regs = [tuple(Signal(len(v), name=f"g{k}_{f}") for f, v in zip(SUMMARY, node,
                                                                            strict=True))
                  for k, node in enumerate(groups)]
        neg_g, v_g = Signal(name="neg_g"), Signal(name="v_g")
        nz, lead, d1, d2, rest, *_ = leading_one(g_regs)
        nz2, lead2, lownz2, above2, neg2, v2 = (
            Signal(name="nz2"), Signal(len(lead), name="lead2"), Signal(name="lownz2"),
            Signal(name="above2"), Signal(name="neg2"), Signal(name="v2"))
        # Stage 5: the four terms of the count from u = L - exp + 12 (exp - 12 depends only
        # on the settings: decoded into a register); 4a > 5 * 2^L is ``above2``.
        base = Signal(signed(LOG4_EXP_BITS + 1))
        m.d.sync += base.eq(cfg.exp - FP4_TOP_LOG2)
        u = Signal(signed(LOG4_EXP_BITS + 3))
        m.d.comb += u.eq(lead2 - base)
        top = 2 * (FP4_EXP_MAX - 1)                       # 12 thresholds of the 5*2^m kind
        c1 = (u >= 0) | ((u == -1) & lownz2)
        c2 = (u >= 1) | ((u == 0) & lownz2)
        c3 = Mux(u < 1, 0, Mux(u > top + 1, top, u - 1))
        c4 = (u >= 1) & (u <= top) & above2
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
                neg_g.eq(neg1), v_g.eq(v1),
                nz2.eq(nz), lead2.eq(lead), lownz2.eq(d1 | d2 | rest),
                above2.eq(d1 | (d2 & rest)), neg2.eq(neg_g), v2.eq(v_g),
                t1.eq(c1), t2.eq(c2), t3.eq(c3), t4.eq(c4), nz3.eq(nz2), neg3.eq(neg2),
                v3.eq(v2),
                self.o.payload[0].exp.eq(e0), self.o.payload[0].sign.eq(neg3 & (e0 != 0)),
                self.o.payload[1].exp.eq(e1), self.o.payload[1].sign.eq(neg3 & (e1 != 0)),
                self.o.valid.eq(v3),
            ]
        return m
