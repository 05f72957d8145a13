"""Layers and models that train through the 4-bit golden ops (or in fp32 for reference).

A quantized layer keeps fp32 master weights on the host and runs all three GEMMs of its
training step on 4-bit codes through :mod:`nibble.host.golden.gemm`, in the order and with
the number formats the accelerator uses (straight-through estimators carry the gradient past each
quantizer):

forward
    W codes = SAWB(W master); acc = X·Wᵀ; hidden layers rescale acc to UINT4 with a PACT
    clip (``golden.numerics.rescale``), the last layer returns ``acc * step`` as fp32 logits.
backward
    dW acc = dYᵀ·X with dY in FP4 phase 1 (TPR); dX acc = dY·W with dY in FP4 phase 0; the
    previous layer's activation applies its ReLU/PACT mask to dX acc, accumulates its clip
    gradient and log-quantizes the result (GradScale exponent) into the next FP4 pair.

The layer API works on 2-D GEMM operands (rows x features), so a convolution can reuse it
through im2col.
"""

import itertools
from dataclasses import dataclass

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
from nibble.rtl.formats import FP4_RADIX_LOG2, UINT4_MAX, UINT4_MIN

__all__ = ["FP32_SCHEME", "MLP", "SCHEMES", "Scheme", "rows", "softmax_xent"]


@dataclass(frozen=True)
class Scheme:
    """How a model trains. ``quantized=False`` is the fp32 reference."""

    name: str
    quantized: bool = True
    radix_log2: int = FP4_RADIX_LOG2   # gradient format: 2 = radix-4 FP4, 1 = radix-2 FP4
    tpr: bool = True                   # phase 1 grid for backward-weight
    gradscale: bool = True             # per-layer power-of-two gradient scale

    @property
    def weight_phase(self):
        return 1 if self.tpr else 0


FP32_SCHEME = Scheme("fp32", quantized=False)
SCHEMES = {s.name: s for s in [
    FP32_SCHEME,
    Scheme("ibm4"),
    Scheme("ibm4-no-tpr", tpr=False),
    Scheme("radix2-fp4", radix_log2=1, tpr=False),
    Scheme("ibm4-no-gradscale", gradscale=False),
]}


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


class Linear:
    """Bias-free ``y = x @ w.T`` (w: n_out x n_in), optionally followed by ReLU.

    With a quantized scheme, hidden layers (``relu=True``) end in a PACT-clipped UINT4
    activation with a learned clip ``alpha``; the output layer returns fp32 logits.
    """

    def __init__(self, n_in, n_out, relu, scheme, rng, alpha_init=4.0):
        self.relu = relu
        self.scheme = scheme
        std = np.sqrt(2.0 / n_in)
        self.w = _Param(rng.standard_normal((n_out, n_in)) * std)
        self.params = [self.w]
        if relu and scheme.quantized:
            self.alpha = _Param(np.float32(alpha_init))
            self.params.append(self.alpha)
            self.gradscale = GradScale(streaming=True)
        self._ctx = None

    # -- fp32 reference -----------------------------------------------------------------------
    def _forward_fp32(self, x):
        y = x @ self.w.value.T
        if self.relu:
            y = np.maximum(y, 0)
        self._ctx = (x, y)
        return y

    def _backward_fp32(self, dy, need_dx):
        x, y = self._ctx
        if self.relu:
            dy = dy * (y > 0)
        self.w.grad[...] = dy.T @ x
        return dy @ self.w.value if need_dx else None

    # -- 4-bit ----------------------------------------------------------------------------------
    def _forward_q(self, x):
        w = sawb_quantize(self.w.value)
        acc = gemm_forward(x.codes, w.codes, as_float=not self.relu)
        unit = x.step * w.step
        if not self.relu:
            out = (acc * unit).astype(np.float32)
        else:
            alpha = float(self.alpha.value)
            m, s = rescale_params(unit * UINT4_MAX / alpha)
            codes, _ = rescale(acc, m, s, UINT4_MIN, UINT4_MAX, relu=True)
            out = QTensor(codes, unit * np.ldexp(1.0, s) / m)   # exact effective step
        self._ctx = (x, w, out)
        return out

    def _backward_q(self, dy, need_dx):
        """``dy``: (phase-0 FP4, phase-1-or-0 FP4) pair. Returns dX accumulators and unit."""
        x, w, _ = self._ctx
        dw = dy[1]
        acc_w = gemm_backward_weight(dw.codes, dw.phase, x.codes, dw.radix_log2, as_float=True)
        np.multiply(acc_w, dw.int_unit * x.step, out=self.w.grad, casting="unsafe")
        if not need_dx:
            return None
        dd = dy[0]
        acc_x = gemm_backward_data(dd.codes, dd.phase, w.codes, dd.radix_log2)
        return acc_x, dd.int_unit * w.step

    def activation_backward(self, acc, unit):
        """Backward through this layer's PACT activation on the device's integer path.

        ``acc`` is the next layer's backward-data accumulator (real value ``acc * unit``).
        The mask comes from this layer's stored UINT4 output codes ``q``: the gradient passes
        where ``0 < q < 15``; where ``q == 15`` it goes to the clip ``alpha`` instead. The
        masked accumulators are log-quantized with this layer's GradScale exponent into the
        FP4 pair for this layer's backward pass.
        """
        q = self._ctx[2].codes
        clipped = q == UINT4_MAX
        self.alpha.grad[...] = acc[clipped].sum() * unit
        masked = np.where((q > UINT4_MIN) & ~clipped, acc, 0)
        return quantize_grad(masked, unit, self.scheme, self.gradscale)

    # -- common -----------------------------------------------------------------------------------
    def forward(self, x):
        return self._forward_q(x) if self.scheme.quantized else self._forward_fp32(x)

    def backward(self, dy, need_dx=True):
        if self.scheme.quantized:
            return self._backward_q(dy, need_dx)
        return self._backward_fp32(dy, need_dx)


