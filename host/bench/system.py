"""``make bench-system``: the full-system model's speed, the array's utilization on the
reference MLPs' GEMMs, and the link's efficiency for bulk transfers.

Everything is measured on the Verilator system model through the driver, over its socket:

* ``sim_cycles_per_second``: device cycles (its free-running counter, read with STATS) per
  wall-clock second while a large GEMM runs, socket service included;
* ``array_utilization``: per GEMM, useful MAC cycles (``M * L * N / (R * C)``) over the
  engine's busy cycles (STATS ``gemm_cycles``), for the forward, backward-data and
  backward-weight GEMMs of every layer of the reference MLPs at batch 64;
* ``link_efficiency``: payload bytes over wire bytes (requests and replies, framing,
  stuffing and CRC included) for a bulk WRITE and a bulk READ of random data;
* ``sdram_efficiency``: bytes a DMA moved per cycle (STATS ``dma_cycles``) over the SDRAM's
  peak of 2 bytes a cycle (16 bits at the system clock), for long LOADs and STOREs and for
  tiles whose rows each open a new SDRAM row, with the data checked by reading it back;
* ``update_cycles_per_weight``: STATS ``vec_cycles`` of an UPDATE over the Fashion-MNIST
  layer-1 weights (784 x 128) over their number, beside REQUANT and a batch's TRANSPOSE;
  ``update_cycles_per_weight_ulx3s`` the same in the ULX3S configuration (its 16-nibble
  words hold two masters, which the unit writes as one: 48 of the layer's rows, what its
  scratchpad holds);
* ``sdram_array_utilization``: the Fashion-MNIST layer-1 forward and backward-weight GEMMs
  with every operand streamed from the SDRAM, on a second model in the ULX3S configuration
  (:mod:`nibble.host.bench.streaming`), checked bit for bit against ``emu://``.
"""

import itertools
import time

import numpy as np
from tqdm import tqdm

from nibble.host.device.commands import lane_cfg, plan_gemm, vector_args
from nibble.host.device.driver import Device
from nibble.host.device.layout import row_words
from nibble.host.golden.tiling import Gemm
from nibble.host.report import markdown_table, publish
from nibble.host.training.train import DEFAULT_MODELS
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import MaskMode, Operand, OutputPath, VecOp

__all__ = ["bench_system"]

BATCH = 64


def mlp_gemms(sizes, batch=BATCH):
    """(name, M, L, N, kinds, lane) of every GEMM of a training step of an MLP."""
    out = []
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        fwd = lane_cfg(OutputPath.RESCALE, m=40000, s=20, relu=1)
        out.append((f"L{i + 1} forward", batch, k, n, (Operand.UINT4, Operand.INT4), fwd))
        if i:      # the first layer's input gradient is not needed
            bwd = lane_cfg(OutputPath.LOG4, exp=4, mask=MaskMode.RELU)
            out.append((f"L{i + 1} backward-data", batch, n, k, (Operand.FP4, Operand.INT4),
                        bwd))
        out.append((f"L{i + 1} backward-weight", n, batch, k, (Operand.FP4, Operand.UINT4),
                    lane_cfg(OutputPath.RAW, phase=1)))
    return out


def _random(rng, kind, shape):
    if kind is Operand.INT4:
        return rng.integers(-8, 8, shape)
    return rng.integers(0, 16, shape)


def measure_utilization(dev, rng, models, progress=True):
    rows = []
    jobs = [(name, *g) for name, sizes in models.items() for g in mlp_gemms(sizes)]
    for model, label, m, red, n, kinds, lane in tqdm(jobs, desc="GEMMs", disable=not progress):
        gemm = Gemm(_random(rng, kinds[0], (m, red)), _random(rng, kinds[1], (red, n)), *kinds)
        mask = rng.integers(0, 16, (m, n))
        plan = plan_gemm(gemm, lane, dev.word_nibbles, dev.rows, dev.cols, mask_codes=mask)
        for buf, raw in plan.uploads:
            dev.upload(buf, raw)
        stats = dev.gemm(plan.cfg)
        useful = m * red * n / (dev.rows * dev.cols)
        multiple = m % dev.rows == 0 and n % dev.cols == 0 and red >= dev.cols
        rows.append({"model": model, "gemm": label, "m": m, "l": red, "n": n,
                     "path": OutputPath(lane["path"]).name, "beats": stats["beats"],
                     "cycles": stats["gemm_cycles"],
                     "utilization": round(useful / stats["gemm_cycles"], 4),
                     "dims_multiple": multiple})
    return rows


