"""How a GEMM maps onto the R x C systolic array: operands, beats and lane order.

The array computes ``T = A @ B`` where A's codes enter the rows (INT4, UINT4 or FP4) and B's
codes enter the columns (INT4 or UINT4). The three GEMMs of a training step map as

=================  ==========================  ======================
mode               A (streamed, M x L)         B (L x N)
=================  ==========================  ======================
FORWARD            X codes (B x K)             W.T (K x N)
BACKWARD_DATA      dY phase-0 codes (B x N)    W (N x K)
BACKWARD_WEIGHT    dY.T phase-1 codes (N x B)  X (B x K)
=================  ==========================  ======================

The output is cut into R x C tiles; each tile is L beats (reduction steps). Lane ``g``
returns, per tile, the elements of :func:`rtl.array.lane_order`. These functions are the
reference schedule: the Amaranth and cocotb tests use them, and so will the command engine's
host model.
"""

from dataclasses import dataclass

import numpy as np

from nibble.rtl.array import lane_order
from nibble.rtl.formats import Operand, operand_cfg

__all__ = ["Gemm", "assemble", "beats", "code_bits", "lane_streams", "tiles"]


def code_bits(codes):
    """4-bit codes as the unsigned nibbles the hardware carries (INT4 two's complement)."""
    return (np.asarray(codes).astype(np.int64) & 0xF).astype(np.uint8)


@dataclass
class Gemm:
    """One array GEMM: ``a`` (M x L codes of kind ``a_kind``) times ``b`` (L x N)."""

    a: np.ndarray
    b: np.ndarray
    a_kind: Operand
    b_kind: Operand

    @property
    def operands(self):
        """OPERAND_CFG field values."""
        return operand_cfg(self.a_kind, self.b_kind)

    @property
    def shape(self):
        return self.a.shape[0], self.a.shape[1], self.b.shape[1]


def tiles(gemm, rows, cols):
    """The (row0, col0) origin of every output tile, in issue order (row-major)."""
    m, _, n = gemm.shape
    return [(r, c) for r in range(0, m, rows) for c in range(0, n, cols)]


def beats(gemm, rows, cols):
    """Every operand beat of the GEMM, as ``(a_nibbles, b_nibbles, last)`` tuples.

    Each tile sends its L reduction steps; partial tiles at the edges are padded with zero
    codes (a zero code contributes nothing in every operand kind).
    """
    m, red, n = gemm.shape
    a_bits, b_bits = code_bits(gemm.a), code_bits(gemm.b)
    out = []
    for r0, c0 in tiles(gemm, rows, cols):
        a_tile = np.zeros((rows, red), np.uint8)
        b_tile = np.zeros((red, cols), np.uint8)
        a_tile[: min(rows, m - r0)] = a_bits[r0:r0 + rows]
        b_tile[:, : min(cols, n - c0)] = b_bits[:, c0:c0 + cols]
        for k in range(red):
            out.append((a_tile[:, k], b_tile[k], k == red - 1))
    return out


def assemble(gemm, rows, cols, lane_values):
    """Place each lane's output sequence into the M x N result (padding is dropped).

    ``lane_values[g]`` is the list lane ``g`` emitted, over all tiles in issue order.
    Elements may be any objects (ints, code pairs); the result is an object array unless
    every element is an int.
    """
    m, _, n = gemm.shape
    result = np.empty((m, n), dtype=object)
    order = [lane_order(rows, cols, g) for g in range(rows)]
    for g in range(rows):
        expected = len(order[g]) * len(tiles(gemm, rows, cols))
        if len(lane_values[g]) != expected:
            raise ValueError(f"lane {g} produced {len(lane_values[g])} elements, "
                             f"expected {expected}")
    pos = [0] * rows
    for r0, c0 in tiles(gemm, rows, cols):
        for g in range(rows):
            for i, j in order[g]:
                value = lane_values[g][pos[g]]
                pos[g] += 1
                if r0 + i < m and c0 + j < n:
                    result[r0 + i, c0 + j] = value
    if all(isinstance(v, (int, np.integer)) for v in result.flat):
        return result.astype(np.int64)
    return result


def lane_streams(gemm, rows, cols, matrix, pad=0):
    """The inverse of :func:`assemble`: per lane, the M x N ``matrix`` elements in the
    order that lane handles them (``pad`` for positions outside the result). Used for the
    activation codes that mask the LOG4 path and for expected outputs."""
    m, _, n = gemm.shape
    matrix = np.asarray(matrix)
    out = [[] for _ in range(rows)]
    for r0, c0 in tiles(gemm, rows, cols):
        for g in range(rows):
            for i, j in lane_order(rows, cols, g):
                inside = r0 + i < m and c0 + j < n
                out[g].append(matrix[r0 + i, c0 + j] if inside else pad)
    return out
