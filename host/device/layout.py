"""Tensor memory layouts, shared by the driver and the emulator (see :mod:`rtl.engine`).

A buffer is ``rows`` rows, ``stride`` words apart, each holding ``elems`` elements of
``elem_nibbles`` 4-bit nibbles from nibble 0 of its first word. A word is ``nib`` nibbles,
``nib // 2`` bytes, nibble 0 in the low half of byte 0.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["Buffer", "low16", "pack", "row_words", "unpack", "widen16"]


def row_words(elems, elem_nibbles, nib):
    """Words one row of ``elems`` elements needs."""
    return -(-elems * elem_nibbles // nib)


@dataclass(frozen=True)
class Buffer:
    """A tensor in device memory: ``rows`` x ``elems`` elements of ``elem_nibbles``."""

    addr: int
    rows: int
    elems: int
    elem_nibbles: int
    stride: int

    @property
    def words(self):
        return self.rows * self.stride

    @property
    def end(self):
        return self.addr + self.words


def _nibbles(raw, rows, width):
    """rows x width nibbles of a buffer's bytes (nibble 0 in the low half of byte 0)."""
    b = np.frombuffer(bytes(raw), np.uint8).reshape(rows, width // 2)
    nibbles = np.empty((rows, width), np.int64)
    nibbles[:, 0::2] = b & 0xF
    nibbles[:, 1::2] = b >> 4
    return nibbles


def pack(values, elem_nibbles, nib, stride=None, base=None):
    """Bytes of a buffer holding ``values`` (rows x elems non-negative ints, each below
    ``16 ** elem_nibbles``), rows ``stride`` words apart (default: as tight as possible).
    With ``base`` (the buffer's current bytes) every other nibble keeps its value, as the
    engine's nibble-enabled writes leave it; otherwise it is zero."""
    values = np.asarray(values, dtype=np.int64)
    rows, elems = values.shape
    stride = stride or row_words(elems, elem_nibbles, nib)
    nibbles = (np.zeros((rows, stride * nib), np.int64) if base is None
               else _nibbles(base, rows, stride * nib))
    for q in range(elem_nibbles):
        nibbles[:, q:elems * elem_nibbles:elem_nibbles] = (values >> (4 * q)) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8).tobytes()


def unpack(raw, rows, elems, elem_nibbles, nib, stride=None, signed_bits=None):
    """Inverse of :func:`pack`; ``signed_bits`` sign-extends each element from that width."""
    stride = stride or row_words(elems, elem_nibbles, nib)
    nibbles = _nibbles(raw, rows, stride * nib)
    out = np.zeros((rows, elems), np.int64)
    for q in range(elem_nibbles):
        out |= nibbles[:, q:elems * elem_nibbles:elem_nibbles] << (4 * q)
    if signed_bits:
        out = np.where(out >= 1 << (signed_bits - 1), out - (1 << signed_bits), out)
    return out


def low16(raw):
    """A READ with ``low16``'s reply from the words' bytes: the low two of every four."""
    b = np.frombuffer(bytes(raw), np.uint8).reshape(-1, 4)
    return b[:, :2].tobytes()


def widen16(raw):
    """The words' bytes again from a ``low16`` reply: each 16-bit value sign-extended to
    the 4 bytes it came from (exact where every RAW element fits 16 bits)."""
    return np.frombuffer(bytes(raw), "<i2").astype("<i4").tobytes()
