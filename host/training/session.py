"""A training run on a device: epochs of steps, metrics, checkpoints, resume and Ctrl-C.

:class:`Session` drives a :class:`~nibble.host.training.device.DeviceMLP` over a dataset:
it shuffles, streams the batches, keeps per-epoch metrics (loss, accuracies, images/s,
device cycles and link bytes per step) and writes ``metrics.json`` and ``checkpoint.npz``
after every epoch. A checkpoint holds the model's device state and the loop's own (epoch,
position, the shuffle and its generator), so a resumed run is bit-identical to one that
was never stopped. Ctrl-C finishes the step, writes the checkpoint and stops.

On a device with an SDRAM that has room for it, the training set is *resident*
(:mod:`nibble.host.training.resident`): uploaded once as 4-bit codes and checked, and each
step sends only the batch's indices (one DMA each). The checkpoint names the set (its
CRC-32 and layout): a resumed run checks the device still holds it and uploads it again
if not.
"""

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nibble.host.golden.numerics import quantize_int
from nibble.host.report import write_json
from nibble.host.training.device import DeviceMLP
from nibble.host.training.resident import GATHER_WIRE_BYTES, ResidentError
from nibble.host.training.train import lr_at
from nibble.rtl.formats import UINT4_MAX, UINT4_MIN

__all__ = ["CHECKPOINT", "Session", "batch_bytes", "load_checkpoint", "save_checkpoint",
           "train_on_device"]

CHECKPOINT = "checkpoint.npz"
#: The per-step counters a session sums, per epoch.
_COUNTERS = ("seconds", "io", "images", "steps", "bytes", "batch_bytes", "cycles")


