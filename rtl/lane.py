"""An output lane: the array's finished sums leave through RAW, RESCALE or LOG4.

The lane first undoes the factored-out TPR phase (``value = acc << phase``, LANE_BITS wide,
equal to the widest GEMM accumulator), then feeds the path the GEMM selected. Each path is a
pipeline that takes one element per cycle; the path is constant during a GEMM, so the lane
never reorders elements.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .formats import (
    CLIP_SUM_BITS,
    LANE_BITS,
    MASK_CLIPPED,
    PE_ACC_BITS,
    RESCALE_IN_BITS,
    UINT4,
    MaskMode,
    OutputPath,
)
from .log4 import LOG4_CFG, LOG4_OUT, Log4Quantizer, mask_passes
from .rescale import RESCALE_CFG, Rescale

__all__ = ["LANE_CFG", "LANE_OUT", "OutputLane"]

#: Settings of an output lane, constant during a GEMM.
LANE_CFG = data.StructLayout({
    "path": OutputPath,
    "phase": unsigned(1),     # TPR phase of the FP4 operand (0 for forward GEMMs)
    "rescale": RESCALE_CFG,
    "log4": LOG4_CFG,
})
#: One output element; which field is meaningful depends on the path.
LANE_OUT = data.UnionLayout({
    "raw": signed(LANE_BITS),     # RAW: the exact accumulator
    "code": unsigned(4),          # RESCALE: INT4 or UINT4 code
    "fp4": LOG4_OUT,              # LOG4: [phase-0 code, phase-1 code]
})


class OutputLane(wiring.Component):
    """One output lane.

    Ports
    -----
    cfg : In(LANE_CFG)
    i : In(stream.Signature(signed(PE_ACC_BITS)))
        PE accumulators (phase factored out).
    mask : In(stream.Signature(UINT4))
        Activation codes, one per element, consumed only on the LOG4 path with a mask.
    o : Out(stream.Signature(LANE_OUT))
    clear : In(1)
        Resets ``absmax`` and ``clip_sum``.
    absmax : Out(unsigned(LANE_BITS))
        RAW: ``max |value|``; RESCALE: ``max |acc|`` after ReLU; LOG4: ``max`` masked
        ``|value|``; over the elements since ``clear``.
    clip_sum : Out(signed(clip_bits))
        LOG4 with a mask: the sum of the values whose activation code is the top code
        (``UINT4_MAX``, clipped at PACT's alpha), since ``clear``: what the gradient of
        alpha needs (``docs/numerics.md`` §2). 0 on the other paths. ``clip_bits``
        (``CLIP_SUM_BITS`` unless given) must hold the sum of every element the lane sees
        until ``clear``: the engine derives it from its memory's size.
    """

    def __init__(self, clip_bits=CLIP_SUM_BITS, primitive=None):
        self.primitive = primitive          # the rescale's DSP blocks (rtl.rescale)
        super().__init__({
            "cfg": In(LANE_CFG),
            "i": In(stream.Signature(signed(PE_ACC_BITS))),
            "mask": In(stream.Signature(UINT4)),
            "o": Out(stream.Signature(LANE_OUT)),
            "clear": In(1),
            "absmax": Out(unsigned(LANE_BITS)),
            "clip_sum": Out(signed(clip_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        m.submodules.rescale = rescale = Rescale(primitive=self.primitive)
        m.submodules.log4 = log4 = Log4Quantizer()
        m.d.comb += [rescale.cfg.eq(cfg.rescale), log4.cfg.eq(cfg.log4)]
        value = Signal(signed(LANE_BITS))
        m.d.comb += value.eq(self.i.payload << cfg.phase)
        # The path decodes depend only on the settings: registered, off the handshake path
        # (the settings are stable from a cycle before the first element).
        is_rescale, is_log4, need_mask = (Signal(name=n) for n in (
            "is_rescale", "is_log4", "need_mask"))
        m.d.sync += [
            is_rescale.eq(cfg.path == OutputPath.RESCALE),
            is_log4.eq(cfg.path == OutputPath.LOG4),
            need_mask.eq((cfg.path == OutputPath.LOG4) & (cfg.log4.mask != MaskMode.NONE)),
        ]

        # RAW: the value as it comes (the FIFO or the row in front of the lane has
        # registered it; a second register would be a copy).

        # The statistic, on what the path sees: the value after ReLU (RESCALE) or after the
        # mask (LOG4). One magnitude and one compare per lane, whatever the path.
        drop = Mux(is_rescale, cfg.rescale.relu & (value < 0),
                   is_log4 & ~mask_passes(cfg.log4.mask, self.mask.payload))
        seen = Signal(signed(LANE_BITS))
        seen_valid = Signal()
        m.d.sync += [seen.eq(Mux(drop, 0, value)), seen_valid.eq(self.i.valid & self.i.ready)]
        mag = Signal(unsigned(LANE_BITS))           # |seen|, registered: two carry chains
        mag_valid = Signal()                         # in one cycle would limit the clock
        m.d.sync += [mag.eq(Mux(seen < 0, -seen, seen)), mag_valid.eq(seen_valid)]
        with m.If(self.clear):
            m.d.sync += self.absmax.eq(0)
        with m.Elif(mag_valid & (mag > self.absmax)):
            m.d.sync += self.absmax.eq(mag)
        # The clip statistic, one registered add per element.
        clipped = Signal(signed(LANE_BITS))
        top = need_mask & (self.mask.payload == MASK_CLIPPED)
        m.d.sync += clipped.eq(Mux(top, value, 0))
        with m.If(self.clear):
            m.d.sync += self.clip_sum.eq(0)
        with m.Elif(seen_valid):
            m.d.sync += self.clip_sum.eq(self.clip_sum + clipped)

        m.d.comb += [
            rescale.i.payload.eq(value[:RESCALE_IN_BITS]),
            rescale.i.valid.eq(self.i.valid & is_rescale),
            log4.i.payload.value.eq(value),
            log4.i.payload.code.eq(self.mask.payload),
            log4.i.valid.eq(self.i.valid & is_log4 & (self.mask.valid | ~need_mask)),
            self.mask.ready.eq(need_mask & self.i.valid & log4.i.ready),
            rescale.o.ready.eq(self.o.ready & is_rescale),
            log4.o.ready.eq(self.o.ready & is_log4),
        ]
        with m.If(is_rescale):
            m.d.comb += [
                self.i.ready.eq(rescale.i.ready),
                self.o.valid.eq(rescale.o.valid),
                self.o.payload.code.eq(rescale.o.payload),
            ]
        with m.Elif(is_log4):
            m.d.comb += [
                self.i.ready.eq(log4.i.ready & (self.mask.valid | ~need_mask)),
                self.o.valid.eq(log4.o.valid),
                self.o.payload.fp4.eq(log4.o.payload),
            ]
        with m.Else():
            m.d.comb += [
                self.i.ready.eq(self.o.ready),
                self.o.valid.eq(self.i.valid),
                self.o.payload.raw.eq(value),
            ]
        return m
