"""``nibble bench numerics``: does 4-bit training hold up against fp32?

Every scheme trains the same model from the same seed with the same hyper-parameters; the
benchmark writes ``numerics.json`` (one row per dataset and scheme), ``numerics.md`` and
``numerics.png`` (test-accuracy curves) under the output folder.
"""

import platform
import time
from pathlib import Path

import numpy as np

from host import datasets
from host.model import SCHEMES
from host.report import markdown_table, plot_curves, update_doc_section, write_json
from host.train import DEFAULT_MODELS, TrainConfig, train

__all__ = ["BENCH_EPOCHS", "bench_numerics"]

#: Epochs per dataset for the benchmark (Fashion-MNIST: the issue asks for at least 10).
BENCH_EPOCHS = {"digits": 30, "fashion-mnist": 10}

COLUMNS = [
    ("dataset", "dataset", "{}"),
    ("model", "model", "{}"),
    ("scheme", "scheme", "{}"),
    ("epochs", "epochs", "{}"),
    ("test accuracy", "test_accuracy", "{:.4f}"),
    ("Δ vs fp32 (points)", "delta_vs_fp32_points", "{:+.2f}"),
    ("train s", "seconds", "{:.1f}"),
    ("ms / step", "step_ms", "{:.3f}"),
    ("step time / fp32", "step_time_ratio_vs_fp32", "{:.2f}"),
]


def bench_numerics(out_dir="build/bench", names=None, schemes=None, epochs=None,
                   cfg_overrides=None, docs=None, progress=True, log=print):
    """Run the benchmark; returns the rows written to ``numerics.json``."""
    names = names or [n for n in ("digits", "fashion-mnist") if datasets.available(n)]
    schemes = schemes or list(SCHEMES)
    if "fp32" not in schemes:
        schemes = ["fp32", *schemes]
    rows, panels = [], {}
    for name in names:
        data = datasets.load(name)
        sizes = DEFAULT_MODELS[name]
        model = "mlp-" + "-".join(map(str, sizes))
        n_epochs = (epochs or {}).get(name, BENCH_EPOCHS[name])
        curves, base = {}, None
        for scheme in schemes:
            cfg = TrainConfig(scheme=scheme, epochs=n_epochs, sizes=sizes,
                              **(cfg_overrides or {}))
            t0 = time.perf_counter()
            result = train(data, cfg, progress=progress)
            if scheme == "fp32":
                base = result
            row = {
                "dataset": name,
                "model": model,
                "scheme": scheme,
                "test_accuracy": result["test_accuracy"],
                "epochs": n_epochs,
                "seconds": result["seconds"],
                "wall_seconds": time.perf_counter() - t0,
                "step_ms": result["step_seconds"] * 1e3,
                "step_time_ratio_vs_fp32": result["step_seconds"] / base["step_seconds"],
                "delta_vs_fp32_points": 100 * (result["test_accuracy"]
                                               - base["test_accuracy"]),
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "momentum": cfg.momentum,
                "seed": cfg.seed,
                "curve": [h["test_accuracy"] for h in result["history"]],
            }
            rows.append(row)
            curves[scheme] = row["curve"]
            log(f"{name:14s} {scheme:18s} test accuracy {row['test_accuracy']:.4f} "
                f"({row['delta_vs_fp32_points']:+.2f} pts vs fp32), "
                f"{row['step_ms']:.3f} ms/step ({row['step_time_ratio_vs_fp32']:.2f}x fp32)")
        panels[f"{name} {model}"] = curves
    out = Path(out_dir)
    write_json(out / "numerics.json", rows)
    plot_curves(out / "numerics.png", panels)
    table = markdown_table(rows, COLUMNS)
    machine = f"{platform.machine()}, {platform.python_implementation()} " \
              f"{platform.python_version()}, numpy {np.__version__}"
    hp = rows[0] if rows else {}
    text = (f"Made by `make bench-numerics` (`nibble bench numerics`) on {machine}: "
            f"seed {hp.get('seed')}, batch {hp.get('batch_size')}, SGD lr {hp.get('lr')} "
            f"(cosine), momentum {hp.get('momentum')}, identical for every scheme.\n\n{table}")
    (out / "numerics.md").write_text(text)
    if docs:
        update_doc_section(docs, "bench-numerics", text)
    return rows
