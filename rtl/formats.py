"""nibble's number formats: the single definition shared by the gateware and the host.

Every format constant of the numerics contract lives here, once. The golden model
(``nibble.host.golden``), the gateware and the host driver all read these names; nothing else
in the repository may spell a format constant as a literal. ``docs/numerics.md`` specifies
each format bit by bit.

The module is pure Python plus Amaranth ``lib.data`` layouts, so both sides can import it.
"""

import enum
import functools
from dataclasses import dataclass

from amaranth.hdl import signed, unsigned
from amaranth.lib import data
from amaranth.lib import enum as hdl_enum

__all__ = [
    "ACC_BITS",
    "CLIP_SUM_BITS",
    "FP4",
    "FP4_EXP_BITS",
    "FP4_EXP_MAX",
    "FP4_EXP_ZERO",
    "FP4_MAG_LOG2_MAX",
    "FP4_PHASES",
    "FP4_RADIX_LOG2",
    "FP4_SIGN_SHIFT",
    "FP4_TOP_LOG2",
    "INT4",
    "INT4_MAX",
    "INT4_MIN",
    "MASK_CLIPPED",
    "MASTER_BITS",
    "MASTER_FRAC",
    "MAX_REDUCTION",
    "MOMENTUM_BITS",
    "RAW_BITS",
    "RAW_NIBBLES",
    "RESCALE_M_BITS",
    "RESCALE_SHIFT_MAX",
    "SAWB_C1",
    "SAWB_C2",
    "SAWB_SHIFT",
    "UINT4",
    "UINT4_MAX",
    "UINT4_MIN",
    "VEC_OPS_ALL",
    "WEIGHT_MAX",
    "WEIGHT_MIN",
    "GemmMode",
    "MaskMode",
    "Operand",
    "OutputPath",
    "VecOp",
    "acc_bits",
    "clip_sum_bits",
    "element_nibbles",
    "fp4_mag_log2",
    "product_range",
    "signed_bits",
    "word_nibbles",
]

# --- Integer formats ------------------------------------------------------------------------
CODE_BITS = 4
INT4_MIN, INT4_MAX = -8, 7        # two's complement storage range
WEIGHT_MIN, WEIGHT_MAX = -7, 7    # symmetric weight grid (SAWB): -8 is never produced
UINT4_MIN, UINT4_MAX = 0, 15      # activations after ReLU / PACT clip

INT4 = signed(CODE_BITS)
UINT4 = unsigned(CODE_BITS)

# --- FP4 radix-4 gradients: code = s | eee ----------------------------------------------------
FP4_EXP_BITS = 3
FP4_EXP_ZERO = 0                  # eee == 0 encodes zero (either sign)
FP4_EXP_MAX = (1 << FP4_EXP_BITS) - 1   # 7: the top binade
FP4_SIGN_SHIFT = FP4_EXP_BITS     # the sign is the code's most significant bit
FP4_RADIX_LOG2 = 2                # radix 4: neighbouring codes differ by 4x
FP4_PHASES = (0, 1)               # TPR: phase 0 grid {4^k}, phase 1 grid {2*4^k}

#: ``FP4`` as an Amaranth layout. Fields are listed LSB first: ``exp`` is bits 0..2,
#: ``sign`` is bit 3, so the packed value equals the host's code ``sign << 3 | exp``.
FP4 = data.StructLayout({"exp": unsigned(FP4_EXP_BITS), "sign": unsigned(1)})


def fp4_mag_log2(exp, phase, radix_log2=FP4_RADIX_LOG2):
    """log2 of the integer magnitude of a nonzero FP4 code in the GEMM datapath.

    In the datapath a code with exponent field ``exp`` (1..7) stands for the integer
    ``2 ** (radix_log2 * (exp - 1) + phase)``: multiplying an integer operand by it is a
    left shift by this amount.
    """
    return radix_log2 * (exp - 1) + phase


#: Largest datapath shift: exponent 7 in phase 1 (2^13 = 8192).
FP4_MAG_LOG2_MAX = fp4_mag_log2(FP4_EXP_MAX, max(FP4_PHASES))
#: The datapath integer of the top code of phase 0 is 2^FP4_TOP_LOG2; the real value of a
#: code is ``datapath_integer * 2 ** (tensor_exp - FP4_TOP_LOG2) * tensor_base``, i.e.
#: ``±4^(eee-7) * 2^phase * 2^tensor_exp * tensor_base``.
FP4_TOP_LOG2 = fp4_mag_log2(FP4_EXP_MAX, 0)

