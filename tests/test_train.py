"""Training through the 4-bit golden ops: gradients are right, and the model learns."""

import numpy as np
import pytest

from nibble.host.golden.gemm import gemm_backward_data
from nibble.host.training import datasets
from nibble.host.training.model import MLP, SCHEMES, quantize_grad, rows, softmax_xent
from nibble.host.training.train import DEFAULT_MODELS, TrainConfig, train
from nibble.rtl.formats import UINT4_MAX


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_softmax_xent_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5)).astype(np.float64)
    y = np.array([0, 3, 1, 4])
    loss, g = softmax_xent(z, y)
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (2, 2), (3, 1)]:
        zp = z.copy()
        zp[i, j] += eps
        assert (softmax_xent(zp, y)[0] - loss) / eps == pytest.approx(g[i, j], abs=1e-4)


def test_quantized_gradients_follow_the_ste_gradient(digits):
    """The 4-bit backward pass approximates the straight-through gradient of the same
    quantized forward pass: right direction and right scale (catches scale bookkeeping)."""
    model = MLP(DEFAULT_MODELS["digits"], SCHEMES["ibm4"], seed=3)
    h = model.input(digits.x_train[:256])
    y = digits.y_train[:256]
    logits = model.forward(h)
    _, dz = softmax_xent(logits, y)
    model.backward(dz)
    l1, l2 = model.layers
    x_hat = h.codes * h.step
    _, _w1, hid = l1._ctx
    _, w2, _ = l2._ctx
    a_hat = hid.codes * hid.step
    # the STE reference in float64 on the dequantized forward values
    assert np.allclose(logits, a_hat @ (w2.codes * w2.step).T, rtol=1e-5)
    dw2 = dz.T @ a_hat
    da = dz @ (w2.codes * w2.step)
    q = hid.codes
    dh = da * ((q > 0) & (q < UINT4_MAX))
    dw1 = dh.T @ x_hat
    for got, ref in [(l2.w.grad, dw2), (l1.w.grad, dw1)]:
        assert cosine(got, ref) > 0.8           # FP4 noise: about 0.88 here
        assert 0.7 < np.linalg.norm(got) / np.linalg.norm(ref) < 1.4
    assert float(l1.alpha.grad) == pytest.approx(da[q == UINT4_MAX].sum(), rel=0.5, abs=1e-3)


def test_pact_alpha_gradient_is_exact_sum_over_clipped(digits):
    model = MLP(DEFAULT_MODELS["digits"], SCHEMES["ibm4"], seed=0, alpha_init=0.5)
    h = model.input(digits.x_train[:64])
    l1, l2 = model.layers
    _, dz = softmax_xent(model.forward(h), digits.y_train[:64])
    model.backward(dz)
    # recompute layer 2's backward-data accumulators and layer 1's alpha gradient by hand
    dy = quantize_grad(dz, 1.0, SCHEMES["ibm4"])
    acc = gemm_backward_data(dy[0].codes, 0, l2._ctx[1].codes)
    unit = dy[0].int_unit * l2._ctx[1].step
    q = l1._ctx[2].codes
    assert (q == UINT4_MAX).any()                # alpha = 0.5 clips plenty
    assert float(l1.alpha.grad) == pytest.approx(acc[q == UINT4_MAX].sum() * unit, rel=1e-6)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_runs_and_learns_something(digits, scheme):
    r = train(digits, TrainConfig(scheme=scheme, epochs=2, sizes=DEFAULT_MODELS["digits"]),
              progress=False)
    assert len(r["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in r["history"])
    assert r["test_accuracy"] > 0.3                       # chance is 0.1


def test_digits_mlp_learns_in_4_bits(digits):
    """The 4-bit emulation trains the digits MLP far above chance (0.1), fast."""
    cfg = TrainConfig(scheme="ibm4", epochs=15, sizes=DEFAULT_MODELS["digits"])
    r = train(digits, cfg, progress=False)
    assert r["test_accuracy"] > 0.90
    assert r["seconds"] < 60
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]


def test_training_is_deterministic(digits):
    cfg = TrainConfig(scheme="ibm4", epochs=1, sizes=DEFAULT_MODELS["digits"])
    a, b = train(digits, cfg, progress=False), train(digits, cfg, progress=False)
    for pa, pb in zip(a["model"].params, b["model"].params, strict=True):
        assert np.array_equal(pa.value, pb.value)


def test_rows_and_predict_on_prepared_inputs(digits):
    model = MLP(DEFAULT_MODELS["digits"], SCHEMES["ibm4"], seed=0)
    h = model.input(digits.x_test)
    assert rows(h, slice(0, 5)).codes.shape == (5, 64)
    pred = model.predict(h, batch_size=100)
    assert pred.shape == (len(digits.x_test),) and pred.max() < 10


def test_bad_config_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="unknown scheme"):
        TrainConfig(scheme="int3")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="does not match"):
        train(digits, TrainConfig(sizes=[10, 10]), progress=False)
