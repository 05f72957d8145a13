"""cocotb: the datapath (array + output lanes) on whole GEMMs, bit-exact with the golden
GEMMs, rescale and log4 quantizer, in all three modes (>= 100k output elements)."""

import os

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from nibble.host.device.commands import lane_cfg
from nibble.host.golden.lanes import golden_acc, golden_clip_sum, golden_lane
from nibble.host.golden.tiling import Gemm, beats, lane_streams
from nibble.rtl.array import array_beat_layout, make_array
from nibble.rtl.datapath import DATAPATH_CFG
from nibble.rtl.formats import (
    FP4_EXP_MAX,
    FP4_SIGN_SHIFT,
    LOG4_EXP_MAX,
    LOG4_EXP_MIN,
    MAX_REDUCTION,
    GemmMode,
    MaskMode,
    Operand,
    OutputPath,
)
from nibble.rtl.lane import LANE_OUT
from nibble.sim.cocotb_util import Sink, Source, params, rng_for, run_streams, start, uint
from nibble.sim.stimuli import MODE_KINDS, lane_value, random_gemm
from nibble.sim.vectors import record

P = params()
R, C = P["rows"], P["cols"]
UNIT = os.environ.get("NIBBLE_UNIT", "datapath")     # the datapath's, or the row's
BEAT = array_beat_layout(R, C)


def phase_of(mode):
    return 1 if mode is GemmMode.BACKWARD_WEIGHT else 0


def pack_beat(a, b, last):
    return BEAT.const({"a": [int(x) for x in a], "b": [int(x) for x in b],
                       "last": int(last)}).as_value().value


async def run_gemm(dut, rng, gemm, lane, mask_matrix=None, p_bubble=0.2, p_stall=0.3):
    """One GEMM through the datapath; checks every lane element, the absmax and the clip
    statistic."""
    m, _, n = gemm.shape
    dut.cfg.value = DATAPATH_CFG.const({"operands": gemm.operands,
                                        "lane": lane}).as_value().value
    dut.clear.value = 1
    await RisingEdge(dut.clk)
    dut.clear.value = 0
    acc = golden_acc(gemm, lane["phase"])
    want, want_absmax = golden_lane(acc, lane, mask_matrix)
    expected = lane_streams(gemm, R, C, want, pad=None)
    path = OutputPath(lane["path"])
    sources = [Source(dut, "beat", [pack_beat(*b) for b in beats(gemm, R, C)], rng, p_bubble)]
    if path is OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        masks = lane_streams(gemm, R, C, mask_matrix, pad=0)
        sources += [Source(dut, f"mask__{g}", [int(c) for c in masks[g]], rng, p_bubble / 2)
                    for g in range(R)]
    sinks = [Sink(dut, f"out__{g}", len(expected[g]), rng, p_stall) for g in range(R)]
    n_beats = len(sources[0].items)
    cycles = await run_streams(dut, sources, sinks, limit=50 * (n_beats + 4 * C) + 200)
    checked = 0
    for g in range(R):
        got = [lane_value(LANE_OUT.from_bits(v), path) for v in sinks[g].items]
        for k, (gv, wv) in enumerate(zip(got, expected[g], strict=True)):
            if wv is None:          # padding outside the result
                continue
            assert gv == wv, f"lane {g} element {k}: got {gv}, want {wv} ({gemm.shape})"
            checked += 1
    for _ in range(8):              # the absmax tree's latency
        await RisingEdge(dut.clk)
    assert uint(dut.absmax) == want_absmax, (uint(dut.absmax), want_absmax)
    want_clip = golden_clip_sum(acc, lane, mask_matrix)
    assert dut.clip_sum.value.to_signed() == want_clip, (dut.clip_sum.value, want_clip)
    assert checked == m * n
    return checked, cycles, n_beats


def random_shape(rng, big=False):
    hi = (4 * R + 3, 48, 4 * C + 3) if big else (2 * R + 3, 24, 2 * C + 3)
    return tuple(int(rng.integers(1, h + 1)) for h in hi)


@cocotb.test()
async def raw_gemms_all_modes(dut):
    """Random shapes (partial tiles, tiles shorter than C) in all three modes, exact wide
    results, with input bubbles and output stalls."""
    await start(dut)
    rng = rng_for("dp-raw")
    total = 0
    for mode in GemmMode:
        for kinds in MODE_KINDS[mode]:
            for _ in range(6):
                gemm = random_gemm(rng, kinds, *random_shape(rng))
                lane = lane_cfg(OutputPath.RAW, phase=phase_of(mode))
                total += (await run_gemm(dut, rng, gemm, lane))[0]
    record(UNIT, "raw_gemms_all_modes", total)


@cocotb.test()
async def forward_rescale_path(dut):
    """Forward GEMMs through the rescale unit: ReLU or not, INT4 or UINT4 codes."""
    await start(dut)
    rng = rng_for("dp-rescale")
    total = 0
    for kinds in MODE_KINDS[GemmMode.FORWARD]:
        for _ in range(10):
            gemm = random_gemm(rng, kinds, *random_shape(rng, big=True))
            top = max(1, int(np.abs(golden_acc(gemm, 0)).max()))
            # M / 2^s puts the largest accumulator near the top code (saturating some).
            s = 15 + top.bit_length() - 4 + int(rng.integers(-1, 2))
            lane = lane_cfg(OutputPath.RESCALE, m=int(rng.integers(1 << 15, 1 << 16)), s=s,
                            relu=int(rng.integers(2)), out_signed=int(rng.integers(2)))
            total += (await run_gemm(dut, rng, gemm, lane))[0]
    record(UNIT, "forward_rescale_path", total)