# --- GEMM operands, modes and accumulator widths --------------------------------------------
#: The longest reduction (K for forward, N for backward-data, B for backward-weight) the
#: hardware accepts. Every accumulator width below is derived from it.
MAX_REDUCTION = 4096


class Operand(enum.Enum):
    """The kinds of 4-bit operand a PE accepts, with their range in the integer datapath."""

    INT4 = "int4"
    UINT4 = "uint4"
    FP4 = "fp4"       # either phase: magnitudes 1 .. 2^FP4_MAG_LOG2_MAX

    @property
    def range(self):
        """(min, max) of the datapath integer this operand kind can carry."""
        if self is Operand.INT4:
            return INT4_MIN, INT4_MAX
        if self is Operand.UINT4:
            return UINT4_MIN, UINT4_MAX
        top = 1 << FP4_MAG_LOG2_MAX
        return -top, top


@dataclass(frozen=True)
class _ModeInfo:
    a: tuple   # operand kinds accepted for A (the streamed operand)
    b: tuple   # operand kinds accepted for B


class GemmMode(enum.Enum):
    """The three GEMMs of a training step of ``y = x @ w.T`` (x: B x K, w: N x K).

    ========================  ===================  ===========  =================
    mode                      result               A            B
    ========================  ===================  ===========  =================
    FORWARD                   ``X @ W.T``  (BxN)   X int/uint4  W int4
    BACKWARD_DATA             ``dY @ W``   (BxK)   dY fp4       W int4
    BACKWARD_WEIGHT           ``dY.T @ X`` (NxK)   dY fp4       X int/uint4
    ========================  ===================  ===========  =================
    """

    FORWARD = 0
    BACKWARD_DATA = 1
    BACKWARD_WEIGHT = 2

    @property
    def operands(self):
        return {
            GemmMode.FORWARD: _ModeInfo((Operand.UINT4, Operand.INT4), (Operand.INT4,)),
            GemmMode.BACKWARD_DATA: _ModeInfo((Operand.FP4,), (Operand.INT4,)),
            GemmMode.BACKWARD_WEIGHT: _ModeInfo((Operand.FP4,), (Operand.UINT4, Operand.INT4)),
        }[self]


def signed_bits(lo, hi):
    """Smallest two's complement width that holds every integer in ``[lo, hi]``."""
    if lo > hi:
        raise ValueError(f"empty range [{lo}, {hi}]")
    width = 1
    while not (-(1 << (width - 1)) <= lo and hi <= (1 << (width - 1)) - 1):
        width += 1
    return width


@functools.cache
def product_range(mode):
    """(min, max) of one product ``a * b`` over every operand pair ``mode`` accepts."""
    info = mode.operands
    corners = [
        x * y
        for a in info.a for b in info.b
        for x in a.range for y in b.range
    ]
    return min(corners), max(corners)


@functools.cache
def acc_bits(mode, length=MAX_REDUCTION):
    """Exact accumulator width for a reduction of ``length`` products in ``mode``.

    The sum of ``length`` products lies in ``[length * pmin, length * pmax]``; this is the
    smallest signed width that holds that interval, so no input the hardware accepts can
    overflow it (``tests/test_gemm.py`` proves it with worst-case operands).
    """
    if not 1 <= length <= MAX_REDUCTION:
        raise ValueError(f"reduction length {length} outside 1..{MAX_REDUCTION}")
    pmin, pmax = product_range(mode)
    return signed_bits(length * pmin, length * pmax)


#: Accumulator width per GEMM mode at MAX_REDUCTION (forward 20, backward modes 30 bits).
ACC_BITS = {mode: acc_bits(mode) for mode in GemmMode}

# --- Range-rescale unit: q = clamp(round((acc * M) >> s), lo, hi) ---------------------------
RESCALE_M_BITS = 16               # unsigned fixed-point multiplier M, normalised to [2^15, 2^16)
RESCALE_SHIFT_MAX = 63            # shift s in 0..63 (a 6-bit field)

# --- SAWB weight scale: alpha = c1 * sqrt(E[w^2]) + c2 * E[|w|] (IBM's 4-bit coefficients) --
SAWB_C1, SAWB_C2 = 12.68, -12.80

