"""The host-emulation training loop: minibatch SGD with momentum and a cosine schedule, for
an MLP or the LeNet-5-class CNN, in any :class:`~nibble.host.training.model.Scheme`."""

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from nibble.host.training.cnn import LeNet
from nibble.host.training.model import MLP, SCHEMES, rows

__all__ = ["DEFAULT_MODELS", "TrainConfig", "lr_at", "train"]

#: The reference MLP of each dataset (layer sizes, input first).
DEFAULT_MODELS = {"digits": [64, 32, 10], "fashion-mnist": [784, 128, 10]}


@dataclass
class TrainConfig:
    scheme: str = "ibm4"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    sizes: list = field(default_factory=list)   # empty: DEFAULT_MODELS[dataset]
    model: str = "mlp"                          # "mlp" (sizes) or "lenet5" (28x28 images)

    def __post_init__(self):
        if self.model not in ("mlp", "lenet5"):
            raise ValueError(f"unknown model {self.model!r}: mlp or lenet5")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose from {', '.join(SCHEMES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def build_model(data, cfg):
    """The model ``cfg`` names for ``data``, and its layer sizes."""
    if cfg.model == "lenet5":
        if data.features != 784 or data.classes != 10:
            raise ValueError(f"lenet5 takes 28x28 images in 10 classes, not {data.name}")
        model = LeNet(SCHEMES[cfg.scheme], seed=cfg.seed)
        return model, model.sizes
    sizes = cfg.sizes or [data.features, 128, data.classes]
    if sizes[0] != data.features or sizes[-1] != data.classes:
        raise ValueError(f"model {sizes} does not match {data.name} "
                         f"({data.features} features, {data.classes} classes)")
    return MLP(sizes, SCHEMES[cfg.scheme], seed=cfg.seed), sizes


def lr_at(lr, step, total):
    """The cosine schedule: learning rate ``lr`` at ``step`` of ``total``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def accuracy(model, h, y):
    """Fraction of correct predictions on an input prepared by ``model.input``."""
    return float(np.mean(model.predict(h) == y)) if len(y) else 0.0


def train(data, cfg, progress=True):
    """Train ``cfg``'s model on ``data`` (a :class:`~nibble.host.training.datasets.Dataset`).

    Returns a dict: ``test_accuracy``, ``history`` (one row per epoch: ``epoch``, ``loss``,
    ``train_accuracy``, ``test_accuracy``, ``seconds``), ``seconds`` (training time without
    evaluation), ``step_seconds`` (mean time of one training step), ``non_4bit_mac_share``
    (of the training steps' MACs), ``config`` and the model.
    """
    model, sizes = build_model(data, cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    h_train, h_test = model.input(data.x_train), model.input(data.x_test)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history, train_seconds, step = [], 0.0, 0
    bar = tqdm(total=total, disable=not progress, unit="step",
               desc=f"{data.name} {cfg.scheme}", leave=False)
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(n)
        losses = []
        t0 = time.perf_counter()
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            losses.append(model.train_step(rows(h_train, idx), data.y_train[idx],
                                           lr_at(cfg.lr, step, total), cfg.momentum))
            step += 1
            bar.update()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "train_accuracy": accuracy(model, h_train, data.y_train),
            "test_accuracy": accuracy(model, h_test, data.y_test),
            "seconds": seconds,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", test=f"{row['test_accuracy']:.3f}")
    bar.close()
    return {
        "config": asdict(cfg) | {"sizes": sizes},
        "history": history,
        "test_accuracy": history[-1]["test_accuracy"],
        "seconds": train_seconds,
        "step_seconds": train_seconds / total,
        "non_4bit_mac_share": model.non_4bit_mac_share(),
        "model": model,
    }
