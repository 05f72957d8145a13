"""The datapath: the systolic array and its R output lanes, as one streaming block.

Operand beats go in (see :mod:`rtl.array`); each lane emits its elements in
:func:`rtl.array.lane_order`. A stalled output stream (or a missing mask code) stops the
systolic array's input, never the array itself: a FIFO per lane (block RAM, its output
through a register) holds everything still in flight, so nothing is lost or duplicated and
no enable fans out to the array's flip-flops. A one-row array
(:class:`~rtl.array.BroadcastRow`) is small enough to stall whole, so its lane takes the sums
from it directly, without a FIFO.
"""

import operator

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .array import array_beat_layout, balanced, lane_order, make_array
from .formats import CLIP_SUM_BITS, LANE_BITS, OPERAND_CFG, PE_ACC_BITS, UINT4
from .lane import LANE_CFG, LANE_OUT, OutputLane
from .memory import ForwardRegister

__all__ = ["DATAPATH_CFG", "Datapath", "lane_order"]

#: Everything a GEMM sets before its first beat.
DATAPATH_CFG = data.StructLayout({"operands": OPERAND_CFG, "lane": LANE_CFG})


class Datapath(wiring.Component):
    """R x C array plus R output lanes.

    Parameters
    ----------
    rows, cols : int
    dsp_pes : int
        PEs that are DSP blocks (one-row arrays only, see :func:`~rtl.array.make_array`).
    primitive : bool or None
        Their SB_MAC16 (and the lanes' rescale multipliers') instantiated (True), modelled
        (False), or by the platform (None).
    clip_bits : int
        Width of the clip statistic: enough for the sum of every element of a GEMM
        (:func:`~rtl.formats.clip_sum_bits`).

    Ports
    -----
    cfg : In(DATAPATH_CFG)
        Constant during a GEMM; change it only when the datapath is empty.
    beat : In(stream.Signature(array_beat_layout(rows, cols)))
        Operand beats (one reduction step of a tile each).
    mask : In(stream.Signature(UINT4)).array(rows)
        Per lane, the activation codes of its elements (LOG4 path with a mask only).
    out : Out(stream.Signature(LANE_OUT)).array(rows)
        Per lane, the results.
    clear : In(1)
        Resets the statistics.
    absmax : Out(unsigned(LANE_BITS))
        Max over the lanes' absmax, ``ceil(log2 rows) + 1`` cycles behind them (one lane's:
        itself).
    clip_sum : Out(signed(clip_bits))
        Sum of the lanes' clip statistic, as many cycles behind them.
    """

    def __init__(self, rows, cols, dsp_pes=0, primitive=None, clip_bits=CLIP_SUM_BITS):
        self.rows, self.cols, self.dsp_pes, self.primitive = rows, cols, dsp_pes, primitive
        self.clip_bits = clip_bits
        super().__init__({
            "cfg": In(DATAPATH_CFG),
            "beat": In(stream.Signature(array_beat_layout(rows, cols))),
            "mask": In(stream.Signature(UINT4)).array(rows),
            "out": Out(stream.Signature(LANE_OUT)).array(rows),
            "clear": In(1),
            "absmax": Out(unsigned(LANE_BITS)),
            "clip_sum": Out(signed(clip_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        R = self.rows
        m.submodules.array = array = make_array(self.rows, self.cols, self.dsp_pes,
                                                   self.primitive)
        lanes = [OutputLane(self.clip_bits, self.primitive) for _ in range(R)]
        m.d.comb += array.cfg.eq(self.cfg.operands)
        wiring.connect(m, wiring.flipped(self.beat), array.beat)
        for g, lane in enumerate(lanes):
            m.submodules[f"lane{g}"] = lane
            m.d.comb += [lane.cfg.eq(self.cfg.lane), lane.clear.eq(self.clear)]
            wiring.connect(m, wiring.flipped(self.mask[g]), lane.mask)
            wiring.connect(m, lane.o, wiring.flipped(self.out[g]))
        if R == 1:      # the row stalls itself and streams its sums to the lane
            wiring.connect(m, array.o, lanes[0].i)
        else:
            self._fifos(m, array, lanes)

        # The statistics over the lanes: registered trees, one level per cycle (statistics
        # are read after the stream, so a latency of ceil(log2 R) + 1 cycles costs nothing).
        # One lane's are registers already: passed on, not registered again.
        if R == 1:
            m.d.comb += [self.absmax.eq(lanes[0].absmax), self.clip_sum.eq(lanes[0].clip_sum)]
        else:
            m.d.sync += [
                self.absmax.eq(_tree(m, [lane.absmax for lane in lanes], "absmax",
                                     lambda a, b: Mux(a > b, a, b))),
                self.clip_sum.eq(_tree(m, [lane.clip_sum for lane in lanes], "clip_sum",
                                       lambda a, b: a + b)),
            ]
        return m


    @staticmethod
    def _fifos(m, array, lanes):
        """The systolic array's elements into the lanes through FIFOs."""
        # No clock enable reaches the array: it always moves, and only its input is
        # throttled. Each lane takes the array's elements through a FIFO (block RAM) with
        # room for everything that can still arrive after the input stops
        # (SystolicArray.max_in_flight); the input enable is a register, high while every
        # FIFO has that much room. A lane that keeps up holds few elements, so a streaming
        # array never stops.
        margin = array.max_in_flight()
        depth = 1 << (2 * margin - 1).bit_length()
        en = Signal(init=1)
        fits = []
        for g, lane in enumerate(lanes):
            m.submodules[f"fifo{g}"] = fifo = SyncFIFOBuffered(width=PE_ACC_BITS, depth=depth)
            # the FIFO's block RAM output through a register before the lane: from the
            # RAM's clock-to-out (5.6 ns) through a RAW element's way to its writer's request
            # register was the 8x32 ULX3S build's critical path (42.14 MHz)
            m.submodules[f"hold{g}"] = hold = ForwardRegister(signed(PE_ACC_BITS))
            m.d.comb += [
                fifo.w_data.eq(array.lane_data[g]),
                fifo.w_en.eq(array.lane_valid[g]),
                hold.i.payload.eq(fifo.r_data),
                hold.i.valid.eq(fifo.r_rdy),
                fifo.r_en.eq(hold.i.ready),
            ]
            wiring.connect(m, hold.o, lane.i)
            fits.append(fifo.level <= depth - margin)
        m.d.sync += en.eq(balanced(operator.and_, fits))
        m.d.comb += array.en.eq(en)


def _tree(m, level, name, op):
    """Reduce ``level`` with ``op`` through a registered balanced tree; returns its root."""
    depth = 0
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level), 2):
            reg = Signal.like(level[k], name=f"{name}_l{depth}_{k // 2}")
            m.d.sync += reg.eq(level[k] if k + 1 == len(level) else op(level[k], level[k + 1]))
            nxt.append(reg)
        level, depth = nxt, depth + 1
    return level[0]

