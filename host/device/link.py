"""Host side of the link framing: byte stuffing, CRC and a resynchronizing frame decoder.

The wire format is defined once, in :mod:`gateware.protocol`.
"""

import zlib
from dataclasses import dataclass, field

from nibble.gateware.protocol import CRC_BYTES, ESC, ESC_XOR, FLAG, HEADER_BYTES, MAX_PAYLOAD

__all__ = ["Frame", "FrameDecoder", "LinkError", "crc32", "decode_body", "encode_frame",
           "stuff", "unstuff"]


def crc32(data):
    """The frame CRC (:data:`gateware.protocol.CRC`, CRC-32/ISO-HDLC), computed by zlib:
    the same function, a thousand times faster than the bit-level reference (a test checks
    that they agree)."""
    return zlib.crc32(data)


class LinkError(ValueError):
    """A malformed frame (bad stuffing, bad CRC, bad length)."""


_SPECIAL = {FLAG, ESC}


def stuff(data):
    """``data`` with every FLAG or ESC byte sent as ``ESC, byte ^ ESC_XOR``."""
    out = bytearray()
    for byte in data:
        if byte in _SPECIAL:
            out += bytes((ESC, byte ^ ESC_XOR))
        else:
            out.append(byte)
    return bytes(out)


def unstuff(data):
    """Inverse of :func:`stuff`; raises :class:`LinkError` on a FLAG or a dangling ESC."""
    out = bytearray()
    esc = False
    for byte in data:
        if byte == FLAG:
            raise LinkError("flag inside a frame")
        if esc:
            out.append(byte ^ ESC_XOR)
            esc = False
        elif byte == ESC:
            esc = True
        else:
            out.append(byte)
    if esc:
        raise LinkError("frame ends in an escape")
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    seq: int
    op: int
    payload: bytes = b""
    #: bytes it took on the wire, flags included (set by :class:`FrameDecoder`)
    wire: int = field(default=0, compare=False)


def encode_frame(frame):
    """Wire bytes of a frame: FLAG, stuffed(seq | op | payload | crc32 LE), FLAG."""
    if not 0 <= frame.seq < 256 or not 0 <= frame.op < 256:
        raise LinkError(f"seq and op are bytes, got {frame.seq}, {frame.op}")
    if len(frame.payload) > MAX_PAYLOAD:
        raise LinkError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes([frame.seq, frame.op]) + bytes(frame.payload)
    body += crc32(body).to_bytes(CRC_BYTES, "little")
    return bytes([FLAG]) + stuff(body) + bytes([FLAG])


def decode_body(encoded):
    """Frame from the bytes between two flags; raises :class:`LinkError`."""
    body = unstuff(encoded)
    if len(body) < HEADER_BYTES + CRC_BYTES:
        raise LinkError(f"frame of {len(body)} bytes is too short")
    if len(body) > HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES:
        raise LinkError(f"frame of {len(body)} bytes is too long")
    data, check = body[:-CRC_BYTES], body[-CRC_BYTES:]
    if crc32(data) != int.from_bytes(check, "little"):
        raise LinkError("bad CRC")
    return Frame(data[0], data[1], bytes(data[2:]), len(encoded) + 2)


class FrameDecoder:
    """Feed it bytes in any chunks; it returns whole frames and counts what it dropped.

    Garbage between frames, a frame cut by a flag, or a corrupted frame are dropped
    (counted in ``errors``); decoding resumes at the next flag.
    """

    def __init__(self):
        self._buf = bytearray()
        self.errors = 0
        self._overflow = False

    def feed(self, data):
        frames = []
        for byte in data:
            if byte == FLAG:
                if self._buf or self._overflow:
                    try:
                        if self._overflow:
                            raise LinkError("frame too long")
                        frames.append(decode_body(bytes(self._buf)))
                    except LinkError:
                        self.errors += 1
                self._buf.clear()
                self._overflow = False
            elif not self._overflow:
                self._buf.append(byte)
                if len(self._buf) > 2 * MAX_PAYLOAD:
                    self._buf.clear()
                    self._overflow = True
        return frames
