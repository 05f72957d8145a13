"""The element-wise unit (TRANSPOSE, UPDATE, REQUANT) in the Amaranth simulator, against
the emulator's reference semantics and the golden fixed-point update."""

import numpy as np
import pytest

from nibble.host.device.commands import vector_args
from nibble.host.device.emu import vector_apply, vector_check
from nibble.host.device.layout import pack, unpack
from nibble.host.golden.numerics import master_update, requantize, sawb_sums
from nibble.rtl.formats import (
    MASTER_MAX,
    MASTER_MIN,
    RAW_NIBBLES,
    VEC_OPS_ALL,
    VecOp,
    word_nibbles,
)
from nibble.rtl.transpose import Transposer
from nibble.rtl.vector import VEC_CFG, VectorUnit
from tests.support import random_memory, random_vector_cfgs, run_commands


def steady(op, nib):
    """(cycles an element, fill) of ``op`` on a memory that grants every request: one
    element a cycle, but UPDATE's two words an element where a word holds one master
    (its V and W words two writes; where it holds two, two elements' are two)."""
    return {VecOp.TRANSPOSE: (1, 6), VecOp.REQUANT: (1, 9),
            VecOp.UPDATE: (2, 11) if nib <= RAW_NIBBLES else (1, 12)}[op]


def run_unit(rows, cols, words, mem_bytes, cfgs, flaky=None, ops=VEC_OPS_ALL):
    """Run VECTOR commands on the RTL; returns (memory after, [(ok, sums, cycles)])."""
    unit = VectorUnit(rows, cols, words, ops)

    def outcome(ctx, ok):
        return ok, (ctx.get(unit.sum_abs), ctx.get(unit.sum_sq)), ctx.get(unit.cycles)

    return run_commands(unit, VEC_CFG, words, mem_bytes, cfgs, outcome, flaky)


@pytest.mark.parametrize("rows,cols,seed", [(2, 4, 1), (1, 4, 2), (4, 16, 3)])
def test_vector_matches_emulator(rows, cols, seed):
    """Random memory, random in-range commands (including wide and saturating masters):
    memory, sums and verdicts match the emulator's after each command."""
    words = 256
    rng = np.random.default_rng(seed)
    mem = random_memory(rng, words, rows, cols)
    cfgs = random_vector_cfgs(rng, rows, cols, words)
    want = bytearray(mem)
    want_sums = []
    for cfg in cfgs:
        assert vector_check(cfg, rows, cols, words)
        sums = vector_apply(want, cfg, rows, cols)
        want_sums.append(sums)
    got, results = run_unit(rows, cols, words, bytes(mem), cfgs)
    assert got == bytes(want)
    last = None
    for (ok, sums, cycles), want_s, cfg in zip(results, want_sums, cfgs, strict=True):
        assert ok
        last = want_s if want_s is not None else last
        if last is not None:
            assert sums == last
        per, fill = steady(cfg["op"], word_nibbles(rows, cols))
        assert cycles == per * cfg["rows"] * cfg["cols"] + fill, (cycles, cfg)


def test_a_unit_built_without_an_operation_refuses_it():
    """A unit with TRANSPOSE alone (the iCEBreaker's): its transposes are the full unit's;
    UPDATE and REQUANT fail its check, as an unknown operation does, and change nothing."""
    rows, cols, words, ops = 1, 4, 256, 1 << VecOp.TRANSPOSE
    rng = np.random.default_rng(5)
    mem = random_memory(rng, words, rows, cols)
    cfgs = random_vector_cfgs(rng, rows, cols, words)
    want = bytearray(mem)
    for cfg in cfgs:
        transpose = cfg["op"] == VecOp.TRANSPOSE
        assert vector_check(cfg, rows, cols, words, ops) == transpose
        if transpose:
            vector_apply(want, cfg, rows, cols)
    got, results = run_unit(rows, cols, words, bytes(mem), cfgs, ops=ops)
    assert got == bytes(want)
    assert [ok for ok, _, _ in results] == [c["op"] == VecOp.TRANSPOSE for c in cfgs]


