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
    """The 4-bit emulation trains the digits MLP far above chance (0.1). (How fast is
    make bench-numerics' business, not a test's.)"""
    cfg = TrainConfig(scheme="ibm4", epochs=15, sizes=DEFAULT_MODELS["digits"])
    r = train(digits, cfg, progress=False)
    assert r["test_accuracy"] > 0.90
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


def test_two_term_gradient_is_closer_and_on_one_grid():
    """The second FP4 term quantizes the first's residual on the same grid: the sum is never
    further from the value than the first term alone, much closer on average, and both
    terms share one exponent (so an accumulator sums their datapath integers exactly)."""
    from nibble.host.training.model import quantize_grad
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 10)) * np.exp(rng.uniform(-6, 0, (64, 10)))).astype(np.float32)
    one = quantize_grad(x, 1.0, SCHEMES["ibm4"])
    two = quantize_grad(x, 1.0, SCHEMES["ibm4-2t"], terms=2)
    for p in (0, 1):
        t1, t2 = two[p]
        assert t1.exp == t2.exp == one[p].exp and t1.phase == t2.phase == one[p].phase
        np.testing.assert_array_equal(t1.codes, one[p].codes)
        e1 = np.abs(x - t1.dequantize())
        e2 = np.abs(x - t1.dequantize() - t2.dequantize())
        assert (e2 <= e1 + 1e-12).all() and e2.mean() < 0.5 * e1.mean()


def test_im2col_and_pooling_are_adjoint_to_their_gradients():
    from nibble.host.training.cnn import col2im, im2col, maxpool2, unpool2
    rng = np.random.default_rng(0)
    x = rng.integers(-9, 9, (2, 3, 9, 9))
    c = rng.integers(-9, 9, (2 * 25, 75))
    assert (im2col(x, 5) * c).sum() == (x * col2im(c, x.shape, 5)).sum()      # exact ints
    y = rng.standard_normal((2, 3, 8, 8))
    p, arg = maxpool2(y)
    g = rng.standard_normal(p.shape)
    assert np.isclose((p * g).sum(), (y * unpool2(g, arg)).sum())
    assert (p == y.reshape(2, 3, 4, 2, 4, 2).max(axis=(3, 5))).all()


def test_cnn_learns_in_4_bits_and_counts_its_macs():
    """LeNet on images whose class is the bright quadrant: the default 4-bit scheme learns it;
    every MAC is 4-bit x 4-bit, and with fp32 none is."""
    from nibble.host.training.cnn import LeNet
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 256)
    img = rng.uniform(0, 0.3, (256, 28, 28))
    for k in range(4):
        r, c = divmod(k, 2)
        img[y == k, 14 * r:14 * r + 14, 14 * c:14 * c + 14] += 0.6
    x = img.reshape(256, 784).astype(np.float32)
    for scheme, share in (("ibm4-2t", 0.0), ("fp32", 1.0)):
        model = LeNet(SCHEMES[scheme], seed=0)
        h = model.input(x)
        losses = [model.train_step(rows(h, slice(i, i + 32)), y[i:i + 32], 0.05, 0.9)
                  for _ in range(3) for i in range(0, 256, 32)]
        assert losses[-1] < 0.5 * losses[0]
        assert float(np.mean(model.predict(h) == y)) > 0.9
        assert model.non_4bit_mac_share() == share


def test_mac_shares_of_the_output_gradient_policies():
    """On the Fashion-MNIST MLP shape: the two-term gradient adds the output layer's two
    backward GEMMs again, all 4-bit; an fp32 output gradient makes them wider."""
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 1, (64, 784)).astype(np.float32), rng.integers(0, 10, 64)
    macs = {}
    for scheme in ("ibm4", "ibm4-2t", "ibm4-fp32-out"):
        model = MLP([784, 128, 10], SCHEMES[scheme])
        model.train_step(model.input(x), y, 0.01, 0.9)
        macs[scheme] = (model.train_macs, model.non_4bit_mac_share())
    out = 64 * 128 * 10
    assert macs["ibm4"] == ([2 * 64 * 784 * 128 + 3 * out, 0], 0.0)   # layer 1: no dX
    assert macs["ibm4-2t"][0] == [macs["ibm4"][0][0] + 2 * out, 0]
    assert macs["ibm4-fp32-out"][0] == [macs["ibm4"][0][0] - 2 * out, 2 * out]


def test_a_learned_clip_driven_below_zero_is_held_at_its_floor():
    """SGD can push PACT's alpha below zero (the CNN's no-TPR ablation did); the layer then
    clips at its floor, a share of the first clip, instead of failing."""
    from nibble.host.training.model import ALPHA_FLOOR, SCHEMES, Linear
    rng = np.random.default_rng(0)
    layer = Linear(16, 8, relu=True, scheme=SCHEMES["ibm4"], rng=rng)
    x = MLP([16, 8], SCHEMES["ibm4"]).input(rng.random((4, 16)))
    layer.forward(x)
    first = float(layer.alpha.value)
    layer.alpha.value[...] = -3.0
    out = layer.forward(x)
    assert float(layer.alpha.value) == pytest.approx(first * ALPHA_FLOOR)
    assert out.codes.max() <= 15
