"""The GEMM engine: the datapath fed from tensor memory, its results written back.

Layouts
    Every operand is stored *k-major*: row ``k`` of a buffer holds the codes of reduction
    step ``k``, rows ``stride`` words apart. So A (M x L) is stored as A^T (L rows of M
    codes) and B (L x N) as itself (L rows of N codes). Results are stored the way the lanes
    produce them, as out^T (N rows of M elements): that is the k-major layout of the next
    layer's A operand, so a forward output feeds the next forward GEMM as it is. Element
    sizes (``rtl.formats.element_nibbles``): RESCALE 1 nibble; LOG4 2 nibbles (phase-0 code
    low, phase-1 code high; an A operand stored that way is read with ``a_pair`` and
    ``a_sel``); RAW 8 nibbles (the 30-bit accumulator sign-extended to 32 bits).

Components, joined by streams (``docs/architecture.md`` has the diagram)::

    BoundsCheck (the four buffers, before anything runs)
    OperandWalker --beat requests--> OperandFetch --beats--> Datapath --R lanes-->
        rd0 (A), rd1 (B)                              ^ masks      |
    MaskReader x R --requests--> StreamArbiter --> Reader (rd2) ---+      |
    LaneWriter x R --write requests--> StreamArbiter --> Writer (wr) <----+

Operands stream from memory at one beat per cycle, back to back across tiles (the array
restarts its accumulators on ``last``), so there is nothing to double-buffer: the only idle
array cycles are a GEMM's fill and drain (about 20 cycles) and tiles shorter than C beats.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .bounds import DIM_BITS, BoundsCheck
from .datapath import Datapath
from .formats import (
    CLIP_SUM_BITS,
    LANE_BITS,
    MAX_REDUCTION,
    OPERAND_CFG,
    RAW_NIBBLES,
    MaskMode,
    OutputPath,
    clip_sum_bits,
    word_nibbles,
)
from .lane import LANE_CFG
from .memory import (
    ADDR_BITS,
    STRIDE_BITS,
    ForwardRegister,
    Reader,
    RegisterSlice,
    StreamArbiter,
    TensorBus,
    Writer,
    write_request,
)
from .operands import OperandFetch, OperandWalker
from .writeback import LaneWriter, MaskReader

__all__ = ["GEMM_CFG", "GemmEngine"]

#: Everything one GEMM needs; the GEMM command's payload is exactly this layout.
GEMM_CFG = data.StructLayout({
    "a_addr": ADDR_BITS, "a_stride": STRIDE_BITS,
    "b_addr": ADDR_BITS, "b_stride": STRIDE_BITS,
    "out_addr": ADDR_BITS, "out_stride": STRIDE_BITS,
    "mask_addr": ADDR_BITS, "mask_stride": STRIDE_BITS,
    "m": DIM_BITS, "l": DIM_BITS, "n": DIM_BITS,
    "a_pair": 1,        # A codes are stored as LOG4 pairs (2 nibbles per element)
    "a_sel": 1,         # ... and this nibble of each pair is the operand
    "operands": OPERAND_CFG,
    "lane": LANE_CFG,
})


class _Wire(wiring.Component):
    """A stream passed through unchanged (where a register stage is not wanted)."""

    def __init__(self, payload_shape):
        super().__init__({"i": In(stream.Signature(payload_shape)),
                          "o": Out(stream.Signature(payload_shape))})

    def elaborate(self, platform):
        m = Module()
        wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
        return m


def _pow2(x):
    return x >= 1 and x & (x - 1) == 0


class GemmEngine(wiring.Component):
    """Runs one GEMM at a time from tensor memory into tensor memory.

    ``held_reads``: its A and B words wait in their readers for each other and for the
    array, so the memory's arbiter holds them; its mask words are taken as they arrive.

    Ports
    -----
    cfg : In(GEMM_CFG)
        Read from ``start`` until ``busy`` falls: hold it constant meanwhile (the command
        decoder does; a second copy would cost 250 flip-flops).
    start : In(1)
        Pulse while ``busy`` is low: check ``cfg``, then run it if it is in range.
    checked : Out(1)
        One-cycle pulse once the check is done; ``ok`` tells the verdict.
    ok : Out(1)
    busy : Out(1)
        From ``start`` until the last result is written.
    cycles, beats : Out(32)
        Of the last GEMM: cycles from its launch to the last write, beats into the array.
    absmax : Out(LANE_BITS)
        The datapath's output statistic (cleared on launch).
    clip_sum : Out(signed(CLIP_SUM_BITS))
        The PACT clip statistic of the last GEMM (see ``rtl.lane``).
    bus : Out(TensorBus.Signature)
        Tensor memory: ``rd0`` A, ``rd1`` B, ``rd2`` mask codes, ``wr`` results.
    """

    def __init__(self, rows, cols, mem_words, dsp_pes=0):
        for x in (rows, cols, mem_words):
            if not _pow2(x):
                raise ValueError(f"rows, cols and mem_words must be powers of two, got {x}")
        self.rows, self.cols, self.mem_words, self.dsp_pes = rows, cols, mem_words, dsp_pes
        self.nib = nibbles = word_nibbles(rows, cols)
        self.aw = (mem_words - 1).bit_length()
        self.held_reads = ("rd0", "rd1")
        super().__init__({
            "cfg": In(GEMM_CFG), "start": In(1), "checked": Out(1), "ok": Out(1),
            "busy": Out(1), "cycles": Out(32), "beats": Out(32), "absmax": Out(LANE_BITS),
            "clip_sum": Out(signed(CLIP_SUM_BITS)),
            "bus": Out(TensorBus.Signature(addr_width=self.aw, nibbles=nibbles)),
        })

    def _buffers(self, m, check, n_pad, m_pad, mask_on):
        """The check's view of the four buffers: A^T, B, out^T and the mask codes."""
        cfg = self.cfg
        path = cfg.lane.path
        out_nibbles = Mux(path == OutputPath.RAW, cfg.m << (RAW_NIBBLES.bit_length() - 1),
                          Mux(path == OutputPath.LOG4, cfg.m << 1, cfg.m))
        bufs = [  # addr, stride, rows, nibbles per row, written, used
            (cfg.a_addr, cfg.a_stride, cfg.l, m_pad << cfg.a_pair, 0, 1),
            (cfg.b_addr, cfg.b_stride, cfg.l, n_pad, 0, 1),
            (cfg.out_addr, cfg.out_stride, cfg.n, out_nibbles, 1, 1),
            (cfg.mask_addr, cfg.mask_stride, cfg.n, m_pad, 0, mask_on),
        ]
        check.drive(m, bufs)

    def elaborate(self, platform):
        m = Module()
        R, C, NIB, aw, cfg = self.rows, self.cols, self.nib, self.aw, self.cfg
        path = cfg.lane.path
        n_pad, m_pad = Signal(DIM_BITS + 1), Signal(DIM_BITS + 1)
        mask_on = Signal()
        m.d.comb += [n_pad.eq((cfg.n + C - 1) & ~(C - 1)), m_pad.eq((cfg.m + R - 1) & ~(R - 1)),
                     mask_on.eq((path == OutputPath.LOG4) & (cfg.lane.log4.mask != MaskMode.NONE))]

        # -- the check, then the launch ------------------------------------------------------
        m.submodules.check = check = BoundsCheck(4, self.mem_words, per_word=self.nib)
        self._buffers(m, check, n_pad, m_pad, mask_on)
        go = Signal()
        # RESCALE takes forward accumulators (RESCALE_IN_BITS): not an FP4 GEMM's
        dims_ok = ((cfg.m != 0) & (cfg.n != 0) & (cfg.l != 0) & (cfg.l <= MAX_REDUCTION)
                   & (Value.cast(path) <= OutputPath.LOG4)
                   & (Value.cast(cfg.lane.log4.mask) <= MaskMode.PACT)
                   & ~((path == OutputPath.RESCALE) & cfg.operands.a_fp4))
        launch = Signal()
        m.d.sync += go.eq(self.start & ~self.busy)
        m.d.comb += [check.start.eq(go), self.checked.eq(check.done),
                     self.ok.eq(check.ok & dims_ok), launch.eq(self.checked & self.ok)]
        with m.If(self.start & ~self.busy):
            m.d.sync += self.busy.eq(1)
        with m.If(self.checked & ~self.ok):
            m.d.sync += self.busy.eq(0)

        # -- operands into the datapath ------------------------------------------------------
        m.submodules.walker = walker = OperandWalker(R, C, aw, NIB, GEMM_CFG)
        m.submodules.fetch = fetch = OperandFetch(R, C, aw, NIB)
        # The clip statistic sums the elements of one GEMM's output buffer, which the check
        # keeps inside the memory: at most mem_words * NIB / 2 (LOG4's two nibbles each).
        m.submodules.dp = dp = Datapath(R, C, self.dsp_pes,
                                        clip_bits=clip_sum_bits(self.mem_words * NIB // 2))
        m.d.comb += [walker.cfg.eq(cfg), walker.launch.eq(launch), fetch.a_pair.eq(cfg.a_pair),
                     fetch.a_sel.eq(cfg.a_sel), dp.cfg.operands.eq(cfg.operands),
                     dp.cfg.lane.eq(cfg.lane), dp.clear.eq(launch), self.absmax.eq(dp.absmax),
                     self.clip_sum.eq(dp.clip_sum)]
        wiring.connect(m, walker.o, fetch.i)
        wiring.connect(m, fetch.beat, dp.beat)
        wiring.connect(m, fetch.rd_a, wiring.flipped(self.bus.rd0))
        wiring.connect(m, fetch.rd_b, wiring.flipped(self.bus.rd1))

        # -- results out, mask codes in: per lane, sharing a port each -----------------------
        # With several lanes both arbiters' outputs pass a register before the memory: R
        # lanes' priority logic and an address adder in front of the tensor-memory arbiter
        # were the ULX3S's critical paths (into the far block RAMs' addresses, and on
        # through the arbiter's grants into the other units). The writes take a whole slice
        # (their grant waits on the DMA's writes); the mask reads only a forward register
        # (the engine is first on their port; a slice there, too, made yosys 0.70's abc9
        # fail an assertion on the ULX3S build). One lane has no arbitration to cut, and
        # the registers would cost a UP5K 278 of its 5,280 LCs.
        m.submodules.write_arbiter = warb = StreamArbiter(write_request(aw, NIB), R)
        m.submodules.write_slice = wslice = (RegisterSlice if R > 1 else _Wire)(
            write_request(aw, NIB))
        m.submodules.writer = writer = Writer(aw, NIB)
        m.submodules.mask_arbiter = marb = StreamArbiter(aw, R)
        m.submodules.mask_read = mread = Reader(aw, NIB, range(max(R, 2)))
        m.submodules.mask_slice = mslice = (ForwardRegister if R > 1 else _Wire)(mread.request)
        m.d.comb += [
            wslice.i.valid.eq(warb.o.valid), wslice.i.payload.eq(warb.o.payload.payload),
            warb.o.ready.eq(wslice.i.ready),
            mslice.i.valid.eq(marb.o.valid), mslice.i.payload.addr.eq(marb.o.payload.payload),
            mslice.i.payload.tag.eq(marb.o.payload.index), marb.o.ready.eq(mslice.i.ready),
        ]
        wiring.connect(m, wslice.o, writer.i)
        wiring.connect(m, mslice.o, mread.i)
        wiring.connect(m, writer.port, wiring.flipped(self.bus.wr))
        wiring.connect(m, mread.port, wiring.flipped(self.bus.rd2))
        # The lanes' settings, copied when the GEMM starts (several lanes): read from the
        # decoder's argument register across the chip, a setting's route into a lane
        # writer's handshake and on into its FIFO's level was a ULX3S build's critical
        # path (37.5 MHz, seed 3); the copy is valid from the cycle after the start, and a
        # launch comes after the check, later.
        def setting(value, name):
            if R == 1:
                return value
            reg = Signal.like(value, name=f"lane_{name}")
            with m.If(self.start & ~self.busy):
                m.d.sync += reg.eq(value)
            return reg

        lane_cfg = {"out_addr": setting(cfg.out_addr, "out_addr"),
                    "out_stride": setting(cfg.out_stride, "out_stride"),
                    "mask_addr": setting(cfg.mask_addr, "mask_addr"),
                    "mask_stride": setting(cfg.mask_stride, "mask_stride"),
                    "m": setting(cfg.m, "m"), "n": setting(cfg.n, "n"),
                    "n_pad": setting(n_pad, "n_pad"), "path": setting(path, "path"),
                    "mask_on": setting(mask_on, "mask_on")}
        lane_writers = []
        for g in range(R):
            lw = m.submodules[f"writer{g}"] = LaneWriter(R, g, aw, NIB)
            mr = m.submodules[f"mask{g}"] = MaskReader(R, g, aw, NIB)
            lane_writers.append(lw)
            for unit, kind in ((lw, "out"), (mr, "mask")):
                m.d.comb += [unit.walk.base.eq(lane_cfg[f"{kind}_addr"]),
                             unit.walk.stride.eq(lane_cfg[f"{kind}_stride"]),
                             unit.walk.m.eq(lane_cfg["m"]), unit.walk.n_pad.eq(lane_cfg["n_pad"]),
                             unit.launch.eq(launch)]
            m.d.comb += [lw.path.eq(lane_cfg["path"]), lw.n.eq(lane_cfg["n"]),
                         mr.on.eq(lane_cfg["mask_on"]),
                         mr.word.valid.eq(mread.o.valid & (mread.o.payload.tag == g)),
                         mr.word.payload.eq(mread.o.payload.data)]
            wiring.connect(m, dp.out[g], lw.i)
            wiring.connect(m, lw.o, warb.i[g])
            wiring.connect(m, mr.req, marb.i[g])
            wiring.connect(m, mr.o, dp.mask[g])
        m.d.comb += mread.o.ready.eq(1)             # a mask reader asks only with room

        # -- counters and the end of the GEMM ------------------------------------------------
        with m.If(launch):
            m.d.sync += [self.cycles.eq(0), self.beats.eq(0)]
        with m.Else():
            with m.If(self.busy & ~go):
                m.d.sync += self.cycles.eq(self.cycles + 1)
            with m.If(walker.o.valid & walker.o.ready):
                m.d.sync += self.beats.eq(self.beats + 1)
        started = Signal()
        finishing = (self.busy & ~walker.o.valid & fetch.idle
                     & Cat(*[lw.done for lw in lane_writers]).all()
                     & ~Cat(*[lw.o.valid for lw in lane_writers]).any()
                     & ~wslice.o.valid & (wslice.i.ready if R > 1 else Const(1))  # no skid
                     & ~mslice.o.valid)
        with m.If(launch):
            m.d.sync += started.eq(1)
        with m.Elif(finishing & started):
            m.d.sync += [self.busy.eq(0), started.eq(0)]
        return m
