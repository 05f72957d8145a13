"""The streamed layer-1 program of ``make bench-system`` (host/bench/streaming.py): its
schedule never loads into a buffer the GEMM beside it uses, every operand is whole before
the GEMM that reads it, and the program runs on ``emu://``. (The bench runs it on the
Verilator system model and checks the scratchpad against ``emu://`` bit for bit.)"""

import numpy as np
import pytest

from nibble.host.bench.streaming import CONFIG, K, layer1_program, run_program
from nibble.host.device.driver import Device
from nibble.host.golden.tiling import Gemm
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import Operand
from nibble.sim.system import emu_url

URL = emu_url(CONFIG)


def _regions(gemm, nib):
    """Word ranges [lo, hi) a GEMM's A, B and output occupy (rows x stride)."""
    def span(addr, stride, rows):
        return addr, addr + stride * rows
    return [span(gemm["a_addr"], gemm["a_stride"], gemm["l"]),
            span(gemm["b_addr"], gemm["b_stride"], gemm["l"]),
            span(gemm["out_addr"], gemm["out_stride"], gemm["n"])]


@pytest.fixture(scope="module")
def program():
    with Device.open(URL) as dev:
        prologue, tiles, words, last = layer1_program(dev, np.random.default_rng(1),
                                                      batches=2)
        run_program(dev, prologue, tiles)
        fo, go = (dev.download(last["bufs"][k]) for k in ("fo", "go"))
        return dev.word_nibbles, prologue, tiles, words, last, fo, go


def test_loads_never_touch_the_running_gemm(program):
    nib, _, tiles, *_ = program
    wpb = words_per_burst(nib)
    for tile in tiles:
        for dma in tile.prefetch:
            lo, hi = dma["mem_addr"], dma["mem_addr"] + dma["bursts"] * dma["rows"] * wpb
            for a, b in _regions(tile.gemm, nib):
                assert hi <= a or lo >= b, (tile.gemm, dma)


def test_operands_are_whole_before_their_gemm(program):
    """Replay the schedule: a word counts as loaded once a DMA wrote it; a GEMM's operands
    must have been loaded since the last GEMM that used the same buffer for other data."""
    nib, prologue, tiles, words, *_ = program
    wpb = words_per_burst(nib)
    stamp = np.full(words, -1)               # index of the tile a load ran beside (-1: prologue)

    def load(dma, when):
        lo = dma["mem_addr"]
        stamp[lo:lo + dma["bursts"] * dma["rows"] * wpb] = when

    for dma in prologue:
        load(dma, -1)
    assert np.all(stamp[:tiles[0].gemm["a_stride"] * tiles[0].gemm["l"]] == -1)
    for i, tile in enumerate(tiles):
        (a0, a1), (b0, b1), _ = _regions(tile.gemm, nib)
        assert np.all(stamp[a0:a1] < i) and np.all(stamp[b0:b1] < i)
        for dma in tile.prefetch:
            load(dma, i)
    assert len(tiles) == 2 * (4 + 13)        # 4 forward and 13 backward-weight tiles a batch


def test_the_transfers_fit_beside_the_compute(program):
    """Every tile's transfers are planned to take less time than its compute (the bench
    measures whether they do)."""
    _, _, tiles, *_ = program
    for tile in tiles:
        bursts = sum(d["bursts"] * d["rows"] for d in tile.prefetch)
        assert bursts * 8.2 <= tile.useful or len(tile.prefetch) == 1


def test_the_program_computes_the_last_batch(program):
    """The scratchpad at the end holds the last batch's forward output and its last
    backward-weight tile, as the same GEMMs run plainly (operands uploaded) give them."""
    *_, last, fo, go = program
    with Device.open(URL) as dev:
        fwd, _ = dev.matmul(Gemm(last["x"], last["w"], Operand.UINT4, Operand.INT4),
                            last["fwd_lane"])
        pairs = last["dy"].T                               # N x B: backward-weight's A
        j = (K - 1) // 64 * 64
        x = last["x"][:, j:]
        bww, _ = dev.matmul(Gemm(pairs >> 4, x, Operand.FP4, Operand.UINT4),
                            last["bww_lane"], a_pair=(pairs, 1))
    assert np.array_equal(fo.T, fwd)
    go = np.where(go >= 1 << 31, go - (1 << 32), go)
    assert np.array_equal(go[:K - j].T, bww)