def batch_bytes(b, k, n):
    """A batch's own bytes: UINT4 inputs, one byte per label, the RAW logits (4 bytes each)
    and the output gradient (one FP4 pair byte each)."""
    return -(-b * k // 2) + b + 4 * b * n + b * n


class _StopFlag:
    """SIGINT sets a flag the loop reads between steps (a second Ctrl-C aborts at once)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def save_checkpoint(path, mlp, meta):
    """Write the model's device state and the loop's state atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = mlp.state()
    arrays = {}
    for i in range(mlp.layers):
        arrays[f"w{i}"], arrays[f"v{i}"] = st["w"][i], st["v"][i]
        arrays[f"codes{i}"] = st["codes"][i]
    meta = dict(meta, **{k: st[k] for k in ("w_step", "act_amax", "alpha", "alpha_v",
                                            "gradscale")})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_checkpoint(path):
    """``(state for DeviceMLP.restore, meta)``."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        layers = len(meta["config"]["sizes"]) - 1
        st = {"w": [z[f"w{i}"] for i in range(layers)], "v": [z[f"v{i}"] for i in range(layers)],
              "codes": [z[f"codes{i}"] for i in range(layers)],
              **{k: meta.get(k) for k in ("w_step", "act_amax", "alpha", "alpha_v",
                                          "gradscale")}}
    return st, meta


def _summary(t):
    """Per-step figures of summed step counters."""
    s = t["steps"]
    return {
        "images_per_second": t["images"] / t["seconds"],
        "device_cycles_per_step": t["cycles"] / s if t["cycles"] else None,
        "link_bytes_per_step": t["bytes"] / s,
        "batch_bytes_per_step": t["batch_bytes"] / s,
        "link_bytes_ratio": t["bytes"] / t["batch_bytes"],
        "host_seconds_per_step": (t["seconds"] - t["io"]) / s,
        "io_seconds_per_step": t["io"] / s,
    }


class Session:
    """Training ``cfg``'s MLP on ``data`` through ``dev`` for ``epochs``; ``out`` (a folder)
    gets the metrics and the checkpoint, ``resume`` is a checkpoint to continue.
    ``resident``: the training set in the device's SDRAM (True: required; None: where it
    fits and saves link bytes, i.e. an image's codes are at least twice a DMA's frames;
    False: batches streamed)."""

    def __init__(self, dev, data, cfg, epochs, out=None, resume=None, resident=None):
        self.dev, self.data, self.cfg, self.epochs = dev, data, cfg, epochs
        self.out = Path(out) if out else None
        self.x_train = quantize_int(data.x_train, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX)
        self.x_test = quantize_int(data.x_test, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX)
        self.total = -(-len(self.x_train) // cfg.batch_size) * epochs
        self.mlp = DeviceMLP(dev, cfg)
        #: why the set is not resident (None when it is, or when not asked)
        self.streamed_because = None
        self.uploaded = None                  # the resident set's upload: None until run()
        if resident is not False:
            try:
                rs = self.mlp.make_resident(self.x_train)
            except ResidentError as e:
                if resident:
                    raise
                self.streamed_because = str(e)
            else:
                if resident is None and not rs.worth_it:
                    self.mlp.resident = None
                    self.streamed_because = (
                        f"an image's {rs.image_bytes} bytes of codes cost about as much link "
                        f"as gathering it ({GATHER_WIRE_BYTES} bytes): resident, "
                        "the set saves no link bytes")
        self.rng = np.random.default_rng(cfg.seed + 1)
        # the loop's state: what a checkpoint keeps
        self.epoch = self.pos = self.step = 0
        self.order = None                     # this epoch's shuffle
        self.losses = []                      # this epoch's losses
        self.history = []                     # one row per finished epoch
        self.counters = dict.fromkeys(_COUNTERS, 0)    # since the epoch (or the run) began
        self.config = {"dataset": data.name, "sizes": cfg.sizes, "batch_size": cfg.batch_size,
                       "lr": cfg.lr, "momentum": cfg.momentum, "seed": cfg.seed,
                       "masters": cfg.masters, "out_grad": cfg.out_grad, "act": cfg.act,
                       "alpha_init": cfg.alpha_init, "act_clip": cfg.act_clip, "epochs": epochs,
                       "device": dev.url, "device_info": dev.info,
                       "state_in_sdram": self.mlp.paged,
                       "resident": (self.mlp.resident.describe() if self.mlp.resident
                                    else None)}
        self._resumed_resident = None
        if resume is not None:
            self._resume(resume)
        else:
            self.mlp.init_weights()

    def _resume(self, path):
        st, meta = load_checkpoint(path)
        c = meta["config"]
        if (c["sizes"] != self.cfg.sizes or c["batch_size"] != self.cfg.batch_size
                or c.get("out_grad", "fp4") != self.cfg.out_grad
                or c.get("act", "absmax") != self.cfg.act):
            raise ValueError(f"{path} is a checkpoint of a different model, batch size or "
                             "scheme")
        self.mlp.restore(st)
        self._resumed_resident = c.get("resident")
        self.rng.bit_generator.state = meta["rng"]
        self.epoch, self.pos, self.step = meta["epoch"], meta["pos"], meta["step"]
        self.losses, self.history = meta["losses"], meta["history"]
        self.order = None if meta["order"] is None else np.array(meta["order"])

    # -- outputs ----------------------------------------------------------------------------
    def checkpoint(self):
        if self.out is None:
            return
        meta = {"config": self.config, "rng": self.rng.bit_generator.state,
                "order": None if self.order is None else self.order.tolist(),
                "epoch": self.epoch, "pos": self.pos, "step": self.step,
                "losses": self.losses, "history": self.history}
        save_checkpoint(self.out / CHECKPOINT, self.mlp, meta)

    def metrics(self, interrupted):
        hist = self.history
        return {"config": self.config, "history": hist, "steps": self.step,
                "upload": self.uploaded,
                "test_accuracy": hist[-1]["test_accuracy"] if hist else None,
                "interrupted": interrupted}

    # -- the loop -------------------------------------------------------------------------------
    def _upload(self, progress):
        """Put the resident set on the device once per session: a resumed run whose
        checkpoint names this set keeps the device's copy when the device's sums of it
        still match (``uploaded["kept"]``)."""
        rs = self.mlp.resident
        if rs is None or self.uploaded is not None:
            return
        dev, staging = self.dev, self.mlp.staging()
        wire0, t0 = dev.wire_sent + dev.wire_received, time.perf_counter()
        kept = (self._resumed_resident == rs.describe()
                and rs.verify(staging, progress, raise_=False))
        if not kept:
            rs.upload(staging, progress)
        self.uploaded = {"kept": bool(kept), "seconds": time.perf_counter() - t0,
                         "link_bytes": dev.wire_sent + dev.wire_received - wire0,
                         "set_bytes": rs.bytes}

    def _train_step(self):
        """One step of the current epoch, its counters summed."""
        dev, mlp, c = self.dev, self.mlp, self.counters
        idx = self.order[self.pos:self.pos + self.cfg.batch_size]
        wire0, io0 = dev.wire_sent + dev.wire_received, dev.io_seconds
        t0 = time.perf_counter()
        lr = lr_at(self.cfg.lr, self.step, self.total)
        if mlp.resident is not None:      # (the next batch of the epoch, to fetch early)
            bs = self.cfg.batch_size
            nxt = self.order[self.pos + bs:self.pos + 2 * bs]
            loss = mlp.step_indices(idx, self.data.y_train[idx], lr,
                                    next_idx=nxt if len(nxt) else None)
        else:
            loss = mlp.step(self.x_train[idx], self.data.y_train[idx], lr)
        c["seconds"] += time.perf_counter() - t0
        c["io"] += dev.io_seconds - io0
        c["bytes"] += dev.wire_sent + dev.wire_received - wire0
        c["batch_bytes"] += batch_bytes(len(idx), self.cfg.sizes[0], self.cfg.sizes[-1])
        self._count_cycles()
        c["images"] += len(idx)
        c["steps"] += 1
        self.losses.append(loss)
        self.pos += len(idx)
        self.step += 1
        return loss

    def _count_cycles(self, settle=False):
        """Add the device cycles counted since the last call to the epoch's. A device the
        host posts commands to (``DeviceMLP.posting``) counts a step's last commands when
        their replies are taken: at the next step, or at ``settle``."""
        mlp = self.mlp
        if settle:
            mlp.settle()
        now = mlp.counters["gemm_cycles"] + mlp.counters["vec_cycles"]
        self.counters["cycles"] += now - self._cycles_seen
        self._cycles_seen = now

    def _end_epoch(self):
        """The epoch's row: mean loss, accuracies (the golden forward on the device's
        codes), and the per-step figures."""
        self._count_cycles(settle=True)
        mlp, d = self.mlp, self.data
        row = {"epoch": self.epoch + 1, "loss": float(np.mean(self.losses)),
               "train_accuracy": float(np.mean(mlp.predict(self.x_train) == d.y_train)),
               "test_accuracy": float(np.mean(mlp.predict(self.x_test) == d.y_test)),
               "seconds": self.counters["seconds"], **_summary(self.counters)}
        self.history.append(row)
        self.epoch += 1
        self.pos = 0
        self.order = None
        return row

    def run(self, progress=True, max_steps=None, time_budget=None):
        """Train until the last epoch ends, Ctrl-C, ``max_steps`` steps of this run or the
        first step that ends past ``time_budget`` seconds. Returns the metrics, with
        ``losses`` (every step's loss in this run), ``partial`` (the per-step figures since
        the last epoch ended, or of the last epoch) and ``model``."""
        self._upload(progress)
        n = len(self.x_train)
        bar = tqdm(total=self.total, initial=self.step, disable=not progress, unit="step",
                   desc=f"{self.data.name} on {self.dev.url}", leave=False)
        run_losses, started, stopped = [], time.perf_counter(), False
        self._cycles_seen = self.mlp.counters["gemm_cycles"] + self.mlp.counters["vec_cycles"]
        with _StopFlag() as stop:
            while self.epoch < self.epochs and not stopped:
                if self.pos == 0:
                    self.order = self.rng.permutation(n)
                    self.losses = []
                    self.counters = dict.fromkeys(_COUNTERS, 0)
                while self.pos < n and not stopped:
                    loss = self._train_step()
                    run_losses.append(loss)
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}")
                    stopped = (stop.set or (max_steps is not None
                                            and len(run_losses) >= max_steps)
                               or (time_budget is not None
                                   and time.perf_counter() - started > time_budget))
                if self.pos < n:
                    break
                row = self._end_epoch()
                bar.set_postfix(loss=f"{row['loss']:.3f}", test=f"{row['test_accuracy']:.3f}")
                if progress:
                    bar.write(f"epoch {row['epoch']}: loss {row['loss']:.4f}, test accuracy "
                              f"{row['test_accuracy']:.4f}, {row['images_per_second']:.0f} "
                              "images/s")
                self.checkpoint()
                if self.out is not None:
                    write_json(self.out / "metrics.json", self.metrics(False))
        bar.close()
        self._count_cycles(settle=True)          # (nothing more after an epoch's end)
        if stopped:
            self.checkpoint()
        result = self.metrics(stopped)
        if self.out is not None:
            write_json(self.out / "metrics.json", result)
        c = self.counters
        result["partial"] = _summary(c) if c["steps"] else (
            self.history[-1] if self.history else None)
        result["losses"] = run_losses
        result["model"] = self.mlp
        return result


def train_on_device(dev, data, cfg, epochs, out=None, resume=None, progress=True,
                    max_steps=None, time_budget=None, resident=None):
    """Train ``cfg``'s MLP on ``data`` through ``dev``: :class:`Session` in one call.

    ``resume``: a checkpoint path; training continues bit-identically. ``max_steps``,
    ``time_budget`` (seconds): stop (with a checkpoint) after that many steps, or the first
    step that ends past that time, of this run (benchmarks and tests). ``resident``: see
    :class:`Session`.
    """
    return Session(dev, data, cfg, epochs, out, resume, resident).run(progress, max_steps,
                                                                       time_budget)
