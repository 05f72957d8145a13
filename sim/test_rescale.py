"""cocotb: the range-rescale unit against nibble.host.golden.numerics.rescale (>= 100k elements)."""

import cocotb
import numpy as np

from nibble.host.golden.numerics import rescale
from nibble.rtl.formats import INT4_MAX, INT4_MIN, RESCALE_IN_BITS, UINT4_MAX, UINT4_MIN
from nibble.rtl.rescale import RESCALE_CFG
from nibble.sim.cocotb_util import Sink, Source, rng_for, run_streams, start
from nibble.sim.stimuli import rescale_vectors
from nibble.sim.vectors import record

MASK = (1 << RESCALE_IN_BITS) - 1
SHIFTS = [0, 1, 2, 3, 8, 15, 16, 17, 20, 23, 26, 29, 32, 34, 35, 36, 37, 50, 63]


async def check(dut, rng, cfg, xs, p_bubble, p_stall):
    dut.cfg.value = RESCALE_CFG.const(cfg).as_value().value
    src = Source(dut, "i", [x & MASK for x in xs], rng, p_bubble)
    snk = Sink(dut, "o", len(xs), rng, p_stall)
    await run_streams(dut, [src], [snk], limit=20 * len(xs) + 100)
    lo, hi = (INT4_MIN, INT4_MAX) if cfg["out_signed"] else (UINT4_MIN, UINT4_MAX)
    want, _ = rescale(np.array(xs, dtype=np.int64), cfg["m"], cfg["s"], lo, hi,
                      relu=bool(cfg["relu"]))
    want = [int(w) & 0xF for w in want]
    bad = [(x, g, w) for x, g, w in zip(xs, snk.items, want, strict=True) if g != w]
    assert not bad, f"{cfg}: {len(bad)} mismatches, first (acc, got, want): {bad[:5]}"
    return len(xs)


@cocotb.test()
async def random_and_corner_vectors(dut):
    """Every shift class, M at 0, 1, the normalised range ends and random; ReLU and both
    output kinds; random bubbles and output stalls."""
    await start(dut)
    rng = rng_for("rescale")
    total = 0
    for s in SHIFTS:
        for m in (0, 1, 1 << 15, (1 << 16) - 1, int(rng.integers(1 << 15, 1 << 16))):
            relu, signed_out = int(rng.integers(2)), int(rng.integers(2))
            cfg = {"m": m, "s": s, "relu": relu, "out_signed": signed_out}
            total += await check(dut, rng, cfg, rescale_vectors(rng, 1100), 0.2, 0.3)
    record("rescale", "random_and_corner_vectors", total)
    assert total >= 100_000


@cocotb.test()
async def ties_and_saturation_edges(dut):
    """Exact halves (round half up), values one step inside and outside the 4-bit range."""
    await start(dut)
    rng = rng_for("rescale-ties")
    total = 0
    for s in range(1, 12):
        xs = []
        for q in range(-20, 21):                       # acc*M == (2q+1) * 2^(s-1) +- 1
            for d in (-1, 0, 1):
                xs.append(((2 * q + 1) << (s - 1)) + d)
        for signed_out in (0, 1):
            cfg = {"m": 1, "s": s, "relu": 0, "out_signed": signed_out}
            total += await check(dut, rng, cfg, xs, 0.0, 0.0)
    record("rescale", "ties_and_saturation_edges", total)


@cocotb.test()
async def output_stalls_hold_the_stream(dut):
    """A sink that stalls 90% of the time loses and duplicates nothing."""
    await start(dut)
    rng = rng_for("rescale-stall")
    cfg = {"m": 40000, "s": 20, "relu": 1, "out_signed": 0}
    total = await check(dut, rng, cfg, rescale_vectors(rng, 2000), 0.0, 0.9)
    record("rescale", "output_stalls_hold_the_stream", total)