@cocotb.test()
async def backward_data_log4_path(dut):
    """Backward-data GEMMs through the mask and the log4 quantizer, GradScale exponents
    around the measured absmax and at the ends of the field."""
    await start(dut)
    rng = rng_for("dp-log4")
    total = 0
    for mask in MaskMode:
        for offset in (0, 0, -2, 3, "min", "max"):
            gemm = random_gemm(rng, (Operand.FP4, Operand.INT4), *random_shape(rng, big=True))
            acc = golden_acc(gemm, 0)
            exp = int(np.ceil(np.log2(max(1, np.abs(acc).max()))))
            exp = {"min": LOG4_EXP_MIN, "max": LOG4_EXP_MAX}.get(offset, exp) if isinstance(
                offset, str) else exp + offset
            codes = rng.integers(0, 16, acc.shape)
            lane = lane_cfg(OutputPath.LOG4, exp=exp, mask=mask)
            total += (await run_gemm(dut, rng, gemm, lane, mask_matrix=codes))[0]
    record(UNIT, "backward_data_log4_path", total)


@cocotb.test()
async def volume(dut):
    """Enough random GEMMs (every mode and path) for over 100k checked output elements."""
    await start(dut)
    rng = rng_for("dp-volume")
    total = 0
    while total < 100_000:
        mode = list(GemmMode)[int(rng.integers(3))]
        kinds = MODE_KINDS[mode][int(rng.integers(len(MODE_KINDS[mode])))]
        gemm = random_gemm(rng, kinds, 8 * R, int(rng.integers(C, 3 * C)), 4 * C)
        acc = golden_acc(gemm, phase_of(mode))
        top = max(1, int(np.abs(acc).max()))
        if mode is GemmMode.FORWARD:
            lane = lane_cfg(OutputPath.RESCALE, m=int(rng.integers(1 << 15, 1 << 16)),
                            s=15 + top.bit_length() - 4, relu=1)
            codes = None
        elif mode is GemmMode.BACKWARD_DATA:
            lane = lane_cfg(OutputPath.LOG4, exp=top.bit_length(), mask=MaskMode.PACT)
            codes = rng.integers(0, 16, acc.shape)
        else:
            lane = lane_cfg(OutputPath.RAW, phase=1)
            codes = None
        total += (await run_gemm(dut, rng, gemm, lane, codes, p_bubble=0.05, p_stall=0.1))[0]
    record(UNIT, "volume", total)


@cocotb.test()
async def back_to_back_tiles_keep_the_array_busy(dut):
    """No bubbles, no stalls, tiles of length >= C: twice the tiles take exactly their extra
    beats in extra cycles, so the array takes one beat (one MAC per PE) every cycle, but for
    the array's own gap after each tile (a one-row array with DSP PEs: one cycle)."""
    await start(dut)
    rng = rng_for("dp-b2b")
    for mode in GemmMode:
        cycles = {}
        for m in (4 * R, 8 * R):
            gemm = random_gemm(rng, MODE_KINDS[mode][0], m, 2 * C, 4 * C)
            lane = lane_cfg(OutputPath.RAW, phase=phase_of(mode))
            _, cycles[m], _ = await run_gemm(dut, rng, gemm, lane, p_bubble=0, p_stall=0)
        extra_beats = 4 * (4 * C // C) * 2 * C
        extra_tiles = 4 * (4 * C // C)         # 4 more tile rows of N / C tiles
        gap = make_array(R, C, P.get("dsp_pes", 0)).tile_gap
        assert cycles[8 * R] - cycles[4 * R] == extra_beats + gap * extra_tiles, \
            (mode, cycles, extra_beats)


@cocotb.test()
async def worst_case_accumulators(dut):
    """A MAX_REDUCTION-long tile of extreme operands in each mode: exact, no overflow."""
    await start(dut)
    rng = rng_for("dp-worst")
    top_neg = (1 << FP4_SIGN_SHIFT) | FP4_EXP_MAX          # -2^12 (phase 0)
    cases = [
        (GemmMode.FORWARD, Operand.UINT4, 15, Operand.INT4, -8),
        (GemmMode.BACKWARD_DATA, Operand.FP4, top_neg, Operand.INT4, -8),
        (GemmMode.BACKWARD_WEIGHT, Operand.FP4, top_neg, Operand.UINT4, 15),
        (GemmMode.BACKWARD_WEIGHT, Operand.FP4, FP4_EXP_MAX, Operand.UINT4, 15),
    ]
    total = 0
    for mode, ak, a, bk, b in cases:
        gemm = Gemm(np.full((R, MAX_REDUCTION), a), np.full((MAX_REDUCTION, C), b), ak, bk)
        lane = lane_cfg(OutputPath.RAW, phase=phase_of(mode))
        total += (await run_gemm(dut, rng, gemm, lane, p_bubble=0, p_stall=0))[0]
    record(UNIT, "worst_case_accumulators", total)
