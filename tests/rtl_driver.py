"""Amaranth-simulator drivers for the datapath tests: random bubbles and stalls."""

import numpy as np
from amaranth.sim import Simulator

from nibble.host.golden.tiling import assemble, beats, lane_streams
from nibble.rtl.formats import MaskMode, OutputPath
from nibble.sim.stimuli import lane_value

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
        for _ in range(8):          # the absmax tree's latency
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
