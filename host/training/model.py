"""Layers and models that train through the 4-bit golden ops, tensor by tensor.

A layer keeps fp32 master weights on the host and runs the three GEMMs of its training step
the way the accelerator does (straight-through estimators carry the gradient past each
quantizer). A :class:`Scheme` says which tensors are quantized:

forward
    ``weights``: W codes = SAWB(W master), INT4. ``inputs``: the network input as UINT4
    codes (step 1/15). ``acts``: hidden outputs rescaled to UINT4 with a learned PACT clip
    (``golden.numerics.rescale``). The last layer returns fp32 logits.
backward
    ``grads``: hidden-layer gradients as FP4 pairs (TPR, GradScale); the previous layer's
    ReLU/PACT mask and its clip gradient come from its stored UINT4 codes. ``out_grad``: the
    output layer's gradient (the softmax's dlogits) as one FP4 pair (``fp4``), as two FP4
    terms per phase (``fp4x2``: the residual ``dY - t1`` quantized on the same grid, so
    ``dY ~ t1 + t2``), or in fp32.

When both operands of a GEMM are codes it is the exact integer GEMM of
:mod:`nibble.host.golden.gemm`, as on the device; a two-term gradient is summed exactly in
the accumulator (the device doubles the GEMM's reduction, ``[t1 | t2] @ [W; W]``). When
either operand is fp32 the GEMM runs in float on the dequantized values. So the all-4-bit
schemes are bit-exact emulations, and the others are the ablations of
``nibble bench numerics``.

The layer API works on 2-D GEMM operands (rows x features), so a convolution reuses it
through im2col (:mod:`nibble.host.training.cnn`).
"""

import itertools
from dataclasses import dataclass, replace

import numpy as np

from nibble.host.golden.gemm import gemm_backward_data, gemm_backward_weight, gemm_forward
from nibble.host.golden.numerics import (
    FP4Tensor,
    GradScale,
    QTensor,
    gradscale_exponent,
    log_quantize,
    log_quantize_tpr,
    quantize_int,
    rescale,
    rescale_params,
    sawb_quantize,
)
from nibble.rtl.formats import FP4_RADIX_LOG2, MAX_REDUCTION, UINT4_MAX, UINT4_MIN

__all__ = ["ABLATIONS", "DEFAULT_SCHEME", "FP32_SCHEME", "MLP", "SCHEMES", "TENSORS", "Linear",
           "Scheme", "dequantize", "rows", "softmax_xent"]

OUT_GRADS = ("fp4", "fp4x2", "fp32")


@dataclass(frozen=True)
class Scheme:
    """How a model trains: which tensors are 4-bit, and the gradient format."""

    name: str
    weights: bool = True               # INT4 weights (SAWB)
    inputs: bool = True                # the network input as UINT4 codes
    acts: bool = True                  # hidden activations as UINT4 codes (PACT)
    grads: bool = True                 # hidden-layer gradients as FP4 pairs
    out_grad: str = "fp4"              # the output layer's gradient: OUT_GRADS
    radix_log2: int = FP4_RADIX_LOG2   # gradient format: 2 = radix-4 FP4, 1 = radix-2 FP4
    tpr: bool = True                   # phase 1 grid for backward-weight
    gradscale: bool = True             # per-layer power-of-two gradient scale

    def __post_init__(self):
        if self.out_grad not in OUT_GRADS:
            raise ValueError(f"out_grad must be one of {OUT_GRADS}, got {self.out_grad!r}")

    @property
    def quantized(self):
        return (self.weights or self.inputs or self.acts or self.grads
                or self.out_grad != "fp32")

    @property
    def weight_phase(self):
        return 1 if self.tpr else 0


FP32_SCHEME = Scheme("fp32", weights=False, inputs=False, acts=False, grads=False,
                     out_grad="fp32")
IBM4 = Scheme("ibm4")
#: The named schemes: fp32, the paper's pure 4-bit scheme and its ablations, and the
#: last-layer policies (the output layer's gradient in more than 4 bits).
SCHEMES = {s.name: s for s in [
    FP32_SCHEME,
    IBM4,
    replace(IBM4, name="ibm4-2t", out_grad="fp4x2"),
    replace(IBM4, name="ibm4-fp32-out", out_grad="fp32"),
    replace(IBM4, name="ibm4-no-tpr", tpr=False),
    replace(IBM4, name="radix2-fp4", radix_log2=1, tpr=False),
    replace(IBM4, name="ibm4-no-gradscale", gradscale=False),
]}


