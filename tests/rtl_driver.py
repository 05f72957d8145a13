"""Amaranth-simulator drivers and golden expectations for the datapath tests.

``golden_*`` compute what a lane must emit from the golden model (``host.numerics``); the
``run_*`` functions drive the RTL in Amaranth's simulator with random bubbles and stalls.
"""

import numpy as np
from amaranth.sim import Simulator

from host.numerics import fp4_int, log_quantize_tpr, rescale
from host.tiling import Gemm, assemble, beats, lane_streams
from rtl.formats import (
    INT4_MAX,
    INT4_MIN,
    UINT4_MAX,
    UINT4_MIN,
    MaskMode,
    Operand,
    OutputPath,
    mask_pass,
)

# -- golden -------------------------------------------------------------------------------------


def operand_ints(codes, kind, phase):
    codes = np.asarray(codes)
    if kind is Operand.FP4:
        return fp4_int(codes.astype(np.uint8), phase)
    return codes.astype(np.int64)


def golden_acc(gemm, phase):
    """Exact T = A @ B (int64) with the FP4 operand at ``phase``."""
    a = operand_ints(gemm.a, gemm.a_kind, phase)
    b = operand_ints(gemm.b, gemm.b_kind, phase)
    return a.astype(object).dot(b.astype(object)).astype(np.int64)


def golden_lane(acc, lane, mask_codes=None):
    """Expected lane outputs for accumulators ``acc`` under lane settings ``lane`` (a dict
    shaped like LANE_CFG): (values, absmax). RAW: ints; RESCALE: 4-bit nibbles;
    LOG4: (phase-0 code, phase-1 code) pairs."""
    acc = np.asarray(acc, dtype=np.int64)
    path = OutputPath(lane["path"])
    if path is OutputPath.RAW:
        return acc, int(np.abs(acc).max()) if acc.size else 0
    if path is OutputPath.RESCALE:
        rs = lane["rescale"]
        lo, hi = (INT4_MIN, INT4_MAX) if rs["out_signed"] else (UINT4_MIN, UINT4_MAX)
        codes, absmax = rescale(acc, rs["m"], rs["s"], lo, hi, relu=bool(rs["relu"]))
        return (codes.astype(np.int64) & 0xF), absmax
    lg = lane["log4"]
    mode = MaskMode(lg["mask"])
    if mask_codes is None:
        mask_codes = np.zeros(acc.shape, np.int64)
    keep = np.vectorize(lambda c: mask_pass(int(c), mode), otypes=[bool])(mask_codes)
    masked = np.where(keep, acc, 0) if acc.size else acc
    p0, p1 = log_quantize_tpr(masked, lg["exp"])
    pairs = np.empty(acc.shape, dtype=object)
    for idx in np.ndindex(acc.shape):
        pairs[idx] = (int(p0[idx]), int(p1[idx]))
    return pairs, int(np.abs(masked).max()) if masked.size else 0


def lane_cfg(path=OutputPath.RAW, phase=0, m=1 << 15, s=0, relu=0, out_signed=0, exp=0,
             mask=MaskMode.NONE):
    return {"path": int(path), "phase": phase,
            "rescale": {"m": m, "s": s, "relu": relu, "out_signed": out_signed},
            "log4": {"exp": exp, "mask": int(mask)}}


def lane_value(payload, path):
    """Decode a LANE_OUT payload (an Amaranth data.Const) for ``path``."""
    path = OutputPath(path)
    if path is OutputPath.RAW:
        return int(payload.raw)
    if path is OutputPath.RESCALE:
        return int(payload.code)
    return (int(payload.fp4[0].as_value().value), int(payload.fp4[1].as_value().value))


# -- stream helpers -----------------------------------------------------------------------------


async def put(ctx, stream, payload, rng, p_bubble):
    while rng.random() < p_bubble:
        await ctx.tick()
    ctx.set(stream.payload, payload)
    ctx.set(stream.valid, 1)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def get(ctx, stream, rng, p_stall):
    while rng.random() < p_stall:
        await ctx.tick()
    ctx.set(stream.ready, 1)
    (payload,) = await ctx.tick().sample(stream.payload).until(stream.valid)
    ctx.set(stream.ready, 0)
    return payload


# -- the datapath ---------------------------------------------------------------------------------


def run_datapath(dut, gemm, lane, mask_matrix=None, seed=0, p_bubble=0.2, p_stall=0.3,
                 clear=True):
    """Run one GEMM through ``dut`` (a Datapath); returns (M x N results, absmax, cycles)."""
    R, C = dut.rows, dut.cols
    rng = np.random.default_rng(seed)
    path = OutputPath(lane["path"])
    counts = [len(s) for s in lane_streams(gemm, R, C, np.zeros(gemm.shape[::2], int))]
    masks = None
    if path is OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        masks = lane_streams(gemm, R, C, mask_matrix)
    results = [[] for _ in range(R)]
    cycles = [0]
    absmax = [0]

    async def setup_and_feed(ctx):
        ctx.set(dut.cfg, {"operands": gemm.operands, "lane": lane})
        if clear:
            ctx.set(dut.clear, 1)
            await ctx.tick()
            ctx.set(dut.clear, 0)
        for a, b, last in beats(gemm, R, C):
            await put(ctx, dut.beat, {"a": [int(x) for x in a], "b": [int(x) for x in b],
                                      "last": int(last)}, rng, p_bubble)

    def feeder(g):
        async def proc(ctx):
            for code in masks[g]:
                await put(ctx, dut.mask[g], int(code), rng, p_bubble / 2)
        return proc

    def collector(g):
        async def proc(ctx):
            for _ in range(counts[g]):
                payload = await get(ctx, dut.out[g], rng, p_stall)
                results[g].append(lane_value(payload, path))
        return proc

    async def timer(ctx):
        while any(len(results[g]) < counts[g] for g in range(R)):
            await ctx.tick()
            cycles[0] += 1
        for _ in range(2):
            await ctx.tick()
        absmax[0] = ctx.get(dut.absmax)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(setup_and_feed)
    sim.add_testbench(timer)
    for g in range(R):
        sim.add_testbench(collector(g), background=True)
        if masks is not None:
            sim.add_testbench(feeder(g), background=True)
    sim.run()
    return assemble(gemm, R, C, results), absmax[0], cycles[0]


def random_gemm(rng, mode_kinds, m, red, n, phase_free=True):
    """Random codes for A (m x red) and B (red x n) of the given operand kinds."""
    a_kind, b_kind = mode_kinds

    def codes(kind, shape):
        if kind is Operand.FP4:
            return rng.integers(0, 16, shape)
        if kind is Operand.INT4:
            return rng.integers(INT4_MIN, INT4_MAX + 1, shape)
        return rng.integers(UINT4_MIN, UINT4_MAX + 1, shape)

    return Gemm(codes(a_kind, (m, red)), codes(b_kind, (red, n)), a_kind, b_kind)
