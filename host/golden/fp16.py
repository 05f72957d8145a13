"""Golden model of the FP16 reference PE (:mod:`nibble.rtl.fp16`): IEEE half inputs, the
product exact in FP32, FP32 accumulation rounded to nearest even.

numpy is the reference: a half times a half is exact in float32 (11 x 11 significand bits
fit its 24, and the exponents' range fits), and numpy's float32 addition rounds to nearest,
ties to even. The PE's results are compared bit for bit except NaNs, which compare as NaN.
"""

import numpy as np

__all__ = ["fp16_mac", "fp32_bits", "half_product"]


def half_product(a_bits, b_bits):
    """FP32 bit patterns of the exact products of half-precision bit patterns."""
    a = np.asarray(a_bits, np.uint16).view(np.float16).astype(np.float32)
    b = np.asarray(b_bits, np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return (a * b).view(np.uint32)


def fp16_mac(acc_bits, a_bits, b_bits):
    """FP32 bit patterns of ``acc + a * b`` (acc FP32, a and b half): what one PE step
    makes of its accumulator."""
    acc = np.asarray(acc_bits, np.uint32).view(np.float32)
    p = half_product(a_bits, b_bits).view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return (acc + p).astype(np.float32).view(np.uint32)


def fp32_bits(values):
    return np.asarray(values, np.float32).view(np.uint32)
