"""cocotb: the log4 quantizer against the golden ``log_quantize_tpr`` (>= 100k elements)."""

import cocotb
import numpy as np

from nibble.host.golden.numerics import log_quantize_tpr
from nibble.rtl.formats import LANE_BITS, LOG4_EXP_MAX, LOG4_EXP_MIN, MaskMode, mask_pass
from nibble.rtl.log4 import LOG4_CFG, LOG4_IN, LOG4_OUT
from nibble.sim.cocotb_util import Sink, Source, rng_for, run_streams, start
from nibble.sim.stimuli import log4_vectors
from nibble.sim.vectors import record

CODE_AT = LOG4_IN.size - 4          # the code field sits above the LANE_BITS value
assert LOG4_IN.const({"value": 0, "code": 1}).as_value().value == 1 << CODE_AT


def pack(x, code):
    return (x & ((1 << LANE_BITS) - 1)) | (code << CODE_AT)


async def check(dut, rng, exp, mask, xs, codes, p_bubble, p_stall):
    dut.cfg.value = LOG4_CFG.const({"exp": exp, "mask": int(mask)}).as_value().value
    src = Source(dut, "i", [pack(x, int(c)) for x, c in zip(xs, codes, strict=True)], rng,
                 p_bubble)
    snk = Sink(dut, "o", len(xs), rng, p_stall)
    await run_streams(dut, [src], [snk], limit=20 * len(xs) + 100)
    keep = np.array([mask_pass(int(c), mask) for c in codes])
    masked = np.where(keep, np.array(xs, dtype=np.int64), 0)
    p0, p1 = log_quantize_tpr(masked, exp)
    got = [LOG4_OUT.from_bits(v) for v in snk.items]
    got = [(g[0].as_value().value, g[1].as_value().value) for g in got]
    want = list(zip(p0.tolist(), p1.tolist(), strict=True))
    bad = [(x, g, w) for x, g, w in zip(masked.tolist(), got, want, strict=True) if g != w]
    assert not bad, f"exp {exp} {mask!r}: {len(bad)} mismatches, first {bad[:5]}"
    return len(xs)


@cocotb.test()
async def every_exponent_and_mask(dut):
    """Every GradScale exponent the field takes, every mask mode, every threshold +-1,
    random magnitudes; random bubbles and stalls."""
    await start(dut)
    rng = rng_for("log4")
    total = 0
    for exp in range(LOG4_EXP_MIN, LOG4_EXP_MAX + 1):
        for mask in MaskMode:
            xs = log4_vectors(rng, exp, 500)
            codes = rng.integers(0, 16, len(xs))
            total += await check(dut, rng, exp, mask, xs, codes, 0.2, 0.3)
    record("log4", "every_exponent_and_mask", total)
    assert total >= 100_000


@cocotb.test()
async def output_stalls_hold_the_stream(dut):
    await start(dut)
    rng = rng_for("log4-stall")
    xs = log4_vectors(rng, 20, 2000)
    codes = rng.integers(0, 16, len(xs))
    total = await check(dut, rng, 20, MaskMode.PACT, xs, codes, 0.0, 0.9)
    record("log4", "output_stalls_hold_the_stream", total)