def measure_speed(dev, rng):
    """Device cycles per wall second while one large GEMM runs."""
    gemm = Gemm(rng.integers(0, 16, (256, 512)), rng.integers(-8, 8, (512, 256)),
                Operand.UINT4, Operand.INT4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RESCALE, m=40000, s=22), dev.word_nibbles,
                     dev.rows, dev.cols)
    for buf, raw in plan.uploads:
        dev.upload(buf, raw)
    before = dev.stats()
    t0 = time.monotonic()
    dev.gemm(plan.cfg)
    seconds = time.monotonic() - t0
    after = dev.stats()
    return {"cycles": after["cycles"] - before["cycles"], "seconds": round(seconds, 3),
            "gemm_cycles": after["gemm_cycles"]}


SDRAM_PEAK_BYTES_PER_CYCLE = 2


def measure_sdram(dev, rng, bursts=2048):
    """DMA bandwidth on the simulated device's SDRAM (see the module docstring)."""
    if not dev.ext_bursts:
        return None
    wb = dev.word_bytes
    words = bursts * words_per_burst(dev.word_nibbles)
    data = rng.integers(0, 256, words * wb, dtype=np.uint8).tobytes()
    dev.write(0, data)
    runs = []
    for label, cfg in (
            ("STORE, one row of bursts", {"store": 1, "rows": 1, "bursts": bursts,
                                          "mem_addr": 0, "ext_addr": 0}),
            ("LOAD, one row of bursts", {"store": 0, "rows": 1, "bursts": bursts,
                                         "mem_addr": words, "ext_addr": 0}),
            ("LOAD, 64 rows of 4 bursts, 257 bursts apart (a new SDRAM row each)",
             {"store": 0, "rows": 64, "bursts": 4, "mem_addr": 2 * words, "ext_addr": 0,
              "ext_stride": 257})):
        stats = dev.dma(cfg)
        moved = cfg["rows"] * cfg["bursts"] * 16
        runs.append({"transfer": label, "bytes": moved, "cycles": stats["dma_cycles"],
                     "bytes_per_cycle": round(moved / stats["dma_cycles"], 3),
                     "efficiency": round(moved / stats["dma_cycles"]
                                         / SDRAM_PEAK_BYTES_PER_CYCLE, 3)})
    if dev.read(words, words) != data:
        raise AssertionError("the SDRAM round trip changed the data")
    return runs


def measure_vector(dev, k=784, n=128, batch=BATCH):
    """The element-wise unit on the Fashion-MNIST MLP's layer 1 (``k`` x ``n`` weights):
    UPDATE of the masters and momenta, REQUANT of the masters into codes, TRANSPOSE of a
    batch of input codes; STATS ``vec_cycles`` per element. The cycles do not depend on
    the values (tests/test_vector.py checks those), so the memory keeps what it holds."""
    nib = dev.word_nibbles
    rw = row_words(n, 8, nib)
    g, w_, v = ((i * k * rw, rw) for i in range(3))
    q = (3 * k * rw, row_words(n, 1, nib))
    x = (q[0] + k * q[1], row_words(k, 1, nib))
    xt = (x[0] + batch * x[1], row_words(batch, 1, nib))
    if xt[0] + k * xt[1] > dev.mem_words:
        return None
    runs = []
    for label, cfg in (
            ("UPDATE (masters, momenta)", vector_args(VecOp.UPDATE, k, n, g, w_, v[0],
                                                      mu=58982, m=40000, s=30)),
            ("REQUANT (masters into codes)", vector_args(VecOp.REQUANT, k, n, w_, q,
                                                         m=40000, s=30)),
            ("TRANSPOSE (input codes)", vector_args(VecOp.TRANSPOSE, batch, k, x, xt))):
        cycles = dev.vector(cfg)["vec_cycles"]
        elements = cfg["rows"] * cfg["cols"]
        runs.append({"operation": label, "rows": cfg["rows"], "cols": cfg["cols"],
                     "elements": elements, "cycles": cycles,
                     "cycles_per_element": round(cycles / elements, 4)})
    return runs


