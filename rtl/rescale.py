"""The range-rescale unit: ``q = clamp(((acc * M) + 2^(s-1)) >> s, lo, hi)``, one per cycle.

Bit-exact with :func:`nibble.host.golden.numerics.rescale` (``docs/numerics.md`` §4): optional
ReLU first, an arithmetic (flooring) shift so the rounding is round half up, no rounding term for
``s = 0``, then saturation to INT4 (-8..7) or UINT4 (0..15). A PACT clip is the UINT4
saturation with alpha folded into M and s. (The output lane keeps the tensor's absmax.)
"""

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .dsp import Mul16, is_ice40
from .formats import (
    CODE_BITS,
    INT4_MAX,
    INT4_MIN,
    RESCALE_IN_BITS,
    RESCALE_M_BITS,
    RESCALE_SHIFT_MAX,
    UINT4_MAX,
    UINT4_MIN,
)

__all__ = ["RESCALE_CFG", "Rescale"]

#: Settings of the rescale unit, constant while a tensor streams through.
RESCALE_CFG = data.StructLayout({
    "m": unsigned(RESCALE_M_BITS),
    "s": range(RESCALE_SHIFT_MAX + 1),
    "relu": unsigned(1),
    "out_signed": unsigned(1),      # saturate to INT4 (else UINT4)
})


class Rescale(wiring.Component):
    """Range-rescale stream: signed accumulators in, 4-bit codes out, 6-cycle latency.

    Ports
    -----
    cfg : In(RESCALE_CFG)
        M (unsigned, 16 bits), s (0..63), ReLU, output kind.
    i : In(stream.Signature(signed(RESCALE_IN_BITS)))
        Accumulators. ``ready`` is ``~o.valid | o.ready`` (the pipeline moves as one).
    o : Out(stream.Signature(unsigned(4)))
        Codes: two's complement INT4 or UINT4.

    ``primitive``: the two partial products on SB_MAC16 blocks (:class:`~rtl.dsp.Mul16`)
    with the stage-1 and stage-2 registers inside them (True), in Amaranth arithmetic
    (False), or by the platform (None: the blocks on an iCE40).
    """

    LATENCY = 6

    def __init__(self, in_bits=RESCALE_IN_BITS, primitive=None):
        self.in_bits, self.primitive = in_bits, primitive
        super().__init__({
            "cfg": In(RESCALE_CFG),
            "i": In(stream.Signature(signed(in_bits))),
            "o": Out(stream.Signature(unsigned(CODE_BITS))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        prod_bits = self.in_bits + RESCALE_M_BITS + 1       # signed acc * unsigned M
        cap = self.in_bits + RESCALE_M_BITS                  # results are 0 from here on

        advance = Signal()
        m.d.comb += [advance.eq(~self.o.valid | self.o.ready), self.i.ready.eq(advance)]

        # Stage 1: ReLU.
        v = Signal(signed(self.in_bits))
        v_ok = Signal()
        x = self.i.payload
        relu_x = Mux(cfg.relu & (x < 0), 0, x)
        # Stages 2-3: the product. Stages 4-5: an arithmetic shift by s - 1, in two halves
        # (multiples of 8, then 0..7). Stage 6: round and saturate.
        # For s >= 1, floor((P + 2^(s-1)) / 2^s) == floor((floor(P / 2^(s-1)) + 1) / 2), so
        # the rounding term is a +1 after the shift, not a wide add before it.
        # The shift amount depends only on the settings, so it is decoded into registers
        # (the settings are stable from a cycle before the first element).
        prod = Signal(signed(prod_bits))
        shift = Signal(range(cap))
        s_zero = Signal()
        m.d.sync += [
            shift.eq(Mux(cfg.s == 0, 0, Mux(cfg.s > cap, cap, cfg.s) - 1)),
            s_zero.eq(cfg.s == 0),
        ]
        coarse = Signal(signed(prod_bits))        # floor(P / 2^(8 * (shift // 8)))
        half = Signal(signed(prod_bits))          # floor(P / 2^(s-1)), or P for s = 0
        # Saturation needs no wide compare: outside a 6-bit window every result saturates
        # (|half| >= 32 rounds to |q| >= 16), inside it the arithmetic is 6 bits wide.
        win = 6
        head = half[win - 1:]
        inside = head.all() | ~head.any()
        small = half[:win].as_signed()
        q = Signal(signed(win + 1))
        m.d.comb += q.eq(Mux(s_zero, small, (small + 1) >> 1))
        valid = [Signal(name=f"valid{k}") for k in range(4)]
        lo = Mux(cfg.out_signed, INT4_MIN, UINT4_MIN)
        hi = Mux(cfg.out_signed, INT4_MAX, UINT4_MAX)
        # The product in two stages: two DSP-sized partial products (16-bit low part of the
        # accumulator times M, and its signed high part times M), then their sum.
        lo_bits = RESCALE_M_BITS
        p_lo = Signal(unsigned(lo_bits + RESCALE_M_BITS))
        p_hi = Signal(signed(max(self.in_bits - lo_bits, 1) + RESCALE_M_BITS + 1))
        v_hi = v[lo_bits:].as_signed() if self.in_bits > lo_bits else Const(0, signed(1))
        v_ok2 = Signal()
        prim = is_ice40(platform) if self.primitive is None else self.primitive
        if prim:        # the UP5K: stages 1 and 2 are the DSP blocks' own registers
            assert self.in_bits <= 2 * lo_bits
            m.submodules.mul_lo = mul_lo = Mul16(a_signed=False, b_signed=False,
                                                 primitive=True)
            m.submodules.mul_hi = mul_hi = Mul16(a_signed=False, b_signed=True,
                                                 primitive=True)
            for mul, b in ((mul_lo, relu_x[:lo_bits]), (mul_hi, relu_x[lo_bits:].as_signed())):
                m.d.comb += [mul.a.eq(cfg.m), mul.b.eq(b), mul.en.eq(advance)]
            m.d.comb += [p_lo.eq(mul_lo.o), p_hi.eq(mul_hi.o.as_signed())]
        with m.If(advance):
            m.d.sync += [
                *([v_ok.eq(self.i.valid), v_ok2.eq(v_ok)] if prim else
                  [v.eq(relu_x), v_ok.eq(self.i.valid),
                   p_lo.eq(v[:lo_bits] * cfg.m), p_hi.eq(v_hi * cfg.m), v_ok2.eq(v_ok)]),
                prod.eq((p_hi << lo_bits) + p_lo), valid[0].eq(v_ok2),
                coarse.eq(prod >> (shift[3:] << 3)), valid[1].eq(valid[0]),
                half.eq(coarse >> shift[:3]), valid[2].eq(valid[1]),
                self.o.payload.eq(Mux(inside, Mux(q < lo, lo, Mux(q > hi, hi, q)),
                                      Mux(half < 0, lo, hi))[:CODE_BITS]),
                valid[3].eq(valid[2]),
            ]
        m.d.comb += self.o.valid.eq(valid[3])
        return m
