"""Property tests of every golden quantizer against brute-force definitions."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nibble.host.golden.numerics import (
    FP4Tensor,
    GradScale,
    NumericsError,
    fp4_decode,
    fp4_int,
    gradscale_exponent,
    log_quantize,
    log_quantize_tpr,
    log_thresholds,
    pact_quantize,
    quantize_int,
    rescale,
    rescale_params,
    round_half_up,
    sawb_alpha,
    sawb_quantize,
)
from nibble.rtl.formats import (
    FP4_EXP_MAX,
    FP4_SIGN_SHIFT,
    RESCALE_M_BITS,
    RESCALE_SHIFT_MAX,
    SAWB_C1,
    SAWB_C2,
    UINT4_MAX,
    WEIGHT_MAX,
)

settings.register_profile("nibble", deadline=None, max_examples=150)
settings.load_profile("nibble")

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
floats_1d = arrays(np.float64, st.integers(1, 40), elements=finite)
RANGES = [(-7, 7), (-8, 7), (0, 15)]


# --- rounding and the integer quantizers --------------------------------------------------
@given(st.integers(-10**6, 10**6))
def test_round_half_up_ties_go_up(n):
    assert round_half_up(n + 0.5) == n + 1
    assert round_half_up(n - 0.5) == n
    assert round_half_up(n + 0.49) == n


def brute_int(x, step, lo, hi):
    """Nearest grid point by exhaustive search; ties go to the larger code."""
    grid = np.arange(lo, hi + 1)
    best = None
    for c in grid:
        d = abs(Fraction(x) - Fraction(int(c)) * Fraction(step))
        if best is None or d < best[0] or (d == best[0] and c > best[1]):
            best = (d, c)
    return best[1]


@given(floats_1d, st.floats(1e-3, 1e3), st.sampled_from(RANGES))
def test_quantize_int_is_nearest_grid_point(x, step, rng):
    lo, hi = rng
    q = quantize_int(x, step, lo, hi)
    assert q.dtype == (np.int8 if lo < 0 else np.uint8)
    assert ((q >= lo) & (q <= hi)).all()
    for xi, qi in zip(x, q, strict=True):
        # x / step is evaluated in float64: compare against the exact search on that ratio.
        assert qi == brute_int(xi / step, 1, lo, hi)


@given(floats_1d, st.floats(1e-3, 1e3), st.sampled_from(RANGES))
def test_quantize_int_idempotent_and_monotonic(x, step, rng):
    lo, hi = rng
    q = quantize_int(x, step, lo, hi)
    assert (quantize_int(q * step, step, lo, hi) == q).all()
    order = np.argsort(x, kind="stable")
    assert (np.diff(q[order].astype(int)) >= 0).all()


def test_quantize_int_corners():
    q = quantize_int([0.0, -0.0, 0.5, -0.5, 1e9, -1e9, 6.5, -7.5], 1.0, -7, 7)
    assert q.tolist() == [0, 0, 1, 0, 7, -7, 7, -7]
    assert quantize_int([7.49, 7.5, 15.5, -3], 1.0, 0, 15).tolist() == [7, 8, 15, 0]


@pytest.mark.parametrize("bad", [[np.nan], [np.inf], [-np.inf], ["a"]])
def test_quantize_int_rejects_non_finite(bad):
    with pytest.raises(NumericsError):
        quantize_int(np.array(bad), 1.0, 0, 15)


def test_quantize_int_rejects_bad_step():
    for step in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(NumericsError):
            quantize_int([1.0], step, 0, 15)


# --- SAWB and PACT -----------------------------------------------------------------------
@given(arrays(np.float32, st.integers(2, 300), elements=st.floats(-4, 4, width=32)))
def test_sawb_matches_its_formula(w):
    assume(np.abs(w).max() > 0)
    w64 = w.astype(np.float64)
    alpha = SAWB_C1 * np.sqrt(np.mean(w64**2)) + SAWB_C2 * np.mean(np.abs(w64))
    if alpha <= 0:
        alpha = np.abs(w64).max()
    assert sawb_alpha(w) == pytest.approx(alpha, rel=1e-12)
    q = sawb_quantize(w)
    assert q.codes.dtype == np.int8
    assert np.abs(q.codes).max() <= WEIGHT_MAX
    assert q.step == pytest.approx(alpha / WEIGHT_MAX, rel=1e-12)
    assert (q.codes == quantize_int(w, q.step, -WEIGHT_MAX, WEIGHT_MAX)).all()


def test_sawb_gaussian_clip_and_errors():
    w = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    # For a Gaussian, alpha = (12.68 - 12.80 * sqrt(2/pi)) * sigma = 2.467 sigma.
    assert sawb_alpha(w) == pytest.approx(12.68 - 12.80 * np.sqrt(2 / np.pi), rel=1e-2)
    assert sawb_alpha(np.array([1.0, -1.0], np.float32)) == 1.0     # degenerate: max|w|
    for bad in (np.zeros(4, np.float32), np.array([np.nan], np.float32),
                np.array([1, 2]), np.zeros(0, np.float32)):
        with pytest.raises(NumericsError):
            sawb_alpha(bad)


@given(floats_1d, st.floats(0.01, 100))
def test_pact_quantize(x, alpha):
    q = pact_quantize(x, alpha)
    assert q.step == alpha / UINT4_MAX
    assert q.codes.dtype == np.uint8
    assert (q.codes == quantize_int(np.clip(x, 0, alpha), q.step, 0, UINT4_MAX)).all()
    assert (q.codes[x >= alpha] == UINT4_MAX).all()
    assert (q.codes[x <= 0] == 0).all()


def test_pact_rejects_bad_alpha():
    for a in (0, -1, np.nan):
        with pytest.raises(NumericsError):
            pact_quantize([1.0], a)


# --- range-rescale unit -------------------------------------------------------------------
def brute_rescale(acc, m, s, lo, hi, relu):
    if relu:
        acc = max(acc, 0)
    value = Fraction(acc * m, 1 << s)
    q = int(np.floor(value + Fraction(1, 2)))      # round half up
    return min(max(q, lo), hi)


accs = arrays(np.int64, st.integers(1, 30), elements=st.integers(-(1 << 30), 1 << 30))


@given(accs, st.integers(0, (1 << RESCALE_M_BITS) - 1), st.integers(0, RESCALE_SHIFT_MAX),
       st.sampled_from(RANGES), st.booleans())
def test_rescale_matches_exact_rational(acc, m, s, rng, relu):
    lo, hi = rng
    codes, absmax = rescale(acc, m, s, lo, hi, relu)
    expect = [brute_rescale(int(a), m, s, lo, hi, relu) for a in acc]
    assert codes.tolist() == expect
    post = np.maximum(acc, 0) if relu else acc
    assert absmax == int(np.abs(post).max())


@given(accs, st.integers(1, (1 << RESCALE_M_BITS) - 1), st.integers(0, 40))
def test_rescale_is_monotonic(acc, m, s):
    order = np.argsort(acc, kind="stable")
    codes, _ = rescale(acc, m, s, -8, 7)
    assert (np.diff(codes[order].astype(int)) >= 0).all()


def test_rescale_corners():
    # ties at .5 go up, for negative values too; saturation at both ends; s = 0 exact.
    codes, absmax = rescale(np.array([1, -1, 3, -3, 0, 100, -100]), 1, 1, -8, 7)
    assert codes.tolist() == [1, 0, 2, -1, 0, 7, -8]
    assert absmax == 100
    codes, absmax = rescale(np.array([-5, 5, 16]), 1, 0, 0, 15, relu=True)
    assert codes.tolist() == [0, 5, 15] and absmax == 16
    assert rescale(np.zeros(0, np.int64), 1, 0, 0, 15) [1] == 0
    big = np.array([(1 << 46) - 1, -(1 << 46) + 1])
    codes, absmax = rescale(big, (1 << 16) - 1, 63, -8, 7)
    assert codes.tolist() == [0, 0]       # (2^46 * 2^16) >> 63 rounds to 0


@pytest.mark.parametrize("kwargs", [
    {"acc": np.array([1.0])}, {"m": -1}, {"m": 1 << 16}, {"s": 64}, {"s": -1},
    {"lo": 0, "hi": 16}, {"acc": np.array([1 << 46])},
])
def test_rescale_rejects_bad_input(kwargs):
    args = {"acc": np.array([1]), "m": 1, "s": 0, "lo": 0, "hi": 15} | kwargs
    with pytest.raises(NumericsError):
        rescale(**args)


@given(st.floats(2.0**-40, 2.0**15, allow_nan=False))
def test_rescale_params_normalised_and_accurate(ratio):
    m, s = rescale_params(ratio)
    assert 1 << (RESCALE_M_BITS - 1) <= m < 1 << RESCALE_M_BITS
    assert 0 <= s <= RESCALE_SHIFT_MAX
    assert abs(m / 2.0**s - ratio) <= ratio * 2.0**-RESCALE_M_BITS


def test_rescale_params_out_of_range():
    for ratio in (0.0, -1.0, np.nan, 2.0**17, 2.0**-60):
        with pytest.raises(NumericsError):
            rescale_params(ratio)


# --- FP4 radix-4 --------------------------------------------------------------------------
def grid(exp, phase, radix_log2=2):
    """All 15 representable values with their codes (negative zero never produced)."""
    out = [(Fraction(0), 0)]
    for e in range(1, FP4_EXP_MAX + 1):
        mag = Fraction(2) ** (radix_log2 * (e - FP4_EXP_MAX) + phase + exp)
        out += [(mag, e), (-mag, (1 << FP4_SIGN_SHIFT) | e)]
    return out


def brute_log(x, exp, phase, radix_log2=2):
    """Nearest grid value by exhaustive search; ties to the smaller magnitude."""
    x = Fraction(x)
    return min(grid(exp, phase, radix_log2), key=lambda vc: (abs(x - vc[0]), abs(vc[0])))[1]


@given(floats_1d, st.integers(-30, 30), st.sampled_from([0, 1]), st.sampled_from([2, 1]))
def test_log_quantize_is_nearest_grid_point(x, exp, phase, r):
    codes = log_quantize(x, exp, phase, r)
    assert codes.dtype == np.uint8 and codes.max() <= 15
    assert codes.tolist() == [brute_log(v, exp, phase, r) for v in x]


@given(st.integers(-30, 30), st.sampled_from([0, 1]), st.sampled_from([2, 1]))
def test_log_quantize_ties_thresholds_and_saturation(exp, phase, r):
    t = log_thresholds(exp, phase, r)
    assert (np.diff(t) > 0).all() and t.size == FP4_EXP_MAX
    below, above = np.nextafter(t, -np.inf), np.nextafter(t, np.inf)
    ecode = np.arange(FP4_EXP_MAX)
    assert (log_quantize(t, exp, phase, r) == ecode).all()          # tie -> smaller
    assert (log_quantize(below, exp, phase, r) == ecode).all()
    assert (log_quantize(above, exp, phase, r) == ecode + 1).all()
    assert (log_quantize(-above, exp, phase, r) == (ecode + 1) | 8).all()
    top = 2.0 ** (exp + phase)
    assert log_quantize([top * 1e6, -top * 1e6, top], exp, phase, r).tolist() == [7, 15, 7]
    assert log_quantize([0.0, -0.0, -t[0]], exp, phase, r).tolist() == [0, 0, 0]


@given(st.integers(-30, 30), st.sampled_from([0, 1]), st.sampled_from([2, 1]))
def test_log_quantize_idempotent_and_monotonic(exp, phase, r):
    codes = np.array([c for _, c in grid(exp, phase, r)], dtype=np.uint8)
    values = fp4_decode(codes, phase, r) * 2.0**exp
    assert (log_quantize(values, exp, phase, r) == codes).all()
    xs = np.sort(np.concatenate([values, np.linspace(-2, 2, 501) * 2.0 ** (exp + phase)]))
    decoded = fp4_decode(log_quantize(xs, exp, phase, r), phase, r)
    assert (np.diff(decoded) >= 0).all()


@given(arrays(np.int64, st.integers(1, 50), elements=st.integers(-(1 << 30), 1 << 30)),
       st.integers(-5, 32), st.sampled_from([2, 1]))
def test_log_quantize_tpr_equals_two_phases(x, exp, r):
    p0, p1 = log_quantize_tpr(x, exp, r)
    assert (p0 == log_quantize(x, exp, 0, r)).all()
    assert (p1 == log_quantize(x, exp, 1, r)).all()


def test_fp4_decode_and_int_agree():
    codes = np.arange(16, dtype=np.uint8)
    for phase in (0, 1):
        ints = fp4_int(codes, phase)
        assert ints.tolist()[:8] == [0] + [1 << (2 * (e - 1) + phase) for e in range(1, 8)]
        assert ints[8] == 0 and (ints[9:] == -ints[1:8]).all()
        assert (fp4_decode(codes, phase) == ints / 4096).all()
        t = FP4Tensor(codes, phase, exp=5, base=0.3)
        assert np.allclose(t.dequantize(), ints * t.int_unit)
        assert t.dequantize()[7] == pytest.approx(0.3 * 2**5 * 2**phase)


@pytest.mark.parametrize("call", [
    lambda: log_quantize([np.nan], 0, 0),
    lambda: log_quantize([1.0], 0, 2),
    lambda: log_quantize([1.0], 0.5, 0),
    lambda: fp4_int(np.array([16]), 0),
    lambda: fp4_int(np.array([1.0]), 0),
    lambda: fp4_int(np.array([-1]), 0),
])
def test_fp4_rejects_bad_input(call):
    with pytest.raises(NumericsError):
        call()


# --- GradScale ------------------------------------------------------------------------------
@given(st.floats(1e-30, 1e30))
def test_gradscale_puts_absmax_in_top_binade(absmax):
    exp = gradscale_exponent(absmax)
    assert 2.0 ** (exp - 1) < absmax <= 2.0**exp
    # the phase-0 top code (2^exp) is the value absmax rounds to: never saturated
    assert log_quantize([absmax], exp, 0)[0] in (FP4_EXP_MAX, FP4_EXP_MAX - 1)
    assert log_quantize([2.0 ** exp], exp, 0)[0] == FP4_EXP_MAX


def test_gradscale_streaming_uses_previous_step():
    gs = GradScale(streaming=True)
    assert gs.update(100.0) == 7               # first step measures itself
    assert gs.update(3.0) == 7                 # then follows the previous absmax (100)
    assert gs.update(1000.0) == 2              # (3)
    assert gs.update(0.0) == 10                # (1000); zero keeps the last statistic
    assert gs.update(5.0, unit=4.0) == 8       # 1000 real = 250 units -> 2^8
    assert gradscale_exponent(0.0) is None
    live = GradScale(streaming=False)
    assert live.update(100.0) == 7 and live.update(3.0) == 2