# --- The hardware datapath: widths derived from the formats above ---------------------------
#: In a PE an FP4 code multiplies as a left shift by ``radix_log2 * (exp - 1)``; the TPR
#: phase is a constant of the GEMM, so the output lane applies it once (``<< phase``).
PE_FP4_SHIFT_MAX = fp4_mag_log2(FP4_EXP_MAX, 0)


@functools.cache
def pe_product_range():
    """(min, max) of one PE product over every mode, with the phase factored out."""
    top = 1 << PE_FP4_SHIFT_MAX
    ranges = {Operand.INT4: (INT4_MIN, INT4_MAX), Operand.UINT4: (UINT4_MIN, UINT4_MAX),
              Operand.FP4: (-top, top)}
    corners = [
        x * y
        for mode in GemmMode
        for a in mode.operands.a for b in mode.operands.b
        for x in ranges[a] for y in ranges[b]
    ]
    return min(corners), max(corners)


#: A PE product (phase factored out): 17 bits signed.
PE_PRODUCT_BITS = signed_bits(*pe_product_range())
#: A PE accumulator: exact for MAX_REDUCTION products of any mode (29 bits signed).
PE_ACC_BITS = signed_bits(MAX_REDUCTION * pe_product_range()[0],
                          MAX_REDUCTION * pe_product_range()[1])
#: An output-lane value, ``pe_acc << phase``: exactly the widest GEMM accumulator (30 bits).
LANE_BITS = PE_ACC_BITS + max(FP4_PHASES)
assert LANE_BITS == max(ACC_BITS.values())


def clip_sum_bits(elements):
    """Bits of an exact sum of up to ``elements`` lane values (LANE_BITS each)."""
    top = 1 << (LANE_BITS - 1)
    return signed_bits(-elements * top, elements * (top - 1))


#: The PACT clip statistic of a GEMM (the sum of the lane values whose activation code is the
#: top code) as STATS reports it: at most 2^(2 * 16) elements (M, N < 2^16) of LANE_BITS
#: each. A device sums in fewer bits: its output buffer holds the elements
#: (:func:`clip_sum_bits` of them, ``rtl.engine``).
CLIP_SUM_BITS = clip_sum_bits(1 << (2 * 16))
assert CLIP_SUM_BITS == LANE_BITS + 2 * 16
#: The rescale unit serves forward GEMMs, whose accumulators fit ACC_BITS[FORWARD] bits.
RESCALE_IN_BITS = ACC_BITS[GemmMode.FORWARD]
#: Effective shift cap: for s >= RESCALE_SHIFT_CAP every result is 0, exactly as for larger s
#: (|acc * M| < 2^(RESCALE_SHIFT_CAP - 1), so acc * M + 2^(s-1) lies in (0, 2^s)).
RESCALE_SHIFT_CAP = RESCALE_IN_BITS + RESCALE_M_BITS
#: The log4 quantizer's GradScale exponent field (two's complement). Exponents below
#: LOG4_EXP_MIN saturate every nonzero input and above LOG4_EXP_MAX zero every input, just
#: like any exponent beyond them, so the host clamps into this range without changing a code.
LOG4_EXP_BITS = 8
LOG4_EXP_MIN = -(FP4_RADIX_LOG2 + 1)
LOG4_EXP_MAX = LANE_BITS + FP4_TOP_LOG2 + 1


# --- Enumerations the hardware stores (shapes for lib.data layouts) ------------------------
class VecOp(hdl_enum.IntEnum, shape=2):
    """The element-wise unit's operations (``rtl.vector``); the value 3 is no operation."""

    TRANSPOSE = 0   # B[c][r] = A[r][c], 1- or 2-nibble elements
    UPDATE = 1      # momentum SGD on master weights W, V with gradient accumulators G
    REQUANT = 2     # INT4 weight codes of master weights: rescale to -7..7


#: The element-wise unit's operations as a bit mask (bit ``op``), as INFO's ``vec_ops``
#: reports them: a unit built with fewer leaves the rest to the host (``Device.vector``).
VEC_OPS_ALL = (1 << len(VecOp)) - 1