def measure_link(dev, rng, nbytes=256 * 1024):
    data = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    out = {}
    for name, op in (("write", lambda: dev.write(0, data)),
                     ("read", lambda: dev.read(0, nbytes // dev.word_bytes))):
        w0 = dev.wire_sent + dev.wire_received
        t0 = time.monotonic()
        op()
        seconds = time.monotonic() - t0
        wire = dev.wire_sent + dev.wire_received - w0
        out[name] = {"payload_bytes": nbytes, "wire_bytes": wire,
                     "efficiency": round(nbytes / wire, 4), "sim_seconds": round(seconds, 3)}
    back = dev.read(0, nbytes // dev.word_bytes)
    assert back == data, "bulk READ did not return the bulk WRITE"
    return out


UTIL_COLUMNS = [("model", "model", "{}"), ("GEMM", "gemm", "{}"), ("M", "m", "{}"),
                ("L", "l", "{}"), ("N", "n", "{}"), ("output", "path", "{}"),
                ("beats", "beats", "{:,}"), ("engine cycles", "cycles", "{:,}"),
                ("utilization", "utilization", "{:.3f}"),
                ("dims multiples of the array", "dims_multiple", "{}")]


def bench_system(out_dir="build/bench", docs=None, progress=True, seed=0):
    from nibble.sim.system import DEFAULTS, serve

    rng = np.random.default_rng(seed)
    with serve() as url, Device.open(url) as dev:
        config = {"rows": dev.rows, "cols": dev.cols, "word_nibbles": dev.word_nibbles,
                  "mem_words": dev.mem_words, "url": url, "sdram": DEFAULTS["sdram"],
                  "ext_bursts": dev.ext_bursts}
        speed = measure_speed(dev, rng)
        link = measure_link(dev, rng)
        sdram = measure_sdram(dev, rng)
        vector = measure_vector(dev)
        util = measure_utilization(dev, rng, DEFAULT_MODELS, progress)
    from nibble.host.bench.streaming import CONFIG, measure_streaming
    with serve(**CONFIG) as url:
        streaming = measure_streaming(url)
        with Device.open(url) as dev:
            vector_ulx3s = measure_vector(dev, k=48)
    streaming["harness_report"] = serve.last_report
    if not streaming["matches_emu"]:
        raise AssertionError("the streamed GEMMs' scratchpad differs from emu://")
    harness = serve.last_report
    multiples = [r["utilization"] for r in util if r["dims_multiple"]]
    result = {
        "config": config,
        "sim_cycles_per_second": round(speed["cycles"] / speed["seconds"]),
        "speed_run": speed,
        "harness_report": harness,
        "array_utilization": round(min(multiples), 4) if multiples else None,
        "array_utilization_all": util,
        "link_efficiency": round(min(link["write"]["efficiency"],
                                     link["read"]["efficiency"]), 4),
        "link": link,
        "sdram": sdram,
        "sdram_efficiency": sdram and min(r["efficiency"] for r in sdram[:2]),
        "sdram_array_utilization": streaming["sdram_array_utilization"],
        "vector": vector,
        "update_cycles_per_weight": vector and vector[0]["cycles_per_element"],
        "vector_ulx3s": vector_ulx3s,
        "update_cycles_per_weight_ulx3s": vector_ulx3s and vector_ulx3s[0]["cycles_per_element"],
        "streaming": streaming,
        "projected_link_mbytes_per_s": {
            f"{name} ({baud / 1e6:g} Mbaud)": round(baud / 10 * min(
                link["write"]["efficiency"], link["read"]["efficiency"]) / 1e6, 3)
            for name, baud in (("icebreaker", 12_000_000), ("ulx3s-85f", 3_000_000))},
    }
    publish(out_dir, "system", result, system_markdown(result), docs, section="system")
    return result


SDRAM_COLUMNS = [("transfer", "transfer", "{}"), ("bytes", "bytes", "{:,}"),
                 ("cycles", "cycles", "{:,}"), ("bytes / cycle", "bytes_per_cycle", "{:.3f}"),
                 ("of peak", "efficiency", "{:.3f}")]


VECTOR_COLUMNS = [("operation", "operation", "{}"), ("rows", "rows", "{}"),
                  ("cols", "cols", "{}"), ("elements", "elements", "{:,}"),
                  ("cycles", "cycles", "{:,}"),
                  ("cycles / element", "cycles_per_element", "{:.3f}")]


def system_markdown(r):
    c = r["config"]
    lines = [
        f"Simulated device: {c['rows']}x{c['cols']} array, {c['mem_words']:,} words of "
        f"{c['word_nibbles']} codes (Verilator system model over a TCP socket).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| sim_cycles_per_second | {r['sim_cycles_per_second']:,} | >= 1,000,000 |",
        f"| array_utilization (min over GEMMs with dims multiple of the array) | "
        f"{r['array_utilization']:.3f} | >= 0.90 |",
        f"| link_efficiency (min of bulk WRITE {r['link']['write']['efficiency']:.3f} and "
        f"bulk READ {r['link']['read']['efficiency']:.3f}) | {r['link_efficiency']:.3f} | "
        ">= 0.90 |",
        "",
        markdown_table(r["array_utilization_all"], UTIL_COLUMNS),
    ]
    if r.get("sdram"):
        lines += [
            f"SDRAM ({c.get('sdram', '?')}, 16 bits at the system clock: peak "
            f"{SDRAM_PEAK_BYTES_PER_CYCLE} bytes a cycle), DMA transfers measured with STATS "
            "`dma_cycles`, data read back and checked:", "",
            markdown_table(r["sdram"], SDRAM_COLUMNS), ""]
    if r.get("vector"):
        lines += [
            "The element-wise unit on the Fashion-MNIST MLP's layer 1 (STATS `vec_cycles`; "
            f"update_cycles_per_weight {r['update_cycles_per_weight']}, target <= 2):", "",
            markdown_table(r["vector"], VECTOR_COLUMNS), ""]
    if r.get("vector_ulx3s"):
        lines += [
            "The same on the ULX3S configuration (16-nibble words: two masters a word, "
            "written as one; 48 of the layer's 784 rows; "
            f"update_cycles_per_weight_ulx3s {r['update_cycles_per_weight_ulx3s']}):", "",
            markdown_table(r["vector_ulx3s"], VECTOR_COLUMNS), ""]
    st = r.get("streaming")
    if st:
        lines += [
            f"Operands streamed from the SDRAM ({st['array']} array, the ULX3S's; "
            f"{st['scratch_words']:,}-word scratchpad; `host/bench/streaming.py`): the "
            f"Fashion-MNIST layer-1 forward and backward-weight GEMMs of {st['batches']} "
            f"batches of 64 in {st['gemm_tiles']} tiles, each tile's next operands loaded "
            "while it runs, the commands queued on the device, the scratchpad bit-identical "
            "to `emu://` at the end:", "",
            "| figure | value | target |", "|---|---|---|",
            f"| sdram_array_utilization (useful MAC cycles {st['useful_mac_cycles']:,} over "
            f"{st['window_cycles']:,} cycles) | {st['sdram_array_utilization']:.3f} | >= 0.90 |",
            f"| ... with the first batch's loads ({st['prologue_cycles']:,} cycles) | "
            f"{st['utilization_with_prologue']:.3f} | |",
            f"| SDRAM bytes loaded per cycle (peak {SDRAM_PEAK_BYTES_PER_CYCLE}) | "
            f"{st['sdram_bytes_per_cycle']:.3f} | |",
            f"| matches emu:// | {st['matches_emu']} | True |", ""]
    proj = ", ".join(f"{k}: {v} MB/s" for k, v in r["projected_link_mbytes_per_s"].items())
    lines.append(f"Payload throughput of the boards' links at that efficiency: {proj}.")
    return "\n".join(lines) + "\n"
