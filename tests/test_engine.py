"""The GEMM engine in the Amaranth simulator, against the emulator's reference semantics."""

import dataclasses
import zlib

import numpy as np
import pytest

from nibble.host.device.commands import lane_cfg, plan_gemm
from nibble.host.device.emu import gemm_apply, gemm_check
from nibble.host.golden.tiling import Gemm
from nibble.rtl.engine import GEMM_CFG, GemmEngine
from nibble.rtl.formats import GemmMode, Operand, OutputPath, word_nibbles
from tests.support import gemm_plan, random_memory, run_commands


def run_engine(rows, cols, words, mem_bytes, cfgs, flaky=None):
    """Run GEMM commands on the RTL; returns (memory after, [(ok, absmax, cycles, beats)])."""
    engine = GemmEngine(rows, cols, words)

    def outcome(ctx, ok):
        return (ok, (ctx.get(engine.absmax), ctx.get(engine.clip_sum)), ctx.get(engine.cycles),
                ctx.get(engine.beats))

    return run_commands(engine, GEMM_CFG, words, mem_bytes, cfgs, outcome, flaky)


def check_cases(rows, cols, words, plans, seed, flaky=None):
    """The plans' GEMMs on random memory: verdicts, absmax and the whole memory after them
    equal the emulator's."""
    rng = np.random.default_rng(seed)
    nib = word_nibbles(rows, cols)
    mem = random_memory(rng, words, rows, cols)
    for plan in plans:
        for buf, raw in plan.uploads:
            mem[buf.addr * nib // 2:buf.addr * nib // 2 + len(raw)] = raw
    want = bytearray(mem)
    expect = []
    for plan in plans:
        ok = gemm_check(plan.cfg, rows, cols, words)
        stats = gemm_apply(want, plan.cfg, rows, cols) if ok else None
        expect.append((ok, stats))
    got_mem, got = run_engine(rows, cols, words, bytes(mem), [p.cfg for p in plans], flaky)
    for (ok, stats), (g_ok, g_stats, cycles, beats) in zip(expect, got, strict=True):
        assert g_ok == ok
        if ok:
            assert g_stats == stats             # absmax and the clip statistic
            assert beats > 0 and cycles >= beats
    assert got_mem == bytes(want)
    return got


@pytest.mark.parametrize("path", list(OutputPath))
@pytest.mark.parametrize("mode", list(GemmMode), ids=lambda m: m.name)
def test_engine_matches_golden(mode, path):
    rng = np.random.default_rng([zlib.crc32(mode.name.encode()), int(path)])
    for rows, cols in [(2, 4), (1, 4), (2, 16)]:     # (2, 16): two RAW elements a word
        shape = tuple(int(x) for x in rng.integers(1, 11, 3))
        plan = gemm_plan(rng, rows, cols, mode, path, shape, base=int(rng.integers(0, 8)),
                         spacing=int(rng.integers(0, 3)))
        check_cases(rows, cols, 512, [plan], seed=int(rng.integers(1 << 30)))


@pytest.mark.parametrize("seed", [1, 2])
def test_engine_waits_for_grants(seed):
    """A memory that grants each port's requests only on some cycles (a banked or shared
    one): every mode and path still gives the emulator's memory, bit for bit."""
    rng = np.random.default_rng(seed + 50)
    plans = [gemm_plan(rng, 2, 4, mode, path, tuple(int(x) for x in rng.integers(1, 11, 3)),
                       base=160 * k)
             for k, (mode, path) in enumerate([(m, p) for m in GemmMode for p in OutputPath])]
    got = check_cases(2, 4, 2048, plans, seed=seed, flaky=seed)
    steady = check_cases(2, 4, 2048, plans, seed=seed)
    assert sum(g[2] for g in got) > sum(g[2] for g in steady)     # the stalls cost cycles


def test_engine_rejects_out_of_range():
    rng = np.random.default_rng(5)
    plan = gemm_plan(rng, 2, 4, GemmMode.FORWARD, OutputPath.RESCALE, (4, 6, 8))
    bad = []
    fp4 = dict(plan.cfg["operands"], a_fp4=1)
    for field, value in [("m", 0), ("l", 4097), ("out_addr", 510), ("a_addr", 508),
                         ("b_stride", 400), ("out_stride", 0), ("operands", fp4)]:
        cfg = dict(plan.cfg, **{field: value})
        assert not gemm_check(cfg, 2, 4, 512), field
        bad.append(dataclasses.replace(plan, cfg=cfg))
    got = check_cases(2, 4, 512, [*bad, plan], seed=1)
    assert [g[0] for g in got] == [0] * len(bad) + [1]


def test_engine_streams_at_one_beat_per_cycle():
    """Dims that are multiples of the array: the engine's cycles are the beats plus a fixed
    fill and drain."""
    rng = np.random.default_rng(3)
    rows, cols = 2, 4
    for red in (16, 64):
        gemm = Gemm(rng.integers(0, 16, (8, red)), rng.integers(-8, 8, (red, 8)),
                    Operand.UINT4, Operand.INT4)
        lane = lane_cfg(OutputPath.RESCALE, m=40000, s=18)
        plan = plan_gemm(gemm, lane, word_nibbles(rows, cols), rows, cols)
        (ok, _, cycles, beats), = check_cases(rows, cols, 512, [plan], seed=2)
        assert ok and beats == (8 // rows) * (8 // cols) * red
        assert cycles - beats < 40, (cycles, beats)


def test_raw_results_keep_pace_with_short_tiles():
    """RAW results on 16-nibble words go out two to a write request: a tile of R * C * 8 /
    16 beats keeps the array at full rate (on the 8 x 16 array that is the backward-weight
    GEMM at batch 64)."""
    rng = np.random.default_rng(4)
    rows, cols = 2, 16
    red = rows * cols * 8 // word_nibbles(rows, cols)           # 16 beats a tile
    gemm = Gemm(rng.integers(0, 16, (8, red)), rng.integers(-8, 8, (red, 64)),
                Operand.UINT4, Operand.INT4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW), word_nibbles(rows, cols), rows, cols)
    (ok, _, cycles, beats), = check_cases(rows, cols, 512, [plan], seed=2)
    assert ok and beats == (8 // rows) * (64 // cols) * red
    assert cycles - beats < 40, (cycles, beats)
