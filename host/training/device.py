"""Training on the accelerator: resident weights, streamed batches, on-device update.

A :class:`DeviceMLP` keeps a bias-free ReLU MLP's whole training state in the device's
tensor memory and drives a training step through the driver, whichever device it talks to
(``emu://``, the simulated device on ``socket://``, a board's serial port):

* the host streams a batch's UINT4 images (as X^T, the forward A operand) and receives the
  RAW logits; it computes the softmax cross-entropy gradient in fp32, quantizes it to an
  FP4 pair (TPR, GradScale) and sends it back;
* per layer the device runs forward (RESCALE to the next layer's UINT4 codes), backward-
  weight (RAW dW) and backward-data (mask and log4-quantize into the next FP4 pair), all in
  the layouts of :mod:`rtl.engine`; the element-wise unit (:mod:`rtl.vector`) makes the
  transposed copies backward-weight reads;
* the weight update runs on the device: UPDATE (momentum SGD on fixed-point master weights,
  with the SAWB statistics of the new weights), then REQUANT to INT4 codes with the SAWB
  step the host computes from those statistics, then TRANSPOSE for backward-data.

Every scale is a function of integers the device returns (absmax, SAWB sums), so two
devices that compute bit-exactly train bit-identically. ``masters="host"`` keeps the master
weights on the host instead (for models whose masters do not fit a board's memory): the
host downloads dW, runs the same fixed-point update
(:func:`~nibble.host.golden.numerics.master_update`) and uploads the codes; the numbers are
identical, only the link cost differs.

Activations are scaled to the 4-bit range every step from the previous step's absmax
(the first step measures first), the way GradScale places the gradient grid; the mask of
the activation derivative is ReLU's (a straight-through estimate at the top code).
"""

import math
from dataclasses import dataclass

import numpy as np

from nibble.host.device.commands import gemm_args
from nibble.host.device.driver import DeviceError
from nibble.host.device.layout import Buffer, pack, row_words, unpack
from nibble.host.golden.gemm import gemm_forward
from nibble.host.golden.lanes import lane_cfg
from nibble.host.golden.numerics import (
    FP4Tensor,
    GradScale,
    NumericsError,
    master_from_float,
    master_update,
    requantize,
    rescale,
    rescale_params,
    sawb_step_from_sums,
    sawb_sums,
)
from nibble.host.golden.tiling import code_bits
from nibble.host.training.model import SCHEMES, quantize_grad, softmax_xent
from nibble.rtl.formats import (
    LOG4_EXP_MAX,
    LOG4_EXP_MIN,
    MASTER_FRAC,
    MOMENTUM_BITS,
    RAW_NIBBLES,
    UINT4_MAX,
    UINT4_MIN,
    MaskMode,
    Operand,
    OutputPath,
    VecOp,
)

__all__ = ["DeviceMLP", "DeviceMemoryError", "DeviceTrainConfig"]

SCHEME = SCHEMES["ibm4"]


class DeviceMemoryError(DeviceError):
    """The model's training state does not fit the device's tensor memory."""


