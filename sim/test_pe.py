"""cocotb: the processing element against the golden operand values (>= 100k products)."""

import cocotb
from cocotb.triggers import ReadOnly, RisingEdge

from nibble.host.golden.lanes import operand_ints
from nibble.rtl.array import A_OPERAND, B_OPERAND
from nibble.rtl.formats import MAX_REDUCTION, Operand, operand_cfg
from nibble.sim.cocotb_util import rng_for, start, uint
from nibble.sim.vectors import record

CONFIGS = [(Operand.UINT4, Operand.INT4), (Operand.INT4, Operand.INT4),
           (Operand.INT4, Operand.UINT4), (Operand.UINT4, Operand.UINT4),
           (Operand.FP4, Operand.INT4), (Operand.FP4, Operand.UINT4)]


def value(kind, code):
    """Datapath integer of a 4-bit code (FP4 with the phase factored out, as in the PE)."""
    code = code & 0xF
    if kind is Operand.INT4:
        code = code - 16 if code >= 8 else code
    return int(operand_ints([code], kind, 0)[0])


async def run_tiles(dut, rng, kinds, tiles, p_freeze):
    """Feed tiles (lists of (a, b) code pairs); returns the finished sums in order."""
    flags = operand_cfg(*kinds)
    a_kind = A_OPERAND.const({"code": 0, "fp4": flags["a_fp4"], "signed": flags["a_signed"]})
    b_kind = B_OPERAND.const({"code": 0, "signed": flags["b_signed"]})
    a_kind, b_kind = a_kind.as_value().value, b_kind.as_value().value
    steps = [(a | a_kind, b | b_kind, k == len(t) - 1)
             for t in tiles for k, (a, b) in enumerate(t)]
    sums, i = [], 0
    while len(sums) < len(tiles):
        en = not (p_freeze and rng.random() < p_freeze)
        dut.en.value = int(en)
        if en and i < len(steps):
            a, b, last = steps[i]
            dut.a_in.value, dut.b_in.value, dut.last_in.value = a, b, int(last)
            i += 1
        elif en:
            dut.a_in.value, dut.b_in.value, dut.last_in.value = a_kind, b_kind, 0
        await ReadOnly()
        if en and uint(dut.result_valid):
            sums.append(dut.result.value.to_signed())
        await RisingEdge(dut.clk)
    return sums


@cocotb.test()
async def every_code_pair(dut):
    """All 256 code pairs in every operand configuration, one-step tiles back to back."""
    await start(dut)
    rng = rng_for("pe-pairs")
    total = 0
    for kinds in CONFIGS:
        tiles = [[(a, b)] for a in range(16) for b in range(16)]
        got = await run_tiles(dut, rng, kinds, tiles, 0.0)
        want = [value(kinds[0], a) * value(kinds[1], b) for a in range(16) for b in range(16)]
        bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
        assert not bad, f"{kinds}: mismatches at pairs {bad[:3]}"
        total += len(tiles)
    record("pe", "every_code_pair", total)


@cocotb.test()
async def random_tiles_with_freezes(dut):
    """Random tiles of 1..64 steps in every configuration; the clock enable drops at random."""
    await start(dut)
    rng = rng_for("pe-random")
    total = 0
    for kinds in CONFIGS:
        tiles = [[(int(a), int(b)) for a, b in rng.integers(0, 16, (int(n), 2))]
                 for n in rng.integers(1, 65, 550)]
        got = await run_tiles(dut, rng, kinds, tiles, 0.25)
        want = [sum(value(kinds[0], a) * value(kinds[1], b) for a, b in t) for t in tiles]
        assert got == want, f"{kinds}: mismatch"
        total += sum(len(t) for t in tiles)
    record("pe", "random_tiles_with_freezes", total)
    assert total >= 100_000


@cocotb.test()
async def worst_case_full_length(dut):
    """MAX_REDUCTION extreme products of each sign in every configuration: the derived
    accumulator width holds them exactly."""
    await start(dut)
    rng = rng_for("pe-worst")
    total = 0
    for kinds in CONFIGS:
        codes = lambda kind: range(16)  # noqa: E731
        vals_a = {c: value(kinds[0], c) for c in codes(kinds[0])}
        vals_b = {c: value(kinds[1], c) for c in codes(kinds[1])}
        for pick in (max, min):
            a, b = pick(((ca, cb) for ca in vals_a for cb in vals_b),
                        key=lambda p: vals_a[p[0]] * vals_b[p[1]])
            got = await run_tiles(dut, rng, kinds, [[(a, b)] * MAX_REDUCTION], 0.0)
            assert got == [MAX_REDUCTION * vals_a[a] * vals_b[b]], (kinds, a, b, got)
            total += MAX_REDUCTION
    record("pe", "worst_case_full_length", total)
