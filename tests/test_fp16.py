"""The FP16 reference PE (rtl/fp16.py) against its golden model (numpy's float32): the exact
half product and the round-to-nearest-even FP32 accumulation, bit for bit, on random,
special and tie operands; the PE's systolic ports and sums."""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from nibble.host.golden.fp16 import fp16_mac, fp32_bits, half_product
from nibble.rtl import fp16
from nibble.rtl.fp16 import Fp16MacPE


class MacUnit(wiring.Component):
    """acc + a * b, combinational: the PE's two functions in a row."""

    def __init__(self):
        super().__init__({"acc": In(32), "a": In(16), "b": In(16), "prod": Out(32),
                          "sum": Out(32)})

    def elaborate(self, platform):
        m = Module()
        p = fp16.half_product(m, self.a, self.b)
        m.d.comb += [self.prod.eq(p), self.sum.eq(fp16.fp32_add(m, self.acc, p))]
        return m


def _same(got, want):
    """Bit-equal, or both NaN."""
    got, want = np.asarray(got, np.uint32), np.asarray(want, np.uint32)
    nan = np.isnan(got.view(np.float32)) & np.isnan(want.view(np.float32))
    return nan | (got == want)


def run_unit(accs, avs, bvs):
    dut = MacUnit()
    out = {"prod": [], "sum": []}

    async def bench(ctx):
        for acc, a, b in zip(accs, avs, bvs, strict=True):
            ctx.set(dut.acc, int(acc))
            ctx.set(dut.a, int(a))
            ctx.set(dut.b, int(b))
            out["prod"].append(ctx.get(dut.prod))
            out["sum"].append(ctx.get(dut.sum))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    return np.array(out["prod"], np.uint32), np.array(out["sum"], np.uint32)


def halves(rng, n):
    """Half bit patterns: normal, subnormal, zero, infinite and NaN, both signs."""
    kind = rng.integers(0, 10, n)
    bits = rng.integers(0, 1 << 16, n).astype(np.uint32)
    exp = np.where(kind == 0, 0, np.where(kind == 1, 31, rng.integers(1, 31, n)))
    frac = np.where((kind == 1) & (rng.random(n) < 0.5), 0, bits & 0x3FF)
    frac = np.where(kind == 2, 0, frac)                           # exact powers of two
    exp = np.where(kind == 3, 0, exp)
    frac = np.where(kind == 3, 0, frac)                           # zeros
    return ((bits & 0x8000) | (exp << 10) | frac).astype(np.uint16)


def accumulators(rng, n, a, b):
    """FP32 accumulators: products' neighbours (cancellation, ties), sums of products,
    powers of two, zeros, infinities, NaN and the largest finite values."""
    p = half_product(a, b).view(np.float32)
    kind = rng.integers(0, 8, n)
    scale = np.ldexp(1.0, rng.integers(-30, 30, n)).astype(np.float32)
    near = -p * (1 + rng.integers(-4, 5, n) * np.float32(2.0 ** -23))
    pick = [near.astype(np.float32),
            (rng.standard_normal(n) * scale).astype(np.float32),
            np.float32(2.0 ** 24) * rng.choice([-1, 1], n),                    # ties
            np.zeros(n, np.float32) * rng.choice([-1, 1], n),
            np.full(n, np.inf, np.float32) * rng.choice([-1, 1], n),
            np.full(n, np.nan, np.float32),
            np.full(n, np.finfo(np.float32).max, np.float32) * rng.choice([-1, 1], n),
            (p * np.float32(rng.integers(1, 1 << 20, n))).astype(np.float32)]
    with np.errstate(invalid="ignore"):
        return fp32_bits(np.choose(kind, pick))


def test_product_and_sum_match_numpy():
    rng = np.random.default_rng(0)
    n = 6000
    a, b = halves(rng, n), halves(rng, n)
    acc = accumulators(rng, n, a, b)
    prod, total = run_unit(acc, a, b)
    assert _same(prod, half_product(a, b)).all()
    ok = _same(total, fp16_mac(acc, a, b))
    assert ok.all(), [(hex(acc[i]), hex(a[i]), hex(b[i]), hex(total[i]))
                      for i in np.flatnonzero(~ok)[:5]]