@dataclass
class DeviceTrainConfig:
    sizes: list
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    masters: str = "device"          # "device" or "host"
    #: The top activation code stands for this fraction of the previous step's absmax
    #: (1.0: no clipping; 0.5 clips the outliers for twice finer steps, which trains
    #: better on both reference MLPs: docs/results.md).
    act_clip: float = 0.5

    def __post_init__(self):
        if self.masters not in ("device", "host"):
            raise ValueError(f"masters must be 'device' or 'host', got {self.masters!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.act_clip <= 1:
            raise ValueError(f"act_clip must be in (0, 1], got {self.act_clip}")


def _vec_cfg(op, rows, cols, a, b, c=None, pair=0, mu=0, m=0, s=0):
    return {"op": int(op), "pair": pair, "rows": rows, "cols": cols,
            "a_addr": a.addr, "a_stride": a.stride, "b_addr": b.addr, "b_stride": b.stride,
            "c_addr": c.addr if c else 0, "mu": mu, "m": m, "s": s}


class _Arena:
    """A bump allocator of tensor-memory buffers; element counts are padded to the array
    so every GEMM that reads a buffer finds whole groups."""

    def __init__(self, nib, pad):
        self.nib, self.pad, self.end = nib, pad, 0
        self.bufs = {}

    def alloc(self, name, rows, elems, e):
        padded = -(-elems // self.pad) * self.pad
        buf = Buffer(self.end, rows, elems, e, row_words(padded, e, self.nib))
        self.end = buf.end
        self.bufs[name] = buf
        return buf


def plan_memory(sizes, batch, nib, pad, masters):
    """The device buffers of a model: returns the arena (``.end`` words in all)."""
    arena = _Arena(nib, pad)
    layers = len(sizes) - 1
    for i in range(layers):
        k, n = sizes[i], sizes[i + 1]
        arena.alloc(f"wc{i}", k, n, 1)                   # W^T codes: forward's B
        if i > 0:
            arena.alloc(f"wr{i}", n, k, 1)               # W codes: backward-data's B
        arena.alloc(f"g{i}", k, n, RAW_NIBBLES)                 # dW^T accumulators
        if masters == "device":
            arena.alloc(f"wm{i}", k, n, RAW_NIBBLES)            # master weights (as dW^T)
            arena.alloc(f"vm{i}", k, n, RAW_NIBBLES)            # momenta
    for i in range(layers):
        k = sizes[i]
        arena.alloc(f"xc{i}", k, batch, 1)               # X^T: forward's A, the mask
        arena.alloc(f"xr{i}", batch, k, 1)               # X: backward-weight's B
        n = sizes[i + 1]
        arena.alloc(f"dc{i}", n, batch, 2)               # dY^T pairs: backward-data's A
        arena.alloc(f"dr{i}", batch, n, 2)               # dY pairs: backward-weight's A
    arena.alloc("logits", sizes[-1], batch, RAW_NIBBLES)
    return arena


def memory_words(sizes, batch, nib, pad, masters):
    return plan_memory(sizes, batch, nib, pad, masters).end


class DeviceMLP:
    """An MLP training on ``dev`` (a :class:`nibble.host.device.driver.Device`)."""

    def __init__(self, dev, cfg):
        self.dev, self.cfg = dev, cfg
        self.sizes = list(cfg.sizes)
        self.layers = len(self.sizes) - 1
        pad = max(dev.rows, dev.cols)
        self.arena = plan_memory(self.sizes, cfg.batch_size, dev.word_nibbles, pad,
                                 cfg.masters)
        if self.arena.end > dev.mem_words:
            need = self.arena.end
            msg = (f"the {'-'.join(map(str, self.sizes))} model at batch {cfg.batch_size} "
                   f"needs {need:,} words of tensor memory with its master weights on the "
                   f"device; {dev.url} has {dev.mem_words:,}")
            if cfg.masters == "device":
                host_need = memory_words(self.sizes, cfg.batch_size, dev.word_nibbles, pad,
                                         "host")
                if host_need <= dev.mem_words:
                    msg += (f". With --masters host (master weights on the host, {host_need:,}"
                            " words on the device, dW and the codes cross the link every "
                            "step) it fits")
            raise DeviceMemoryError(msg)
        self.buf = self.arena.bufs
        self.mu = round(cfg.momentum * (1 << MOMENTUM_BITS))
        if not 0 <= self.mu < 1 << MOMENTUM_BITS:
            raise ValueError(f"momentum {cfg.momentum} outside [0, 1)")
        self.w_step = [0.0] * self.layers          # real SAWB step of each layer's codes
        self.act_amax = [None] * (self.layers - 1)  # real absmax of each hidden output
        self.gradscale = [GradScale(streaming=True) for _ in range(self.layers - 1)]
        self.host_w = self.host_v = None            # masters="host": the masters
        self.codes = [None] * self.layers           # last codes (host mode, checkpoints)
        self.counters = {"gemm_cycles": 0, "vec_cycles": 0, "gemms": []}

    # -- set-up -------------------------------------------------------------------------------
    def init_weights(self):
        """He-normal weights from ``seed`` (the host models' initialisation), as masters."""
        rng = np.random.default_rng(self.cfg.seed)
        w = [master_from_float(rng.standard_normal((b, a)) * np.sqrt(2.0 / a)).T
             for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True)]
        self.load_masters(w, [np.zeros_like(x) for x in w])

    def load_masters(self, w, v, codes=None, w_step=None):
        """Put master weights ``w`` and momenta ``v`` (K x N int64 each, i.e. W^T) in
        place and make the INT4 codes (given, or requantized from fresh statistics)."""
        dev, nib = self.dev, self.dev.word_nibbles
        if self.cfg.masters == "host":
            self.host_w = [np.array(x, np.int64) for x in w]
            self.host_v = [np.array(x, np.int64) for x in v]
        for i in range(self.layers):
            if self.cfg.masters == "device":
                for name, x in ((f"wm{i}", w[i]), (f"vm{i}", v[i])):
                    buf = self.buf[name]
                    dev.write(buf.addr, pack(x & 0xFFFFFFFF, RAW_NIBBLES, nib, buf.stride))
            if codes is not None:
                self.w_step[i] = w_step[i]
                self._put_codes(i, codes[i])
            else:
                self._requant(i, None)

    def _put_codes(self, i, codes):
        buf = self.buf[f"wc{i}"]
        self.dev.write(buf.addr, pack(code_bits(codes), 1, self.dev.word_nibbles, buf.stride))
        self.codes[i] = np.asarray(codes, np.int8)
        self._transpose_weights(i)

    def _transpose_weights(self, i):
        if i > 0:
            k, n = self.sizes[i], self.sizes[i + 1]
            self._vector(_vec_cfg(VecOp.TRANSPOSE, k, n, self.buf[f"wc{i}"],
                                  self.buf[f"wr{i}"]))

    # -- device operations ----------------------------------------------------------------
    def _gemm(self, cfg):
        stats = self.dev.gemm(cfg)
        self.counters["gemm_cycles"] += stats["gemm_cycles"]
        self.counters["gemms"].append((cfg["m"], cfg["l"], cfg["n"], stats["gemm_cycles"],
                                       stats["beats"]))
        return stats

    def _vector(self, cfg):
        stats = self.dev.vector(cfg)
        self.counters["vec_cycles"] += stats["vec_cycles"]
        return stats

    def _update(self, i, ratio):
        """UPDATE layer ``i`` with gradient factor ``ratio`` (lr x accumulator unit, in
        master units), then requantize. ``ratio=None`` only measures (no update)."""
        k, n = self.sizes[i], self.sizes[i + 1]
        if ratio is None or ratio == 0:
            gm, gs, mu = 0, 0, (self.mu if ratio == 0 else 0)
        else:
            try:
                gm, gs = rescale_params(ratio)
            except NumericsError as e:
                raise NumericsError(f"layer {i}: the update factor {ratio:.3g} is outside "
                                    f"the UPDATE unit's range ({e})") from None
            mu = self.mu
        if self.cfg.masters == "device":
            stats = self._vector(_vec_cfg(VecOp.UPDATE, k, n, self.buf[f"g{i}"],
                                          self.buf[f"wm{i}"], self.buf[f"vm{i}"], mu=mu,
                                          m=gm, s=gs))
            sums = stats["w_sum_abs"], stats["w_sum_sq"]
        else:
            if ratio is None:
                g = np.zeros_like(self.host_w[i])
            else:
                gbuf = self.buf[f"g{i}"]
                g = unpack(self.dev.read(gbuf.addr, gbuf.words), k, n, RAW_NIBBLES,
                           self.dev.word_nibbles, gbuf.stride, 32)
            self.host_w[i], self.host_v[i] = master_update(g, self.host_w[i], self.host_v[i],
                                                           mu, gm, gs)
            sums = sawb_sums(self.host_w[i])
        return sums

    def _requant(self, i, ratio):
        sums = self._update(i, ratio)
        k, n = self.sizes[i], self.sizes[i + 1]
        step = sawb_step_from_sums(*sums, k * n)            # master units
        qm, qs = rescale_params(1.0 / step)
        self.w_step[i] = math.ldexp(step, -MASTER_FRAC)
        if self.cfg.masters == "device":
            self._vector(_vec_cfg(VecOp.REQUANT, k, n, self.buf[f"wm{i}"],
                                  self.buf[f"wc{i}"], m=qm, s=qs))
            self.codes[i] = None
            self._transpose_weights(i)
        else:
            self._put_codes(i, requantize(self.host_w[i], qm, qs))

    # -- a training step ----------------------------------------------------------------------
    def _act_params(self, i, unit):
        amax = self.act_amax[i] * self.cfg.act_clip
        m, s = rescale_params(unit * UINT4_MAX / amax)
        return m, s

    def step(self, x_codes, labels, lr):
        """One SGD step on a batch (UINT4 image codes, labels); returns the loss."""
        dev, b, nib = self.dev, len(labels), self.dev.word_nibbles
        buf = self.buf
        xc0 = buf["xc0"]
        dev.write(xc0.addr, pack(np.asarray(x_codes).T, 1, nib, xc0.stride))
        x_step = [1.0 / UINT4_MAX]
        for i in range(self.layers):
            k, n = self.sizes[i], self.sizes[i + 1]
            self._vector(_vec_cfg(VecOp.TRANSPOSE, k, b, buf[f"xc{i}"], buf[f"xr{i}"]))
            unit = x_step[i] * self.w_step[i]
            a, w = buf[f"xc{i}"], buf[f"wc{i}"]
            if i == self.layers - 1:
                self._gemm(gemm_args(a, w, buf["logits"], (b, k, n), Operand.UINT4,
                                     Operand.INT4, lane_cfg(OutputPath.RAW)))
                break
            out = buf[f"xc{i + 1}"]
            if self.act_amax[i] is None:                      # first step: measure first
                st = self._gemm(gemm_args(a, w, out, (b, k, n), Operand.UINT4, Operand.INT4,
                                          lane_cfg(OutputPath.RESCALE, relu=1)))
                self.act_amax[i] = (st["absmax"] or 1) * unit
            m, s = self._act_params(i, unit)
            st = self._gemm(gemm_args(a, w, out, (b, k, n), Operand.UINT4, Operand.INT4,
                                      lane_cfg(OutputPath.RESCALE, m=m, s=s, relu=1)))
            x_step.append(unit * math.ldexp(1.0, s) / m)
            if st["absmax"]:
                self.act_amax[i] = st["absmax"] * unit
        # logits, loss, the output gradient
        lb = buf["logits"]
        n_out = self.sizes[-1]
        acc = unpack(dev.read(lb.addr, lb.words), n_out, b, RAW_NIBBLES, nib, lb.stride, 32).T
        logits = (acc * (x_step[-1] * self.w_step[-1])).astype(np.float32)
        loss, dlogits = softmax_xent(logits, labels)
        d0, d1 = quantize_grad(dlogits, 1.0, SCHEME)
        dc = buf[f"dc{self.layers - 1}"]
        dev.write(dc.addr, pack((d0.codes.astype(np.int64) | (d1.codes.astype(np.int64) << 4)).T,
                                2, nib, dc.stride))
        units = (d0.int_unit, d1.int_unit)
        for i in reversed(range(self.layers)):
            k, n = self.sizes[i], self.sizes[i + 1]
            dc, dr = buf[f"dc{i}"], buf[f"dr{i}"]
            self._vector(_vec_cfg(VecOp.TRANSPOSE, n, b, dc, dr, pair=1))
            self._gemm(gemm_args(dr, buf[f"xr{i}"], buf[f"g{i}"], (n, b, k), Operand.FP4,
                                 Operand.UINT4, lane_cfg(OutputPath.RAW, phase=1), a_sel=1))
            unit_w = units[1] * x_step[i]
            if i > 0:
                units = self._backward_data(i, b, units[0] * self.w_step[i])
            self._requant(i, lr * unit_w * math.ldexp(1.0, MASTER_FRAC))
        return loss

    def _backward_data(self, i, b, unit):
        """dX of layer ``i`` masked by layer i-1's activation and log-quantized on the
        device into layer i-1's FP4 pair; returns that pair's datapath units."""
        k, n = self.sizes[i], self.sizes[i + 1]
        buf = self.buf
        gs = self.gradscale[i - 1]

        def run(exp):
            # exponents beyond the lane's range give the same codes as its ends
            lane = lane_cfg(OutputPath.LOG4, exp=int(np.clip(exp, LOG4_EXP_MIN, LOG4_EXP_MAX)),
                            mask=MaskMode.RELU)
            return self._gemm(gemm_args(buf[f"dc{i}"], buf[f"wr{i}"], buf[f"dc{i - 1}"],
                                        (b, n, k), Operand.FP4, Operand.INT4, lane, a_sel=0,
                                        mask=buf[f"xc{i}"]))

        exp = gs.planned(unit)                               # GradScale, streaming
        if exp is None:                                      # the first step measures
            exp = gs.update(run(0)["absmax"], unit)
            run(exp)
        else:
            gs.update(run(exp)["absmax"], unit)
        # the datapath unit is the same for both phases (the integer holds 2^phase)
        unit = FP4Tensor(None, 0, exp, unit).int_unit
        return unit, unit

    # -- reading the model back -------------------------------------------------------------
    def weight_codes(self):
        """Each layer's INT4 codes as W (N x K int8)."""
        out = []
        for i in range(self.layers):
            if self.codes[i] is None:
                buf = self.buf[f"wc{i}"]
                k, n = self.sizes[i], self.sizes[i + 1]
                self.codes[i] = unpack(self.dev.read(buf.addr, buf.words), k, n, 1,
                                       self.dev.word_nibbles, buf.stride, 4).astype(np.int8)
            out.append(self.codes[i].T)
        return out

    def masters(self):
        """(w, v): the master weights and momenta, K x N int64 per layer."""
        if self.cfg.masters == "host":
            return [x.copy() for x in self.host_w], [x.copy() for x in self.host_v]
        w, v = [], []
        for i in range(self.layers):
            k, n = self.sizes[i], self.sizes[i + 1]
            for name, dst in ((f"wm{i}", w), (f"vm{i}", v)):
                buf = self.buf[name]
                dst.append(unpack(self.dev.read(buf.addr, buf.words), k, n, RAW_NIBBLES,
                                  self.dev.word_nibbles, buf.stride, 32))
        return w, v

    def predict(self, x_codes, batch=2048):
        """Predicted classes, computed on the host from the device's weight codes with the
        device's forward arithmetic (the golden model: bit-exact with a device forward)."""
        codes = self.weight_codes()
        preds = []
        for lo in range(0, len(x_codes), batch):
            h = np.asarray(x_codes[lo:lo + batch])
            step = 1.0 / UINT4_MAX
            for i, w in enumerate(codes):
                acc = gemm_forward(h, w)
                if i == self.layers - 1:
                    preds.append(acc.argmax(axis=1))
                    break
                unit = step * self.w_step[i]
                m, s = self._act_params(i, unit)
                h, _ = rescale(acc, m, s, UINT4_MIN, UINT4_MAX, relu=True)
                step = unit * math.ldexp(1.0, s) / m
        return np.concatenate(preds) if preds else np.zeros(0, np.int64)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self):
        w, v = self.masters()
        return {
            "w": w, "v": v, "codes": [c.T for c in self.weight_codes()],
            "w_step": list(self.w_step), "act_amax": list(self.act_amax),
            "gradscale": [(g.prev_absmax, g.exp) for g in self.gradscale],
        }

    def restore(self, st):
        self.act_amax = list(st["act_amax"])
        for g, (prev, exp) in zip(self.gradscale, st["gradscale"], strict=True):
            g.prev_absmax, g.exp = prev, exp
        self.load_masters(st["w"], st["v"], codes=st["codes"], w_step=st["w_step"])


