"""The host link protocol: one definition for the gateware and the host driver.

A frame on the wire is ``FLAG body FLAG`` with HDLC-style byte stuffing inside: a body byte
equal to ``FLAG`` or ``ESC`` is sent as ``ESC, byte ^ ESC_XOR``. Stuffing is a two-state
machine in both directions (no look-ahead buffer, unlike COBS), costs 2 bytes in 128 on
random data, and a receiver resynchronizes at the next ``FLAG`` after any garbage. The body
is::

    seq (1 byte) | op (1 byte) | payload (0..MAX_PAYLOAD bytes) | crc32 (4 bytes, LE)

with the CRC (:data:`CRC`, CRC-32/ISO-HDLC) over ``seq | op | payload``. A reply echoes the
request's ``seq``; its ``op`` is the request's opcode on success, or a :class:`Status` error
code (``0x80`` and up) with an empty payload. A rejected frame changes no device state.
``docs/protocol.md`` gives the payload of every command.
"""

import functools

from amaranth.hdl import signed
from amaranth.lib import crc, data, enum

from nibble.rtl.dma import DMA_CFG
from nibble.rtl.engine import GEMM_CFG
from nibble.rtl.memory import ADDR_BITS
from nibble.rtl.vector import VEC_CFG

__all__ = ["CRC", "CRC_BYTES", "DMA_ARGS", "ESC", "ESC_XOR", "FLAG", "GATHER_ADDR_BYTES",
           "GATHER_HEADER", "GEMM_ARGS", "HEADER_BYTES", "INFO_LAYOUT", "MAX_PAYLOAD",
           "PARAMS_FROM", "PARAM_BITS", "PROGRAM_OPS", "READ_ARGS", "REQUANT_PARAM_BITS",
           "RUN_ARGS", "STATS_ARGS", "STATS_LAYOUT", "VEC_ARGS", "VERSION", "WRITE_HEADER",
           "Op", "Status", "entry_bytes", "entry_words", "longest_entry_words",
           "max_encoded_size"]

#: The frame CRC; ``CRC().compute(data)`` on the host, ``crc.Processor`` in the gateware.
CRC = crc.catalog.CRC32_ISO_HDLC(data_width=8)
CRC_BYTES = 4
HEADER_BYTES = 2                 # seq, op
FLAG = 0x7E
ESC = 0x7D
ESC_XOR = 0x20
#: Largest payload of one frame.
MAX_PAYLOAD = 1024
VERSION = 10


class Op(enum.IntEnum, shape=8):
    """Request opcodes."""

    PING = 0x01       # echo the payload
    INFO = 0x02       # array size, memory size, protocol version (INFO_LAYOUT)
    WRITE = 0x10      # WRITE_HEADER, then whole words of data
    READ = 0x11       # READ_ARGS; the reply is the words (low16: half their bytes)
    GEMM = 0x20       # GEMM_ARGS; starts the engine and replies at once
    STATS = 0x21      # optional STATS_ARGS; the reply is STATS_LAYOUT
    VECTOR = 0x22     # VEC_ARGS; starts the element-wise unit and replies at once
    DMA = 0x23        # DMA_ARGS; starts a tile transfer to or from the SDRAM, replies at once
    RUN = 0x24        # RUN_ARGS; runs a program of GEMM, VECTOR and DMA entries stored in
                      # tensor memory, replies when it has ended with its STATS_LAYOUT
    GATHER = 0x25     # GATHER_HEADER, then 3-byte SDRAM burst addresses: one DMA LOAD each
    FENCE = 0x26      # no payload; answers once every unit (GEMM, VECTOR, DMA) is idle
    BESIDE = 0x27     # a program's entry only (v9): the next GEMM or VECTOR entry starts
                      # while a DMA runs (the host has made sure they share no word)


class Status(enum.IntEnum, shape=8):
    """Error replies (``op`` byte of a reply); every rejected frame changes no state."""

    BAD_CRC = 0x80        # the frame's CRC did not match (seq is as received)
    UNKNOWN_OP = 0x81
    BAD_LENGTH = 0x82     # payload too short, too long or not whole words
    OUT_OF_RANGE = 0x83   # dims or buffer out of range
    BUSY = 0x84           # a unit is running and the command must wait; try again