def test_vector_waits_for_grants():
    """A memory that grants requests only on some cycles: the same memory and sums as the
    emulator, in more cycles than the steady ones (:func:`steady`)."""
    rows, cols, words = 2, 4, 256
    rng = np.random.default_rng(7)
    mem = random_memory(rng, words, rows, cols)
    cfgs = random_vector_cfgs(rng, rows, cols, words)
    want = bytearray(mem)
    for cfg in cfgs:
        vector_apply(want, cfg, rows, cols)
    got, results = run_unit(rows, cols, words, bytes(mem), cfgs, flaky=3)
    assert got == bytes(want) and all(ok for ok, _, _ in results)
    nib = word_nibbles(rows, cols)
    assert sum(c for _, _, c in results) > sum(
        steady(c["op"], nib)[0] * c["rows"] * c["cols"] + steady(c["op"], nib)[1]
        for c in cfgs)


def test_vector_range_checks():
    """Each rejected command is rejected by both, and leaves memory alone."""
    rows, cols, words = 2, 4, 64
    nib = word_nibbles(rows, cols)
    cfgs = [
        vector_args(VecOp.TRANSPOSE, 0, 3, (0, 1), (0, 1)),              # empty
        vector_args(VecOp.TRANSPOSE, 3, 0, (0, 1), (0, 1)),
        vector_args(3, 1, 1, (0, 1), (0, 1)),                              # no such op
        vector_args(VecOp.TRANSPOSE, 4, 4, (62, 1), (0, 1)),             # A past the end
        vector_args(VecOp.TRANSPOSE, 4, 4, (0, 1), (61, 1)),             # B past the end
        vector_args(VecOp.UPDATE, 2, 2, (0, 2), (10, 2), 61),            # C past the end
        vector_args(VecOp.UPDATE, 2, 2, (0, 2), (10, 1), 20),            # W rows overlap
        vector_args(VecOp.REQUANT, 1, 9, (0, 9), (20, 1)),               # 9 codes in 1 word
        vector_args(VecOp.REQUANT, 1, 8, (0, 8), (56, 1)),               # fine: last words
        vector_args(VecOp.UPDATE, 3, 1, (61, 1), (0, 1), 3),             # fine: to the end
    ]
    mem = bytes(words * nib // 2)
    want = bytearray(mem)
    verdicts = []
    for cfg in cfgs:
        ok = vector_check(cfg, rows, cols, words)
        verdicts.append(int(ok))
        if ok:
            vector_apply(want, cfg, rows, cols)
    assert verdicts == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    got, results = run_unit(rows, cols, words, mem, cfgs)
    assert [r[0] for r in results] == verdicts
    assert got == bytes(want)


def test_update_golden_corners():
    """The fixed-point update by hand: rounding ties, saturation, and s = 0 / 63."""
    g = np.array([3, -3, 0, 0, MASTER_MAX, MASTER_MIN])
    w = np.array([0, 0, 0, MASTER_MIN, MASTER_MIN, MASTER_MAX])
    v = np.array([0, 0, 1 << 16, 1, 0, 0])
    # m/2^s = 1/2: 3/2 = 1.5 -> 2, -3/2 = -1.5 -> -1 (half up); v*mu: (2^16*2^15+2^15)>>16
    w2, v2 = master_update(g, w, v, 1 << 15, 1 << 15, 16)
    assert list(v2[:3]) == [2, -1, 1 << 15]
    assert list(w2[:3]) == [-2, 1, -(1 << 15)]
    ws, vs = master_update(g, w, v, 0, 2, 0)                      # saturate both ways
    assert vs[4] == MASTER_MAX and ws[4] == MASTER_MIN
    assert vs[5] == MASTER_MIN and ws[5] == MASTER_MAX
    _, v3 = master_update(g, w, v, 0, 1, 0)                      # s = 0: v' = g
    assert list(v3) == list(np.clip(g, MASTER_MIN, MASTER_MAX))
    _, v4 = master_update(g, w, v, 0, (1 << 16) - 1, 63)         # everything rounds to 0
    assert not v4.any()
    assert list(requantize(np.array([7 << 20, -(15 << 19), 1 << 19, -(1 << 19)]),
                           1 << 15, 35)) == [7, -7, 1, 0]          # ties: 0.5 -> 1, -0.5 -> 0
    assert sawb_sums(np.array([256, -256, 255, -1])) == (3, 3)     # -1 >> 8 = -1


def test_update_roundtrip_pack():
    """Masters survive the memory layout: 8-nibble elements, sign-extended on read."""
    nib = 8
    w = np.array([[MASTER_MIN, -1, 0, MASTER_MAX]])
    raw = pack(w & 0xFFFFFFFF, 8, nib)
    assert (unpack(raw, 1, 4, 8, nib, None, 32) == w).all()


def run_transposer(rows, cols, words, mem_bytes, cfgs, flaky=None):
    """Run VECTOR commands on the TRANSPOSE-only unit; returns (memory, [(ok, cycles)])."""
    unit = Transposer(rows, cols, words)
    return run_commands(unit, VEC_CFG, words, mem_bytes, cfgs,
                        lambda ctx, ok: (ok, ctx.get(unit.cycles)), flaky)


@pytest.mark.parametrize("rows,cols,flaky", [(1, 8, None), (2, 4, None), (1, 8, 3),
                                             (4, 16, 4)])
def test_transposer_is_the_units_transpose(rows, cols, flaky):
    """The lean TRANSPOSE-only unit (rtl/transpose.py) against the emulator: random
    transposes of codes and FP4 pairs at random places, and the other operations refused
    (unchanged memory), on a memory that grants every request or only some; n + 3 cycles
    for n elements when it grants them all."""
    words = 256
    rng = np.random.default_rng([rows, cols, flaky or 0])
    mem = random_memory(rng, words, rows, cols)
    cfgs = random_vector_cfgs(rng, rows, cols, words)
    cfgs += [c for c in random_vector_cfgs(rng, rows, cols, words)
             if c["op"] == VecOp.TRANSPOSE]
    want = bytearray(mem)
    ops = 1 << VecOp.TRANSPOSE
    for cfg in cfgs:
        if vector_check(cfg, rows, cols, words, ops):
            vector_apply(want, cfg, rows, cols)
    got, results = run_transposer(rows, cols, words, bytes(mem), cfgs, flaky)
    assert got == bytes(want)
    assert [ok for ok, _ in results] == [c["op"] == VecOp.TRANSPOSE for c in cfgs]
    for (ok, cycles), cfg in zip(results, cfgs, strict=True):
        if ok and flaky is None:
            assert cycles == cfg["rows"] * cfg["cols"] + 3, (cycles, cfg)


def test_transposer_rejects_out_of_range():
    """Buffers past the memory's end, overlapping rows of B, zero dimensions: refused, as
    the emulator's check refuses them, and nothing written."""
    rows, cols, words = 1, 8, 256
    rng = np.random.default_rng(11)
    mem = random_memory(rng, words, rows, cols)
    base = vector_args(VecOp.TRANSPOSE, 4, 9, (0, 2), (64, 1))
    cfgs = [dict(base, b_addr=words - 8), dict(base, b_stride=0), dict(base, rows=0),
            dict(base, a_addr=words - 1), dict(base, pair=1, rows=5, b_stride=1), base]
    got, results = run_transposer(rows, cols, words, bytes(mem), cfgs)
    want = bytearray(mem)
    verdicts = [vector_check(c, rows, cols, words) for c in cfgs]
    assert verdicts == [False, False, False, False, False, True]
    vector_apply(want, base, rows, cols)
    assert [ok for ok, _ in results] == verdicts and got == bytes(want)
