"""The datapath: the systolic array and its R output lanes, as one streaming block.

Operand beats go in (see :mod:`rtl.array`); each lane emits its elements in
:func:`rtl.array.lane_order`. A stalled output stream (or a missing mask code) freezes the
array, and nothing is lost or duplicated; the freeze goes through a registered clock enable
and a 3-deep FIFO per lane, so no handshake reaches the array's flip-flops combinationally.
"""

from amaranth.hdl import Elaboratable, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .array import SystolicArray, array_beat_layout, lane_order
from .formats import LANE_BITS, OPERAND_CFG, PE_ACC_BITS, UINT4
from .lane import LANE_CFG, LANE_OUT, OutputLane

__all__ = ["DATAPATH_CFG", "Datapath", "lane_order"]

#: Depth of the FIFO between the array and each lane (see Datapath.elaborate).
SKID_DEPTH = 3

#: Everything a GEMM sets before its first beat.
DATAPATH_CFG = data.StructLayout({"operands": OPERAND_CFG, "lane": LANE_CFG})


class SkidFIFO(Elaboratable):
    """A small FIFO in registers: a ring with read and write pointers, so a pop or a push
    only moves a 2-bit pointer (no wide shift on the handshake path).

    (Written out rather than ``lib.fifo.SyncFIFO`` because YoWASP's yosys 0.70 asserts while
    mapping its distributed RAM on ECP5.)
    """

    def __init__(self, width, depth):
        self.width, self.depth = width, depth
        self.w_data = Signal(width)
        self.w_en = Signal()
        self.r_data = Signal(width)
        self.r_rdy = Signal()
        self.r_en = Signal()
        self.level = Signal(range(depth + 1))

    def elaborate(self, platform):
        m = Module()
        regs = [Signal(self.width, name=f"entry{k}") for k in range(self.depth)]
        rptr = Signal(range(self.depth))
        wptr = Signal(range(self.depth))
        pop = Signal()
        m.d.comb += [pop.eq(self.r_en & (self.level != 0)), self.r_rdy.eq(self.level != 0)]
        with m.Switch(rptr):
            for k in range(self.depth):
                with m.Case(k) if k + 1 < self.depth else m.Default():
                    m.d.comb += self.r_data.eq(regs[k])
        for k in range(self.depth):
            with m.If(self.w_en & (wptr == k)):
                m.d.sync += regs[k].eq(self.w_data)
        with m.If(self.w_en):
            m.d.sync += wptr.eq(Mux(wptr == self.depth - 1, 0, wptr + 1))
        with m.If(pop):
            m.d.sync += rptr.eq(Mux(rptr == self.depth - 1, 0, rptr + 1))
        m.d.sync += self.level.eq(self.level + self.w_en - pop)
        return m


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

        # The array's clock enable is a register, so no output stream or mask handshake
        # reaches the thousands of flip-flops it drives in the same cycle: each lane takes
        # the array's elements through a 3-deep FIFO, and the array moves in the next cycle
        # only if every FIFO holds at most one element now. At most two more elements can
        # arrive before the enable drops, so a FIFO never overflows, and a lane that keeps
        # up holds at most one element, so a streaming array never stops.
        en = Signal(init=1)
        fits = []
        for g, lane in enumerate(lanes):
            m.submodules[f"lane{g}"] = lane
            m.submodules[f"skid{g}"] = skid = SkidFIFO(PE_ACC_BITS, SKID_DEPTH)
            m.d.comb += [lane.cfg.eq(self.cfg.lane), lane.clear.eq(self.clear)]
            wiring.connect(m, wiring.flipped(self.mask[g]), lane.mask)
            wiring.connect(m, lane.o, wiring.flipped(self.out[g]))
            m.d.comb += [
                skid.w_data.eq(array.lane_data[g]),
                skid.w_en.eq(array.lane_valid[g] & en),
                lane.i.payload.eq(skid.r_data),
                lane.i.valid.eq(skid.r_rdy),
                skid.r_en.eq(lane.i.ready),
            ]
            fits.append(skid.level <= 1)
        m.d.sync += en.eq(_and_tree(fits))
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


def _and_tree(values):
    values = list(values)
    while len(values) > 1:
        values = [values[k] & values[k + 1] if k + 1 < len(values) else values[k]
                  for k in range(0, len(values), 2)]
    return values[0]
