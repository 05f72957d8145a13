"""Host side of the link framing: COBS, CRC and a resynchronizing frame decoder.

The wire format is defined once, in :mod:`gateware.protocol`.
"""

from dataclasses import dataclass

from gateware.protocol import CRC, CRC_BYTES, DELIMITER, HEADER_BYTES, MAX_PAYLOAD

__all__ = ["Frame", "FrameDecoder", "LinkError", "cobs_decode", "cobs_encode", "encode_frame"]


class LinkError(ValueError):
    """A malformed frame (bad COBS, bad CRC, bad length)."""


def cobs_encode(data):
    """Consistent Overhead Byte Stuffing: ``data`` without any zero byte."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data):
    """Inverse of :func:`cobs_encode`; raises :class:`LinkError` on a malformed block."""
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise LinkError("zero byte inside a COBS frame")
        end = i + code
        if end > len(data):
            raise LinkError("truncated COBS block")
        block = data[i + 1:end]
        if 0 in block:
            raise LinkError("zero byte inside a COBS frame")
        out += block
        i = end
        if code < 255 and i < len(data):
            out.append(0)
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    seq: int
    op: int
    payload: bytes = b""


def encode_frame(frame):
    """Wire bytes of a frame: COBS(seq | op | payload | crc32 LE) and the delimiter."""
    if not 0 <= frame.seq < 256 or not 0 <= frame.op < 256:
        raise LinkError(f"seq and op are bytes, got {frame.seq}, {frame.op}")
    if len(frame.payload) > MAX_PAYLOAD:
        raise LinkError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes([frame.seq, frame.op]) + bytes(frame.payload)
    body += CRC.compute(body).to_bytes(CRC_BYTES, "little")
    return cobs_encode(body) + bytes([DELIMITER])


def decode_body(encoded):
    """Frame from the bytes between two delimiters; raises :class:`LinkError`."""
    body = cobs_decode(encoded)
    if len(body) < HEADER_BYTES + CRC_BYTES:
        raise LinkError(f"frame of {len(body)} bytes is too short")
    if len(body) > HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES:
        raise LinkError(f"frame of {len(body)} bytes is too long")
    data, check = body[:-CRC_BYTES], body[-CRC_BYTES:]
    if CRC.compute(data) != int.from_bytes(check, "little"):
        raise LinkError("bad CRC")
    return Frame(data[0], data[1], bytes(data[2:]))


class FrameDecoder:
    """Feed it bytes in any chunks; it returns whole frames and counts what it dropped.

    Garbage between frames, a frame cut by a delimiter, or a corrupted frame are dropped
    (counted in ``errors``); decoding resumes at the next delimiter.
    """

    def __init__(self):
        self._buf = bytearray()
        self.errors = 0
        self._overflow = False

    def feed(self, data):
        frames = []
        for byte in data:
            if byte == DELIMITER:
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