def quantize_grad(values, unit, scheme, gradscale=None):
    """FP4 pair (backward-data operand, backward-weight operand) of ``values * unit``.

    With GradScale the grid is placed from ``gradscale`` (streaming, per layer) or, without
    a state object, from the current absmax; the codes are then computed on ``values``
    directly (the device's integer accumulators). Without GradScale the grid is fixed in
    real units, its top code at 1.0 for every layer.
    """
    r = scheme.radix_log2
    if scheme.gradscale:
        absmax = float(np.abs(values).max()) if values.size else 0.0
        if gradscale is None:
            exp = gradscale_exponent(absmax) or 0
        else:
            exp = gradscale.update(absmax, unit)
        base = unit
    else:
        values, exp, base = values * unit, 0, 1.0
    if scheme.tpr:
        codes = log_quantize_tpr(values, exp, r)
    else:
        codes = (log_quantize(values, exp, 0, r),) * 2
    return tuple(FP4Tensor(c, phase, exp, base, r)
                 for c, phase in zip(codes, (0, scheme.weight_phase), strict=True))


class MLP:
    """A bias-free ReLU MLP, e.g. ``MLP([784, 128, 10], SCHEMES["ibm4"], seed=0)``."""

    def __init__(self, sizes, scheme, seed=0, alpha_init=4.0):
        if len(sizes) < 2:
            raise ValueError("an MLP needs at least an input and an output size")
        rng = np.random.default_rng(seed)
        self.sizes = list(sizes)
        self.scheme = scheme
        self.layers = [
            Linear(a, b, relu=i < len(sizes) - 2, scheme=scheme, rng=rng, alpha_init=alpha_init)
            for i, (a, b) in enumerate(itertools.pairwise(sizes))
        ]

    @property
    def params(self):
        return [p for layer in self.layers for p in layer.params]

    def input(self, x):
        """Network input from pixels in [0, 1]: UINT4 codes (step 1/15) when quantized, as
        the host streams them to the device; fp32 otherwise. Quantize a dataset once."""
        if not self.scheme.quantized:
            return np.asarray(x, dtype=np.float32)
        return QTensor(quantize_int(x, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX), 1.0 / UINT4_MAX)

    def forward(self, h):
        """Logits of an input prepared by :meth:`input`."""
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def backward(self, dlogits):
        if self.scheme.quantized:
            dy = quantize_grad(dlogits, 1.0, self.scheme)
        else:
            dy = dlogits
        for i in reversed(range(len(self.layers))):
            out = self.layers[i].backward(dy, need_dx=i > 0)
            if i > 0:
                dy = self.layers[i - 1].activation_backward(*out) if self.scheme.quantized \
                    else out

    def train_step(self, h, labels, lr, momentum):
        """One SGD step on a batch prepared by :meth:`input`; returns the loss."""
        logits = self.forward(h)
        loss, dlogits = softmax_xent(logits, labels)
        self.backward(dlogits)
        for p in self.params:
            p.step(lr, momentum)
        return loss

    def predict(self, h, batch_size=1024):
        """Predicted classes of an input prepared by :meth:`input`."""
        n = len(h.codes) if isinstance(h, QTensor) else len(h)
        out = [self.forward(rows(h, slice(i, i + batch_size))).argmax(axis=1)
               for i in range(0, n, batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
