"""The GEMM engine in the Amaranth simulator, against the emulator's reference semantics."""

import dataclasses
import zlib

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from nibble.host.device.commands import plan_gemm
from nibble.host.device.emu import gemm_apply, gemm_check
from nibble.host.device.packing import to_int
from nibble.rtl.engine import GEMM_CFG, GemmEngine
from nibble.rtl.formats import MaskMode, Operand, OutputPath, word_nibbles
from nibble.rtl.memory import BlockRAM
from nibble.sim.stimuli import MODE_KINDS, lane_cfg, random_gemm


class EngineBench(wiring.Component):
    def __init__(self, rows, cols, words):
        self.engine = GemmEngine(rows, cols, words)
        self.mem = BlockRAM(words, self.engine.nib)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.engine = e = self.engine
        m.submodules.mem = mem = self.mem
        wiring.connect(m, e.bus, mem.bus)
        return m


def preload(ctx, tmem, mem_bytes):
    """Fill every copy of a TensorMemory with ``mem_bytes`` (from a testbench)."""
    wb = tmem.nibbles // 2
    for addr in range(tmem.words):
        word = int.from_bytes(mem_bytes[addr * wb:(addr + 1) * wb], "little")
        if word:
            for copy in tmem.copies:
                ctx.set(copy.data[addr], word)


def dump(ctx, tmem):
    """The bytes of a TensorMemory (its first copy; the copies are written together)."""
    wb = tmem.nibbles // 2
    return b"".join(ctx.get(tmem.copies[0].data[addr]).to_bytes(wb, "little")
                    for addr in range(tmem.words))


def run_engine(rows, cols, words, mem_bytes, cfgs):
    """Run GEMM commands on the RTL; returns (memory bytes after, [(ok, absmax, cycles,
    beats)])."""
    bench = EngineBench(rows, cols, words)
    results = []
    out = bytearray(mem_bytes)

    async def tb(ctx):
        preload(ctx, bench.mem, mem_bytes)
        e = bench.engine
        for cfg in cfgs:
            ctx.set(e.cfg.as_value(), to_int(GEMM_CFG, cfg))
            ctx.set(e.start, 1)
            await ctx.tick()
            ctx.set(e.start, 0)
            (ok,) = await ctx.tick().sample(e.ok).until(e.checked)
            if ok:
                await ctx.tick().until(~e.busy)
                await ctx.tick().repeat(4)        # the absmax tree
            results.append((int(ok), ctx.get(e.absmax), ctx.get(e.cycles), ctx.get(e.beats)))
        out[:] = dump(ctx, bench.mem)

    sim = Simulator(bench)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return bytes(out), results


def random_lane(rng, path, phase):
    if path is OutputPath.RAW:
        return lane_cfg(OutputPath.RAW, phase=phase)
    if path is OutputPath.RESCALE:
        return lane_cfg(OutputPath.RESCALE, phase=phase, m=int(rng.integers(1 << 15, 1 << 16)),
                        s=int(rng.integers(14, 22)), relu=int(rng.integers(2)),
                        out_signed=int(rng.integers(2)))
    return lane_cfg(OutputPath.LOG4, phase=phase, exp=int(rng.integers(-3, 12)),
                    mask=MaskMode(int(rng.integers(3))))


def one_case(rng, rows, cols, words, mode, path, shape, spacing=0):
    if path is OutputPath.RESCALE:
        mode = type(mode).FORWARD           # the rescale unit takes forward accumulators
    kinds = MODE_KINDS[mode][int(rng.integers(len(MODE_KINDS[mode])))]
    phase = 1 if mode.name == "BACKWARD_WEIGHT" else 0
    gemm = random_gemm(rng, kinds, *shape)
    lane = random_lane(rng, path, phase)
    nib = word_nibbles(rows, cols)
    mask = rng.integers(0, 16, (shape[0], shape[2]))
    a_pair = None
    if kinds[0] is Operand.FP4 and rng.random() < 0.5:
        sel = int(rng.integers(2))
        other = rng.integers(0, 16, gemm.a.shape)
        pairs = np.where(sel, other | (gemm.a << 4), gemm.a | (other << 4))
        a_pair = (pairs, sel)
    plan = plan_gemm(gemm, lane, nib, rows, cols, base=int(rng.integers(0, 8)),
                     mask_codes=mask, a_pair=a_pair, spacing=spacing)
    return plan


def check_cases(rows, cols, words, plans, seed):
    rng = np.random.default_rng(seed)
    nib = word_nibbles(rows, cols)
    mem = bytearray(rng.integers(0, 256, words * nib // 2, dtype=np.uint8).tobytes())
    for plan in plans:
        for buf, raw in plan.uploads:
            mem[buf.addr * nib // 2:buf.addr * nib // 2 + len(raw)] = raw
    want = bytearray(mem)
    expect = []
    for plan in plans:
        ok = gemm_check(plan.cfg, rows, cols, words)
        absmax = gemm_apply(want, plan.cfg, rows, cols) if ok else None
        expect.append((ok, absmax))
    got_mem, got = run_engine(rows, cols, words, bytes(mem), [p.cfg for p in plans])
    for (ok, absmax), (g_ok, g_absmax, cycles, beats) in zip(expect, got, strict=True):
        assert g_ok == ok
        if ok:
            assert g_absmax == absmax
            assert beats > 0 and cycles >= beats
    assert got_mem == bytes(want)
    return got


@pytest.mark.parametrize("path", list(OutputPath))
@pytest.mark.parametrize("mode", ["FORWARD", "BACKWARD_DATA", "BACKWARD_WEIGHT"])
def test_engine_matches_golden(mode, path):
    from nibble.rtl.formats import GemmMode
    rng = np.random.default_rng([zlib.crc32(mode.encode()), int(path)])
    for rows, cols in [(2, 4), (1, 4)]:
        shape = tuple(int(x) for x in rng.integers(1, 11, 3))
        plan = one_case(rng, rows, cols, 512, GemmMode[mode], path, shape,
                        spacing=int(rng.integers(0, 3)))
        check_cases(rows, cols, 512, [plan], seed=int(rng.integers(1 << 30)))


def test_engine_rejects_out_of_range():
    from nibble.rtl.formats import GemmMode
    rng = np.random.default_rng(5)
    plan = one_case(rng, 2, 4, 512, GemmMode.FORWARD, OutputPath.RESCALE, (4, 6, 8))
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
    from nibble.host.golden.tiling import Gemm
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