#: The tensors a scheme quantizes (the per-tensor ablation's rows).
TENSORS = ("weights", "inputs", "acts", "grads", "out_grad")
#: The default scheme, what the device runs: 4-bit everywhere, two FP4 terms for the output
#: layer's gradient.
DEFAULT_SCHEME = "ibm4-2t"


def _with(scheme, tensor, on, name):
    value = ("fp4" if on else "fp32") if tensor == "out_grad" else on
    return replace(scheme, name=name, **{tensor: value})


#: Per tensor: quantized alone (everything else fp32, the output gradient one FP4 pair) and
#: every tensor but it (the default scheme with it in fp32).
ABLATIONS = {s.name: s for t in TENSORS for s in (
    _with(FP32_SCHEME, t, True, f"only-{t.replace('_', '-')}"),
    _with(SCHEMES[DEFAULT_SCHEME], t, False, f"all-but-{t.replace('_', '-')}"))}
SCHEMES.update(ABLATIONS)


def dequantize(t):
    """Real values of a :class:`QTensor` (float32), or an fp32 array as it is."""
    if isinstance(t, QTensor):
        return (t.codes * np.float32(t.step)).astype(np.float32)
    return t


def rows(h, index):
    """Rows ``index`` of a prepared input (a :class:`QTensor` or an fp32 array)."""
    return QTensor(h.codes[index], h.step) if isinstance(h, QTensor) else h[index]


