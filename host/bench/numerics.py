"""``nibble bench numerics``: does 4-bit training hold up against fp32, and what costs what?

Every scheme trains the same model from the same seeds with the same hyper-parameters, in
host emulation through the golden GEMMs (:mod:`nibble.host.training`):

* the schemes table: fp32, the default scheme (``ibm4-2t``: 4-bit everywhere, the output
  layer's gradient as two FP4 terms), the pure 4-bit scheme ``ibm4`` and the other ablations,
  on the digits MLP, the Fashion-MNIST MLP and a LeNet-5-class CNN;
* the per-tensor ablation (Fashion-MNIST MLP): each tensor quantized alone, everything else
  in fp32, and every tensor but it, so the next decision rests on a table;
* each scheme's ``non_4bit_mac_share``: the share of a training step's MACs with an operand
  wider than 4 bits, the paper's currency for what a precision exception costs;
* the paper's TPR-FP4 numbers (Sun et al., NeurIPS 2020) beside ours.

It writes ``numerics.json`` (one row per dataset, model and scheme), ``numerics.md`` and
``numerics.png`` (test-accuracy curves) under the output folder.
"""

import multiprocessing
import platform
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from nibble.host.report import markdown_table, plot_curves, publish
from nibble.host.training import datasets
from nibble.host.training.model import ABLATIONS, DEFAULT_SCHEME, TENSORS
from nibble.host.training.train import DEFAULT_MODELS, TrainConfig, train

__all__ = ["BENCH_MODELS", "PAPER", "SCHEME_ORDER", "bench_numerics"]

#: (dataset, model, epochs): what the benchmark trains.
BENCH_MODELS = [("digits", "mlp", 30), ("fashion-mnist", "mlp", 10),
                ("fashion-mnist", "lenet5", 10)]
#: The schemes table's rows, fp32 first.
SCHEME_ORDER = ["fp32", DEFAULT_SCHEME, "ibm4", "ibm4-fp32-out", "ibm4-no-tpr", "radix2-fp4",
                "ibm4-no-gradscale"]
#: The per-tensor ablation runs on this model.
ABLATION_MODEL = ("fashion-mnist", "mlp", 10)
#: Sun et al., NeurIPS 2020: (dataset, model, fp32, TPR-FP4) test accuracy in %.
PAPER = [("CIFAR-10", "ResNet-18", 93.01, 92.74), ("CIFAR-10", "VGG16", 92.07, 91.47),
         ("CIFAR-10", "ResNet-50", 94.70, 93.42), ("CIFAR-10", "MobileNetV2", 93.00, 91.80),
         ("ImageNet", "ResNet-18", 69.40, 68.27), ("ImageNet", "ResNet-50", 76.48, 74.01),
         ("ImageNet", "AlexNet", 57.56, 56.38)]

COLUMNS = [
    ("dataset", "dataset", "{}"), ("model", "model", "{}"), ("scheme", "scheme", "{}"),
    ("epochs", "epochs", "{}"), ("test accuracy (mean)", "test_accuracy", "{:.4f}"),
    ("± std", "test_accuracy_std", "{:.4f}"), ("Δ vs fp32 (points)", "delta_vs_fp32_points",
                                               "{:+.2f}"),
    ("MACs not 4-bit", "non_4bit_mac_share", "{:.2%}"), ("ms / step", "step_ms", "{:.3f}"),
    ("step time / fp32", "step_time_ratio_vs_fp32", "{:.2f}"),
]


def model_name(dataset, model):
    if model == "lenet5":
        return "lenet5"
    return "mlp-" + "-".join(map(str, DEFAULT_MODELS[dataset]))


