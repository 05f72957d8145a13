"""A LeNet-5-class CNN through the same golden GEMMs: convolutions as GEMMs over im2col.

``LeNet``: conv 5x5 (1 -> 6) -> max-pool 2 -> conv 5x5 (6 -> 16) -> max-pool 2 -> fc 256 ->
120 -> fc 120 -> 10, ReLU after every layer but the last, on 28x28 images.

A convolution is a :class:`~nibble.host.training.model.Linear` layer on im2col rows (one row
per output position, ``C * 5 * 5`` features): its forward, backward-data and backward-weight
GEMMs, its PACT activation and its gradient quantization are exactly the MLP's, with the
same integer arithmetic when both operands are codes. What the host adds here, as a device
would leave to the host for now: im2col and col2im (the backward-data accumulators of
overlapping windows are summed as exact integers before the mask and the quantizer), and
2x2 max-pooling, taken on UINT4 codes (the quantizer is monotonic, so pooling codes equals
pooling values), its gradient routed to the first maximum of each window. Backward-weight
reduces over every output position of the batch (24 x 24 x B for the first convolution),
more than the accelerator's ``MAX_REDUCTION``: it is summed in chunks of at most that many
rows, exactly, as a device would sum several RAW passes.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nibble.host.golden.numerics import QTensor
from nibble.host.training.model import Linear, Model

__all__ = ["LeNet", "col2im", "im2col", "maxpool2", "unpool2"]


def _map(t, fn):
    """Apply ``fn`` to the values of a QTensor (keeping its step) or of an fp32 array."""
    return QTensor(fn(t.codes), t.step) if isinstance(t, QTensor) else fn(t)


def im2col(x, k):
    """(B, C, H, W) -> (B * H' * W', C * k * k), rows ordered (b, y, x), columns (c, i, j)."""
    b, c, h, w = x.shape
    win = sliding_window_view(x, (k, k), axis=(2, 3))          # (B, C, H', W', k, k)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * (h - k + 1) * (w - k + 1), c * k * k)


def col2im(cols, shape, k):
    """The adjoint of :func:`im2col`: sums each window's gradient back into (B, C, H, W)."""
    b, c, h, w = shape
    ho, wo = h - k + 1, w - k + 1
    g = cols.reshape(b, ho, wo, c, k, k)
    out = np.zeros(shape, dtype=np.result_type(cols.dtype, np.float32)
                   if cols.dtype.kind == "f" else np.int64)
    for i in range(k):
        for j in range(k):
            out[:, :, i:i + ho, j:j + wo] += g[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return out


def maxpool2(x):
    """2x2 max-pooling of (B, C, H, W) and, per window, the index (0..3) of its first
    maximum."""
    b, c, h, w = x.shape
    win = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(b, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def unpool2(g, arg):
    """The gradient of :func:`maxpool2`: each window's gradient to its first maximum."""
    b, c, h, w = g.shape
    out = np.zeros((b, c, h, w, 4), dtype=g.dtype)
    np.put_along_axis(out, arg[..., None], g[..., None], axis=-1)
    return out.reshape(b, c, h, w, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, 2 * h, 2 * w)


def _rows(x):
    """(B, C, H, W) -> (B * H * W, C): one row per position (the GEMM output layout)."""
    b, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(b * h * w, c)


def _image(x, b, h, w):
    """The inverse of :func:`_rows`."""
    return x.reshape(b, h, w, -1).transpose(0, 3, 1, 2)


def _grad_map(grad, fn):
    """Apply ``fn`` to a backward-data result ``("acc", values, unit)`` / ``("real", v)``."""
    return (grad[0], fn(grad[1]), *grad[2:])


class LeNet(Model):
    """The CNN, e.g. ``LeNet(SCHEMES["ibm4"], seed=0)``; inputs are 784 pixels per image."""

    K = 5

    def __init__(self, scheme, seed=0, alpha_init=None):
        rng = np.random.default_rng(seed)
        self.scheme = scheme
        self.sizes = [784, 6, 16, 120, 10]
        k2 = self.K * self.K

        def layer(n_in, n_out, relu):
            return Linear(n_in, n_out, relu, scheme, rng, alpha_init)

        self.conv1, self.conv2 = layer(k2, 6, True), layer(6 * k2, 16, True)
        self.fc1, self.fc2 = layer(256, 120, True), layer(120, 10, False)
        self.layers = [self.conv1, self.conv2, self.fc1, self.fc2]

    def forward(self, h):
        b = len(h.codes) if isinstance(h, QTensor) else len(h)
        x = _map(h, lambda v: v.reshape(b, 1, 28, 28))
        self._args = []
        for conv, size in ((self.conv1, 24), (self.conv2, 8)):
            y = conv.forward(_map(x, lambda v: im2col(v, self.K)))
            y = _map(y, lambda v, size=size: _image(v, b, size, size))
            pooled, arg = maxpool2(y.codes if isinstance(y, QTensor) else y)
            self._args.append(arg)
            x = QTensor(pooled, y.step) if isinstance(y, QTensor) else pooled
        h = _map(x, lambda v: v.reshape(b, -1))
        return self.fc2.forward(self.fc1.forward(h))

    def backward(self, dlogits):
        b = len(dlogits)
        g = self.fc2.backward(self.output_grad(dlogits))
        g = self.fc1.backward(self.fc1.activation_backward(g))
        g = _grad_map(g, lambda v: v.reshape(b, 16, 4, 4))
        for conv, arg, shape in ((self.conv2, self._args[1], (b, 6, 12, 12)),
                                 (self.conv1, self._args[0], None)):
            g = _grad_map(g, lambda v, arg=arg: _rows(unpool2(v, arg)))
            g = conv.backward(conv.activation_backward(g), need_dx=shape is not None)
            if shape is None:
                break
            g = _grad_map(g, lambda v, shape=shape: col2im(v, shape, self.K))
