"""Array utilization with the operands streamed from the SDRAM: does the memory hierarchy
keep the array fed?

The Fashion-MNIST MLP's layer 1 (784 -> 128) at batch 64, forward and backward-weight, for
several batches in a row, on a device in the ULX3S configuration (8 x 16 array). Every
operand lives in the SDRAM; the host plans the transfers (VTA-style: load, compute, store
as commands) and the scratchpad holds

====================  =========================================  ==========================
buffer                what                                       words (8 x 16, batch 64)
====================  =========================================  ==========================
``xa0``, ``xa1``      X^T codes, forward's A (784 x 64), by batch 2 x 3,136
``wb0``, ``wb1``      W^T tiles of 32 columns, forward's B       2 x 1,568
``fo``                the forward's UINT4 output (128 x 64)      512
``da``                dY^T FP4 pairs, backward-weight's A        1,024
``xb0``, ``xb1``      X tiles of 64 columns, backward-weight's B 2 x 256
``go``                a dW^T tile (64 x 128 RAW), on chip        4,096
====================  =========================================  ==========================

15,552 words in all: the schedule needs a 16K-word scratchpad (an 8K one cannot hold the
forward's X^T beside two weight tiles). The host sends, for each GEMM tile, the GEMM and
then the transfers of later tiles' operands: the decoder queues the GEMM until every unit
is idle (so it starts the cycle the previous tile and its loads have ended) and starts each
DMA at once while the GEMM runs (into a buffer the running GEMM does not read).

Where the loads go is set by the write port: tensor memory has one, and a backward-weight
tile writes a RAW word every cycle (64 x 128 results of 32 bits in 4,096 cycles), so a load
beside it only gets the cycles the lanes leave. The schedule therefore puts the big loads
(the next batch's X^T, the next weight tiles, dY^T) beside the forward tiles, which write
almost nothing, and only each backward-weight tile's next X tile (256 words) beside the
backward-weight tiles; a tile's loads are planned to fit 80 % of the SDRAM time and of the
write-port time its GEMM leaves free.

The weight gradient tile stays on chip (the element-wise update would consume it there);
storing RAW dW to the SDRAM is 4 bytes per weight, twice the array's rate on this GEMM,
which is what bounds the update (see docs/architecture.md, External memory).

``sdram_array_utilization`` = useful MAC cycles (``M * L * N / (R * C)`` summed over the
tiles) over the device cycles from the first tile's start to the last one's end, the first
batch's loads (the pipeline's prologue) before that window and reported apart. The same
program runs on ``emu://`` and the final scratchpad must match it bit for bit.
"""

from dataclasses import dataclass, field

import numpy as np

from nibble.host.device.commands import gemm_args, lane_cfg
from nibble.host.device.layout import Buffer, pack
from nibble.host.golden.tiling import code_bits
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import Operand, OutputPath
from nibble.sim.system import board_config, emu_url

__all__ = ["CONFIG", "layer1_program", "measure_streaming", "run_program"]

#: The device configuration: the ULX3S's (8 x 16 array, 16K-word scratchpad, its SDRAM).
CONFIG = board_config("ulx3s-85f")
K, N, BATCH = 784, 128, 64           # layer 1 of the Fashion-MNIST MLP
FWD_TILE, BWW_TILE = 32, 64          # columns of W^T (forward) and X (backward-weight)


@dataclass
class Tile:
    """One GEMM and the transfers that start while it runs."""
    gemm: dict
    useful: float                    # M * L * N / (R * C)
    out_words: int                   # words its GEMM writes
    prefetch: list = field(default_factory=list)     # DMA_ARGS values


