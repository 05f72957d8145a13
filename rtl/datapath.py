"""The datapath: the systolic array and its R output lanes, as one streaming block.

Operand beats go in (see :mod:`rtl.array`); each lane emits its elements in
:func:`rtl.array.lane_order`. The array moves only when every lane that has an element for
it accepts it, so a stalled output stream (or a missing mask code) freezes the array and
nothing is lost or duplicated.
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .array import SystolicArray, array_beat_layout, lane_order
from .formats import LANE_BITS, OPERAND_CFG, UINT4
from .lane import LANE_CFG, LANE_OUT, OutputLane

__all__ = ["DATAPATH_CFG", "Datapath", "lane_order"]

#: Everything a GEMM sets before its first beat.
DATAPATH_CFG = data.StructLayout({"operands": OPERAND_CFG, "lane": LANE_CFG})


class Datapath(wiring.Component):
    """R x C array plus R output lanes.

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
        Resets the absmax statistic.
    absmax : Out(unsigned(LANE_BITS))
        Max over the lanes' absmax, ``ceil(log2 rows) + 1`` cycles behind them.
    """

    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        super().__init__({
            "cfg": In(DATAPATH_CFG),
            "beat": In(stream.Signature(array_beat_layout(rows, cols))),
            "mask": In(stream.Signature(UINT4)).array(rows),
            "out": Out(stream.Signature(LANE_OUT)).array(rows),
            "clear": In(1),
            "absmax": Out(unsigned(LANE_BITS)),
        })

    def elaborate(self, platform):
        m = Module()
        R = self.rows
        m.submodules.array = array = SystolicArray(self.rows, self.cols)
        lanes = [OutputLane() for _ in range(R)]
        m.d.comb += array.cfg.eq(self.cfg.operands)
        wiring.connect(m, wiring.flipped(self.beat), array.beat)

        moves = []
        for g, lane in enumerate(lanes):
            m.submodules[f"lane{g}"] = lane
            m.d.comb += [lane.cfg.eq(self.cfg.lane), lane.clear.eq(self.clear)]
            wiring.connect(m, wiring.flipped(self.mask[g]), lane.mask)
            wiring.connect(m, lane.o, wiring.flipped(self.out[g]))
            moves.append(~array.lane_valid[g] | lane.i.ready)
            # An element is handed over only in a cycle where the whole array moves.
            m.d.comb += [lane.i.payload.eq(array.lane_data[g]),
                         lane.i.valid.eq(array.lane_valid[g] & array.en)]
        en = moves[0]
        for mv in moves[1:]:
            en = en & mv
        m.d.comb += array.en.eq(en)

        # Max over the lanes: a registered tree, one level per cycle (a statistic read after
        # the stream, so its latency of ceil(log2 R) + 1 cycles costs nothing).
        level = [lane.absmax for lane in lanes]
        depth = 0
        while len(level) > 1:
            nxt = []
            for k in range(0, len(level), 2):
                reg = Signal(unsigned(LANE_BITS), name=f"absmax_l{depth}_{k // 2}")
                pick = level[k] if k + 1 == len(level) else Mux(
                    level[k] > level[k + 1], level[k], level[k + 1])
                m.d.sync += reg.eq(pick)
                nxt.append(reg)
            level, depth = nxt, depth + 1
        m.d.sync += self.absmax.eq(level[0])
        return m
