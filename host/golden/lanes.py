"""What the device computes: the exact accumulators of a GEMM and what an output lane makes
of them. The emulator (``emu://``), the driver's checks and the RTL tests share these."""

import numpy as np

from nibble.host.golden.numerics import fp4_int, log_quantize_tpr, rescale
from nibble.rtl.formats import (
    INT4_MAX,
    INT4_MIN,
    MASK_CLIPPED,
    UINT4_MAX,
    UINT4_MIN,
    MaskMode,
    Operand,
    OutputPath,
    mask_pass,
)

__all__ = ["golden_acc", "golden_clip_sum", "golden_lane", "operand_ints"]


def operand_ints(codes, kind, phase):
    """Datapath integers of codes (FP4 at ``phase``)."""
    codes = np.asarray(codes)
    if kind is Operand.FP4:
        return fp4_int(codes.astype(np.uint8), phase)
    return codes.astype(np.int64)


def golden_acc(gemm, phase):
    """Exact T = A @ B (int64) with the FP4 operand at ``phase``."""
    a = operand_ints(gemm.a, gemm.a_kind, phase)
    b = operand_ints(gemm.b, gemm.b_kind, phase)
    # exact in float64: |a| <= 2^13, |b| <= 15 and at most MAX_REDUCTION terms keep every
    # partial sum below 2^31
    assert np.abs(a).max(initial=0) * np.abs(b).max(initial=0) * a.shape[1] < 1 << 53
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def golden_lane(acc, lane, mask_codes=None):
    """Expected lane outputs for accumulators ``acc`` under ``lane`` (LANE_CFG values):
    ``(values, absmax)``. RAW: ints; RESCALE: 4-bit nibbles; LOG4: (phase 0, phase 1)
    code pairs (an object array)."""
    acc = np.asarray(acc, dtype=np.int64)
    path = OutputPath(lane["path"])
    if path is OutputPath.RAW:
        return acc, int(np.abs(acc).max()) if acc.size else 0
    if path is OutputPath.RESCALE:
        rs = lane["rescale"]
        lo, hi = (INT4_MIN, INT4_MAX) if rs["out_signed"] else (UINT4_MIN, UINT4_MAX)
        codes, absmax = rescale(acc, rs["m"], rs["s"], lo, hi, relu=bool(rs["relu"]))
        return (codes.astype(np.int64) & 0xF), absmax
    lg = lane["log4"]
    mode = MaskMode(lg["mask"])
    if mask_codes is None:
        mask_codes = np.zeros(acc.shape, np.int64)
    keep = mask_pass(np.asarray(mask_codes, dtype=np.int64), mode)
    masked = np.where(keep, acc, 0) if acc.size else acc
    p0, p1 = log_quantize_tpr(masked, lg["exp"])
    pairs = np.empty(acc.shape, dtype=object)
    for idx in np.ndindex(acc.shape):
        pairs[idx] = (int(p0[idx]), int(p1[idx]))
    return pairs, int(np.abs(masked).max()) if masked.size else 0


def golden_clip_sum(acc, lane, mask_codes=None):
    """The lane's PACT clip statistic: for LOG4 with a mask, the sum of the accumulators
    whose activation code is the top code (clipped at alpha); otherwise 0."""
    if (OutputPath(lane["path"]) is not OutputPath.LOG4 or mask_codes is None
            or MaskMode(lane["log4"]["mask"]) is MaskMode.NONE):
        return 0
    acc = np.asarray(acc, dtype=np.int64)
    return int(acc[np.asarray(mask_codes) == MASK_CLIPPED].sum())