def _buffers(nib):
    """The scratchpad map (see the module docstring); returns {name: Buffer}."""
    out, addr = {}, 0

    def put(name, rows, elems, en):
        nonlocal addr
        stride = -(-elems * en // nib)
        out[name] = Buffer(addr, rows, elems, en, stride)
        addr += rows * stride

    put("xa0", K, BATCH, 1)
    put("xa1", K, BATCH, 1)
    put("wb0", K, FWD_TILE, 1)
    put("wb1", K, FWD_TILE, 1)
    put("fo", N, BATCH, 1)
    put("da", BATCH, N, 2)
    put("xb0", BATCH, BWW_TILE, 1)
    put("xb1", BATCH, BWW_TILE, 1)
    put("go", BWW_TILE, N, 8)
    return out, addr


def layer1_program(dev, rng, batches=3):
    """Upload ``batches`` batches of random layer-1 operands to the SDRAM (tiled the way
    the scratchpad buffers hold them) and return (prologue DMAs, tiles, scratch words, the
    last batch's operands: ``x`` (B x K codes), ``w`` (K x N, W^T), ``dy`` (B x N pairs))."""
    nib = dev.word_nibbles
    bufs, words = _buffers(nib)
    if words > dev.mem_words:
        raise ValueError(f"the schedule needs {words:,} words of scratchpad; "
                         f"{dev.url} has {dev.mem_words:,}")
    staging = (bufs["go"].addr, bufs["go"].words)
    ext = [0]

    def upload(buf, values, e):
        """Put ``values`` in the SDRAM in ``buf``'s layout; returns its first burst."""
        raw = pack(values, e, nib, buf.stride)
        raw += bytes(-len(raw) % 16)
        at = ext[0]
        dev.ext_write(at, raw, staging)
        ext[0] += len(raw) // 16
        return at

    w = rng.integers(-8, 8, (K, N))                            # W^T codes
    w_at = [upload(bufs["wb0"], code_bits(w[:, j:j + FWD_TILE]), 1)
            for j in range(0, N, FWD_TILE)]
    fwd_lane = lane_cfg(OutputPath.RESCALE, m=40000, s=20, relu=1)
    bww_lane = lane_cfg(OutputPath.RAW, phase=1)
    per = dev.rows * dev.cols
    n_fwd = len(w_at)
    tiles, loads = [], []          # loads: (earliest tile, deadline tile, buffer, burst)
    for b in range(batches):
        x, dy = rng.integers(0, 16, (BATCH, K)), rng.integers(0, 256, (BATCH, N))
        xa = bufs[f"xa{b % 2}"]
        xa_at = upload(xa, x.T, 1)
        da_at = upload(bufs["da"], dy, 2)
        xb_at = [upload(bufs["xb0"], x[:, j:j + BWW_TILE], 1) for j in range(0, K, BWW_TILE)]
        first = len(tiles)
        # X^T: from the last batch's first tile on (into the other buffer); the first
        # weight tile once the last batch's forward has read it for the last time
        prev = first - n_fwd - len(xb_at)                # the last batch's first tile
        last_wb0 = (n_fwd - 1) // 2 * 2                  # its last forward tile on wb0
        loads += [(prev if b else -1, first, xa, xa_at),
                  (prev + last_wb0 + 1 if b else -1, first, bufs["wb0"], w_at[0])]
        for t, j in enumerate(range(0, N, FWD_TILE)):
            out = Buffer(bufs["fo"].addr + j * bufs["fo"].stride, FWD_TILE, BATCH, 1,
                         bufs["fo"].stride)
            if t:
                loads.append((first + t - 1, first + t, bufs[f"wb{t % 2}"], w_at[t]))
            tiles.append(Tile(gemm_args(xa, bufs[f"wb{t % 2}"], out, (BATCH, K, FWD_TILE),
                                        Operand.UINT4, Operand.INT4, fwd_lane),
                              BATCH * K * FWD_TILE / per, out.rows * out.stride))
        bww = len(tiles)
        loads.append((first, bww, bufs["da"], da_at))
        for t, j in enumerate(range(0, K, BWW_TILE)):
            n = min(BWW_TILE, K - j)
            loads.append((bww + t - 1, bww + t, bufs[f"xb{t % 2}"], xb_at[t]))
            tiles.append(Tile(gemm_args(bufs["da"], bufs[f"xb{t % 2}"], bufs["go"],
                                        (N, BATCH, n), Operand.FP4, Operand.UINT4,
                                        bww_lane, a_sel=1), N * BATCH * n / per,
                              n * bufs["go"].stride))
    prologue = _schedule(tiles, loads, words_per_burst(nib))
    return prologue, tiles, words, {"x": x, "w": w, "dy": dy, "fwd_lane": fwd_lane,
                                    "bww_lane": bww_lane, "bufs": bufs}


#: A tile's transfers are planned to take at most this share of its compute time (the
#: DMA moves a burst in ~8.2 cycles, measured by make bench-system).
DMA_SHARE, CYCLES_PER_BURST = 0.8, 8.2


def _schedule(tiles, loads, wpb):
    """Spread the loads over the tiles that run while they may happen: each load starts
    beside a tile from its ``earliest`` on and must end before its ``deadline`` tile; a
    tile takes loads (split into pieces) until its transfer budget is spent, and a load
    due at the next tile goes whole. Loads due before the first tile are the prologue."""
    pending = sorted(([e, d, buf, at, 0] for e, d, buf, at in loads), key=lambda x: x[1])
    prologue = []

    def take(item, bursts, into):
        _, _, buf, at, done = item
        total = buf.words // wpb
        n = min(bursts, total - done)
        into.append({"store": 0, "rows": 1, "bursts": n, "mem_addr": buf.addr + done * wpb,
                     "ext_addr": at + done})
        item[4] += n
        return n

    for item in [p for p in pending if p[1] == 0]:
        take(item, 1 << 30, prologue)
    for i, tile in enumerate(tiles):
        budget = DMA_SHARE * min(tile.useful / CYCLES_PER_BURST,
                                 (tile.useful - tile.out_words) / wpb)
        for item in pending:
            total = item[2].words // wpb
            if item[4] == total or item[0] > i:
                continue
            if item[1] == i + 1:
                budget -= take(item, 1 << 30, tile.prefetch)
            elif budget >= 1:
                budget -= take(item, int(budget), tile.prefetch)
    return prologue


def run_program(dev, prologue, tiles):
    """Run the prologue, then every tile as queued commands; returns (prologue cycles,
    window cycles)."""
    c0 = dev.stats()["cycles"]
    for cfg in prologue:
        dev.dma(cfg, wait=False)
    c1 = dev.wait()["cycles"]
    for tile in tiles:
        dev.gemm(tile.gemm, wait=False)      # queued until the last tile and its loads end
        for cfg in tile.prefetch:
            dev.dma(cfg, wait=False)         # starts at once, beside the GEMM
    c2 = dev.wait()["cycles"]
    return c1 - c0, c2 - c1


def measure_streaming(url, reference="emu://", batches=3, seed=0):
    """Run the program on ``url`` and on ``reference`` (both in :data:`CONFIG`); returns
    the figures (see the module docstring)."""
    from nibble.host.device.driver import Device

    results = []
    for where in (url, reference):
        if where.startswith("emu://"):
            where = emu_url(CONFIG)
        with Device.open(where, timeout=10) as dev:
            prologue, tiles, words, _ = layer1_program(dev, np.random.default_rng(seed),
                                                       batches)
            pro, window = run_program(dev, prologue, tiles)
            results.append((dev.read(0, words), pro, window, tiles, dev))
    (got, pro, window, tiles, dev), (want, *_) = results
    if not window:
        raise ValueError(f"{url} counts no cycles: run the program on a clocked device")
    useful = sum(t.useful for t in tiles)
    gemm_tiles = len(tiles)
    loads = sum(c["bursts"] * c["rows"] for t in tiles for c in t.prefetch) * 16
    return {
        "array": f"{dev.rows}x{dev.cols}", "scratch_words": dev.mem_words,
        "batches": batches, "gemm_tiles": gemm_tiles, "useful_mac_cycles": round(useful),
        "window_cycles": window, "prologue_cycles": pro, "bytes_loaded": loads,
        "sdram_array_utilization": round(useful / window, 4),
        "utilization_with_prologue": round(useful / (window + pro), 4),
        "sdram_bytes_per_cycle": round(loads / window, 3),
        "matches_emu": got == want,
    }
