"""Offline datasets: scikit-learn's 8x8 digits and Fashion-MNIST from Debian's package.

Images come back as float32 in [0, 1], flattened (N x features); labels as int64.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "DatasetError", "fashion_mnist_dir", "load"]

#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files; override with
#: the ``NIBBLE_FASHION_MNIST`` environment variable.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(RuntimeError):
    """A dataset that cannot be loaded (missing files, bad format)."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int = 10

    @property
    def features(self):
        return self.x_train.shape[1]


def fashion_mnist_dir():
    return Path(os.environ.get("NIBBLE_FASHION_MNIST", FASHION_MNIST_DIR))


def read_idx(path):
    """Read a (possibly gzipped) IDX file into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def _fashion_mnist():
    root = fashion_mnist_dir()
    parts = {}
    for split, (images, labels) in _FASHION_FILES.items():
        ipath, lpath = root / images, root / labels
        if not ipath.exists() or not lpath.exists():
            raise DatasetError(
                f"Fashion-MNIST not found in {root} (install Debian's dataset-fashion-mnist, "
                "or point NIBBLE_FASHION_MNIST at a folder with the IDX files)")
        x = read_idx(ipath).reshape(-1, 28 * 28).astype(np.float32) / 255.0
        parts[split] = (x, read_idx(lpath).astype(np.int64))
    return Dataset("fashion-mnist", *parts["train"], *parts["test"])


def _digits(seed=0, test_fraction=0.2):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test])


DATASETS = {"digits": _digits, "fashion-mnist": _fashion_mnist}


def load(name):
    """Load a dataset by name (``digits`` or ``fashion-mnist``)."""
    try:
        return DATASETS[name]()
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")\
            from None


def available(name):
    """True when ``name`` can be loaded on this machine."""
    if name == "fashion-mnist":
        root = fashion_mnist_dir()
        return all((root / f).exists() for pair in _FASHION_FILES.values() for f in pair)
    return name in DATASETS