def bench_numerics(out_dir="build/bench", names=None, schemes=None, models=None, epochs=None,
                   seeds=3, ablation=True, docs=None, progress=True, log=print, jobs=1):
    """Run the benchmark; returns the rows written to ``numerics.json``.

    Each (dataset, model, scheme) trains with seeds ``0 .. seeds-1``; a row reports the mean
    test accuracy over seeds (and each seed's), the mean training and step times and the
    non-4-bit MAC share. BLAS runs on one thread: these GEMMs are too small to gain from
    more, and OpenBLAS's spinning threads make step times erratic on a shared 2-core
    machine. ``jobs`` > 1 trains that many runs at once in worker processes (each on one
    BLAS thread); a run's result does not depend on where it ran, only its step time does
    when the workers share the cores.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _bench(out_dir, names, schemes, models, epochs, seeds, ablation, docs,
                      progress, log, jobs)


#: The datasets the benchmark trains on, loaded once in the parent; forked workers share them.
_LOADED = {}


def _train_one(task):
    """One training run (a worker's unit of work): ``task`` = (dataset, model, scheme,
    epochs, seed, progress). The trained model stays in the worker."""
    dataset, model, scheme, n_epochs, seed, progress = task
    with threadpool_limits(limits=1, user_api="blas"):
        cfg = TrainConfig(scheme=scheme, epochs=n_epochs, seed=seed, model=model,
                          sizes=DEFAULT_MODELS[dataset] if model == "mlp" else [])
        result = train(_LOADED[dataset], cfg, progress=progress)
    result.pop("model")
    return result


def _row(dataset, model, scheme, n_epochs, runs):
    """The (dataset, model, scheme) row from its seeds' runs."""
    accs = [r["test_accuracy"] for r in runs]
    cfg = runs[0]["config"]
    return {
        "dataset": dataset, "model": model_name(dataset, model), "scheme": scheme,
        "test_accuracy": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
        "test_accuracies": accs, "epochs": n_epochs, "seeds": len(runs),
        "non_4bit_mac_share": float(np.mean([r["non_4bit_mac_share"] for r in runs])),
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "step_ms": 1e3 * float(np.mean([r["step_seconds"] for r in runs])),
        "batch_size": cfg["batch_size"], "lr": cfg["lr"], "momentum": cfg["momentum"],
        "curve": np.mean([[h["test_accuracy"] for h in r["history"]] for r in runs],
                         axis=0).tolist(),
    }


def _run_all(tasks, jobs, progress):
    """Every task's result, in order: here one by one (each run's own progress bar), or in
    ``jobs`` forked workers under one bar counting finished runs."""
    if jobs <= 1:
        return [_train_one((*t, progress)) for t in tasks]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool, tqdm(total=len(tasks), disable=not progress, unit="run",
                                      desc=f"training runs ({jobs} workers)") as bar:
        results = {}
        for i, result in pool.imap_unordered(_indexed, enumerate(tasks)):
            results[i] = result
            bar.update()
            bar.set_postfix_str(" ".join(map(str, tasks[i][:3])))
    return [results[i] for i in range(len(tasks))]


def _indexed(item):
    i, task = item
    return i, _train_one((*task, False))


def _bench(out_dir, names, schemes, models, epochs, seeds, ablation, docs, progress, log, jobs):
    names = names or [n for n in ("digits", "fashion-mnist") if datasets.available(n)]
    schemes = [s for s in SCHEME_ORDER if s in (schemes or SCHEME_ORDER)] + \
        [s for s in (schemes or []) if s not in SCHEME_ORDER]
    if "fp32" not in schemes:
        schemes = ["fp32", *schemes]
    tables = [(d, m, (epochs or {}).get(d, e), "schemes", schemes) for d, m, e in BENCH_MODELS
              if d in names and (models is None or m in models)]
    d, m, e = ABLATION_MODEL
    if ablation and d in names and (models is None or m in models):
        tables.append((d, m, (epochs or {}).get(d, e), "ablation", ["fp32", *ABLATIONS]))
    tasks = [(dataset, model, scheme, n_epochs, seed)
             for dataset, model, n_epochs, _, todo in tables for scheme in todo
             for seed in range(seeds)]
    _LOADED.update({dataset: datasets.load(dataset) for dataset, *_ in tables})
    try:
        results = iter(_run_all(tasks, jobs, progress))
    finally:
        _LOADED.clear()
    rows, panels = [], {}
    for dataset, model, n_epochs, table, todo in tables:
        curves, base = {}, None
        for scheme in todo:
            row = _row(dataset, model, scheme, n_epochs, [next(results) for _ in range(seeds)])
            row["table"] = table
            base = base or row
            row["step_time_ratio_vs_fp32"] = row["step_ms"] / base["step_ms"]
            row["delta_vs_fp32_points"] = 100 * (row["test_accuracy"] - base["test_accuracy"])
            rows.append(row)
            curves[scheme] = row["curve"]
            log(f"{dataset:14s} {row['model']:16s} {scheme:18s} test accuracy "
                f"{row['test_accuracy']:.4f} ± {row['test_accuracy_std']:.4f} "
                f"({row['delta_vs_fp32_points']:+.2f} pts vs fp32), MACs not 4-bit "
                f"{row['non_4bit_mac_share']:.2%}, {row['step_ms']:.3f} ms/step")
        if table == "schemes":
            panels[f"{dataset} {model_name(dataset, model)} (mean of {seeds} seeds)"] = curves
    if panels:
        plot_curves(Path(out_dir) / "numerics.png", panels)
    publish(out_dir, "numerics", rows, render(rows, seeds, jobs), docs)
    return rows


