"""Bit-exact golden model of nibble's number formats and quantizers.

Everything here is vectorized numpy and follows ``docs/numerics.md`` to the bit; the RTL is
checked against these functions. Constants come from :mod:`rtl.formats` (the single
definition). Bad input raises :class:`NumericsError` (a ``ValueError``), never a wrong answer.

Conventions
-----------
* Integer codes are numpy integer arrays: INT4 codes in ``int8``, UINT4 and FP4 codes in
  ``uint8`` (FP4 code = ``sign << 3 | exp``).
* One rounding rule everywhere: round half up, ``floor(x + 1/2)``.
"""

import functools
from dataclasses import dataclass

import numpy as np

from nibble.rtl.formats import (
    FP4_EXP_BITS,
    FP4_EXP_MAX,
    FP4_EXP_ZERO,
    FP4_RADIX_LOG2,
    FP4_SIGN_SHIFT,
    INT4_MAX,
    INT4_MIN,
    MASTER_FRAC,
    MASTER_MAX,
    MASTER_MIN,
    MOMENTUM_BITS,
    RESCALE_M_BITS,
    RESCALE_SHIFT_MAX,
    SAWB_C1,
    SAWB_C2,
    SAWB_SHIFT,
    UINT4_MAX,
    UINT4_MIN,
    WEIGHT_MAX,
    WEIGHT_MIN,
    fp4_mag_log2,
)

__all__ = [
    "FP4Tensor",
    "GradScale",
    "NumericsError",
    "QTensor",
    "check_codes",
    "check_finite",
    "fp4_decode",
    "fp4_int",
    "gradscale_exponent",
    "log_quantize",
    "log_quantize_tpr",
    "log_thresholds",
    "master_from_float",
    "master_update",
    "pact_quantize",
    "quantize_int",
    "requantize",
    "rescale",
    "rescale_params",
    "round_half_up",
    "sawb_alpha",
    "sawb_quantize",
    "sawb_step_from_sums",
    "sawb_sums",
]

_EXP_MASK = (1 << FP4_EXP_BITS) - 1
_CODE_RANGES = {
    "int4": (INT4_MIN, INT4_MAX),
    "weight": (WEIGHT_MIN, WEIGHT_MAX),
    "uint4": (UINT4_MIN, UINT4_MAX),
    "fp4": (0, (1 << (FP4_EXP_BITS + 1)) - 1),
}


class NumericsError(ValueError):
    """Input that the numerics contract does not accept (dtype, shape, range, NaN/Inf)."""


# --- validation -------------------------------------------------------------------------------
def check_finite(x, name="input"):
    """Return ``x`` as a float64 array, raising if it is not real-valued and finite."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise NumericsError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise NumericsError(f"{name}: contains NaN or Inf")
    return x


def check_codes(codes, kind, name="codes"):
    """Check that ``codes`` is an integer array whose values are valid ``kind`` codes.

    ``kind`` is one of ``"int4"``, ``"weight"``, ``"uint4"``, ``"fp4"``.
    """
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise NumericsError(f"{name}: {kind} codes must be an integer array, got dtype "
                            f"{codes.dtype}")
    lo, hi = _CODE_RANGES[kind]
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise NumericsError(f"{name}: {kind} codes must lie in {lo}..{hi}, got "
                            f"{codes.min()}..{codes.max()}")
    return codes


def _check_int(value, name, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise NumericsError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise NumericsError(f"{name} = {value} outside {lo}..{hi}")
    return int(value)


def _check_phase(phase):
    return _check_int(phase, "phase", 0, 1)


# --- rounding ---------------------------------------------------------------------------------
def round_half_up(x):
    """The one rounding rule of nibble: nearest integer, ties toward +inf (``floor(x+1/2)``)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


# --- integer formats --------------------------------------------------------------------------
@dataclass
class QTensor:
    """A tensor of 4-bit integer codes with a real step: ``value = codes * step``."""

    codes: np.ndarray
    step: float

    def dequantize(self):
        return self.codes.astype(np.float64) * self.step


