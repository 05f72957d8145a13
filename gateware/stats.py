"""The statistics a STATS reports on a device with programs: each command's, or a RUN's.

A RUN (:mod:`nibble.gateware.decoder`) carries out a stored program of GEMM, VECTOR and DMA
entries and answers with one STATS: the host needs the statistics of the whole command the
program pages through the scratchpad (a GEMM's absmax and PACT clip sum, an UPDATE's SAWB
sums), not of its last part. :class:`CommandStats` keeps them: when a unit ends (its
``busy`` falls) its statistics are taken into registers, and while a program runs they
combine with the ones its earlier entries left there, as the host combined the parts'
STATS before (absmax: the larger; sums and cycle counts: the total, wrapping at the
registers' widths). Outside a program each command's replace the last's, so a STATS after
a GEMM reports that GEMM's, as without this block.

A unit's statistics are taken ``SETTLE`` cycles after its ``busy`` falls: the datapath's
absmax tree runs a few cycles behind the lanes' last writes, and the next GEMM or VECTOR
starts at least a whole PARSE (over 30 cycles) later. ``settled`` tells the decoder when
nothing is pending, so a RUN's STATS never goes out before its last entry's statistics.
An UPDATE's SAWB sums are taken only from UPDATEs (the unit restarts them only for an
UPDATE). Cost on the ULX3S: the registers (330 bits) and their adders, only on a device
with SDRAM (the only one with RUN).
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.formats import CLIP_SUM_BITS, LANE_BITS, SAWB_SQ_BITS, SAWB_SUM_BITS

__all__ = ["SETTLE", "CommandStats"]

#: Cycles from a unit's end to its statistics' capture.
SETTLE = 8


class CommandStats(wiring.Component):
    """Ports
    -----
    gemm_busy, absmax, clip_sum, gemm_cycles, beats : In
        The engine: running, and its statistics (final once it has ended).
    vec_busy, update, vec_cycles, w_sum_abs, w_sum_sq : In
        The element-wise unit: running, whether its operation is an UPDATE, its statistics.
    program, begin : In(1)
        A RUN's program runs; it begins (what it combines starts over).
    o_absmax, o_clip_sum, o_gemm_cycles, o_beats, o_vec_cycles, o_w_sum_abs, o_w_sum_sq : Out
        What STATS reports.
    settled : Out(1)
        No unit's end is waiting to be taken in.
    """

    def __init__(self):
        fields = {"absmax": LANE_BITS, "clip_sum": signed(CLIP_SUM_BITS), "gemm_cycles": 32,
                  "beats": 32, "vec_cycles": 32, "w_sum_abs": SAWB_SUM_BITS,
                  "w_sum_sq": SAWB_SQ_BITS}
        super().__init__({
            "gemm_busy": In(1), "vec_busy": In(1), "update": In(1),
            "program": In(1), "begin": In(1), "settled": Out(1),
            **{name: In(shape) for name, shape in fields.items()},
            **{f"o_{name}": Out(shape) for name, shape in fields.items()},
        })

    def elaborate(self, platform):
        m = Module()
        was_g, was_v = Signal(), Signal()
        ended_g, ended_v = Signal(SETTLE), Signal(SETTLE)    # a unit ended k + 1 cycles ago
        seen_g, seen_v, seen_u = Signal(), Signal(), Signal()  # ... in this program
        update = Signal()                                      # the VECTOR was an UPDATE
        m.d.sync += [was_g.eq(self.gemm_busy), was_v.eq(self.vec_busy),
                     ended_g.eq(Cat(was_g & ~self.gemm_busy, ended_g[:-1])),
                     ended_v.eq(Cat(was_v & ~self.vec_busy, ended_v[:-1]))]
        with m.If(was_v & ~self.vec_busy):
            m.d.sync += update.eq(self.update)
        m.d.comb += self.settled.eq(~was_g & ~was_v & ~ended_g.any() & ~ended_v.any())

        def take(seen, pairs, combine=None):
            more = self.program & seen
            for out, new in pairs:
                total = (combine or (lambda a, b: a + b))(out, new)
                m.d.sync += out.eq(Mux(more, total, new))
            m.d.sync += seen.eq(1)

        with m.If(ended_g[-1]):
            take(seen_g, [(self.o_clip_sum, self.clip_sum), (self.o_gemm_cycles, self.gemm_cycles),
                          (self.o_beats, self.beats)])
            take(seen_g, [(self.o_absmax, self.absmax)], lambda a, b: Mux(a > b, a, b))
        with m.If(ended_v[-1]):
            take(seen_v, [(self.o_vec_cycles, self.vec_cycles)])
            with m.If(update):
                take(seen_u, [(self.o_w_sum_abs, self.w_sum_abs),
                              (self.o_w_sum_sq, self.w_sum_sq)])
        with m.If(self.begin):
            m.d.sync += [seen_g.eq(0), seen_v.eq(0), seen_u.eq(0)]
        return m
