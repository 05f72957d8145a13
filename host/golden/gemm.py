"""Golden GEMMs on 4-bit codes with exact integer accumulation.

Each GEMM turns its codes into the datapath integers of :mod:`rtl.formats` and multiplies
them through floating-point BLAS, which is exact while every partial sum is an integer of
magnitude below 2^mantissa: float32 when the proven bound is below 2^24, float64 below
2^53. The bound ``max|a| * max|b| * length`` is checked on every call (it bounds every
partial sum whatever the summation order), and a reduction longer than
:data:`rtl.formats.MAX_REDUCTION` is rejected: the hardware accumulators are sized for it.
"""

import numpy as np

from nibble.host.golden.numerics import NumericsError, check_codes, fp4_int
from nibble.rtl.formats import ACC_BITS, FP4_RADIX_LOG2, MAX_REDUCTION, GemmMode, product_range

__all__ = ["exact_matmul", "gemm_backward_data", "gemm_backward_weight", "gemm_forward"]

_F32_EXACT = 1 << 24
_F64_EXACT = 1 << 53


def exact_matmul(a, b, mode, as_float=False):
    """``a @ b`` of datapath integers of ``mode``'s operands, exactly, as int64.

    With ``as_float`` the same exact integers come back in the float32/float64 array BLAS
    produced (saves a conversion on hot paths that scale the result anyway).

    The reduction length is ``a.shape[1]``. Every partial sum is bounded by
    ``max|product| * length`` from :func:`rtl.formats.product_range`; the BLAS precision is
    chosen so that bound is exact, and a bound beyond float64 raises.
    """
    k = a.shape[1]
    if k > MAX_REDUCTION:
        raise NumericsError(f"reduction length {k} exceeds the hardware limit "
                            f"{MAX_REDUCTION} (the accumulator width is derived for it)")
    bound = max(map(abs, product_range(mode))) * k
    assert bound < 1 << (ACC_BITS[mode] - 1), "derived accumulator width violated"
    if bound < _F32_EXACT:
        out = np.matmul(a.astype(np.float32), b.astype(np.float32))
    elif bound < _F64_EXACT:
        out = np.matmul(a.astype(np.float64), b.astype(np.float64))
    else:  # unreachable for 4-bit operands within MAX_REDUCTION; guards future modes
        raise NumericsError(f"partial-sum bound {bound} is not exact in float64")
    return out if as_float else out.astype(np.int64)


def _two_d(x, name):
    x = np.asarray(x)
    if x.ndim != 2:
        raise NumericsError(f"{name} must be 2-D, got shape {x.shape}")
    return x


def _act_kind(x_codes):
    return "int4" if x_codes.dtype.kind == "i" else "uint4"


def gemm_forward(x_codes, w_codes, as_float=False):
    """Forward ``Y = X @ W.T``: X (B x K) UINT4 (uint dtype) or INT4 (int dtype) codes,
    W (N x K) INT4 codes. Returns the exact B x N int64 accumulators."""
    x = _two_d(x_codes, "x")
    w = _two_d(w_codes, "w")
    check_codes(x, _act_kind(x), "x")
    check_codes(w, "int4", "w")
    if x.shape[1] != w.shape[1]:
        raise NumericsError(f"forward: x is {x.shape} but w is {w.shape} (K must match)")
    return exact_matmul(x, w.T, GemmMode.FORWARD, as_float)


def gemm_backward_data(dy_codes, phase, w_codes, radix_log2=FP4_RADIX_LOG2, as_float=False):
    """Backward-data ``dX = dY @ W``: dY (B x N) FP4 codes of ``phase``, W (N x K) INT4.
    Returns the exact B x K int64 accumulators in units of the dY datapath integer.
    ``radix_log2`` other than 2 is for emulating other gradient formats only."""
    dy = _two_d(dy_codes, "dy")
    w = _two_d(w_codes, "w")
    check_codes(w, "int4", "w")
    if dy.shape[1] != w.shape[0]:
        raise NumericsError(f"backward-data: dy is {dy.shape} but w is {w.shape} "
                            "(N must match)")
    return exact_matmul(fp4_int(dy, phase, radix_log2), w, GemmMode.BACKWARD_DATA, as_float)


def gemm_backward_weight(dy_codes, phase, x_codes, radix_log2=FP4_RADIX_LOG2,
                         as_float=False):
    """Backward-weight ``dW = dY.T @ X``: dY (B x N) FP4 codes of ``phase``, X (B x K)
    UINT4/INT4 codes. Returns the exact N x K int64 accumulators."""
    dy = _two_d(dy_codes, "dy")
    x = _two_d(x_codes, "x")
    check_codes(x, _act_kind(x), "x")
    if dy.shape[0] != x.shape[0]:
        raise NumericsError(f"backward-weight: dy is {dy.shape} but x is {x.shape} "
                            "(B must match)")
    return exact_matmul(fp4_int(dy, phase, radix_log2).T, x, GemmMode.BACKWARD_WEIGHT,
                        as_float)