def quantize_int(x, step, lo, hi):
    """Codes ``clamp(round_half_up(x / step), lo, hi)`` as int8 (``lo < 0``) or uint8.

    ``x / step`` is evaluated in float64.
    """
    x = check_finite(x, "x")
    if not (np.isfinite(step) and step > 0):
        raise NumericsError(f"step must be finite and > 0, got {step!r}")
    return _quantize_unchecked(x, step, lo, hi)


def _quantize_unchecked(x, step, lo, hi):
    q = np.divide(x, step, dtype=np.float64)
    q += 0.5
    np.floor(q, out=q)
    np.clip(q, lo, hi, out=q)
    return q.astype(np.int8 if lo < 0 else np.uint8)


def sawb_alpha(w):
    """SAWB clip ``alpha = c1*sqrt(E[w^2]) + c2*E[|w|]`` (IBM's 4-bit coefficients).

    The moments are accumulated in float64. When alpha is not positive (degenerate weight
    distributions, e.g. all weights of equal magnitude) it falls back to ``max|w|``; an
    all-zero tensor, NaN or Inf raises.
    """
    w = np.asarray(w)
    if w.dtype.kind != "f" or w.size == 0:
        raise NumericsError(f"w: expected a non-empty float array, got dtype {w.dtype}")
    flat = w.reshape(-1).astype(np.float64)
    mean_sq = np.dot(flat, flat) / flat.size
    mean_abs = np.abs(flat).sum() / flat.size
    if not (np.isfinite(mean_sq) and np.isfinite(mean_abs)):
        raise NumericsError("w: contains NaN or Inf")
    alpha = SAWB_C1 * np.sqrt(mean_sq) + SAWB_C2 * mean_abs
    if not alpha > 0:
        alpha = np.abs(flat).max()
    if not alpha > 0:
        raise NumericsError("SAWB: the weight tensor is all zero")
    return float(alpha)


def sawb_quantize(w):
    """INT4 weight codes on the symmetric grid -7..7 with step ``sawb_alpha(w) / 7``."""
    step = sawb_alpha(w) / WEIGHT_MAX
    return QTensor(_quantize_unchecked(np.asarray(w), step, WEIGHT_MIN, WEIGHT_MAX), step)


def pact_quantize(x, alpha):
    """PACT activation: UINT4 codes of ``clip(x, 0, alpha)`` with step ``alpha / 15``."""
    if not (np.isfinite(alpha) and alpha > 0):
        raise NumericsError(f"PACT clip alpha must be finite and > 0, got {alpha!r}")
    step = float(alpha) / UINT4_MAX
    return QTensor(quantize_int(x, step, UINT4_MIN, UINT4_MAX), step)


# --- range-rescale unit -----------------------------------------------------------------------
def rescale_params(ratio):
    """Fixed-point ``(M, s)`` with ``M / 2**s`` closest to ``ratio`` and M normalised.

    M is unsigned with ``RESCALE_M_BITS`` bits and normalised to ``[2^15, 2^16)`` whenever the
    shift range allows; ``s`` is in ``0..RESCALE_SHIFT_MAX``. Ratios too large for s = 0, or
    too small to normalise, raise.
    """
    ratio = float(ratio)
    if not (np.isfinite(ratio) and ratio > 0):
        raise NumericsError(f"rescale ratio must be finite and > 0, got {ratio!r}")
    _, e = np.frexp(ratio)                  # ratio = f * 2^e, f in [0.5, 1)
    s = RESCALE_M_BITS - int(e)             # M = ratio * 2^s in [2^15, 2^16)
    if s < 0 or s > RESCALE_SHIFT_MAX:
        raise NumericsError(f"rescale ratio {ratio!r} is outside the range of "
                            f"{RESCALE_M_BITS}-bit M and shift 0..{RESCALE_SHIFT_MAX}")
    m = int(round_half_up(np.ldexp(ratio, s)))
    if m >> RESCALE_M_BITS:                 # rounding carried to 2^16: renormalise
        m, s = m >> 1, s - 1
        if s < 0:
            raise NumericsError(f"rescale ratio {ratio!r} too large")
    return m, s


