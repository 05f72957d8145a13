"""Golden expectations and test vectors shared by the Amaranth tests and the cocotb benches.

Everything here is computed from the golden model (``nibble.host.golden``) and the format
definitions (``nibble.rtl.formats``); nothing is derived from the RTL.
"""



from nibble.host.golden.tiling import Gemm
from nibble.rtl.formats import (
    INT4_MAX,
    INT4_MIN,
    LANE_BITS,
    RESCALE_IN_BITS,
    UINT4_MAX,
    UINT4_MIN,
    GemmMode,
    Operand,
    OutputPath,
)

__all__ = ["MODE_KINDS", "lane_value", "log4_vectors", "random_gemm", "rescale_vectors"]

#: Operand kinds each GEMM mode is tested with (A, B).
MODE_KINDS = {
    GemmMode.FORWARD: [(Operand.UINT4, Operand.INT4), (Operand.INT4, Operand.INT4)],
    GemmMode.BACKWARD_DATA: [(Operand.FP4, Operand.INT4)],
    GemmMode.BACKWARD_WEIGHT: [(Operand.FP4, Operand.UINT4), (Operand.FP4, Operand.INT4)],
}


def lane_value(payload, path):
    """Decode a LANE_OUT payload (an Amaranth ``data.Const``) for ``path``."""
    path = OutputPath(path)
    if path is OutputPath.RAW:
        return int(payload.raw)
    if path is OutputPath.RESCALE:
        return int(payload.code)
    return (int(payload.fp4[0].as_value().value), int(payload.fp4[1].as_value().value))


def random_gemm(rng, kinds, m, red, n):
    """Random codes for A (m x red) and B (red x n) of operand kinds ``kinds``."""
    a_kind, b_kind = kinds

    def codes(kind, shape):
        if kind is Operand.FP4:
            return rng.integers(0, 16, shape)
        if kind is Operand.INT4:
            return rng.integers(INT4_MIN, INT4_MAX + 1, shape)
        return rng.integers(UINT4_MIN, UINT4_MAX + 1, shape)

    return Gemm(codes(a_kind, (m, red)), codes(b_kind, (red, n)), a_kind, b_kind)


def rescale_vectors(rng, n):
    """Corner cases (zero, +-1, the input range ends, the 4-bit edges) plus ``n`` random
    accumulators spread over every magnitude."""
    lim = 1 << (RESCALE_IN_BITS - 1)
    corners = [0, 1, -1, lim - 1, -lim, 7, -8, 15, 16, -9]
    mags = rng.integers(0, lim, n) >> rng.integers(0, RESCALE_IN_BITS - 1, n)
    return corners + [int(v) for v in mags * rng.choice([-1, 1], n)]


def log4_vectors(rng, exp, n):
    """Accumulators around the quantizer's range: every threshold and power of two +-1,
    the extremes, and ``n`` random values spread over the magnitudes near ``exp``."""
    top = 1 << (LANE_BITS - 1)
    vals = [0, 1, -1, top - 1, -(top - 1), -top]
    for k in range(0, LANE_BITS):
        for base in (1 << k, 5 << k):
            vals += [base - 1, base, base + 1, -base]
    span = max(1, min(LANE_BITS - 2, exp + 2))
    mags = rng.integers(0, 1 << span, n) >> rng.integers(0, span, n)
    vals += [int(v) for v in mags * rng.choice([-1, 1], n)]
    return [max(-top, min(top - 1, v)) for v in vals]
