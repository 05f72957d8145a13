"""``nibble bench numerics``: does 4-bit training hold up against fp32?

Every scheme trains the same model from the same seed with the same hyper-parameters; the
benchmark writes ``numerics.json`` (one row per dataset and scheme), ``numerics.md`` and
``numerics.png`` (test-accuracy curves) under the output folder.
"""

import platform
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from nibble.host.report import markdown_table, plot_curves, update_doc_section, write_json
from nibble.host.training import datasets
from nibble.host.training.model import SCHEMES
from nibble.host.training.train import DEFAULT_MODELS, TrainConfig, train

__all__ = ["BENCH_EPOCHS", "bench_numerics"]

#: Epochs per dataset for the benchmark (Fashion-MNIST: the issue asks for at least 10).
BENCH_EPOCHS = {"digits": 30, "fashion-mnist": 10}

COLUMNS = [
    ("dataset", "dataset", "{}"),
    ("model", "model", "{}"),
    ("scheme", "scheme", "{}"),
    ("epochs", "epochs", "{}"),
    ("test accuracy (mean)", "test_accuracy", "{:.4f}"),
    ("± std", "test_accuracy_std", "{:.4f}"),
    ("Δ vs fp32 (points)", "delta_vs_fp32_points", "{:+.2f}"),
    ("train s", "seconds", "{:.1f}"),
    ("ms / step", "step_ms", "{:.3f}"),
    ("step time / fp32", "step_time_ratio_vs_fp32", "{:.2f}"),
]


def bench_numerics(out_dir="build/bench", names=None, schemes=None, epochs=None, seeds=3,
                   docs=None, progress=True, log=print):
    """Run the benchmark; returns the rows written to ``numerics.json``.

    Each (dataset, scheme) trains with seeds ``0 .. seeds-1``; a row reports the mean test
    accuracy over seeds (and each seed's), the mean training time and the mean step time.
    BLAS runs on one thread: these GEMMs are too small to gain from more, and OpenBLAS's
    spinning threads make step times erratic on a shared 2-core machine.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _bench_numerics(out_dir, names, schemes, epochs, seeds, docs, progress, log)


def _bench_numerics(out_dir, names, schemes, epochs, seeds, docs, progress, log):
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
            runs = []
            for seed in range(seeds):
                cfg = TrainConfig(scheme=scheme, epochs=n_epochs, sizes=sizes, seed=seed)
                runs.append(train(data, cfg, progress=progress))
            accs = [r["test_accuracy"] for r in runs]
            row = {
                "dataset": name,
                "model": model,
                "scheme": scheme,
                "test_accuracy": float(np.mean(accs)),
                "test_accuracy_std": float(np.std(accs)),
                "test_accuracies": accs,
                "epochs": n_epochs,
                "seeds": seeds,
                "seconds": float(np.mean([r["seconds"] for r in runs])),
                "step_ms": 1e3 * float(np.mean([r["step_seconds"] for r in runs])),
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "momentum": cfg.momentum,
                "curve": np.mean([[h["test_accuracy"] for h in r["history"]] for r in runs],
                                 axis=0).tolist(),
            }
            if scheme == "fp32":
                base = row
            row["step_time_ratio_vs_fp32"] = row["step_ms"] / base["step_ms"]
            row["delta_vs_fp32_points"] = 100 * (row["test_accuracy"] - base["test_accuracy"])
            rows.append(row)
            curves[scheme] = row["curve"]
            log(f"{name:14s} {scheme:18s} test accuracy {row['test_accuracy']:.4f} "
                f"± {row['test_accuracy_std']:.4f} ({row['delta_vs_fp32_points']:+.2f} pts vs "
                f"fp32), {row['step_ms']:.3f} ms/step ({row['step_time_ratio_vs_fp32']:.2f}x)")
        panels[f"{name} {model} (mean of {seeds} seeds)"] = curves
    out = Path(out_dir)
    write_json(out / "numerics.json", rows)
    plot_curves(out / "numerics.png", panels)
    table = markdown_table(rows, COLUMNS)
    machine = f"{platform.machine()}, {platform.python_implementation()} " \
              f"{platform.python_version()}, numpy {np.__version__}, BLAS on 1 thread"
    hp = rows[0] if rows else {}
    text = (f"Made by `make bench-numerics` (`nibble bench numerics`) on {machine}: "
            f"seeds 0..{seeds - 1}, batch {hp.get('batch_size')}, SGD lr {hp.get('lr')} "
            f"(cosine), momentum {hp.get('momentum')}, identical for every scheme.\n\n{table}")
    (out / "numerics.md").write_text(text)
    if docs:
        update_doc_section(docs, "bench-numerics", text)
    return rows
