"""The ``nibble`` command line."""

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from nibble.host.golden.numerics import NumericsError
from nibble.host.training.datasets import DATASETS, DatasetError
from nibble.host.training.model import SCHEMES
from nibble.host.training.train import DEFAULT_MODELS

#: Defaults of ``nibble train`` per dataset: epochs and learning rate.
TRAIN_EPOCHS = {"digits": 10, "fashion-mnist": 10}
TRAIN_LR = {"digits": 0.1, "fashion-mnist": 0.02}

__all__ = ["main"]


def _amount(n):
    """Bytes as KB or MiB, whichever reads."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1000:.1f} KB"


def _at_least(low):
    """An argparse type: an integer, ``low`` or more."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


_positive, _count = _at_least(1), _at_least(0)


def _parse_model(text, dataset):
    if text in (None, "mlp"):
        return list(DEFAULT_MODELS[dataset])
    try:
        sizes = [int(x) for x in text.split("-")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"--model: expected layer sizes like 784-128-10, got {text!r}")
    return sizes


@contextmanager
def open_device(url, baud=None, quiet=False):
    """A connected device for ``url``; ``sim`` builds (once) and serves the simulated
    device for the duration, ``sim:BOARD`` the simulated device in a board's configuration
    (its array, memory, SDRAM and element-wise unit)."""
    from nibble.host.device.driver import Device

    if url != "sim" and not url.startswith("sim:"):
        with Device.open(url, baudrate=baud) as dev:
            yield dev
        return
    from nibble.sim.system import DEFAULTS, board_config, build, serve
    config = board_config(url[4:]) if url.startswith("sim:") else DEFAULTS
    build(**config, quiet=quiet)
    with serve(**config) as sock, Device.open(sock) as dev:
        yield dev


