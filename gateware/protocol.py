"""The host link protocol: one definition for the gateware and the host driver.

A frame on the wire is the COBS encoding of ``body`` followed by one ``0x00`` delimiter, so
a receiver resynchronizes at the next zero after any garbage. The body is::

    seq (1 byte) | op (1 byte) | payload (0..MAX_PAYLOAD bytes) | crc32 (4 bytes, LE)

with the CRC (:data:`CRC`, CRC-32/ISO-HDLC) over ``seq | op | payload``. A reply echoes the
request's ``seq``; its ``op`` is the request's opcode on success or an :class:`Status`
error code (``0x80`` and up) with a one-byte detail. ``docs/protocol.md`` will give the
payload of every command as the command engine lands (the next issue).
"""

import enum

from amaranth.lib import crc

__all__ = ["CRC", "CRC_BYTES", "DELIMITER", "HEADER_BYTES", "MAX_PAYLOAD", "Op", "Status",
           "max_encoded_size"]

#: The frame CRC; ``CRC().compute(data)`` on the host, ``crc.Processor`` in the gateware.
CRC = crc.catalog.CRC32_ISO_HDLC(data_width=8)
CRC_BYTES = 4
HEADER_BYTES = 2                 # seq, op
DELIMITER = 0x00
#: Largest payload of one frame (so the COBS overhead is at most 1 byte in 254).
MAX_PAYLOAD = 1024


class Op(enum.IntEnum):
    """Request opcodes."""

    PING = 0x01       # echo the payload
    INFO = 0x02       # array size, memory sizes, protocol version
    WRITE = 0x10      # write bytes into a buffer
    READ = 0x11       # read bytes from a buffer
    GEMM = 0x20       # run a GEMM between buffers
    STATS = 0x21      # absmax and the sums SAWB needs


class Status(enum.IntEnum):
    """Error replies (``op`` byte of a reply); every rejected frame changes no state."""

    BAD_CRC = 0x80
    UNKNOWN_OP = 0x81
    BAD_LENGTH = 0x82
    OUT_OF_RANGE = 0x83   # dims or buffer out of range
    BUSY = 0x84


def max_encoded_size(payload_len):
    """Wire bytes of a frame carrying ``payload_len`` bytes (COBS worst case + delimiter)."""
    body = HEADER_BYTES + payload_len + CRC_BYTES
    return body + (body + 253) // 254 + 1
