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
  with the SAWB statistics of the new weights), then REQUANT to INT4 codes, then TRANSPOSE
  for backward-data. REQUANT's SAWB step is the one of the masters *before* the update
  (the statistics the last UPDATE returned; at the start, of the initial masters): known
  before the step, so a paged device requantizes each part of the masters in its
  scratchpad right after updating it (``PagedDevice.gemm_update``), instead of reading
  all the masters from its SDRAM again once the host has the new statistics (on the
  ULX3S configuration 0.41 MB a step, ``make bench-train``). One step's update moves the
  statistics little; ``make bench-train`` measures the accuracy (after 10 epochs 0.8785,
  0.8762 with the updated masters' step; fp32 0.8789).

Every scale is a function of integers the device returns (absmax, SAWB sums), so two
devices that compute bit-exactly train bit-identically. On a paged device the host sends
each command without waiting for its reply (:attr:`DeviceMLP.posting`) and takes the
replies in order where a result is needed (:meth:`DeviceMLP.settle`): the logits, and
the last step's statistics (the next scales, the SAWB sums) once the new batch's gather
and transpose are on their way; the step's numbers are the
same, the host's work and the link's bytes overlap the device's. On a device with an SDRAM whose
scratchpad cannot hold the state, the state lives in the SDRAM and every command pages its
buffers through the scratchpad (:class:`~nibble.host.device.paged.PagedDevice`; the same
numbers, bit for bit). ``masters="host"`` keeps the master weights on the host instead (for
models whose masters do not fit a board's memory, and by default on a device whose
element-wise unit is built without UPDATE and REQUANT, such as the iCEBreaker's: INFO's
``vec_ops``): the host downloads dW, runs the same
fixed-point update
(:func:`~nibble.host.golden.numerics.master_update`) and uploads the codes; the numbers are
identical, only the link cost differs.

Activations are scaled to the 4-bit range every step from the previous step's absmax
(the first step measures first), the way GradScale places the gradient grid; the mask of
the activation derivative is ReLU's (a straight-through estimate at the top code).
"""

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from nibble.host.device.commands import gemm_args, lane_cfg, vector_args
from nibble.host.device.driver import DeviceError
from nibble.host.device.layout import Buffer, pack, row_words, unpack, widen16
from nibble.host.device.paged import PagedDevice
from nibble.host.golden.gemm import gemm_forward
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
from nibble.host.training.resident import ResidentSet, staging_area
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import (
    CODE_BITS,
    LOG4_EXP_MAX,
    LOG4_EXP_MIN,
    MASTER_FRAC,
    MOMENTUM_BITS,
    RAW_NIBBLES,
    SAWB_SQ_BITS,
    SAWB_SUM_BITS,
    UINT4_MAX,
    UINT4_MIN,
    MaskMode,
    Operand,
    OutputPath,
    VecOp,
)

__all__ = ["DeviceMLP", "DeviceMemoryError", "DeviceTrainConfig", "LayerBuffers",
           "MemoryPlan", "memory_words", "plan_memory"]

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
    #: "device", "host", or "auto": on the device when its element-wise unit has UPDATE
    #: and REQUANT (INFO ``vec_ops``), else on the host.
    masters: str = "auto"
    #: The output layer's gradient: "fp4x2" (two FP4 terms, summed exactly by doubling its
    #: GEMMs' reduction) or "fp4" (one FP4 pair: the pure 4-bit scheme).
    out_grad: str = "fp4x2"
    #: The hidden activations' scale: "pact" (a clip alpha per layer, learned from the
    #: device's clip statistic; its initial value alpha_init, or with None act_clip times
    #: the first batch's absmax) or "absmax" (the top code stands for act_clip times the
    #: previous step's absmax).
    act: str = "pact"
    alpha_init: float | None = None
    act_clip: float = 0.5

    def __post_init__(self):
        if self.masters not in ("device", "host", "auto"):
            raise ValueError(f"masters must be 'device', 'host' or 'auto', got "
                             f"{self.masters!r}")
        if self.out_grad not in ("fp4", "fp4x2"):
            raise ValueError(f"out_grad must be 'fp4' or 'fp4x2', got {self.out_grad!r}")
        if self.act not in ("pact", "absmax"):
            raise ValueError(f"act must be 'pact' or 'absmax', got {self.act!r}")
        if self.alpha_init is not None and not self.alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {self.alpha_init}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.act_clip <= 1:
            raise ValueError(f"act_clip must be in (0, 1], got {self.act_clip}")


class _Arena:
    """A bump allocator of tensor-memory buffers; element counts are padded to the array
    so every GEMM that reads a buffer finds whole groups."""

    def __init__(self, nib, pad):
        self.nib, self.pad, self.end = nib, pad, 0

    def alloc(self, rows, elems, e, align=1):
        """``align``: the buffer's address and row stride in multiples of that many words."""
        padded = -(-elems // self.pad) * self.pad
        stride = -(-row_words(padded, e, self.nib) // align) * align
        buf = Buffer(-(-self.end // align) * align, rows, elems, e, stride)
        self.end = buf.end
        return buf


@dataclass
class LayerBuffers:
    """One layer's tensors in device memory (layer ``y = x @ w.T``, x: B x K, w: N x K)."""

    wc: Buffer            # W^T codes, K rows of N: forward's B
    wr: Buffer | None     # W codes, N rows of K: backward-data's B (not for layer 0)
    g: Buffer             # dW^T accumulators, K rows of N RAW elements: UPDATE's G
    wm: Buffer | None     # master weights, as dW^T (device masters only)
    vm: Buffer | None     # momenta, as dW^T (device masters only)
    xc: Buffer = None     # X^T codes, K rows of B: forward's A, the layer below's mask
    xr: Buffer = None     # X codes, B rows of K: backward-weight's B
    dc: Buffer = None     # dY^T FP4 pairs, N rows of B: backward-data's A
    dr: Buffer = None     # dY FP4 pairs, B rows of N: backward-weight's A


@dataclass
class MemoryPlan:
    layers: list          # LayerBuffers per layer
    logits: Buffer        # the last layer's RAW output, N rows of B
    end: int              # words in all


def plan_memory(sizes, batch, nib, pad, masters, terms=1, align=1):
    """Where a model's training state lives in device memory (:class:`MemoryPlan`). With a
    ``terms``-term output gradient the top layer's backward operands hold ``terms`` copies
    along their reduction: dY^T and W as ``terms * N`` rows, dY and X as ``terms * B``.
    ``align``: layer 0's X rows start on multiples of that many words (an SDRAM burst's,
    so a DMA can gather resident images into them)."""
    arena = _Arena(nib, pad)
    layers = []
    top = len(sizes) - 2
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        wc = arena.alloc(k, n, 1)
        wr = arena.alloc(n * (terms if i == top else 1), k, 1) if i > 0 else None
        g = arena.alloc(k, n, RAW_NIBBLES)
        wm = vm = None
        if masters == "device":
            wm, vm = arena.alloc(k, n, RAW_NIBBLES), arena.alloc(k, n, RAW_NIBBLES)
        layers.append(LayerBuffers(wc, wr, g, wm, vm))
    for i, (layer, k, n) in enumerate(zip(layers, sizes[:-1], sizes[1:], strict=True)):
        t = terms if i == top else 1
        layer.xc = arena.alloc(k, batch, 1)
        layer.xr = arena.alloc(batch * t, k, 1, align if i == 0 else 1)
        layer.dc, layer.dr = arena.alloc(n * t, batch, 2), arena.alloc(batch * t, n, 2)
    logits = arena.alloc(sizes[-1], batch, RAW_NIBBLES)
    return MemoryPlan(layers, logits, arena.end)


def memory_words(sizes, batch, nib, pad, masters, terms=1, align=1):
    return plan_memory(sizes, batch, nib, pad, masters, terms, align).end


def _rows(buf, first, rows):
    """Rows ``first .. first + rows - 1`` of ``buf`` as a buffer of their own."""
    return replace(buf, addr=buf.addr + first * buf.stride, rows=rows)


def masters_for(dev):
    """Where ``masters="auto"`` keeps a model's master weights on ``dev``: on the device
    when its element-wise unit can UPDATE and REQUANT them, else on the host."""
    both = (1 << VecOp.UPDATE) | (1 << VecOp.REQUANT)
    return "device" if getattr(dev, "vec_ops", both) & both == both else "host"


class DeviceMLP:
    """An MLP training on ``dev`` (a :class:`nibble.host.device.driver.Device`)."""

    def __init__(self, dev, cfg):
        if cfg.masters == "auto":
            cfg = replace(cfg, masters=masters_for(dev))
        self.dev, self.cfg = dev, cfg
        self.sizes = list(cfg.sizes)
        self.layers = len(self.sizes) - 1
        pad = max(dev.rows, dev.cols)
        self.terms = 2 if cfg.out_grad == "fp4x2" else 1
        sdram = bool(getattr(dev, "ext_bursts", 0))
        self.align = words_per_burst(dev.word_nibbles) if sdram else 1
        self.plan = plan_memory(self.sizes, cfg.batch_size, dev.word_nibbles, pad, cfg.masters,
                                self.terms, self.align)
        #: the state lives in the SDRAM and every command pages through the scratchpad
        #: (a device with an SDRAM, when the state does not fit its scratchpad)
        self.paged = self.plan.end > dev.mem_words and sdram
        self.raw_dev = dev                          # the driver's device, even when paged
        #: the training set in the SDRAM (:meth:`make_resident`), or None: batches streamed
        self.resident = None
        #: layer 0's X rows for the next batch (:meth:`step_indices`' ``next_idx``): a
        #: paged state gathers and transposes it while the host computes the loss
        self.x_spare, self._prefetched, self._next = None, None, None
        self._rows_later = []
        if self.paged:
            self.dev = dev = PagedDevice(dev)
            if self.layers > 1:            # (the top layer's X rows hold more copies)
                xr = self.plan.layers[0].xr
                self.x_spare = replace(xr, addr=-(-self.plan.end // self.align) * self.align)
                self.plan = replace(self.plan, end=self.x_spare.end)
        if self.plan.end > dev.mem_words:
            need = self.plan.end
            msg = (f"the {'-'.join(map(str, self.sizes))} model at batch {cfg.batch_size} "
                   f"needs {need:,} words of tensor memory with its master weights on the "
                   f"{cfg.masters}; {dev.url} has {dev.mem_words:,}"
                   + (" (its SDRAM)" if self.paged else ""))
            if cfg.masters == "device":
                host_need = memory_words(self.sizes, cfg.batch_size, dev.word_nibbles, pad,
                                         "host", self.terms, self.align)
                if host_need <= dev.mem_words:
                    msg += (f". With --masters host (master weights on the host, {host_need:,}"
                            " words on the device, dW and the codes cross the link every "
                            "step) it fits")
            raise DeviceMemoryError(msg)
        self.bufs = self.plan.layers
        self.mu = round(cfg.momentum * (1 << MOMENTUM_BITS))
        if not 0 <= self.mu < 1 << MOMENTUM_BITS:
            raise ValueError(f"momentum {cfg.momentum} outside [0, 1)")
        self.w_step = [0.0] * self.layers          # real SAWB step of each layer's codes
        #: each layer's SAWB sums of its masters as they are now (the last UPDATE's, or
        #: the host's of the masters it put there); the next REQUANT's step comes from them
        self.sawb = [None] * self.layers
        self._sawb_post = [None] * self.layers      # the posted command that brings them
        self.act_amax = [None] * (self.layers - 1)  # absmax: of each hidden output (real)
        self.alpha = [cfg.alpha_init] * (self.layers - 1)           # pact: the clips
        self.alpha_v = [0.0] * (self.layers - 1)                    # ... their momenta
        self.gradscale = [GradScale(streaming=True) for _ in range(self.layers - 1)]
        self.host_w = self.host_v = None            # masters="host": the masters
        self.codes = [None] * self.layers           # last codes (host mode, checkpoints)
        #: device cycles: of GEMMs, of VECTOR operations, per layer; every GEMM's shape
        self.counters = {"gemm_cycles": 0, "vec_cycles": 0, "transpose_cycles": 0, "gemms": [],
                         "layer_cycles": [0] * self.layers}
        #: send commands without waiting for their replies where the step does not need
        #: them yet (a paged device: every command one RUN, :meth:`settle`)
        self.posting = self.paged
        #: (handle, [what to do with its STATS], whether the next step's scales need it)
        #: for the commands not settled yet
        self._pending, self._posted = [], 0

    # -- set-up -------------------------------------------------------------------------------
    def init_weights(self):
        """He-normal weights from ``seed`` (the host models' initialisation), as masters."""
        rng = np.random.default_rng(self.cfg.seed)
        w = [master_from_float(rng.standard_normal((b, a)) * np.sqrt(2.0 / a)).T
             for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True)]
        self.load_masters(w, [np.zeros_like(x) for x in w])

    def load_masters(self, w, v, codes=None, w_step=None):
        """Put master weights ``w`` and momenta ``v`` (K x N int64 each, i.e. W^T) in
        place and make the INT4 codes (given, or requantized from their statistics, which
        the host computes as the UPDATE unit would)."""
        dev, nib = self.dev, self.dev.word_nibbles
        self._prefetched = None
        if self.cfg.masters == "host":
            self.host_w = [np.array(x, np.int64) for x in w]
            self.host_v = [np.array(x, np.int64) for x in v]
        for i in range(self.layers):
            if self.cfg.masters == "device":
                for buf, x in ((self.bufs[i].wm, w[i]), (self.bufs[i].vm, v[i])):
                    dev.write(buf.addr, pack(x & 0xFFFFFFFF, RAW_NIBBLES, nib, buf.stride))
            sum_abs, sum_sq = sawb_sums(w[i])                # (the unit's wrapping sums)
            self.sawb[i] = sum_abs % (1 << SAWB_SUM_BITS), sum_sq % (1 << SAWB_SQ_BITS)
            self._sawb_post[i] = None
            if codes is not None:
                self.w_step[i] = w_step[i]
                self._put_codes(i, codes[i])
            else:
                self._requant(i, *self._requant_params(i))
        self.settle()

    def _put_codes(self, i, codes):
        buf = self.bufs[i].wc
        self.dev.write(buf.addr, pack(code_bits(codes), 1, self.dev.word_nibbles, buf.stride))
        self.codes[i] = np.asarray(codes, np.int8)
        self._transpose_weights(i)

    def _copies(self, i):
        """How many copies of layer ``i``'s backward operands the gradient needs."""
        return self.terms if i == self.layers - 1 else 1

    def _transpose_weights(self, i):
        if i > 0:
            k, n = self.sizes[i], self.sizes[i + 1]
            for c in range(self._copies(i)):
                self._vector(i, vector_args(VecOp.TRANSPOSE, k, n, self.bufs[i].wc,
                                         _rows(self.bufs[i].wr, c * n, n)))

    # -- device operations ----------------------------------------------------------------
    def _gemm(self, i, cfg, then=None, now=False):
        """Run a GEMM of layer ``i``: returns its STATS, after ``then(stats)``; while
        :attr:`posting` (unless ``now``) the host does not wait: returns None, and its
        reply is counted and given to ``then`` by :meth:`settle`."""
        if self.posting and not now:
            self._post(self.dev.gemm(cfg, later=True), [
                lambda st: self._count_gemm(i, cfg, st), *([then] if then else [])],
                then is not None)
            return None
        stats = self.dev.gemm(cfg)
        self._count_gemm(i, cfg, stats)
        if then is not None:
            then(stats)
        return stats

    def _count_gemm(self, i, cfg, stats):
        self.counters["gemm_cycles"] += stats["gemm_cycles"]
        self.counters["layer_cycles"][i] += stats["gemm_cycles"]
        self.counters["gemms"].append((cfg["m"], cfg["l"], cfg["n"], stats["gemm_cycles"],
                                       stats["beats"]))

    def _vector(self, i, cfg, now=False):
        """Run a VECTOR operation of layer ``i``; returns the STATS (None while
        :attr:`posting`, unless ``now``: as :meth:`_gemm`)."""
        if self.posting and not now:
            self._post(self.dev.vector(cfg, later=True),
                       [lambda st: self._count_vector(i, cfg, st)])
            return None
        stats = self.dev.vector(cfg)
        self._count_vector(i, cfg, stats)
        return stats

    def _post(self, handle, then=(), scales=False):
        """Keep a command sent without waiting for :meth:`settle`; returns its number."""
        self._posted += 1
        self._pending.append((self._posted, handle, list(then), scales))
        return self._posted

    def settle(self, scales=False, before=None):
        """Take the replies of the commands sent without waiting (:attr:`posting`), in
        order: count them and apply what the step derives from them (the next step's
        activation scales and GradScale, PACT's clips). Only up to the last that sets a
        scale with ``scales``, only those numbered below ``before`` (:meth:`_post`) with
        it: where the host has waited for a later reply, so nothing is waited for."""
        cut = len(self._pending)
        if scales:
            cut = max((k + 1 for k, (*_, needed) in enumerate(self._pending) if needed),
                      default=0)
        if before is not None:
            cut = sum(1 for n, *_ in self._pending if n < before)
        pending, self._pending = self._pending[:cut], self._pending[cut:]
        for _, handle, then, _ in pending:
            stats = handle.result()
            for fn in then:
                fn(stats)

    def _count_vector(self, i, cfg, stats):
        self.counters["vec_cycles"] += stats["vec_cycles"]
        if cfg["op"] == VecOp.TRANSPOSE:
            self.counters["transpose_cycles"] += stats["vec_cycles"]
        self.counters["layer_cycles"][i] += stats["vec_cycles"]

    def _update_params(self, i, ratio):
        """(mu, M, s) of layer ``i``'s UPDATE with gradient factor ``ratio`` (lr x
        accumulator unit, in master units)."""
        if ratio == 0:
            return self.mu, 0, 0
        try:
            gm, gs = rescale_params(ratio)
        except NumericsError as e:
            raise NumericsError(f"layer {i}: the update factor {ratio:.3g} is outside "
                                f"the UPDATE unit's range ({e})") from None
        return self.mu, gm, gs

    def _update_args(self, i, ratio):
        k, n = self.sizes[i], self.sizes[i + 1]
        mu, gm, gs = self._update_params(i, ratio)
        return vector_args(VecOp.UPDATE, k, n, self.bufs[i].g, self.bufs[i].wm,
                           self.bufs[i].vm, mu=mu, m=gm, s=gs)

    def _gemm_update(self, i, gemm, ratio, requant):
        """Layer ``i``'s backward-weight GEMM ``gemm`` into ``g``, then its UPDATE (as
        :meth:`_update`), and the REQUANT ``requant`` (``(M, s, step)``,
        :meth:`_requant_params`) of its new masters: on a device that fuses them
        (``gemm_update``: a paged device, whose gradient then never leaves its scratchpad,
        nor the new masters before their codes are made; protocol v10 for the REQUANT) as
        one request. Records the new masters' SAWB sums (:attr:`sawb`; a posted request's
        when :meth:`settle` takes its reply). Returns True when the REQUANT ran with them
        (the caller then only transposes the codes and takes the step), else False."""
        fused = getattr(self.dev, "gemm_update", None)
        if self.cfg.masters == "device" and fused is not None:
            update = self._update_args(i, ratio)
            rq = self._requant_args(i, *requant[:2])
            v10 = self.dev.info.get("version", 0) >= 10
            for with_rq in ([rq, None] if v10 else [None]):
                handle = fused(gemm, update, with_rq, later=self.posting)
                if handle is not None:      # (None: not fusable here; run them apart)
                    def done(stats, i=i):
                        self._count_gemm(i, gemm, stats)
                        self._count_vector(i, update, stats)
                        self.sawb[i] = stats["w_sum_abs"], stats["w_sum_sq"]
                    if self.posting and hasattr(handle, "result"):
                        # (not a scale the next forward waits for: the next REQUANT
                        # settles it, :meth:`_requant_params`)
                        self._sawb_post[i] = self._post(handle, [done])
                    else:
                        done(handle.result() if hasattr(handle, "result") else handle)
                    return with_rq is not None
        self._gemm(i, gemm)
        self.sawb[i] = self._update(i, ratio)
        return False

    def _update(self, i, ratio):
        """UPDATE layer ``i`` with gradient factor ``ratio`` (lr x accumulator unit, in
        master units); returns the new masters' SAWB sums."""
        k, n = self.sizes[i], self.sizes[i + 1]
        if self.cfg.masters == "device":
            stats = self._vector(i, self._update_args(i, ratio), now=True)
            return stats["w_sum_abs"], stats["w_sum_sq"]
        mu, gm, gs = self._update_params(i, ratio)
        gbuf = self.bufs[i].g
        g = unpack(self.dev.read(gbuf.addr, gbuf.words), k, n, RAW_NIBBLES,
                   self.dev.word_nibbles, gbuf.stride, 32)
        self.host_w[i], self.host_v[i] = master_update(g, self.host_w[i], self.host_v[i],
                                                       mu, gm, gs)
        sum_abs, sum_sq = sawb_sums(self.host_w[i])
        return sum_abs % (1 << SAWB_SUM_BITS), sum_sq % (1 << SAWB_SQ_BITS)

    def _requant_params(self, i):
        """``(M, s, step)`` of layer ``i``'s next REQUANT: SAWB on its masters' sums as they
        are now (:attr:`sawb`), ``step`` the real value of code 1."""
        if self._sawb_post[i] is not None:             # the last UPDATE's reply
            self.settle(before=self._sawb_post[i] + 1)
            self._sawb_post[i] = None
        k, n = self.sizes[i], self.sizes[i + 1]
        step = sawb_step_from_sums(*self.sawb[i], k * n)            # master units
        qm, qs = rescale_params(1.0 / step)
        return qm, qs, math.ldexp(step, -MASTER_FRAC)

    def _requant_args(self, i, qm, qs):
        k, n = self.sizes[i], self.sizes[i + 1]
        return vector_args(VecOp.REQUANT, k, n, self.bufs[i].wm, self.bufs[i].wc, m=qm, s=qs)

    def _requant(self, i, qm, qs, step, done=False):
        """Requantize layer ``i``'s masters with ``(qm, qs)`` (on the device, or the host's
        masters; ``done``: the fused update did) and take ``step``; then the codes'
        transposes."""
        self.w_step[i] = step
        if self.cfg.masters == "host":
            self._put_codes(i, requantize(self.host_w[i], qm, qs))
            return
        if not done:
            self._vector(i, self._requant_args(i, qm, qs))
        self.codes[i] = None
        self._transpose_weights(i)

    # -- a training step ----------------------------------------------------------------------
    def _act_params(self, i, unit):
        """(M, s) that rescale layer ``i``'s accumulators (real value of 1: ``unit``) to
        UINT4 codes whose top code is the clip: PACT's alpha, or a fraction of the previous
        absmax."""
        if self.cfg.act == "pact":
            top = self.alpha[i]
        else:
            top = self.act_amax[i] * self.cfg.act_clip
        return rescale_params(unit * UINT4_MAX / top)

    # -- the training set in the SDRAM ---------------------------------------------------------
    def make_resident(self, codes):
        """A :class:`~nibble.host.training.resident.ResidentSet` of ``codes`` (images x K
        UINT4) in the SDRAM beside the state (after it when the state is paged there), used
        by :meth:`step_indices`; not uploaded yet."""
        wpb = words_per_burst(self.raw_dev.word_nibbles)
        base = -(-self.plan.end // wpb) if self.paged else 0
        self.resident = ResidentSet(self.raw_dev, codes, base, self.bufs[0].xr.stride)
        return self.resident

    def staging(self):
        """The scratchpad words no buffer holds between commands ``(addr, words)``: all of
        it but the stored programs' area when the state is paged, else what the state
        leaves free."""
        if self.paged:
            return staging_area(self.raw_dev, 0, self.dev.scratch)
        return staging_area(self.raw_dev, self.plan.end)

    def _gather(self, idx, xr=None):
        """Layer 0's X (B rows of K codes; or ``xr``) from the resident set: DMAs straight
        into it, or (paged) into the scratchpad and one DMA STORE to its place in the
        SDRAM."""
        xr, rs = xr or self.bufs[0].xr, self.resident
        if not self.paged:
            rs.gather(idx, xr.addr)
            return
        at = self.staging()[0]
        # posted: their answers are taken when the step settles
        answers = rs.gather(idx, at, post=self.posting) or []
        answers.append(self.raw_dev.dma(
            {"store": 1, "rows": 1, "bursts": len(idx) * rs.row_bursts, "mem_addr": at,
             "ext_addr": xr.addr // rs.wpb}, wait=False, post=self.posting))
        for a in answers:
            if a is not None:
                self._post(a)

    # -- a training step ----------------------------------------------------------------------
    def step(self, x_codes, labels, lr):
        """One SGD step on a batch (UINT4 image codes, labels); returns the loss."""
        self._prefetched = self._next = None
        first = self.bufs[0].xc
        self.dev.write(first.addr, pack(np.asarray(x_codes).T, 1, self.dev.word_nibbles,
                                        first.stride))
        return self._step(labels, lr, gathered=False)

    def step_indices(self, idx, labels, lr, next_idx=None):
        """One SGD step on images ``idx`` of the resident set (:meth:`make_resident`, uploaded)
        with their labels: the link carries the indices' DMAs, not the images. With
        ``next_idx`` (the next step's images) a paged device gathers and transposes the
        next batch into spare X rows while the host computes this one's loss (the logits'
        READ replies go to the link's transmit FIFO, and the device goes on); the next
        step then finds it there."""
        if self.resident is None:
            raise DeviceError("step_indices needs a resident training set (make_resident)")
        key = tuple(int(i) for i in idx)
        if self._prefetched == key:       # gathered and transposed last step: its X rows
            layer = self.bufs[0]
            layer.xr, self.x_spare = self.x_spare, layer.xr
            gathered = "transposed"
        else:
            self._gather(idx)
            gathered = True
        self._prefetched = None
        self._next = (None if next_idx is None or self.x_spare is None or not self.posting
                      else [int(i) for i in next_idx])
        return self._step(labels, lr, gathered)

    def _transpose_rows(self):
        """The X rows the forward left for later (:meth:`_forward`)."""
        for i, cfg in self._rows_later:
            self._vector(i, cfg)
        self._rows_later = []

    def _prefetch(self, idx):
        """Gather images ``idx`` into the spare X rows and transpose them into layer 0's
        Xt (this step's forward has read it; backward reads the X rows, not Xt)."""
        layer = self.bufs[0]
        self._gather(idx, self.x_spare)
        self._vector(0, vector_args(VecOp.TRANSPOSE, len(idx), self.sizes[0],
                                    _rows(self.x_spare, 0, len(idx)), layer.xc))
        self._prefetched = tuple(idx)

    def _step(self, labels, lr, gathered):
        dev, b, nib = self.dev, len(labels), self.dev.word_nibbles
        x_step = self._forward(b, gathered)
        # logits, loss, the output gradient: one FP4 pair per element and term, the terms
        # stacked along the top layer's backward reductions (dY^T as terms x N rows)
        out, low = self.plan.logits, self._logits_low16()
        if self.posting:              # the READs sent, the next batch behind them
            raw = dev.read(out.addr, out.words, later=True, low16=low)
            self._transpose_rows()    # (before the prefetch writes layer 0's xc)
            if self._next:
                self._prefetch(self._next)
            raw = raw.result()
        else:
            raw = dev.read(out.addr, out.words, low16=low)
            self._transpose_rows()
        if low:
            raw = widen16(raw)
        acc = unpack(raw, self.sizes[-1], b, RAW_NIBBLES, nib, out.stride, 32).T
        self.settle(scales=True)      # the forward GEMMs' replies came before the READ's
        logits = (acc * (x_step[-1] * self.w_step[-1])).astype(np.float32)
        loss, dlogits = softmax_xent(logits, labels)
        d0, d1 = quantize_grad(dlogits, 1.0, SCHEME, terms=self.terms)
        terms0 = d0 if isinstance(d0, list) else [d0]
        terms1 = d1 if isinstance(d1, list) else [d1]
        pairs = np.concatenate([(t0.codes.astype(np.int64) | (t1.codes.astype(np.int64) << 4)).T
                                for t0, t1 in zip(terms0, terms1, strict=True)])
        top = self.bufs[-1].dc
        dev.write(top.addr, pack(pairs, 2, nib, top.stride))
        self._backward(b, x_step, (terms0[0].int_unit, terms1[0].int_unit), lr)
        if not self.posting:
            self.settle()
        # (posting: the step's last replies are taken later; :meth:`settle` before reading
        # the counters)
        return loss

    def _logits_low16(self):
        """Whether the logits cross the link as 16-bit integers (READ's ``low16``, protocol
        v9; half the bytes, and on the ULX3S configuration 1.2 ms a step the device waited
        for): every logit is a sum of K products of a UINT4 code and an INT4 code, so
        ``|logit| <= K * 15 * 8``, which fits while K is at most 273."""
        k = self.sizes[-2]
        info = getattr(self.dev, "info", None) or {}
        return (info.get("version", 0) >= 9
                and k * UINT4_MAX * (1 << (CODE_BITS - 1)) < 1 << 15)

    def _forward(self, b, gathered=False):
        """The forward GEMMs of a batch already in layer 0's ``xc`` (``gathered``: in the
        first copy of its ``xr``); returns each layer's input step (real value of code 1).
        Every hidden output is rescaled to UINT4 codes into the next layer's ``xc``; the
        logits stay RAW. The X rows that backward-weight reads (each layer's ``xc``
        transposed into its ``xr``) are left in :attr:`_rows_later`: only the backward
        reads them, so they are made while the logits cross the link (on the ULX3S
        configuration the hidden layer's two copies were 0.46 ms a step before the logits)."""
        x_step = [1.0 / UINT4_MAX]
        later = self._rows_later = []
        for i, (layer, k, n) in enumerate(zip(self.bufs, self.sizes, self.sizes[1:],
                                              strict=False)):
            copies = range(self._copies(i))
            if i == 0 and gathered == "transposed":
                copies = copies[1:]
            elif i == 0 and gathered:
                self._vector(i, vector_args(VecOp.TRANSPOSE, b, k, _rows(layer.xr, 0, b),
                                         layer.xc))
                copies = copies[1:]
            for c in copies:
                later.append((i, vector_args(VecOp.TRANSPOSE, k, b, layer.xc,
                                             _rows(layer.xr, c * b, b))))
            if i == 0:          # the last step's replies that set scales (they are in)
                self.settle(scales=True)
            unit = x_step[i] * self.w_step[i]

            def forward(out, lane, then=None, now=False, i=i, layer=layer, k=k, n=n):
                return self._gemm(i, gemm_args(layer.xc, layer.wc, out, (b, k, n), Operand.UINT4,
                                               Operand.INT4, lane), then, now)

            if i == self.layers - 1:
                forward(self.plan.logits, lane_cfg(OutputPath.RAW))
                break
            out = self.bufs[i + 1].xc
            if (self.act_amax[i] is None if self.cfg.act == "absmax"
                    else self.alpha[i] is None):                  # the first step measures
                st = forward(out, lane_cfg(OutputPath.RESCALE, relu=1), now=True)
                self.act_amax[i] = (st["absmax"] or 1) * unit
                if self.cfg.act == "pact":
                    self.alpha[i] = self.act_amax[i] * self.cfg.act_clip
            m, s = self._act_params(i, unit)

            def measured(st, i=i, unit=unit):      # the next step's scale (settle)
                if st["absmax"]:
                    self.act_amax[i] = st["absmax"] * unit

            forward(out, lane_cfg(OutputPath.RESCALE, m=m, s=s, relu=1), measured)
            x_step.append(unit * math.ldexp(1.0, s) / m)
        return x_step

    def _backward(self, b, x_step, units, lr):
        """From the top: backward-weight into ``g``, the update and the requantization
        (fused where the device can, :meth:`_gemm_update`), backward-data into the layer
        below's FP4 pair (and its clip's gradient) from the codes the forward used, then
        the new codes' transposes. ``units``: the top gradient's datapath units (phase 0,
        phase 1). The REQUANT's step is known before the step (:attr:`sawb`), so nothing
        here waits for a reply from this step."""
        for i in reversed(range(self.layers)):
            layer, k, n, c = self.bufs[i], self.sizes[i], self.sizes[i + 1], self._copies(i)
            for t in range(c):
                self._vector(i, vector_args(VecOp.TRANSPOSE, n, b, _rows(layer.dc, t * n, n),
                                         _rows(layer.dr, t * b, b), pair=1))
            unit_w = units[1] * x_step[i]
            ratio = lr * unit_w * math.ldexp(1.0, MASTER_FRAC)
            requant = self._requant_params(i)
            # the gradient goes to the UPDATE at once (backward-data reads neither it nor
            # the masters, and reads the transposed codes, wr, which the forward used)
            done = self._gemm_update(i, gemm_args(
                layer.dr, layer.xr, layer.g, (n, c * b, k), Operand.FP4, Operand.UINT4,
                lane_cfg(OutputPath.RAW, phase=1), a_sel=1), ratio, requant)
            if i > 0:
                units = self._backward_data(i, b, units[0] * self.w_step[i], lr)
            self._requant(i, *requant, done=done)

    def _backward_data(self, i, b, unit, lr):
        """dX of layer ``i`` masked by layer i-1's activation and log-quantized on the
        device into layer i-1's FP4 pair; with PACT, layer i-1's clip learns from the
        device's clip statistic. Returns that pair's datapath units."""
        k, n, c = self.sizes[i], self.sizes[i + 1], self._copies(i)
        layer, below = self.bufs[i], self.bufs[i - 1]
        gs = self.gradscale[i - 1]
        pact = self.cfg.act == "pact"

        def run(exp, then=None, now=False):
            # exponents beyond the lane's range give the same codes as its ends
            lane = lane_cfg(OutputPath.LOG4, exp=int(np.clip(exp, LOG4_EXP_MIN, LOG4_EXP_MAX)),
                            mask=MaskMode.PACT if pact else MaskMode.RELU)
            return self._gemm(i, gemm_args(layer.dc, layer.wr, below.dc, (b, c * n, k),
                                           Operand.FP4, Operand.INT4, lane, a_sel=0,
                                           mask=layer.xc), then, now)

        def clip(st, unit=unit):      # dL/dalpha: the gradient where the code was clipped
            if pact:                  # (SGD with momentum)
                v = self.alpha_v[i - 1] * self.cfg.momentum + st["clip_sum"] * unit
                self.alpha_v[i - 1] = v
                self.alpha[i - 1] -= lr * v

        exp = gs.planned(unit)                               # GradScale, streaming
        if exp is None:                                      # the first step measures
            exp = gs.update(run(0, now=True)["absmax"], unit)
            clip(run(exp, now=True))
        else:               # the next step's exponent, and the clip, once it has answered
            run(exp, lambda st, unit=unit: (gs.update(st["absmax"], unit), clip(st)))
        # the datapath unit is the same for both phases (the integer holds 2^phase)
        unit = FP4Tensor(None, 0, exp, unit).int_unit
        return unit, unit

    # -- reading the model back -------------------------------------------------------------
    def weight_codes(self):
        """Each layer's INT4 codes as W (N x K int8)."""
        self.settle()
        out = []
        for i in range(self.layers):
            if self.codes[i] is None:
                buf = self.bufs[i].wc
                k, n = self.sizes[i], self.sizes[i + 1]
                self.codes[i] = unpack(self.dev.read(buf.addr, buf.words), k, n, 1,
                                       self.dev.word_nibbles, buf.stride, 4).astype(np.int8)
            out.append(self.codes[i].T)
        return out

    def masters(self):
        """(w, v): the master weights and momenta, K x N int64 per layer."""
        self.settle()
        if self.cfg.masters == "host":
            return [x.copy() for x in self.host_w], [x.copy() for x in self.host_v]
        w, v = [], []
        for i in range(self.layers):
            k, n = self.sizes[i], self.sizes[i + 1]
            for buf, dst in ((self.bufs[i].wm, w), (self.bufs[i].vm, v)):
                dst.append(unpack(self.dev.read(buf.addr, buf.words), k, n, RAW_NIBBLES,
                                  self.dev.word_nibbles, buf.stride, 32))
        return w, v

    def predict(self, x_codes, batch=2048):
        """Predicted classes, computed on the host from the device's weight codes with the
        device's forward arithmetic (the golden model: bit-exact with a device forward)."""
        self.settle()
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
        self.settle()
        w, v = self.masters()
        return {
            "w": w, "v": v, "codes": [c.T for c in self.weight_codes()],
            "w_step": list(self.w_step), "act_amax": list(self.act_amax),
            "alpha": list(self.alpha), "alpha_v": list(self.alpha_v),
            "gradscale": [(g.prev_absmax, g.exp) for g in self.gradscale],
        }

    def restore(self, st):
        self.act_amax = list(st["act_amax"])
        if st["alpha"] is not None:             # (checkpoints from before PACT have none)
            self.alpha, self.alpha_v = list(st["alpha"]), list(st["alpha_v"])
        for g, (prev, exp) in zip(self.gradscale, st["gradscale"], strict=True):
            g.prev_absmax, g.exp = prev, exp
        self.load_masters(st["w"], st["v"], codes=st["codes"], w_step=st["w_step"])