def cmd_train(args):
    from nibble.host.report import plot_curves, write_json
    from nibble.host.training import datasets
    from nibble.host.training.device import DeviceTrainConfig, masters_for
    from nibble.host.training.session import CHECKPOINT, load_checkpoint, train_on_device

    if args.resume:
        ckpt = Path(args.resume) / CHECKPOINT
        if not ckpt.exists():
            raise ValueError(f"--resume: no {CHECKPOINT} in {args.resume}")
        _, meta = load_checkpoint(ckpt)
        c = meta["config"]
        dataset, sizes, epochs = c["dataset"], c["sizes"], args.epochs or c["epochs"]
        cfg = DeviceTrainConfig(sizes=sizes, batch_size=c["batch_size"], lr=c["lr"],
                                momentum=c["momentum"], seed=c["seed"], masters=c["masters"],
                                out_grad=c.get("out_grad", "fp4"), act=c.get("act", "absmax"),
                                alpha_init=c.get("alpha_init"), act_clip=c["act_clip"])
        out = Path(args.out or args.resume)
    else:
        ckpt = None
        dataset, epochs = args.dataset, args.epochs or TRAIN_EPOCHS[args.dataset]
        sizes = _parse_model(args.model, dataset)
        cfg = DeviceTrainConfig(sizes=sizes, batch_size=args.batch_size,
                                lr=args.lr or TRAIN_LR[dataset],
                                momentum=args.momentum, seed=args.seed, masters=args.masters,
                                out_grad=args.out_grad, act=args.act,
                                alpha_init=args.alpha_init, act_clip=args.act_clip)
        out = Path(args.out or f"build/train/{dataset}")
    data = datasets.load(dataset)
    if sizes[0] != data.features or sizes[-1] != data.classes:
        raise ValueError(f"model {'-'.join(map(str, sizes))} does not match {dataset} "
                         f"({data.features} inputs, {data.classes} classes)")
    model = "-".join(map(str, sizes))
    where = "the simulated device" if args.device == "sim" else args.device
    with open_device(args.device, args.baud, quiet=args.quiet) as dev:
        masters = masters_for(dev) if cfg.masters == "auto" else cfg.masters
        print(f"training the {dataset} MLP {model} in 4 bits on {where}, {epochs} epochs, "
              f"batch {cfg.batch_size}, master weights on the {masters}"
              + (f" (resuming {ckpt})" if ckpt else ""), flush=True)
        r = train_on_device(dev, data, cfg, epochs, out=out, resume=ckpt,
                            progress=not args.quiet, resident=None if args.resident else False)
    if r["interrupted"]:
        print(f"\ninterrupted after step {r['steps']}: checkpoint {out / CHECKPOINT}; "
              f"continue with: nibble train --device {args.device} --resume {out}")
        return 130
    up = r.get("upload")
    if up:
        res = r["config"]["resident"]
        print(f"the training set was resident in the device's SDRAM ({res['images']:,} images, "
              f"{_amount(up['set_bytes'])} of 4-bit codes, "
              + ("kept from the checkpoint: the device's sums of it matched" if up["kept"] else
                 f"uploaded and checked in {up['seconds']:.1f} s")
              + "); each step sent the batch's indices, not its images")
    if r["config"].get("state_in_sdram"):
        print("the training state lived in the device's SDRAM (too large for its scratchpad: "
              "every command paged its buffers through it)")
    curves = {"ibm4 (device)": r["history"]}
    if args.fp32:
        from nibble.host.training.train import TrainConfig, train
        print(f"fp32 baseline on the host ({model}, same hyper-parameters) ...", flush=True)
        f = train(data, TrainConfig(scheme="fp32", epochs=epochs, batch_size=cfg.batch_size,
                                    lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed,
                                    sizes=sizes), progress=not args.quiet)
        r["fp32"] = {"history": f["history"], "test_accuracy": f["test_accuracy"]}
        curves["fp32 (host)"] = f["history"]
    r.pop("model")
    write_json(out / "metrics.json", r)
    plot_curves(out / "curves.png", {
        f"{dataset} {model}: training loss": {k: [h["loss"] for h in v]
                                              for k, v in curves.items()},
        f"{dataset} {model}: test accuracy": {k: [h["test_accuracy"] for h in v]
                                              for k, v in curves.items()},
    }, ylabel=None)
    last = r["history"][-1]
    print(f"\n{'':24s} {'test accuracy':>14s}")
    print(f"{'ibm4 on the device':24s} {r['test_accuracy']:14.4f}")
    if "fp32" in r:
        print(f"{'fp32 on the host':24s} {r['fp32']['test_accuracy']:14.4f}")
    cyc = last["device_cycles_per_step"]
    print(f"\n{last['images_per_second']:.0f} images/s; per step: "
          + (f"{cyc:,.0f} device cycles, " if cyc else "")
          + f"{last['link_bytes_per_step']:,.0f} link bytes "
          f"({last['link_bytes_ratio']:.2f}x the batch's own)")
    print(f"metrics:    {out / 'metrics.json'}\nplots:      {out / 'curves.png'}\n"
          f"checkpoint: {out / CHECKPOINT}")
    return 0


def cmd_bench_numerics(args):
    from nibble.host.bench.numerics import bench_numerics

    epochs = dict.fromkeys(("digits", "fashion-mnist"), args.epochs) if args.epochs else None
    bench_numerics(out_dir=args.out, names=args.dataset, schemes=args.scheme, models=args.model,
                   epochs=epochs, seeds=args.seeds, ablation=args.ablation, docs=args.docs,
                   progress=not args.quiet, jobs=args.jobs)
    print(f"\nwrote {args.out}/numerics.json, numerics.md, numerics.png"
          + (f"; updated {args.docs}" if args.docs else ""))
    return 0


def cmd_formats(_args):
    from nibble.rtl import formats as f

    print(f"INT4   storage {f.INT4_MIN}..{f.INT4_MAX}, weights {f.WEIGHT_MIN}..{f.WEIGHT_MAX}")
    print(f"UINT4  {f.UINT4_MIN}..{f.UINT4_MAX}")
    print(f"FP4    code s|eee, eee={f.FP4_EXP_ZERO} is zero, value ±4^(eee-7)·2^phase·2^exp, "
          f"datapath shift up to {f.FP4_MAG_LOG2_MAX}")
    print(f"GEMM   max reduction {f.MAX_REDUCTION}")
    for mode in f.GemmMode:
        lo, hi = f.product_range(mode)
        print(f"  {mode.name.lower():16s} products {lo}..{hi}, accumulator "
              f"{f.ACC_BITS[mode]} bits")
    print(f"Rescale M {f.RESCALE_M_BITS} bits unsigned, shift 0..{f.RESCALE_SHIFT_MAX}")
    lo, hi = f.pe_product_range()
    print(f"PE     products {lo}..{hi} ({f.PE_PRODUCT_BITS} bits, TPR phase applied in the "
          f"lane), accumulator {f.PE_ACC_BITS} bits, lane value {f.LANE_BITS} bits")
    return 0