# -- the training loop ------------------------------------------------------------------------
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
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


CHECKPOINT = "checkpoint.npz"


def save_checkpoint(path, mlp, meta):
    """Write the model's device state and the loop's state atomically."""
    import json
    from pathlib import Path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = mlp.state()
    arrays = {}
    for i in range(mlp.layers):
        arrays[f"w{i}"], arrays[f"v{i}"] = st["w"][i], st["v"][i]
        arrays[f"codes{i}"] = st["codes"][i]
    meta = dict(meta, w_step=st["w_step"], act_amax=st["act_amax"],
                gradscale=st["gradscale"])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_checkpoint(path):
    """``(state for DeviceMLP.restore, meta)``."""
    import json
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        layers = len(meta["config"]["sizes"]) - 1
        st = {"w": [z[f"w{i}"] for i in range(layers)], "v": [z[f"v{i}"] for i in range(layers)],
              "codes": [z[f"codes{i}"] for i in range(layers)],
              "w_step": meta["w_step"], "act_amax": meta["act_amax"],
              "gradscale": meta["gradscale"]}
    return st, meta


def _summary(t):
    """Per-step figures of accumulated step counters."""
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


def train_on_device(dev, data, cfg, epochs, out=None, resume=None, progress=True,
                    max_steps=None, time_budget=None):
    """Train ``cfg``'s MLP on ``data`` through ``dev``. Returns the metrics dict (also
    written to ``out/metrics.json`` with ``out/checkpoint.npz``, each epoch and on Ctrl-C).

    ``resume``: a checkpoint path; training continues bit-identically. ``max_steps``,
    ``time_budget`` (seconds): stop (with a checkpoint) after that many steps, or the first
    step that ends past that time, of this run (benchmarks and tests). The result also has
    ``losses`` (every step's loss in this run) and ``partial`` (the per-step figures of the
    steps since the last epoch ended, or of the last epoch).
    """
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from nibble.host.golden.numerics import quantize_int
    from nibble.host.report import write_json
    from nibble.host.training.train import lr_at

    xq = quantize_int(data.x_train, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX)
    xt = quantize_int(data.x_test, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX)
    n = len(xq)
    bsz = cfg.batch_size
    steps_per_epoch = -(-n // bsz)
    total = steps_per_epoch * epochs
    mlp = DeviceMLP(dev, cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    loop = {"epoch": 0, "pos": 0, "step": 0, "order": None, "losses": [], "history": []}
    if resume is not None:
        st, meta = load_checkpoint(resume)
        if meta["config"]["sizes"] != cfg.sizes or meta["config"]["batch_size"] != bsz:
            raise ValueError(f"{resume} is a checkpoint of a different model or batch size")
        mlp.restore(st)
        rng.bit_generator.state = meta["rng"]
        loop.update({k: meta[k] for k in ("epoch", "pos", "step", "losses", "history")})
        loop["order"] = np.array(meta["order"]) if meta["order"] is not None else None
    else:
        mlp.init_weights()
    out = Path(out) if out else None
    config = {"dataset": data.name, "sizes": cfg.sizes, "batch_size": bsz, "lr": cfg.lr,
              "momentum": cfg.momentum, "seed": cfg.seed, "masters": cfg.masters,
              "act_clip": cfg.act_clip,
              "epochs": epochs, "device": dev.url, "device_info": dev.info}

    def checkpoint():
        if out is None:
            return
        meta = {"config": config, "rng": rng.bit_generator.state,
                "order": None if loop["order"] is None else loop["order"].tolist(),
                **{k: loop[k] for k in ("epoch", "pos", "step", "losses", "history")}}
        save_checkpoint(out / CHECKPOINT, mlp, meta)

    def metrics(interrupted):
        hist = loop["history"]
        return {"config": config, "history": hist, "steps": loop["step"],
                "test_accuracy": hist[-1]["test_accuracy"] if hist else None,
                "interrupted": interrupted}

    bar = tqdm(total=total, initial=loop["step"], disable=not progress, unit="step",
               desc=f"{data.name} on {dev.url}", leave=False)
    interrupted = False
    run_steps = 0
    run_losses = []
    started = time.perf_counter()
    k_in, n_out = cfg.sizes[0], cfg.sizes[-1]
    with _StopFlag() as stop:
        while loop["epoch"] < epochs and not interrupted:
            if loop["pos"] == 0:
                loop["order"] = rng.permutation(n)
                loop["losses"] = []
            if loop["pos"] == 0 or "t" not in loop:      # this epoch's (or run's) counters
                loop["t"] = dict.fromkeys(("seconds", "io", "images", "steps", "bytes",
                                           "batch_bytes", "cycles"), 0)
            acc_t = loop["t"]
            while loop["pos"] < n:
                idx = loop["order"][loop["pos"]:loop["pos"] + bsz]
                wire0 = dev.wire_sent + dev.wire_received
                io0 = dev.io_seconds
                cyc0 = mlp.counters["gemm_cycles"] + mlp.counters["vec_cycles"]
                t0 = time.perf_counter()
                loss = mlp.step(xq[idx], data.y_train[idx],
                                lr_at(cfg.lr, loop["step"], total))
                acc_t["seconds"] += time.perf_counter() - t0
                acc_t["io"] += dev.io_seconds - io0
                acc_t["bytes"] += dev.wire_sent + dev.wire_received - wire0
                acc_t["batch_bytes"] += batch_bytes(len(idx), k_in, n_out)
                acc_t["cycles"] += (mlp.counters["gemm_cycles"] + mlp.counters["vec_cycles"]
                                    - cyc0)
                acc_t["images"] += len(idx)
                acc_t["steps"] += 1
                loop["losses"].append(loss)
                run_losses.append(loss)
                loop["pos"] += len(idx)
                loop["step"] += 1
                run_steps += 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if (stop.set or (max_steps is not None and run_steps >= max_steps)
                        or (time_budget is not None
                            and time.perf_counter() - started > time_budget)):
                    interrupted = True
                    break
            if interrupted and loop["pos"] < n:
                break
            row = {
                "epoch": loop["epoch"] + 1,
                "loss": float(np.mean(loop["losses"])),
                "train_accuracy": float(np.mean(mlp.predict(xq) == data.y_train)),
                "test_accuracy": float(np.mean(mlp.predict(xt) == data.y_test)),
                "seconds": acc_t["seconds"],
                **_summary(acc_t),
            }
            loop["history"].append(row)
            loop["epoch"] += 1
            loop["pos"] = 0
            loop["order"] = None
            bar.set_postfix(loss=f"{row['loss']:.3f}", test=f"{row['test_accuracy']:.3f}")
            if progress:
                bar.write(f"epoch {row['epoch']}: loss {row['loss']:.4f}, test accuracy "
                          f"{row['test_accuracy']:.4f}, {row['images_per_second']:.0f} "
                          "images/s")
            checkpoint()
            if out is not None:
                write_json(out / "metrics.json", metrics(False))
    bar.close()
    if interrupted:
        checkpoint()
    result = metrics(interrupted)
    if out is not None:
        write_json(out / "metrics.json", result)
    t = loop.get("t")
    result["partial"] = _summary(t) if t and t["steps"] else (
        loop["history"][-1] if loop["history"] else None)
    result["losses"] = run_losses
    result["model"] = mlp
    return result