def rescale(acc, m, s, lo, hi, relu=False):
    """The range-rescale unit: ``q = clamp(((acc * m) + 2^(s-1)) >> s, lo, hi)``.

    ``>>`` is an arithmetic (flooring) shift, so the rounding is round half up; for
    ``s = 0`` no rounding term is added. With ``relu`` negative accumulators become 0 first.
    Returns ``(codes, absmax)`` where ``absmax = max|acc|`` after the optional ReLU (the
    statistic the unit reports when the stream ends; 0 for an empty tensor).
    """
    acc = np.asarray(acc)
    if acc.dtype.kind not in "iu":
        raise NumericsError(f"acc must be an integer array, got dtype {acc.dtype}")
    m = _check_int(m, "M", 0, (1 << RESCALE_M_BITS) - 1)
    s = _check_int(s, "s", 0, RESCALE_SHIFT_MAX)
    if not (INT4_MIN <= lo <= hi <= UINT4_MAX):
        raise NumericsError(f"clamp range [{lo}, {hi}] is not a 4-bit range")
    acc = acc.astype(np.int64)
    if acc.size and np.abs(acc).max() >= 1 << 46:
        raise NumericsError("acc too wide for the rescale unit (|acc| must be < 2^46)")
    if relu:
        acc = np.maximum(acc, 0)
    absmax = int(np.abs(acc).max()) if acc.size else 0
    # |acc * m| < 2^62 keeps the product exact in int64.
    prod = acc * m
    if s:
        prod = (prod + (1 << (s - 1))) >> s
    codes = np.clip(prod, lo, hi).astype(np.int8 if lo < 0 else np.uint8)
    return codes, absmax


# --- FP4 radix-4 gradients --------------------------------------------------------------------
@dataclass
class FP4Tensor:
    """FP4 codes with their grid: ``value = ±R^(eee-7) * 2^phase * 2^exp * base``.

    ``exp`` is the tensor's power-of-two (GradScale) exponent; ``base`` a real factor that the
    host carries (the unit of the integer accumulator the codes were quantized from).
    """

    codes: np.ndarray
    phase: int
    exp: int
    base: float = 1.0
    radix_log2: int = FP4_RADIX_LOG2

    def dequantize(self):
        return fp4_decode(self.codes, self.phase, self.radix_log2) * np.ldexp(self.base,
                                                                                self.exp)

    @property
    def int_unit(self):
        """Real value of datapath integer 1 (see :func:`fp4_int`)."""
        return np.ldexp(self.base, self.exp - self.radix_log2 * (FP4_EXP_MAX - 1))


@functools.cache
def _fp4_table(phase, radix_log2):
    """Datapath integer of each of the 16 FP4 codes."""
    table = np.zeros(1 << (FP4_EXP_BITS + 1), dtype=np.int64)
    for code in range(table.size):
        e, sign = code & _EXP_MASK, code >> FP4_SIGN_SHIFT
        if e != FP4_EXP_ZERO:
            table[code] = (-1) ** sign * (1 << fp4_mag_log2(e, phase, radix_log2))
    table.flags.writeable = False
    return table


def fp4_int(codes, phase, radix_log2=FP4_RADIX_LOG2):
    """Datapath integers of FP4 codes: ``±2^(radix_log2*(eee-1) + phase)``, 0 for eee = 0."""
    phase = _check_phase(phase)
    return _fp4_table(phase, radix_log2)[check_codes(codes, "fp4")]


def fp4_decode(codes, phase, radix_log2=FP4_RADIX_LOG2):
    """Relative values of FP4 codes: ``±R^(eee-7) * 2^phase`` (0 for eee = 0), float64."""
    top = radix_log2 * (FP4_EXP_MAX - 1)
    return np.ldexp(fp4_int(codes, phase, radix_log2).astype(np.float64), -top)