SYNTH_COLUMNS = [
    ("device", "device", "{}"), ("array", "array", "{}"), ("PEs", "pes", "{}"),
    ("lanes", "lanes", "{}"), ("LUTs/LCs", "luts", "{:,}"), ("FFs", "ffs", "{:,}"),
    ("DSPs", "dsps", "{}"), ("RAMs", "rams", "{}"), ("fmax MHz", "fmax_mhz", "{:.1f}"),
    ("target MHz", "target_mhz", "{:.0f}"), ("all LUTs / PEs", "luts_per_pe", "{:.0f}"),
    ("one PE's LUTs", "pe_luts", "{}"), ("of which FP4 path", "fp4_path_luts", "{}"),
    ("PE pair's LUTs", "pe_pair_luts", "{}"), ("its DSPs", "pe_pair_dsps", "{}"),
    ("build s", "seconds", "{:.0f}"),
]


def synth_table(out_dir):
    """Markdown table of every build/synth/<device>.json present."""
    import json

    from nibble.gateware.synth import DEVICES
    rows = []
    for name in DEVICES:
        path = Path(out_dir) / f"{name}.json"
        if path.exists():
            row = json.loads(path.read_text())
            row["array"] = f"{row['rows']}x{row['cols']}"
            rows.append(row)
    from nibble.host.report import markdown_table
    return markdown_table(rows, SYNTH_COLUMNS) if rows else ""


def cmd_synth(args):
    from nibble.gateware.synth import DEVICES, synthesize
    from nibble.host.report import update_doc_section

    for name in [] if args.report_only else args.device or list(DEVICES):
        dev = DEVICES[name]
        rows, cols = args.rows or dev.rows, args.cols or dev.cols
        print(f"{name}: synthesizing the {rows}x{cols} datapath with YoWASP "
              f"(yosys, nextpnr; minutes) ...", flush=True)
        r = synthesize(name, out_dir=args.out, rows=rows, cols=cols, seed=args.seed)
        verdict = "meets" if r["timing_met"] else "MISSES"
        print(f"  {r['luts']:,} LUTs/LCs, {r['ffs']:,} FFs, {r['dsps']} DSPs, "
              f"{r['fmax_mhz']:.1f} MHz ({verdict} {r['target_mhz']:.0f} MHz), "
              f"{r['seconds']:.0f} s -> {args.out}/{name}.json")
    table = synth_table(args.out)
    Path(args.out, "synth.md").write_text(table)
    print("\n" + table)
    if args.docs:
        update_doc_section(args.docs, "synth", table)
        print(f"updated {args.docs}")
    return 0


def cmd_bench_system(args):
    from nibble.host.bench.system import bench_system

    print("benchmarking the full-system model (Verilator, built on first use) ...", flush=True)
    r = bench_system(out_dir=args.out, docs=args.docs, progress=not args.quiet)
    print(f"\nsim_cycles_per_second {r['sim_cycles_per_second']:,}\n"
          f"array_utilization     {r['array_utilization']:.3f} (dims multiple of the array)\n"
          f"link_efficiency       {r['link_efficiency']:.3f}\n"
          f"wrote {args.out}/system.json, system.md"
          + (f"; updated {args.docs}" if args.docs else ""))
    return 0


def cmd_bench_density(args):
    from nibble.host.bench.density import bench_density

    r = bench_density(out_dir=args.out, devices=args.device or ("ecp5-85f", "ice40-up5k"),
                      docs=args.docs, progress=not args.quiet)
    for d, ratio in r["ratio_vs_fp16_lut"].items():
        print(f"{d}: nibble's PE has {ratio:.2f}x the MAC/s per LUT of an all-LUT FP16 PE "
              f"({r['ratio_vs_fp16_dsp'][d]:.2f}x of one with its multiply in a DSP); the "
              f"paper's area model says {r['paper_density_ratio']}x")
    print(f"wrote {args.out}/density.json, density.md"
          + (f"; updated {args.docs}" if args.docs else ""))
    return 0


