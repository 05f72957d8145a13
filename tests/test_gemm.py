"""Golden GEMMs: exact against an int64 reference, and accumulator widths proven."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nibble.host.golden.gemm import gemm_backward_data, gemm_backward_weight, gemm_forward
from nibble.host.golden.numerics import NumericsError, fp4_int
from nibble.rtl.formats import (
    ACC_BITS,
    FP4_EXP_MAX,
    FP4_SIGN_SHIFT,
    INT4_MAX,
    INT4_MIN,
    MAX_REDUCTION,
    UINT4_MAX,
    GemmMode,
    acc_bits,
    product_range,
    signed_bits,
)

dims = st.integers(1, 40)


def rand_codes(rng, kind, shape):
    if kind == "int4":
        return rng.integers(INT4_MIN, INT4_MAX + 1, shape).astype(np.int8)
    if kind == "uint4":
        return rng.integers(0, UINT4_MAX + 1, shape).astype(np.uint8)
    return rng.integers(0, 16, shape).astype(np.uint8)      # fp4, both signs and zero


@given(dims, dims, dims, st.sampled_from(["int4", "uint4"]), st.integers(0, 2**32 - 1))
def test_forward_exact(b, k, n, xkind, seed):
    rng = np.random.default_rng(seed)
    x, w = rand_codes(rng, xkind, (b, k)), rand_codes(rng, "int4", (n, k))
    out = gemm_forward(x, w)
    assert out.dtype == np.int64 and out.shape == (b, n)
    assert (out == x.astype(np.int64) @ w.astype(np.int64).T).all()


@given(dims, dims, dims, st.sampled_from([0, 1]), st.integers(0, 2**32 - 1))
def test_backward_data_exact(b, n, k, phase, seed):
    rng = np.random.default_rng(seed)
    dy, w = rand_codes(rng, "fp4", (b, n)), rand_codes(rng, "int4", (n, k))
    out = gemm_backward_data(dy, phase, w)
    assert out.shape == (b, k)
    assert (out == fp4_int(dy, phase) @ w.astype(np.int64)).all()


@given(dims, dims, dims, st.sampled_from([0, 1]), st.sampled_from(["int4", "uint4"]),
       st.integers(0, 2**32 - 1))
def test_backward_weight_exact(b, n, k, phase, xkind, seed):
    rng = np.random.default_rng(seed)
    dy, x = rand_codes(rng, "fp4", (b, n)), rand_codes(rng, xkind, (b, k))
    out = gemm_backward_weight(dy, phase, x)
    assert out.shape == (n, k)
    assert (out == fp4_int(dy, phase).T @ x.astype(np.int64)).all()


def test_as_float_returns_same_integers():
    rng = np.random.default_rng(1)
    x, w = rand_codes(rng, "uint4", (8, 300)), rand_codes(rng, "int4", (5, 300))
    assert (gemm_forward(x, w, as_float=True) == gemm_forward(x, w)).all()


# --- accumulator widths: derived, then proven with worst-case operands ---------------------
def test_signed_bits():
    assert signed_bits(-8, 7) == 4 and signed_bits(-9, 7) == 5 and signed_bits(0, 8) == 5
    assert signed_bits(0, 0) == 1 and signed_bits(-1, 0) == 1


def test_derived_widths():
    assert product_range(GemmMode.FORWARD) == (-120, 105)           # uint4 15 x int4 -8
    assert product_range(GemmMode.BACKWARD_DATA) == (-65536, 65536)  # 2^13 x -8
    assert product_range(GemmMode.BACKWARD_WEIGHT) == (-122880, 122880)
    assert ACC_BITS == {GemmMode.FORWARD: 20, GemmMode.BACKWARD_DATA: 30,
                        GemmMode.BACKWARD_WEIGHT: 30}
    with pytest.raises(ValueError):
        acc_bits(GemmMode.FORWARD, MAX_REDUCTION + 1)


FP4_TOP_POS = FP4_EXP_MAX                                  # +2^(12+phase)
FP4_TOP_NEG = (1 << FP4_SIGN_SHIFT) | FP4_EXP_MAX          # -2^(12+phase)


def full(shape, value, dtype):
    return np.full(shape, value, dtype=dtype)


def worst_cases():
    """(mode, result, operands) of every extreme accumulator at MAX_REDUCTION."""
    L = MAX_REDUCTION
    u, i, f = np.uint8, np.int8, np.uint8
    yield GemmMode.FORWARD, gemm_forward(full((1, L), 15, u), full((1, L), -8, i))
    yield GemmMode.FORWARD, gemm_forward(full((1, L), 15, u), full((1, L), 7, i))
    yield GemmMode.FORWARD, gemm_forward(full((1, L), -8, i), full((1, L), -8, i))
    yield GemmMode.BACKWARD_DATA, gemm_backward_data(full((1, L), FP4_TOP_NEG, f), 1,
                                                     full((L, 1), -8, i))
    yield GemmMode.BACKWARD_DATA, gemm_backward_data(full((1, L), FP4_TOP_POS, f), 1,
                                                     full((L, 1), -8, i))
    yield GemmMode.BACKWARD_WEIGHT, gemm_backward_weight(full((L, 1), FP4_TOP_POS, f), 1,
                                                         full((L, 1), 15, u))
    yield GemmMode.BACKWARD_WEIGHT, gemm_backward_weight(full((L, 1), FP4_TOP_NEG, f), 1,
                                                         full((L, 1), 15, u))


@pytest.mark.parametrize("mode,out", list(worst_cases()),
                         ids=lambda v: getattr(v, "name", ""))
def test_worst_case_operands_fit_derived_width(mode, out):
    """Each extreme sum (exact: see test_worst_case_values) fits ACC_BITS[mode]."""
    value = int(out[0, 0])
    width = ACC_BITS[mode]
    assert -(1 << (width - 1)) <= value < 1 << (width - 1)


@pytest.mark.parametrize("mode", list(GemmMode))
def test_width_is_minimal(mode):
    """The most extreme sum of each mode does not fit one bit less."""
    values = [int(out[0, 0]) for m, out in worst_cases() if m is mode]
    width = ACC_BITS[mode]
    assert any(not (-(1 << (width - 2)) <= v < 1 << (width - 2)) for v in values)


def test_worst_case_values():
    L = MAX_REDUCTION
    got = [int(out[0, 0]) for _, out in worst_cases()]
    assert got == [-120 * L, 105 * L, 64 * L, 65536 * L, -65536 * L, 122880 * L,
                   -122880 * L]


# --- bad input: a clear error, never a wrong answer ----------------------------------------
def ok_operands():
    return np.zeros((2, 3), np.uint8), np.zeros((4, 3), np.int8)


@pytest.mark.parametrize("call", [
    lambda: gemm_forward(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.int8)),  # dtype
    lambda: gemm_forward(np.zeros((2, 3), np.uint8), np.zeros((4, 2), np.int8)),    # K
    lambda: gemm_forward(np.zeros(3, np.uint8), np.zeros((4, 3), np.int8)),         # 1-D
    lambda: gemm_forward(np.full((2, 3), 16, np.uint8), np.zeros((4, 3), np.int8)),  # range
    lambda: gemm_forward(np.zeros((2, 3), np.uint8), np.full((4, 3), 8, np.int16)),
    lambda: gemm_forward(np.zeros((1, MAX_REDUCTION + 1), np.uint8),
                         np.zeros((1, MAX_REDUCTION + 1), np.int8)),                # length
    lambda: gemm_backward_data(np.zeros((2, 3), np.uint8), 0, np.zeros((4, 3), np.int8)),
    lambda: gemm_backward_data(np.full((2, 4), 16, np.uint8), 0, np.zeros((4, 3), np.int8)),
    lambda: gemm_backward_data(np.zeros((2, 4), np.uint8), 2, np.zeros((4, 3), np.int8)),
    lambda: gemm_backward_weight(np.zeros((2, 4), np.uint8), 1, np.zeros((3, 3), np.uint8)),
    lambda: gemm_backward_weight(np.zeros((2, 4), np.float64), 1, np.zeros((2, 3), np.uint8)),
])
def test_bad_input_raises(call):
    with pytest.raises(NumericsError):
        call()