def log_thresholds(exp, phase, radix_log2=FP4_RADIX_LOG2):
    """The 7 decision thresholds of :func:`log_quantize`, ascending (float64, exact).

    ``thresholds[0]`` is half the smallest magnitude; ``thresholds[j]`` (j = 1..6) is the
    midpoint ``(1+R)/2 * g_(j-1)`` between grid magnitudes ``g_(j-1)`` and ``g_j = R*g_(j-1)``.
    The exponent field of a magnitude ``a`` is the number of thresholds strictly below ``a``.
    """
    r = radix_log2
    g0 = exp + phase - r * (FP4_EXP_MAX - 1)            # log2 of the smallest magnitude
    mids = [np.ldexp((1.0 + (1 << r)) / 2.0, g0 + r * j) for j in range(FP4_EXP_MAX - 1)]
    return np.array([np.ldexp(0.5, g0), *mids])


def _fp4_code(e, negative):
    """Pack exponent fields and signs into FP4 codes; a zero result keeps sign 0."""
    return e | ((negative & (e != FP4_EXP_ZERO)).astype(np.uint8) << FP4_SIGN_SHIFT)


def log_quantize(x, exp, phase, radix_log2=FP4_RADIX_LOG2):
    """Round ``x`` to FP4 codes on the grid ``{0} ∪ {±R^j * 2^(phase+exp-6r)}, j = 0..6``.

    Round to nearest in the linear domain: between two grid magnitudes ``g`` and ``R*g`` the
    threshold is the midpoint ``(1+R)/2 * g`` (2.5 g for radix 4); at or below half the
    smallest magnitude the result is zero; above the largest it saturates; exact ties go
    to the smaller magnitude. The sign bit of a zero result is 0. ``x`` may be integer
    (a device accumulator) or real; the comparisons are exact in float64 (an integer ``x``
    must stay below 2^53 in magnitude).
    """
    phase = _check_phase(phase)
    exp = _check_int(exp, "exp", -900, 900)
    x = check_finite(x, "x")
    e = np.searchsorted(log_thresholds(exp, phase, radix_log2), np.abs(x), side="left")
    return _fp4_code(e.astype(np.uint8), x < 0)


def log_quantize_tpr(x, exp, radix_log2=FP4_RADIX_LOG2):
    """``(log_quantize(x, exp, 0), log_quantize(x, exp, 1))`` in one pass.

    The phase-1 thresholds are the phase-0 thresholds times 2 and interleave with them, so
    one search over the 14 merged thresholds gives both exponent fields: with ``i``
    thresholds below ``|x|``, phase 0 has ``(i+1)//2`` and phase 1 has ``i//2``.
    """
    exp = _check_int(exp, "exp", -900, 900)
    x = check_finite(x, "x")
    t0 = log_thresholds(exp, 0, radix_log2)
    merged = np.empty(2 * t0.size)
    merged[0::2], merged[1::2] = t0, 2.0 * t0
    i = np.searchsorted(merged, np.abs(x), side="left").astype(np.uint8)
    neg = x < 0
    return _fp4_code((i + 1) >> 1, neg), _fp4_code(i >> 1, neg)


def gradscale_exponent(absmax):
    """GradScale: ``exp = ceil(log2(absmax))``: the phase-0 top code ``2^exp`` is the
    smallest power of two not below ``absmax``, so the largest value lands in the top
    binade without saturating (``2^(exp-1) < absmax <= 2^exp``). Returns None for
    ``absmax == 0`` (nothing to scale)."""
    absmax = float(absmax)
    if not (np.isfinite(absmax) and absmax >= 0):
        raise NumericsError(f"absmax must be finite and >= 0, got {absmax!r}")
    if absmax == 0:
        return None
    frac, e = np.frexp(absmax)               # absmax = frac * 2^e, frac in [0.5, 1)
    return int(e) - 1 if frac == 0.5 else int(e)