def test_rounding_ties_and_sticky_bits():
    """Sums whose exact value lies on, just below and just above half an ULP: every
    neighbour of 1 + 2^-24 and friends, both signs, and the largest finite values."""
    one = np.float32(1.0)
    accs, avs, bvs = [], [], []
    for k in range(-3, 4):
        for e in range(-26, -20):
            for s in (1, -1):
                # a * b = 2^e * (1 + k 2^-10): a few ULPs of 1 around the tie
                a = np.float16(np.ldexp(1 + k * 2.0 ** -10, e // 2))
                b = np.float16(np.ldexp(1.0, e - e // 2))
                accs.append(fp32_bits(s * (one + np.float32(k * 2.0 ** -23))))
                avs.append(np.array(a).view(np.uint16))
                bvs.append(np.array(b * s).view(np.uint16))
    big = np.float32(np.finfo(np.float32).max)
    accs += [fp32_bits(big), fp32_bits(-big)]
    avs += [np.array(np.float16(65504)).view(np.uint16)] * 2
    bvs += [np.array(np.float16(65504)).view(np.uint16),
            np.array(np.float16(-65504)).view(np.uint16)]
    accs, avs, bvs = np.array(accs, np.uint32), np.array(avs), np.array(bvs)
    _, total = run_unit(accs, avs, bvs)
    assert _same(total, fp16_mac(accs, avs, bvs)).all()
    # a half product is below half an ULP of the largest float: no overflow to infinity
    assert total[-2] == fp32_bits(big) and total[-1] == fp32_bits(-big)


@pytest.mark.parametrize("seed", [1, 2])
def test_pe_interleaves_three_sums(seed):
    """Three interleaved streams of sums of 1 to 30 products (beat t belongs to sum t mod 3),
    with stalls: each published sum is numpy's sequential one, in order, and the operands
    come out a cycle late."""
    rng = np.random.default_rng(seed)
    streams = []                       # per slot: (a, b, last) beats and the expected sums
    for _ in range(fp16.ADD_STAGES):
        lengths = rng.integers(1, 31, 6)
        n = int(lengths.sum())
        a = (rng.standard_normal(n) * 4).astype(np.float16).view(np.uint16)
        b = rng.standard_normal(n).astype(np.float16).view(np.uint16)
        last = np.zeros(n, bool)
        last[np.cumsum(lengths) - 1] = True
        want, acc, pos = [], np.uint32(0), 0
        for k in lengths:
            for i in range(pos, pos + k):
                acc = fp16_mac(acc, a[i], b[i])
            want.append(int(acc))
            acc, pos = np.uint32(0), pos + k
        streams.append((a, b, last, want))
    beats = max(len(st[0]) for st in streams) * fp16.ADD_STAGES
    dut = Fp16MacPE()
    got = [[] for _ in streams]
    passed, sent = [], []

    async def bench(ctx):
        t = 0
        for _ in range(int(beats / 0.7) + 60):
            stall = rng.random() < 0.2
            ctx.set(dut.en, int(not stall))
            if not stall:
                slot, k = t % fp16.ADD_STAGES, t // fp16.ADD_STAGES
                a, b, last, _ = streams[slot]
                beat = (int(a[k]), int(b[k]), int(last[k])) if k < len(a) else (0, 0, 0)
                ctx.set(dut.a_in, beat[0])
                ctx.set(dut.b_in, beat[1])
                ctx.set(dut.last_in, beat[2])
                sent.append(beat[0])
                t += 1
            await ctx.tick()
            if not stall:
                passed.append(ctx.get(dut.a_out))
            if ctx.get(dut.result_valid) and not stall:
                # the operand registers hold beat t - 1, the adder's output beat t - 6
                got[(t - 6) % fp16.ADD_STAGES].append(ctx.get(dut.result))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert got == [st[3] for st in streams]
    assert passed == sent