def cmd_bench_link(args):
    from nibble.host.bench.link import bench_link

    r = bench_link(out_dir=args.out, docs=args.docs,
                   log=(lambda *a: None) if args.quiet else print)["usb"]
    print(f"native USB: {r['stream_wire_bytes_per_second'] / 1e3:,.0f} KB/s of protocol bytes, "
          f"a command's round trip {1e6 * r['ping_round_trip_s']:,.0f} us")
    print(f"wrote {args.out}/link.json, link.md"
          + (f"; updated {args.docs}" if args.docs else ""))
    return 0


def cmd_bench_train(args):
    from nibble.host.bench.train import bench_train

    r = bench_train(out_dir=args.out, epochs=args.epochs, sim_seconds=args.sim_seconds,
                    docs=args.docs, progress=not args.quiet, board_only=args.board_only)
    print(f"\nfp32_test_accuracy  {r['fp32_test_accuracy']:.4f}\n"
          f"ibm4_test_accuracy  {r['ibm4_test_accuracy']:.4f}\n"
          f"sim_matches_emu     {r['sim_matches_emu']} ({r['sim_steps']} steps)\n"
          f"link_bytes_ratio    {r['link_bytes_ratio']:.3f}\n"
          f"wrote {args.out}/train.json, train.md"
          + (f"; updated {args.docs}" if args.docs else ""))
    return 0