class GradScale:
    """Per-layer GradScale state.

    ``streaming=True`` (what the device does) picks the exponent from the previous step's
    absmax, so the quantizer never waits for a whole tensor; the first step measures first.
    The absmax is kept in real units so a change of the accumulator unit between steps does
    not mislead it. ``streaming=False`` uses the current tensor's absmax.
    """

    def __init__(self, streaming=True):
        self.streaming = streaming
        self.prev_absmax = None      # real units
        self.exp = 0

    def planned(self, unit=1.0):
        """The exponent a streaming update will use for a tensor in units of ``unit``,
        known before the tensor is (from the previous absmax); None when the tensor must
        be measured first (the first step, or ``streaming=False``)."""
        if self.streaming and self.prev_absmax:
            return gradscale_exponent(self.prev_absmax / unit)
        return None

    def update(self, absmax, unit=1.0):
        """Exponent for the tensor whose absmax (in units of ``unit``) is ``absmax``."""
        real = float(absmax) * unit
        exp = self.planned(unit)
        if exp is None and real:
            exp = gradscale_exponent(real / unit)
        if exp is not None:
            self.exp = exp
        if real:
            self.prev_absmax = real
        return self.exp


# --- On-device training: fixed-point master weights (rtl.vector) -----------------------------
def _round_shift(p, s):
    """``(p + 2^(s-1)) >> s`` (``p`` for s = 0), flooring; exact on Python ints in object
    arrays or int64 arrays whose sums stay below 2^63."""
    return (p + (1 << (s - 1))) >> s if s else p


def master_update(g, w, v, mu, m, s):
    """The UPDATE operation on int64 arrays: gradient accumulators ``g``, master weights
    ``w`` and momenta ``v`` (MASTER_BITS integers in units of 2^-MASTER_FRAC). Returns
    ``(w', v')``::

        v' = sat((v * mu + 2^15) >> 16 + round(g * m >> s));  w' = sat(w - v')
    """
    g, w, v = (np.asarray(x, dtype=np.int64) for x in (g, w, v))
    m = _check_int(m, "M", 0, (1 << RESCALE_M_BITS) - 1)
    s = _check_int(s, "s", 0, RESCALE_SHIFT_MAX)
    mu = _check_int(mu, "mu", 0, (1 << MOMENTUM_BITS) - 1)
    # |v * mu| < 2^47 and |g * m| < 2^47: exact in int64, as are the rounding sums
    a = (v * mu + (1 << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS
    b = _round_shift(g * m, s)
    v_new = np.clip(a + b, MASTER_MIN, MASTER_MAX)
    w_new = np.clip(w - v_new, MASTER_MIN, MASTER_MAX)
    return w_new, v_new


def requantize(w, m, s):
    """The REQUANT operation: INT4 weight codes (-7..7, int8) of master weights ``w``:
    ``clamp(round(w * m >> s), -7, 7)``, the range-rescale rule."""
    return rescale(np.asarray(w, dtype=np.int64), m, s, WEIGHT_MIN, WEIGHT_MAX)[0]


def sawb_sums(w):
    """The UPDATE unit's SAWB statistics of master weights: ``(sum |t|, sum t^2)`` over
    ``t = w >> SAWB_SHIFT``."""
    t = np.asarray(w, dtype=np.int64) >> SAWB_SHIFT
    return int(np.abs(t).sum()), int((t * t).sum())


def sawb_step_from_sums(sum_abs, sum_sq, count):
    """SAWB weight step, in master units, from the device's statistics over ``count``
    weights: ``alpha / 7`` with ``alpha = c1 sqrt(E[w^2]) + c2 E[|w|]`` measured on
    ``w >> SAWB_SHIFT`` and scaled back. Raises when alpha is not positive (a degenerate
    tensor: host SAWB falls back to max|w|, which the device does not measure)."""
    scale = float(1 << SAWB_SHIFT)
    alpha = (SAWB_C1 * np.sqrt(sum_sq / count) + SAWB_C2 * (sum_abs / count)) * scale
    if not alpha > 0:
        raise NumericsError("SAWB: weight statistics give a non-positive clip "
                            f"(sum|t| = {sum_abs}, sum t^2 = {sum_sq}, n = {count})")
    return float(alpha) / WEIGHT_MAX


def master_from_float(w):
    """Master-weight integers (units of 2^-MASTER_FRAC) of real weights, round half up."""
    q = round_half_up(np.ldexp(np.asarray(w, dtype=np.float64), MASTER_FRAC))
    return np.clip(q, MASTER_MIN, MASTER_MAX).astype(np.int64)