def softmax_xent(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits (fp32)."""
    z = logits - logits.max(axis=1, keepdims=True)
    ez = np.exp(z)
    p = ez / ez.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = float(-np.log(np.maximum(p[np.arange(n), labels], 1e-30)).mean())
    p[np.arange(n), labels] -= 1.0
    return loss, (p / n).astype(np.float32)


class _Param:
    """An fp32 master tensor with SGD-momentum state."""

    def __init__(self, value):
        self.value = np.asarray(value, dtype=np.float32)
        self.grad = np.zeros_like(self.value)
        self.velocity = np.zeros_like(self.value)

    def step(self, lr, momentum):
        self.velocity *= momentum
        self.velocity += self.grad
        self.value -= lr * self.velocity


# -- gradients: FP4 terms or fp32 -----------------------------------------------------------------
def _grid(values, unit, scheme, gradscale):
    """(values on the grid's scale, exp, base) of a gradient: GradScale places the grid
    from ``gradscale`` (streaming, per layer) or from the current absmax; without GradScale
    the grid is fixed in real units, its top code at 1.0."""
    if not scheme.gradscale:
        return values * unit, 0, 1.0
    absmax = float(np.abs(values).max()) if values.size else 0.0
    exp = (gradscale_exponent(absmax) or 0) if gradscale is None else \
        gradscale.update(absmax, unit)
    return values, exp, unit


def quantize_grad(values, unit, scheme, gradscale=None, terms=1):
    """The FP4 gradient of ``values * unit`` for (backward-data, backward-weight): a pair of
    :class:`FP4Tensor`, or with ``terms=2`` a pair of two-term lists ``[t1, t2]`` where
    ``t2`` is the FP4 residual of ``t1`` on the same grid (same exp), so the two sum
    exactly in an accumulator."""
    r = scheme.radix_log2
    values, exp, base = _grid(values, unit, scheme, gradscale)
    if scheme.tpr:
        first = log_quantize_tpr(values, exp, r)
    else:
        first = (log_quantize(values, exp, 0, r),) * 2
    out = []
    for codes, phase in zip(first, (0, scheme.weight_phase), strict=True):
        t1 = FP4Tensor(codes, phase, exp, base, r)
        if terms == 1:
            out.append(t1)
            continue
        rest = values - t1.dequantize() / base           # the residual, on the same scale
        out.append([t1, FP4Tensor(log_quantize(rest, exp, phase, r), phase, exp, base, r)])
    return tuple(out)


def _terms(dy):
    return dy if isinstance(dy, list) else [dy]


#: PACT's initial clip: this fraction of the first batch's largest activation.
ALPHA_INIT = 0.5
#: The learned clip never goes below this share of its first value: without a floor, SGD
#: drove it negative in the CNN's no-TPR ablation (make bench-numerics stopped with "rescale
#: ratio must be finite and > 0").
ALPHA_FLOOR = 1 / 64


class Linear:
    """Bias-free ``y = x @ w.T`` (w: n_out x n_in), optionally followed by ReLU.

    Hidden layers (``relu=True``) end in a PACT-clipped UINT4 activation with a learned clip
    ``alpha`` when the scheme quantizes activations; the output layer returns fp32 logits.
    ``alpha_init``: the clip's initial value, or None to measure it on the first batch
    (:data:`ALPHA_INIT` of its largest activation; a fixed 4.0 left the first convolution of
    the CNN with outputs far below the clip, on a few of its 16 codes).
    """

    def __init__(self, n_in, n_out, relu, scheme, rng, alpha_init=None):
        self.relu = relu
        self.scheme = scheme
        std = np.sqrt(2.0 / n_in)
        self.w = _Param(rng.standard_normal((n_out, n_in)) * std)
        self.params = [self.w]
        if relu and scheme.acts:
            self.alpha = _Param(np.float32(alpha_init or 0.0))
            self.alpha_measured = alpha_init is not None
            self.alpha_floor = (alpha_init or 0.0) * ALPHA_FLOOR
            self.params.append(self.alpha)
        if relu and scheme.grads:
            self.gradscale = GradScale(streaming=True)
        self._ctx = None
        #: MACs run so far: [4-bit x 4-bit (INT4/UINT4 x INT4/UINT4/FP4), any wider]
        self.macs = [0, 0]

    def _count(self, exact, *shape):
        """Count a GEMM of ``shape`` (M, L, N): exact integer GEMMs on 4-bit codes are the
        4-bit MACs; the others have an fp32 operand."""
        self.macs[0 if exact else 1] += int(np.prod(shape))

    def forward(self, x):
        """``x``: a :class:`QTensor` of UINT4 codes, or fp32. Returns the next layer's
        input (codes or fp32) or, for the output layer, fp32 logits."""
        w = sawb_quantize(self.w.value) if self.scheme.weights else self.w.value
        exact = isinstance(x, QTensor) and isinstance(w, QTensor)
        self._count(exact, len(x.codes) if isinstance(x, QTensor) else len(x),
                    *self.w.value.shape[::-1])
        if exact:
            acc = gemm_forward(x.codes, w.codes, as_float=not self.relu or not self.scheme.acts)
            unit = x.step * w.step
        else:
            acc, unit = dequantize(x) @ dequantize(w).T, 1.0
        if not self.relu:
            out = (acc * unit).astype(np.float32)
        elif not self.scheme.acts:
            out = np.maximum(acc * unit, 0).astype(np.float32)
        else:
            if not self.alpha_measured:           # the first batch sets the clip
                top = float(acc.max()) * unit if acc.size else 0.0
                self.alpha.value[...] = ALPHA_INIT * top if top > 0 else 1.0
                self.alpha_floor = float(self.alpha.value) * ALPHA_FLOOR
                self.alpha_measured = True
            if self.alpha.value < self.alpha_floor:   # SGD drove the clip to (below) zero
                self.alpha.value[...] = self.alpha_floor
            if exact:                             # the device's rescale unit
                m, s = rescale_params(unit * UINT4_MAX / float(self.alpha.value))
                codes, _ = rescale(acc, m, s, UINT4_MIN, UINT4_MAX, relu=True)
                out = QTensor(codes, unit * np.ldexp(1.0, s) / m)   # exact effective step
            else:
                step = float(self.alpha.value) / UINT4_MAX
                out = QTensor(quantize_int(np.maximum(acc, 0), step, UINT4_MIN, UINT4_MAX),
                              step)
        self._ctx = (x, w, out)
        return out

    def backward(self, dy, need_dx=True):
        """``dy``: the gradient of this layer's output, a (backward-data, backward-weight)
        pair of FP4 tensors or two-term lists, or fp32. Sets ``w.grad``; returns the
        gradient of the input as ``("acc", integer accumulators, unit)`` (exact GEMM) or
        ``("real", fp32)``."""
        x, w, _ = self._ctx
        if isinstance(dy, tuple):
            self.w.grad[...] = self._dw_fp4(_terms(dy[1]), x)
            if need_dx:
                return self._dx_fp4(_terms(dy[0]), w)
            return None
        self.w.grad[...] = dy.T @ dequantize(x)
        self._count(False, *dy.shape, self.w.value.shape[1])
        if need_dx:
            self._count(False, *dy.shape, self.w.value.shape[1])
            return "real", dy @ dequantize(w)
        return None

    def _dw_fp4(self, terms, x):
        for t in terms:
            self._count(isinstance(x, QTensor), *t.codes.shape, self.w.value.shape[1])
        if isinstance(x, QTensor):
            # reductions longer than the hardware's are summed in chunks, exactly (float64)
            n = len(x.codes)
            chunks = [slice(lo, lo + MAX_REDUCTION) for lo in range(0, n, MAX_REDUCTION)]
            acc = sum(gemm_backward_weight(t.codes[c], t.phase, x.codes[c], t.radix_log2,
                                           as_float=True).astype(
                                               np.float64 if len(chunks) > 1 else None)
                      for t in terms for c in chunks)
            return acc * (terms[0].int_unit * x.step)
        return sum(t.dequantize().astype(np.float32).T for t in terms) @ x

    def _dx_fp4(self, terms, w):
        for t in terms:
            self._count(isinstance(w, QTensor), *t.codes.shape, self.w.value.shape[1])
        if isinstance(w, QTensor):
            acc = sum(gemm_backward_data(t.codes, t.phase, w.codes, t.radix_log2)
                      for t in terms)
            return "acc", acc, terms[0].int_unit * w.step
        return "real", sum(t.dequantize().astype(np.float32) for t in terms) @ w

    def activation_backward(self, grad):
        """Backward through this layer's activation: ``grad`` is the next layer's
        backward-data result (:meth:`backward`). With PACT the mask comes from the stored
        UINT4 codes q (the gradient passes where ``0 < q < 15``, and goes to the clip
        ``alpha`` where ``q == 15``), else from ReLU; the masked gradient is then
        log-quantized with this layer's GradScale into the FP4 pair for its backward, or
        kept in fp32."""
        _kind, values, *unit = grad
        unit = unit[0] if unit else 1.0
        out = self._ctx[2]
        if self.scheme.acts:
            q = out.codes
            clipped = q == UINT4_MAX
            self.alpha.grad[...] = values[clipped].sum() * unit
            keep = (q > UINT4_MIN) & ~clipped
        else:
            keep = out > 0
        masked = np.where(keep, values, 0)
        if self.scheme.grads:
            return quantize_grad(masked, unit, self.scheme, self.gradscale)
        return (masked * unit).astype(np.float32)


class Model:
    """What an MLP and a CNN share: the input, a training step, predictions."""

    def input(self, x):
        """Network input from pixels in [0, 1]: UINT4 codes (step 1/15) when the scheme
        quantizes inputs, as the host streams them to the device; fp32 otherwise.
        Quantize a dataset once."""
        if not self.scheme.inputs:
            return np.asarray(x, dtype=np.float32)
        return QTensor(quantize_int(x, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX), 1.0 / UINT4_MAX)

    def output_grad(self, dlogits):
        """The output layer's gradient as the scheme says (its GradScale sees the whole
        tensor: the current absmax)."""
        s = self.scheme
        if s.out_grad == "fp32":
            return dlogits
        return quantize_grad(dlogits, 1.0, s, terms=2 if s.out_grad == "fp4x2" else 1)

    @property
    def params(self):
        return [p for layer in self.layers for p in layer.params]

    def non_4bit_mac_share(self):
        """The share of the training steps' MACs with an operand wider than 4 bits (the
        paper's currency for what a precision exception costs)."""
        four, other = getattr(self, "train_macs", (0, 0))
        return other / (four + other) if four + other else 0.0

    def train_step(self, h, labels, lr, momentum):
        """One SGD step on a batch prepared by :meth:`input`; returns the loss."""
        before = self._macs()
        logits = self.forward(h)
        loss, dlogits = softmax_xent(logits, labels)
        self.backward(dlogits)
        for p in self.params:
            p.step(lr, momentum)
        after = self._macs()
        self.train_macs = [t + a - b for t, a, b in zip(getattr(self, "train_macs", (0, 0)),
                                                         after, before, strict=True)]
        return loss

    def _macs(self):
        return [sum(layer.macs[k] for layer in self.layers) for k in (0, 1)]

    def predict(self, h, batch_size=1024):
        """Predicted classes of an input prepared by :meth:`input`."""
        n = len(h.codes) if isinstance(h, QTensor) else len(h)
        out = [self.forward(rows(h, slice(i, i + batch_size))).argmax(axis=1)
               for i in range(0, n, batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class MLP(Model):
    """A bias-free ReLU MLP, e.g. ``MLP([784, 128, 10], SCHEMES["ibm4"], seed=0)``."""

    def __init__(self, sizes, scheme, seed=0, alpha_init=None):
        if len(sizes) < 2:
            raise ValueError("an MLP needs at least an input and an output size")
        rng = np.random.default_rng(seed)
        self.sizes = list(sizes)
        self.scheme = scheme
        self.layers = [
            Linear(a, b, relu=i < len(sizes) - 2, scheme=scheme, rng=rng, alpha_init=alpha_init)
            for i, (a, b) in enumerate(itertools.pairwise(sizes))
        ]

    def forward(self, h):
        """Logits of an input prepared by :meth:`input`."""
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def backward(self, dlogits):
        dy = self.output_grad(dlogits)
        for i in reversed(range(len(self.layers))):
            grad = self.layers[i].backward(dy, need_dx=i > 0)
            if i > 0:
                dy = self.layers[i - 1].activation_backward(grad)