def cmd_sim_serve(args):
    from nibble.sim.system import build, serve

    sdram = "" if args.sdram == "none" else args.sdram
    config = {"rows": args.rows, "cols": args.cols, "words": args.words, "sdram": sdram}
    if args.board:
        from nibble.sim.system import board_config
        config = board_config(args.board)
    build(**config, quiet=False)
    with serve(port=args.port, **config) as url:
        print(f"simulated nibble device ({config['rows']}x{config['cols']}, "
              f"{config['words']:,} words, SDRAM {config['sdram'] or 'none'}"
              + (f", the {args.board}'s configuration" if args.board else "") + ") at "
              f"{url}\n  e.g. nibble device info --device {url}\n  Ctrl-C stops it",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    print(serve.last_report)
    return 0


def cmd_device_info(args):
    from nibble.host.device.driver import Device

    with Device.open(args.device) as dev:
        info = dev.info
        stats = dev.stats()
    print(f"{args.device}: nibble protocol v{info['version']}, {info['rows']}x{info['cols']} "
          f"array, {info['mem_words']:,} words of {info['word_nibbles']} codes "
          f"({info['mem_words'] * info['word_nibbles'] // 2:,} bytes), "
          f"clock {info['clk_hz'] / 1e6:g} MHz, "
          + (f"SDRAM {info['ext_bursts'] * 16 / 2**20:g} MiB" if info["ext_bursts"]
             else "no SDRAM"))
    from nibble.rtl.formats import VecOp
    has = [op.name for op in VecOp if info["vec_ops"] >> op & 1]
    lacks = [op.name for op in VecOp if not info["vec_ops"] >> op & 1]
    print(f"  element-wise unit: {', '.join(has) or 'none'}"
          + (f" ({' and '.join(lacks)} run on the host)" if lacks else ""))
    print(f"  busy {stats['busy']}, cycles {stats['cycles']:,}, last GEMM "
          f"{stats['gemm_cycles']:,} cycles / {stats['beats']:,} beats, "
          f"frames dropped {stats['rx_errors']}")
    return 0


def cmd_bitstream(args):
    from nibble.gateware.boards import build, rebudget, resolve

    board = resolve(args.board, rows=args.rows, cols=args.cols, baud=args.baud,
                    mem_words=args.words, clk_hz=args.clk and round(args.clk * 1e6),
                    link=args.link, dsp_pes=args.dsp_pes, lut_map=args.lut_map,
                    sdram_hz=args.sdram_clk and round(args.sdram_clk * 1e6))
    if args.report_only:
        from nibble.gateware.boards import rereport
        r = rereport(board, out_root=args.out)
        if args.docs:
            _boards_doc(args.docs, args.out)
        print(f"{board.name}: the last build's report again: {r['luts']:,} LUTs, "
              + ", ".join(f"{n} {c['fmax_mhz']:.2f} MHz (target {c['target_mhz']:g})"
                          for n, c in r["clocks"].items()))
        return 0
    if args.budget_only:
        print(f"{board.name}: measuring the last build's blocks again ...", flush=True)
        rebudget(board, out_root=args.out, progress=sys.stderr.isatty())
        if args.docs:
            _boards_doc(args.docs, args.out)
            print(f"updated {args.docs}")
        return 0
    if board.clock_note:
        print(board.clock_note)
    link = f"{board.baud:,} baud" if board.link == "uart" else "native USB"
    print(f"{board.name}: building the bitstream ({board.rows}x{board.cols} array, "
          f"{board.mem_words:,} words, {board.clk_hz / 1e6:g} MHz, {link}) with "
          "YoWASP; this takes minutes ...", flush=True)
    try:
        r = build(board, out_root=args.out, seed=args.seed or board.seed,
                  progress=sys.stderr.isatty(),
                  budget=not args.no_budget)
    finally:     # the table also records a board that does not fit
        if args.docs:
            _boards_doc(args.docs, args.out)
    verdict = "meets" if r["timing_met"] else "MISSES"
    print(f"  {r['luts']:,} of {r['lut_capacity']:,} LUTs, {r['ffs']:,} FFs, {r['dsps']} DSPs, "
          f"{r['rams']} of {r['ram_capacity']} RAMs, {r['fmax_mhz']:.1f} MHz ({verdict} "
          f"{r['target_mhz']:g} MHz), {r['seconds']:.0f} s\n  -> {r['bitstream']}, "
          f"{args.out}/{board.name}/report.json")
    if args.docs:
        print(f"updated {args.docs}")
    return 0 if r["timing_met"] else 1


BOARD_COLUMNS = [
    ("board", "board", "{}"), ("array", "array", "{}"), ("scratchpad words", "mem_words", "{:,}"),
    ("SDRAM", "sdram_mb", "{}"),
    ("link", "link_text", "{}"), ("fits", "fits", "{}"), ("LUTs/LCs", "luts", "{:,}"),
    ("of", "lut_capacity", "{:,}"), ("FFs", "ffs", "{}"), ("DSPs", "dsps", "{}"),
    ("RAMs", "rams", "{}"), ("fmax MHz", "fmax", "{}"),
    ("target MHz", "target_mhz", "{:g}"), ("build s", "seconds", "{:.0f}"),
]


def boards_table(out_root):
    import json

    from nibble.gateware.boards import BOARDS
    from nibble.host.report import markdown_table
    rows = []
    for name in BOARDS:
        path = Path(out_root) / name / "report.json"
        if path.exists():
            row = json.loads(path.read_text())
            row["array"] = f"{row['rows']}x{row['cols']}"
            row["fits"] = "yes" if row.get("fits", True) else "**no**"
            mib = row.get("sdram_bytes", 0) / 2**20
            clocks = row.get("clocks", {})
            at = (f", {row['sdram_mhz']:g} MHz" + (f" (fmax {clocks['sdram']['fmax_mhz']:.1f})"
                                                   if "sdram" in clocks else "")
                  if row.get("sdram_mhz") else "")
            row["sdram_mb"] = f"{mib:g} MiB ({row['sdram']}{at})" if mib else "-"
            row["fmax"] = "-" if row.get("fmax_mhz") is None else f"{row['fmax_mhz']:.1f}"
            row["link_text"] = "USB (CDC-ACM)" if row.get("link") == "usb" else \
                f"UART {row['baud']:,} baud"
            for key in ("ffs", "dsps", "rams"):
                row[key] = f"{row[key]:,}" if isinstance(row.get(key), int) else "-"
            rows.append(row)
    return markdown_table(rows, BOARD_COLUMNS) if rows else ""


def _boards_doc(docs, out_root):
    """The boards section of ``docs``: the builds' table and their logic by block."""
    from nibble.host.report import update_doc_section
    update_doc_section(docs, "boards", boards_table(out_root) + "\n" + budget_table(out_root))


def budget_table(out_root):
    """Each board's logic by block (report.json ``blocks``, :mod:`gateware.budget`), the
    boards side by side."""
    import json

    from nibble.gateware.boards import BOARDS
    from nibble.host.report import markdown_table
    reports = [json.loads(p.read_text()) for p in
               (Path(out_root) / name / "report.json" for name in BOARDS) if p.exists()]
    reports = [r for r in reports if r.get("blocks")]
    if not reports:
        return ""
    columns = [("block", "block", "{}")]
    rows = {}
    for r in reports:
        b, unit = r["board"], "LCs" if r["board"] == "icebreaker" else "LUTs"
        columns += [(f"{b} {unit}", f"{b}.luts", "{}"), ("%", f"{b}.pct", "{}"),
                    ("DSPs", f"{b}.dsps", "{}"), ("RAMs", f"{b}.rams", "{}")]
        for block, cost in r["blocks"].items():
            row = rows.setdefault(block, {"block": block})
            if cost["luts"] is None:            # not measured (gateware.budget)
                row[f"{b}.luts"] = "not measured"
                continue
            row[f"{b}.luts"] = f"{cost['luts']:,}"
            row[f"{b}.pct"] = f"{100 * cost['luts'] / r['luts']:.0f}"
            row[f"{b}.dsps"], row[f"{b}.rams"] = cost["dsps"], cost["rams"]
    for row in rows.values():
        for _, key, _ in columns:
            row.setdefault(key, "-")
    return ("Where the logic goes (`gateware/budget.py`: each block synthesized and packed "
            "on its own; `rest` is the build's total less the blocks, negative where blocks "
            "alone keep logic that the whole design shares or drops):\n\n"
            + markdown_table(list(rows.values()), columns))


def cmd_flash(args):
    from nibble.gateware.boards import flash, resolve

    board = resolve(args.board)
    print(f"{board.name}: programming with openFPGALoader ...", flush=True)
    flash(board, bitstream=args.bitstream, out_root=args.out)
    print("done")
    return 0


def cmd_docs(args):
    from nibble.host.docs import update_protocol_doc

    print(f"updated {update_protocol_doc(args.protocol)}")
    return 0


def _bench_outputs(parser):
    """A benchmark's output options: its folder, the doc it updates, no progress."""
    parser.add_argument("--out", default="build/bench")
    parser.add_argument("--docs", help="also update the generated section in this markdown file")
    parser.add_argument("--quiet", action="store_true")


def build_parser():
    from nibble.gateware.boards import BOARDS
    from nibble.gateware.device import SIM_DEVICE
    from nibble.rtl.sdram import CHIPS

    p = argparse.ArgumentParser(prog="nibble", description="nibble: 4-bit neural-network "
                                "training on open FPGAs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an MLP in 4 bits on a device (default: the "
                       "simulated device) beside an fp32 baseline")
    t.add_argument("--device", default="sim",
                   help="sim (the simulated device, built on first use; default), "
                        "sim:BOARD (it in a board's configuration, e.g. sim:icebreaker), "
                        "emu://, socket://HOST:PORT, or a board's serial port such as "
                        "/dev/ttyUSB1")
    t.add_argument("--dataset", choices=list(DATASETS), default="digits")
    t.add_argument("--model", help="layer sizes, e.g. 784-128-10 (default: the dataset's MLP)")
    t.add_argument("--epochs", type=_positive, help="default: 10")
    t.add_argument("--batch-size", type=_positive, default=64)
    t.add_argument("--lr", type=float,
                   help="learning rate (cosine schedule; default: digits 0.1, Fashion-MNIST 0.02)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out-grad", choices=["fp4x2", "fp4"], default="fp4x2",
                   help="the output layer's gradient: two FP4 terms (default) or one (the "
                        "pure 4-bit scheme)")
    t.add_argument("--act", choices=["pact", "absmax"], default="pact",
                   help="hidden activation scale: a learned PACT clip (default) or a "
                        "fraction of the previous step's absmax")
    t.add_argument("--alpha-init", type=float,
                   help="PACT: the clips' initial value (default: --act-clip times the first "
                        "batch's absmax)")
    t.add_argument("--act-clip", type=float, default=0.5,
                   help="the top activation code stands for this fraction of the previous "
                        "step's absmax (absmax), or of the first batch's (PACT's initial "
                        "clip); default 0.5")
    t.add_argument("--masters", choices=["device", "host", "auto"], default="auto",
                   help="where the fixed-point master weights live (default: on the device "
                        "when its element-wise unit can update them, else on the host)")
    t.add_argument("--stream", dest="resident", action="store_false",
                   help="send every batch's images over the link, even when the device's "
                        "SDRAM could hold the training set (by default it is uploaded once "
                        "and each step sends only the batch's indices)")
    t.add_argument("--no-fp32", dest="fp32", action="store_false",
                   help="skip the fp32 baseline")
    t.add_argument("--baud", type=_positive, help="serial baud rate (a board's default)")
    t.add_argument("--out", help="output folder (default build/train/DATASET)")
    t.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    n = bsub.add_parser("numerics", help="4-bit schemes vs fp32 on digits and Fashion-MNIST "
                        "(MLPs and a CNN), and the per-tensor ablation")
    n.add_argument("--dataset", action="append", choices=list(DATASETS),
                   help="repeatable; default: every dataset present on this machine")
    n.add_argument("--scheme", action="append", choices=list(SCHEMES),
                   help="repeatable; default: all (fp32 is always included)")
    n.add_argument("--model", action="append", choices=["mlp", "lenet5"],
                   help="repeatable; default: both (the CNN on Fashion-MNIST only)")
    n.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the per-tensor ablation (Fashion-MNIST MLP)")
    n.add_argument("--epochs", type=_positive, help="override the epochs of every dataset")
    n.add_argument("--seeds", type=_positive, default=3, help="seeds per scheme (default 3)")
    n.add_argument("--jobs", type=_positive, default=1,
                   help="training runs at once, in worker processes (default 1; the results "
                   "do not depend on it, the step times do)")
    _bench_outputs(n)
    n.set_defaults(func=cmd_bench_numerics)

    y = sub.add_parser("synth", help="synthesize the datapath for the FPGAs (YoWASP)")
    y.add_argument("--device", action="append", choices=["ice40-up5k", "ecp5-85f"],
                   help="device (repeatable; default all)")
    y.add_argument("--rows", type=_positive, help="array rows (default: per device)")
    y.add_argument("--cols", type=_positive, help="array columns (default: per device)")
    y.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    y.add_argument("--out", default="build/synth")
    y.add_argument("--docs", help="also update the generated table in this markdown file")
    y.add_argument("--report-only", action="store_true",
                   help="build nothing: tabulate the existing build/synth/<device>.json")
    y.set_defaults(func=cmd_synth)

    bs = bsub.add_parser("system", help="full-system model: sim speed, array utilization, "
                         "link efficiency")
    _bench_outputs(bs)
    bs.set_defaults(func=cmd_bench_system)

    bd = bsub.add_parser("density", help="nibble's INT4 x FP4 PE against an FP16 PE on both "
                         "FPGAs: LUTs, DSPs, fmax, MAC/s per LUT (the paper's 7.3x)")
    bd.add_argument("--device", action="append", choices=["ecp5-85f", "ice40-up5k"],
                    help="repeatable; default: both")
    _bench_outputs(bd)
    bd.set_defaults(func=cmd_bench_density)

    bl = bsub.add_parser("link", help="the native USB link on the device's RTL behind a "
                         "packet-level USB host: stream rate, a command's round trip")
    _bench_outputs(bl)
    bl.set_defaults(func=cmd_bench_link)

    bt_ = bsub.add_parser("train", help="Fashion-MNIST training on the device: fp32 vs ibm4, "
                          "the simulated device vs emu://, link bytes, board projections")
    bt_.add_argument("--epochs", type=_positive, default=10)
    bt_.add_argument("--sim-seconds", type=float, default=600,
                     help="time budget of the simulated device's steps (default 600)")
    bt_.add_argument("--board-only", action="store_true",
                     help="measure only the boards' configurations again (the ULX3S's, the "
                     "iCEBreaker's digits run), keeping the rest of the last run's train.json "
                     "(minutes instead of an hour)")
    _bench_outputs(bt_)
    bt_.set_defaults(func=cmd_bench_train)

    sm = sub.add_parser("sim", help="the Verilator system model")
    smsub = sm.add_subparsers(dest="sim", required=True)
    sv = smsub.add_parser("serve", help="build (cached) and serve it on a TCP socket")
    sv.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    sv.add_argument("--rows", type=_positive, default=SIM_DEVICE["rows"])
    sv.add_argument("--cols", type=_positive, default=SIM_DEVICE["cols"])
    sv.add_argument("--words", type=_positive, default=SIM_DEVICE["words"])
    sv.add_argument("--sdram", choices=[*CHIPS, "none"], default=SIM_DEVICE["sdram"],
                    help="the SDRAM part on the simulated board (default %(default)s; "
                         "its chip model checks every timing)")
    sv.add_argument("--board", choices=list(BOARDS),
                    help="a board's configuration instead: its array, memory, SDRAM and "
                         "element-wise unit (the other options are then ignored)")
    sv.set_defaults(func=cmd_sim_serve)

    dv = sub.add_parser("device", help="talk to a device")
    dvsub = dv.add_subparsers(dest="device_cmd", required=True)
    di = dvsub.add_parser("info", help="print a device's INFO and STATS")
    di.add_argument("--device", required=True,
                    help="emu://, socket://HOST:PORT or a serial port: /dev/ttyUSB1 (a "
                    "board's USB-serial chip), /dev/ttyACM0 (a board on native USB)")
    di.set_defaults(func=cmd_device_info)

    bt = sub.add_parser("bitstream", help="build a board's bitstream (YoWASP)")
    bt.add_argument("--board", required=True,
                    help="icebreaker, ulx3s-85f, or an amaranth-boards platform module:Class")
    bt.add_argument("--rows", type=_positive)
    bt.add_argument("--cols", type=_positive)
    bt.add_argument("--baud", type=_positive, help="the UART link's baud rate")
    bt.add_argument("--link", choices=("uart", "usb"),
                    help="the host link: the board's USB-serial chip (uart) or the FPGA as a "
                    "USB device on the board's USB port (usb; the ULX3S's default)")
    bt.add_argument("--words", type=_positive, help="tensor memory words")
    bt.add_argument("--clk", type=float, metavar="MHZ",
                    help="design clock: the nearest the board's PLL makes at or below it "
                    "(default: the board's, or on another iCE40 / ECP5 board "
                    "36 / 45 MHz)")
    bt.add_argument("--sdram-clk", type=float, metavar="MHZ",
                    help="the SDRAM's own clock: the nearest the board's PLL makes at or "
                    "below it beside the design's (default: the board's; the ULX3S's 100)")
    bt.add_argument("--dsp-pes", type=_count, metavar="N",
                    help="PEs that multiply in DSP blocks (default: the board's; the others "
                    "in LUTs)")
    bt.add_argument("--lut-map", choices=("abc9", "abc"),
                    help="how yosys maps an ECP5 design's LUTs (default abc9; abc where "
                    "yosys's abc9 stops on an assertion)")
    bt.add_argument("--seed", type=int,
                    help="nextpnr placement seed (default: the board's, else 1)")
    bt.add_argument("--out", default="build")
    bt.add_argument("--docs", help="also update the boards table in this markdown file")
    bt.add_argument("--no-budget", action="store_true",
                    help="skip the logic budget by block (minutes on the ULX3S; "
                         "--budget-only adds it later)")
    bt.add_argument("--report-only", action="store_true",
                    help="compute the last build's report.json again from its toolchain "
                    "reports (no synthesis or place and route)")
    bt.add_argument("--budget-only", action="store_true",
                    help="measure the logic by block again for the last build's report "
                         "(no place and route)")
    bt.set_defaults(func=cmd_bitstream)

    fl = sub.add_parser("flash", help="program a board with openFPGALoader")
    fl.add_argument("--board", required=True)
    fl.add_argument("--bitstream", help="default: build/<board>/top.bin or top.bit")
    fl.add_argument("--out", default="build")
    fl.set_defaults(func=cmd_flash)

    dc = sub.add_parser("docs", help="rewrite the generated sections of docs/protocol.md "
                        "from the payload layouts")
    dc.add_argument("--protocol", default="docs/protocol.md")
    dc.set_defaults(func=cmd_docs)

    f = sub.add_parser("formats", help="print the number formats and accumulator widths")
    f.set_defaults(func=cmd_formats)
    return p


def main(argv=None):
    from nibble.gateware.boards import BoardError
    from nibble.gateware.synth import SynthError
    from nibble.host.device.driver import DeviceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, NumericsError, SynthError, BoardError, DeviceError, ValueError) as e:
        print(f"nibble: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nibble: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