class OutputPath(hdl_enum.IntEnum, shape=2):
    """What an output lane does with a GEMM result; the value 3 is no path."""

    RAW = 0       # the exact wide accumulator (LANE_BITS), e.g. for host reads
    RESCALE = 1   # range-rescale to INT4 / UINT4 codes (forward)
    LOG4 = 2      # mask and log4-quantize to an FP4 pair (backward-data)


class MaskMode(hdl_enum.IntEnum, shape=2):
    """The activation derivative the log4 lane applies, from the stored UINT4 code q; the
    value 3 is no mode."""

    NONE = 0      # pass everything
    RELU = 1      # pass where q > 0
    PACT = 2      # pass where 0 < q < 15 (q == 15 was clipped at alpha)


#: The activation code PACT clipped at alpha: where the gradient goes to alpha instead.
MASK_CLIPPED = UINT4_MAX


def mask_pass(code, mode):
    """Golden mask: does the gradient pass for activation code ``code`` under ``mode``.
    ``code`` may be an int or a numpy array of them (elementwise)."""
    mode = MaskMode(mode)
    if mode is MaskMode.NONE:
        return code >= UINT4_MIN          # every code: the same shape as ``code``
    if mode is MaskMode.RELU:
        return code > UINT4_MIN
    return (code > UINT4_MIN) & (code < UINT4_MAX)


# --- Tensor memory: words of 4-bit nibbles, elements of 1, 2 or 8 nibbles -------------------
#: A RAW element (the LANE_BITS accumulator, sign-extended), a master weight and a momentum
#: are RAW_BITS two's complement integers: RAW_NIBBLES nibbles of tensor memory.
RAW_BITS = 32
RAW_NIBBLES = RAW_BITS // CODE_BITS
assert LANE_BITS <= RAW_BITS


def word_nibbles(rows, cols):
    """Codes per tensor-memory word on an R x C array: a B group (C codes), a paired A group
    (2R nibbles) and a RAW element each sit in one aligned word."""
    return max(cols, 2 * rows, RAW_NIBBLES)


def element_nibbles(path):
    """Nibbles of one stored output element of an :class:`OutputPath`: RESCALE one code,
    LOG4 an FP4 pair (phase 0 low, phase 1 high), RAW a RAW_BITS integer."""
    return {OutputPath.RAW: RAW_NIBBLES, OutputPath.RESCALE: 1,
            OutputPath.LOG4: 2}[OutputPath(path)]


# --- On-device training: fixed-point master weights (rtl.vector) ------------------------------
#: A master weight (and its momentum) is a signed MASTER_BITS integer in units of
#: 2^-MASTER_FRAC; one 8-nibble element of tensor memory, like a RAW result.
MASTER_BITS = RAW_BITS
MASTER_FRAC = 24
MASTER_MIN, MASTER_MAX = -(1 << (MASTER_BITS - 1)), (1 << (MASTER_BITS - 1)) - 1
#: Momentum as an unsigned fraction ``mu / 2^MOMENTUM_BITS``.
MOMENTUM_BITS = 16
#: The SAWB statistics are sums of |t| and t^2 over t = w >> SAWB_SHIFT (arithmetic), with
#: SAWB_SUM_BITS and SAWB_SQ_BITS wide accumulators: exact for up to 2^SAWB_MAX_LOG2 weights.
SAWB_SHIFT = 8
SAWB_MAX_LOG2 = 20
SAWB_T_BITS = MASTER_BITS - SAWB_SHIFT
SAWB_SUM_BITS = SAWB_T_BITS + SAWB_MAX_LOG2             # |t| <= 2^23
SAWB_SQ_BITS = 2 * SAWB_T_BITS - 1 + SAWB_MAX_LOG2      # t^2 <= 2^46


#: Operand interpretation of a PE, set once per GEMM.
OPERAND_CFG = data.StructLayout({
    "a_fp4": unsigned(1),     # A is FP4 radix-4 (a shift); else an integer
    "a_signed": unsigned(1),  # integer A is INT4 (else UINT4)
    "b_signed": unsigned(1),  # B is INT4 (else UINT4)
})


def operand_cfg(a, b):
    """OPERAND_CFG field values for operand kinds ``a`` and ``b`` (``Operand`` members)."""
    if b is Operand.FP4:
        raise ValueError("the B operand is an integer (INT4 or UINT4)")
    return {"a_fp4": int(a is Operand.FP4), "a_signed": int(a is Operand.INT4),
            "b_signed": int(b is Operand.INT4)}