#: Tensor memory addresses are in words (``ADDR_BITS`` bits, as in the GEMM arguments); a word is
#: ``word_nibbles`` 4-bit codes (INFO), nibble 0 in the low half of byte 0, bytes
#: little-endian.
WRITE_HEADER = data.StructLayout({"addr": ADDR_BITS})
#: ``low16``: of every 4 bytes (a RAW element) only the low 2, so half the bytes (v9): for
#: RAW values the host knows fit 16 bits, such as the logits of a layer whose reduction K
#: keeps ``K * 15 * 8 < 2^15``; up to twice ``MAX_PAYLOAD`` bytes of words then.
READ_ARGS = data.StructLayout({"addr": ADDR_BITS, "words": 16, "low16": 1})
#: Optional: sums over ``count`` INT4 codes from word ``addr`` (for SAWB's E|w| and E w^2).
STATS_ARGS = data.StructLayout({"addr": ADDR_BITS, "count": 24})
STATS_LAYOUT = data.StructLayout({
    "busy": 8,              # bit 0: a GEMM or VECTOR runs; bit 1: a DMA runs
    "absmax": 32,           # the last GEMM's output statistic (see rtl.lane)
    "gemm_cycles": 32,      # cycles from the last GEMM's start to its last write
    "beats": 32,            # operand beats the last GEMM sent into the array
    "cycles": 32,           # free-running cycle counter
    "sum_abs": 32,          # sum |code| over the STATS_ARGS region (0 without args)
    "sum_sq": 32,           # sum code^2 over that region
    "rx_errors": 16,        # frames dropped: bad CRC, too long, timed out
    "vec_cycles": 32,       # cycles of the last VECTOR operation
    "w_sum_abs": 48,        # SAWB statistics of the last UPDATE: sum |w >> 8|
    "w_sum_sq": 72,         # ... and sum (w >> 8)^2
    "clip_sum": signed(64),  # the last GEMM's PACT clip statistic (see rtl.lane)
    "dma_cycles": 32,       # cycles of the last DMA transfer
})
INFO_LAYOUT = data.StructLayout({
    "version": 8,
    "rows": 8,
    "cols": 8,
    "word_nibbles": 8,
    "mem_words": 32,
    "max_payload": 16,
    "clk_hz": 32,
    "ext_bursts": 32,       # SDRAM size in 16-byte bursts (0: no SDRAM, no DMA)
    "vec_ops": 8,           # the element-wise unit's operations, bit VecOp (VEC_OPS_ALL)
})


#: The GEMM command's payload: the engine's own settings layout, defined once there.
GEMM_ARGS = GEMM_CFG
#: The VECTOR command's payload: the element-wise unit's settings layout.
VEC_ARGS = VEC_CFG
#: The DMA command's payload: the DMA's settings layout.
DMA_ARGS = DMA_CFG


#: A program entry (RUN) in tensor memory: the entry's opcode in byte 0, its arguments
#: from byte 1 (the layout of its command), padded to whole words; entries follow one
#: another. A FENCE entry waits for every unit (a part's result is stored after it); a
#: BESIDE entry lets the next GEMM or VECTOR start without waiting for the DMA (it waits
#: for the GEMM and the element-wise unit still: a part computes while the part before is
#: stored and the one after loaded, :mod:`nibble.host.device.paged`). GEMM
#: and VECTOR entries take their settings from ``PARAMS_FROM`` on (the output lane's; the
#: update's and requantization's factors) from the RUN's ``params``, so a program stored
#: once runs with the scales of every step.
PROGRAM_OPS = {Op.GEMM: GEMM_ARGS, Op.VECTOR: VEC_ARGS, Op.DMA: DMA_ARGS,
               Op.FENCE: data.StructLayout({}), Op.BESIDE: data.StructLayout({})}
PARAMS_FROM = {Op.GEMM: GEMM_ARGS["lane"].offset, Op.VECTOR: VEC_ARGS["mu"].offset}
PARAM_BITS = max(PROGRAM_OPS[op].size - at for op, at in PARAMS_FROM.items())
#: (v10) a REQUANT entry without settings takes the RUN's ``requant`` where that is not
#: zero (else ``params``, as every VECTOR): one program updates a part's masters (the
#: UPDATE's factors) and requantizes them in the scratchpad (the weight factor), both
#: given every step
REQUANT_PARAM_BITS = VEC_ARGS.size - PARAMS_FROM[Op.VECTOR]
RUN_ARGS = data.StructLayout({"addr": ADDR_BITS, "entries": 16, "params": PARAM_BITS,
                              "requant": REQUANT_PARAM_BITS})
#: GATHER: ``count`` 3-byte SDRAM burst addresses follow; the k-th is loaded into
#: ``bursts`` bursts of tensor memory from word ``mem_addr + k * mem_stride``.
GATHER_HEADER = data.StructLayout({"mem_addr": ADDR_BITS, "mem_stride": 16, "bursts": 16,
                                   "count": 16})
GATHER_ADDR_BYTES = 3


def entry_bytes(op):
    """Bytes of a program entry of ``op`` before padding to whole words."""
    return 1 + layout_bytes(PROGRAM_OPS[op])


def entry_words(op, nib):
    """Words of a program entry of ``op`` in tensor memory of ``nib``-nibble words."""
    return -(-entry_bytes(op) // (nib // 2))


def longest_entry_words(nib):
    """Words the device reads for every entry (the longest entry's), whatever it is."""
    return max(entry_words(op, nib) for op in PROGRAM_OPS)


def max_encoded_size(payload_len):
    """Wire bytes of a frame carrying ``payload_len`` bytes (every byte stuffed + 2 flags)."""
    return 2 * (HEADER_BYTES + payload_len + CRC_BYTES) + 2


@functools.cache
def layout_bytes(layout):
    """Bytes of a packed layout on the wire (little-endian, padded to whole bytes);
    remembered, since ``data.Layout`` works its size out again on every access."""
    return (layout.size + 7) // 8