def render(rows, seeds, jobs=1):
    machine = (f"{platform.machine()}, {platform.python_implementation()} "
               f"{platform.python_version()}, numpy {np.__version__}, BLAS on 1 thread"
               + (f", {jobs} runs at once" if jobs > 1 else ""))
    main = [r for r in rows if r["table"] == "schemes"]
    hp = rows[0] if rows else {}
    text = (f"Made by `make bench-numerics` (`nibble bench numerics`) on {machine}: seeds "
            f"0..{seeds - 1}, batch {hp.get('batch_size')}, SGD lr {hp.get('lr')} (cosine), "
            f"momentum {hp.get('momentum')}, identical for every scheme.\n\n"
            + markdown_table(main, COLUMNS))
    abl = {r["scheme"]: r for r in rows if r["table"] == "ablation"}
    if abl:
        m = next(iter(abl.values()))
        table = [{"tensor": t, "alone": abl[f"only-{t.replace('_', '-')}"],
                  "without": abl[f"all-but-{t.replace('_', '-')}"]} for t in TENSORS]
        text += (f"\nPer-tensor ablation ({m['dataset']} {m['model']}, {m['epochs']} epochs): "
                 "the accuracy cost of each tensor quantized alone (every other tensor "
                 f"fp32), and of the default scheme `{DEFAULT_SCHEME}` with every tensor but "
                 "it quantized (it in fp32).\n\n"
                 + markdown_table([{"tensor": r["tensor"],
                                    "alone": r["alone"]["delta_vs_fp32_points"],
                                    "alone_acc": r["alone"]["test_accuracy"],
                                    "without": r["without"]["delta_vs_fp32_points"],
                                    "without_acc": r["without"]["test_accuracy"]}
                                   for r in table],
                                  [("tensor", "tensor", "`{}`"),
                                   ("quantized alone: Δ (points)", "alone", "{:+.2f}"),
                                   ("accuracy", "alone_acc", "{:.4f}"),
                                   ("all but it quantized: Δ (points)", "without", "{:+.2f}"),
                                   ("accuracy", "without_acc", "{:.4f}")]))
    ours = [r for r in main if r["scheme"] == DEFAULT_SCHEME]
    fp32 = {(r["dataset"], r["model"]): r for r in main if r["scheme"] == "fp32"}
    both = [{"work": "nibble (this table)", "dataset": r["dataset"], "model": r["model"],
             "fp32": 100 * fp32[r["dataset"], r["model"]]["test_accuracy"],
             "fp4": 100 * r["test_accuracy"], "delta": r["delta_vs_fp32_points"],
             "share": f"{r['non_4bit_mac_share']:.2%}"} for r in ours
            if (r["dataset"], r["model"]) in fp32]
    both += [{"work": "Sun et al. 2020 (TPR-FP4)", "dataset": d, "model": m, "fp32": a,
              "fp4": b, "delta": b - a, "share": "see text"} for d, m, a, b in PAPER]
    text += ("\nBeside the paper (test accuracy in %; nibble's default scheme "
             f"`{DEFAULT_SCHEME}`):\n\n" + markdown_table(both, [
                 ("work", "work", "{}"), ("dataset", "dataset", "{}"), ("model", "model", "{}"),
                 ("fp32", "fp32", "{:.2f}"), ("4-bit", "fp4", "{:.2f}"),
                 ("Δ (points)", "delta", "{:+.2f}"), ("MACs not 4-bit", "share", "{}")]))
    return text
