"""Datasets, the IDX reader and the nibble command line."""

import gzip
import json

import numpy as np
import pytest

from nibble.host.cli import main
from nibble.host.training import datasets


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    """A Fashion-MNIST folder with 30 training and 10 test images in the real IDX format."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setenv("NIBBLE_FASHION_MNIST", str(tmp_path))
    return tmp_path


def test_digits_split():
    d = datasets.load("digits")
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)
    assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert set(np.unique(d.y_test)) == set(range(10))


def test_idx_reader_and_fashion_loader(tiny_fashion):
    assert datasets.available("fashion-mnist")
    d = datasets.load("fashion-mnist")
    assert d.x_train.shape == (30, 784) and d.x_test.shape == (10, 784)
    assert d.x_train.max() <= 1.0 and d.y_train.dtype == np.int64


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))         # says 5, has 2
    with pytest.raises(datasets.DatasetError, match="expected"):
        datasets.read_idx(bad)
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(datasets.DatasetError, match="IDX"):
        datasets.read_idx(tmp_path / "junk")


@pytest.mark.skipif(not datasets.available("fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    d = datasets.load("fashion-mnist")
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)


def test_missing_dataset_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NIBBLE_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert main(["train", "--dataset", "fashion-mnist", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Fashion-MNIST not found" in err[0]


def test_cli_bench_numerics_rows(tmp_path, tiny_fashion):
    doc = tmp_path / "results.md"
    doc.write_text("# r\n<!-- bench-numerics:begin -->\nold\n<!-- bench-numerics:end -->\n")
    out = tmp_path / "bench"
    assert main(["bench", "numerics", "--epochs", "1", "--seeds", "2", "--quiet",
                 "--out", str(out), "--model", "mlp", "--no-ablation",
                 "--scheme", "ibm4", "--scheme", "radix2-fp4", "--docs", str(doc)]) == 0
    rows = json.loads((out / "numerics.json").read_text())
    assert {(r["dataset"], r["scheme"]) for r in rows} == {
        (d, s) for d in ("digits", "fashion-mnist") for s in ("fp32", "ibm4", "radix2-fp4")}
    for r in rows:
        assert {"dataset", "model", "scheme", "test_accuracy", "epochs", "seconds",
                "step_time_ratio_vs_fp32"} <= set(r)
        assert 0 <= r["test_accuracy"] <= 1 and r["epochs"] == 1
        assert len(r["test_accuracies"]) == 2
        assert r["test_accuracy"] == sum(r["test_accuracies"]) / 2
    assert (out / "numerics.png").exists()
    assert "| fashion-mnist | mlp-784-128-10 | ibm4 |" in doc.read_text()
    assert "old" not in doc.read_text()


def test_cli_bench_numerics_cnn_ablation_and_paper(tmp_path, tiny_fashion):
    """The CNN and the per-tensor ablation through the same command: every row carries its
    non-4-bit MAC share, and the markdown sets the default scheme beside the paper."""
    out = tmp_path / "bench"
    assert main(["bench", "numerics", "--epochs", "1", "--seeds", "1", "--quiet",
                 "--out", str(out), "--dataset", "fashion-mnist"]) == 0
    rows = json.loads((out / "numerics.json").read_text())
    cnn = {r["scheme"]: r for r in rows if r["model"] == "lenet5"}
    abl = {r["scheme"]: r for r in rows if r["table"] == "ablation"}
    assert set(cnn) == {"fp32", "ibm4-2t", "ibm4", "ibm4-fp32-out", "ibm4-no-tpr",
                        "radix2-fp4", "ibm4-no-gradscale"}
    assert set(abl) == {"fp32"} | {f"{k}-{t}" for k in ("only", "all-but")
                                   for t in ("weights", "inputs", "acts", "grads", "out-grad")}
    for r in rows:
        assert {"dataset", "model", "scheme", "test_accuracy", "non_4bit_mac_share"} <= set(r)
    assert cnn["fp32"]["non_4bit_mac_share"] == 1.0
    assert cnn["ibm4"]["non_4bit_mac_share"] == cnn["ibm4-2t"]["non_4bit_mac_share"] == 0.0
    assert 0 < cnn["ibm4-fp32-out"]["non_4bit_mac_share"] < 0.01
    md = (out / "numerics.md").read_text()
    assert "Per-tensor ablation" in md and "| Sun et al. 2020 (TPR-FP4) | ImageNet |" in md


def test_bench_numerics_jobs_do_not_change_results(tmp_path, tiny_fashion):
    """Runs spread over worker processes give the same rows, in the same order, as one by
    one: only the timings may differ."""
    from nibble.host.bench.numerics import bench_numerics

    kw = dict(names=["fashion-mnist"], schemes=["ibm4"], models=["mlp"],
              epochs={"fashion-mnist": 1}, seeds=2, ablation=False, progress=False,
              log=lambda _: None)
    one = bench_numerics(out_dir=tmp_path / "one", **kw)
    two = bench_numerics(out_dir=tmp_path / "two", jobs=2, **kw)
    assert [(r["scheme"], r["test_accuracies"], r["curve"]) for r in one] == \
        [(r["scheme"], r["test_accuracies"], r["curve"]) for r in two]
    assert "2 runs at once" in (tmp_path / "two" / "numerics.md").read_text()


def test_cli_formats(capsys):
    assert main(["formats"]) == 0
    assert "accumulator 20 bits" in capsys.readouterr().out


def test_cli_train_makes_the_set_resident_or_streams(tmp_path, tiny_fashion, capsys):
    """Fashion-MNIST on a device with an SDRAM: uploaded once and said so; --stream sends
    the images every step instead."""
    args = ["train", "--device", "emu://", "--dataset", "fashion-mnist", "--epochs", "1",
            "--quiet", "--no-fp32"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "training set was resident in the device's SDRAM (30 images" in out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["config"]["resident"]["images"] == 30 and not metrics["upload"]["kept"]
    assert main([*args, "--stream", "--out", str(tmp_path / "b")]) == 0
    assert "resident" not in capsys.readouterr().out
