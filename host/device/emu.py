"""``emu://``: the device's command set on the golden model, in process.

:func:`gemm_apply` is the reference semantics of one GEMM command on tensor memory (the
engine's RTL tests compare against it). :class:`Emulator` speaks the wire protocol, byte for
byte like the gateware, so the driver's framing, retries and error handling run unchanged;
:class:`EmuTransport` gives it pyserial's ``write``/``read`` interface.
"""

import numpy as np

from nibble.gateware.protocol import (
    CRC_BYTES,
    ESC,
    ESC_XOR,
    FLAG,
    GATHER_ADDR_BYTES,
    GATHER_HEADER,
    HEADER_BYTES,
    INFO_LAYOUT,
    MAX_PAYLOAD,
    PARAMS_FROM,
    PROGRAM_OPS,
    READ_ARGS,
    RUN_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VEC_ARGS,
    VERSION,
    WRITE_HEADER,
    Op,
    Status,
    entry_bytes,
    entry_words,
    layout_bytes,
    longest_entry_words,
)
from nibble.host.device.layout import low16, pack, row_words, unpack
from nibble.host.device.link import Frame, crc32, encode_frame
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.host.golden.lanes import golden_acc, golden_clip_sum, golden_lane
from nibble.host.golden.numerics import master_update, requantize, sawb_sums
from nibble.host.golden.tiling import Gemm
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import (
    CLIP_SUM_BITS,
    MAX_REDUCTION,
    SAWB_SQ_BITS,
    SAWB_SUM_BITS,
    VEC_OPS_ALL,
    MaskMode,
    Operand,
    OutputPath,
    VecOp,
    element_nibbles,
    word_nibbles,
)
from nibble.rtl.sdram import BURST_BITS, CHIPS

__all__ = ["WHOLE", "EmuTransport", "Emulator", "dma_apply", "dma_check", "gemm_apply",
           "gemm_regions", "merge_params", "vec_regions", "vector_apply", "vector_check"]


def _region(mem, nib, addr, rows, stride):
    """``rows`` rows of ``stride`` words from ``addr``; where the last row's stride runs past
    the end of memory (the words beyond the buffer's own), it reads zeros."""
    wb = nib // 2
    raw = mem[addr * wb:(addr + rows * stride) * wb]
    return bytes(raw) + bytes(rows * stride * wb - len(raw))


def _kind(fp4, is_signed):
    if fp4:
        return Operand.FP4
    return Operand.INT4 if is_signed else Operand.UINT4


def _signed_codes(codes, kind):
    if kind is Operand.INT4:
        return np.where(codes >= 8, codes - 16, codes)
    return codes


def gemm_check(cfg, rows, cols, mem_words):
    """True when the GEMM command ``cfg`` (GEMM_ARGS values) is in range: the same rule as
    the engine's sequential check."""
    nib = word_nibbles(rows, cols)
    lane = cfg["lane"]
    path = lane["path"]
    if not (cfg["m"] and cfg["n"] and cfg["l"] and cfg["l"] <= MAX_REDUCTION):
        return False
    if path > OutputPath.LOG4 or lane["log4"]["mask"] > MaskMode.PACT:
        return False
    if path == OutputPath.RESCALE and cfg["operands"]["a_fp4"]:
        return False            # RESCALE takes forward (non-FP4) accumulators only
    if cfg["out_stride"] * nib < cfg["m"] * element_nibbles(path):
        return False
    return all(addr + (rows_ - 1) * stride + words <= mem_words
               for addr, stride, rows_, words, _ in gemm_regions(cfg, rows, cols))


#: ``written`` of a region a command writes and does not read, every nibble of each row's
#: words (truthy, as ``True``): it need not be read before (``host.device.paged`` stores
#: such a block without loading it).
WHOLE = "whole"


def _written(row_nibbles, nib):
    """A written region's ``written``: ``WHOLE`` when its rows are whole words."""
    return WHOLE if row_nibbles % nib == 0 else True


def gemm_regions(cfg, rows, cols):
    """(addr, stride, rows, row words, written) of each buffer the GEMM command ``cfg``
    touches: A, B, the output and, for a masked LOG4 GEMM, the mask codes. ``written`` is
    False for a region read, True or :data:`WHOLE` for one written."""
    nib = word_nibbles(rows, cols)
    lane = cfg["lane"]
    path = lane["path"]
    ea = 2 if cfg["a_pair"] else 1
    m_pad = -(-cfg["m"] // rows) * rows
    n_pad = -(-cfg["n"] // cols) * cols
    e_out = element_nibbles(path)
    bufs = [(cfg["a_addr"], cfg["a_stride"], cfg["l"], row_words(m_pad, ea, nib), False),
            (cfg["b_addr"], cfg["b_stride"], cfg["l"], row_words(n_pad, 1, nib), False),
            (cfg["out_addr"], cfg["out_stride"], cfg["n"], row_words(cfg["m"], e_out, nib),
             _written(cfg["m"] * e_out, nib))]
    if path == OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        bufs.append((cfg["mask_addr"], cfg["mask_stride"], cfg["n"], row_words(m_pad, 1, nib),
                     False))
    return bufs


def gemm_apply(mem, cfg, rows, cols):
    """Run the GEMM command ``cfg`` on ``mem`` (a bytearray, the whole tensor memory) as the
    engine does; returns its statistics ``(absmax, clip_sum)``."""
    nib = word_nibbles(rows, cols)
    m, red, n = cfg["m"], cfg["l"], cfg["n"]
    ops, lane = cfg["operands"], cfg["lane"]
    a_kind = _kind(ops["a_fp4"], ops["a_signed"])
    b_kind = _kind(0, ops["b_signed"])
    ea = 2 if cfg["a_pair"] else 1
    at = unpack(_region(mem, nib, cfg["a_addr"], red, cfg["a_stride"]), red, m, ea, nib,
                cfg["a_stride"])
    if cfg["a_pair"]:
        at = (at >> (4 * cfg["a_sel"])) & 0xF
    b = unpack(_region(mem, nib, cfg["b_addr"], red, cfg["b_stride"]), red, n, 1, nib,
               cfg["b_stride"])
    gemm = Gemm(_signed_codes(at.T, a_kind), _signed_codes(b, b_kind), a_kind, b_kind)
    acc = golden_acc(gemm, lane["phase"])
    path = OutputPath(lane["path"])
    mask = None
    if path is OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        mask = unpack(_region(mem, nib, cfg["mask_addr"], n, cfg["mask_stride"]), n, m, 1,
                      nib, cfg["mask_stride"]).T
    values, absmax = golden_lane(acc, lane, mask)
    clip_sum = golden_clip_sum(acc, lane, mask)
    if path is OutputPath.LOG4:
        elems = np.array([[p0 | (p1 << 4) for p0, p1 in row] for row in values], np.int64)
    else:
        elems = np.asarray(values, np.int64) & 0xFFFFFFFF
    write_elements(mem, nib, cfg["out_addr"], cfg["out_stride"], elems.T,
                   element_nibbles(path))
    return absmax, clip_sum


def write_elements(mem, nib, addr, stride, values, elem_nibbles):
    """Write ``values`` (rows x elems) into a buffer, touching only their own nibbles."""
    rows = values.shape[0]
    wb = nib // 2
    data = pack(values, elem_nibbles, nib, stride, base=_region(mem, nib, addr, rows, stride))
    end = min(len(mem), (addr + rows * stride) * wb)
    mem[addr * wb:end] = data[:end - addr * wb]


def code_sums(mem, nib, addr, count):
    """Sum |c| and sum c^2 over ``count`` INT4 codes from word ``addr`` (STATS)."""
    words = -(-count // nib)
    codes = unpack(_region(mem, nib, addr, 1, words), 1, count, 1, nib, words, 4)[0]
    return int(np.abs(codes).sum()), int((codes * codes).sum())


def vec_regions(cfg, nib):
    """(addr, stride, rows, row words, written) of each buffer a VECTOR command touches
    (``written`` as in :func:`gemm_regions`; an UPDATE reads the buffers it writes)."""
    op, rows, cols = cfg["op"], cfg["rows"], cfg["cols"]
    if op == VecOp.TRANSPOSE:
        e = 2 if cfg["pair"] else 1
        return [(cfg["a_addr"], cfg["a_stride"], rows, row_words(cols, e, nib), False),
                (cfg["b_addr"], cfg["b_stride"], cols, row_words(rows, e, nib),
                 _written(rows * e, nib))]
    w8 = row_words(cols, 8, nib)
    if op == VecOp.UPDATE:
        return [(cfg["a_addr"], cfg["a_stride"], rows, w8, False),
                (cfg["b_addr"], cfg["b_stride"], rows, w8, True),
                (cfg["c_addr"], cfg["b_stride"], rows, w8, True)]
    return [(cfg["a_addr"], cfg["a_stride"], rows, w8, False),           # REQUANT
            (cfg["b_addr"], cfg["b_stride"], rows, row_words(cols, 1, nib),
             _written(cols, nib))]


def vector_check(cfg, rows, cols, mem_words, vec_ops=VEC_OPS_ALL):
    """True when the VECTOR command ``cfg`` (VEC_ARGS values) is in range, as the unit's
    check decides (for a unit built with the operations ``vec_ops``)."""
    nib = word_nibbles(rows, cols)
    if not (cfg["rows"] and cfg["cols"] and vec_ops >> cfg["op"] & 1):
        return False
    return all(addr + (n - 1) * stride + words <= mem_words and not (wr and stride < words)
               for addr, stride, n, words, wr in vec_regions(cfg, nib))


def _read(mem, nib, buf, elems, e, signed_bits=None):
    addr, stride, rows, _, _ = buf
    return unpack(_region(mem, nib, addr, rows, stride), rows, elems, e, nib, stride,
                  signed_bits)


def vector_apply(mem, cfg, rows, cols):
    """Run the VECTOR command ``cfg`` on ``mem`` as the element-wise unit does; returns the
    SAWB sums ``(sum_abs, sum_sq)`` of an UPDATE, else None."""
    nib = word_nibbles(rows, cols)
    bufs = vec_regions(cfg, nib)
    op, n_cols = cfg["op"], cfg["cols"]
    if op == VecOp.TRANSPOSE:
        e = 2 if cfg["pair"] else 1
        src = _read(mem, nib, bufs[0], n_cols, e)
        write_elements(mem, nib, cfg["b_addr"], cfg["b_stride"], src.T, e)
        return None
    if op == VecOp.REQUANT:
        w = _read(mem, nib, bufs[0], n_cols, 8, 32)
        codes = requantize(w, cfg["m"], cfg["s"]).astype(np.int64) & 0xF
        write_elements(mem, nib, cfg["b_addr"], cfg["b_stride"], codes, 1)
        return None
    g = _read(mem, nib, bufs[0], n_cols, 8, 32)
    w = _read(mem, nib, bufs[1], n_cols, 8, 32)
    v = _read(mem, nib, bufs[2], n_cols, 8, 32)
    w_new, v_new = master_update(g, w, v, cfg["mu"], cfg["m"], cfg["s"])
    write_elements(mem, nib, cfg["c_addr"], cfg["b_stride"], v_new & 0xFFFFFFFF, 8)
    write_elements(mem, nib, cfg["b_addr"], cfg["b_stride"], w_new & 0xFFFFFFFF, 8)
    sum_abs, sum_sq = sawb_sums(w_new)
    return sum_abs % (1 << SAWB_SUM_BITS), sum_sq % (1 << SAWB_SQ_BITS)


def dma_check(cfg, nib, mem_words, ext_bursts):
    """True when the DMA command ``cfg`` (DMA_CFG values) is in range, as the DMA's two
    checks decide (a written region's rows must not overlap)."""
    wpb = words_per_burst(nib)
    if not (cfg["rows"] and cfg["bursts"]):
        return False
    regions = ((cfg["mem_addr"], cfg["mem_stride"], cfg["bursts"] * wpb, mem_words,
                not cfg["store"]),
               (cfg["ext_addr"], cfg["ext_stride"], cfg["bursts"], ext_bursts, cfg["store"]))
    return all(addr + (cfg["rows"] - 1) * stride + words <= size
               and not (written and stride < words)
               for addr, stride, words, size, written in regions)


def dma_apply(mem, ext, cfg, nib):
    """Run the DMA command ``cfg`` between tensor memory ``mem`` and the SDRAM's bytes
    ``ext`` (bytearrays): a burst is 16 bytes, its words little-endian, word 0 first."""
    wb, burst = nib // 2, BURST_BITS // 8
    for r in range(cfg["rows"]):
        m0 = (cfg["mem_addr"] + r * cfg["mem_stride"]) * wb
        e0 = (cfg["ext_addr"] + r * cfg["ext_stride"]) * burst
        n = cfg["bursts"] * burst
        if cfg["store"]:
            ext[e0:e0 + n] = mem[m0:m0 + n]
        else:
            mem[m0:m0 + n] = ext[e0:e0 + n]


def merge_params(op, args, params, requant=0):
    """A program entry's argument bytes with the RUN's ``params`` in place of its settings
    (:data:`~nibble.gateware.protocol.PARAMS_FROM` on) when it has none (all zero); a
    REQUANT's with the RUN's ``requant`` where that is not zero (v10)."""
    layout = PROGRAM_OPS[op]
    if op not in PARAMS_FROM:
        return args
    at = PARAMS_FROM[op]
    bits = int.from_bytes(args, "little")
    if bits >> at & ((1 << (layout.size - at)) - 1):
        return args                     # its own settings (a program of two kinds)
    field = VEC_ARGS["op"]
    if op == Op.VECTOR and requant and \
            bits >> field.offset & ((1 << field.width) - 1) == VecOp.REQUANT:
        params = requant
    bits &= (1 << at) - 1
    bits |= (params & ((1 << (layout.size - at)) - 1)) << at
    return bits.to_bytes(layout_bytes(layout), "little")


class Emulator:
    """The device, byte stream in and out, on the golden model (GEMMs finish instantly)."""

    def __init__(self, rows=2, cols=4, mem_words=1 << 16, clk_hz=0, sdram="",
                 vec_ops=VEC_OPS_ALL):
        self.rows, self.cols, self.mem_words, self.clk_hz = rows, cols, mem_words, clk_hz
        self.vec_ops = vec_ops
        self.nib = word_nibbles(rows, cols)
        self.mem = bytearray(mem_words * self.nib // 2)
        #: The SDRAM's bytes (empty without one); DMA moves 16-byte bursts.
        self.ext = bytearray(CHIPS[sdram].bytes if sdram else 0)
        self.ext_bursts = len(self.ext) // (BURST_BITS // 8)
        self.absmax = self.clip_sum = 0
        self.sdram = sdram
        self.w_sums = (0, 0)
        self.rx_errors = 0
        self._body = bytearray()
        self._esc = False
        self._overflow = False
        self._last = None       # (seq, op, reply op) of the last executed request
        self.out = bytearray()

    def feed(self, data):
        for byte in data:
            if byte == FLAG:
                if self._body or self._overflow:
                    self._frame()
                self._body.clear()
                self._esc = self._overflow = False
            elif byte == ESC:
                self._esc = True
            else:
                if len(self._body) < HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES:
                    self._body.append(byte ^ ESC_XOR if self._esc else byte)
                else:
                    self._overflow = True
                self._esc = False

    def _reply(self, seq, op, payload=b""):
        self.out += encode_frame(Frame(seq, op, payload))

    def _error(self):
        self.rx_errors = min(self.rx_errors + 1, 0xFFFF)        # saturating, as in the RTL

    def _frame(self):
        body = bytes(self._body)
        if self._overflow:
            self._error()
            return self._reply(body[0], Status.BAD_LENGTH)
        if len(body) < HEADER_BYTES + CRC_BYTES:
            self._error()
            return None
        if crc32(body[:-CRC_BYTES]) != int.from_bytes(body[-CRC_BYTES:], "little"):
            self._error()
            return self._reply(body[0], Status.BAD_CRC)
        seq, op, payload = body[0], body[1], body[HEADER_BYTES:-CRC_BYTES]
        if (op in (Op.WRITE, Op.GEMM, Op.VECTOR, Op.DMA, Op.RUN, Op.GATHER)
                and self._last is not None and self._last[:2] == (seq, op)):
            # a retry: answer, do not redo (a RUN with its STATS, which nothing has changed)
            return self._reply(seq, self._last[2], self._stats() if op == Op.RUN else b"")
        status, reply = self._execute(op, payload)
        self._last = (seq, op, status) if status < 0x80 else None
        return self._reply(seq, status, reply)

    def _execute(self, op, payload):
        wb = self.nib // 2
        if op == Op.PING:
            return op, payload
        if op == Op.INFO:
            if payload:
                return Status.BAD_LENGTH, b""
            return op, pack_fields(INFO_LAYOUT, {
                "version": VERSION, "rows": self.rows, "cols": self.cols,
                "word_nibbles": self.nib, "mem_words": self.mem_words,
                "max_payload": MAX_PAYLOAD, "clk_hz": self.clk_hz,
                "ext_bursts": self.ext_bursts, "vec_ops": self.vec_ops})
        if op == Op.WRITE:
            hb = layout_bytes(WRITE_HEADER)
            data = payload[hb:]
            if len(payload) < hb + wb or len(data) % wb:
                return Status.BAD_LENGTH, b""
            addr = unpack_fields(WRITE_HEADER, payload[:hb])["addr"]
            if addr + len(data) // wb > self.mem_words:
                return Status.OUT_OF_RANGE, b""
            self.mem[addr * wb:addr * wb + len(data)] = data
            return op, b""
        if op == Op.READ:
            if len(payload) != layout_bytes(READ_ARGS):
                return Status.BAD_LENGTH, b""
            args = unpack_fields(READ_ARGS, payload)
            if not 0 < args["words"] <= (MAX_PAYLOAD // wb) << args["low16"]:
                return Status.BAD_LENGTH, b""
            if args["addr"] + args["words"] > self.mem_words:
                return Status.OUT_OF_RANGE, b""
            words = bytes(self.mem[args["addr"] * wb:(args["addr"] + args["words"]) * wb])
            return op, low16(words) if args["low16"] else words
        if op in PROGRAM_OPS and op != Op.BESIDE and (op in (Op.GEMM, Op.VECTOR) or self.ext):
            if len(payload) != layout_bytes(PROGRAM_OPS[op]):
                return Status.BAD_LENGTH, b""
            return self._unit(op, payload), b""
        if op == Op.RUN and self.ext:
            if len(payload) != layout_bytes(RUN_ARGS):
                return Status.BAD_LENGTH, b""
            status = self._run(unpack_fields(RUN_ARGS, payload))
            return status, self._stats() if status == op else b""
        if op == Op.GATHER and self.ext:
            hb = layout_bytes(GATHER_HEADER)
            if len(payload) < hb:
                return Status.BAD_LENGTH, b""
            head = unpack_fields(GATHER_HEADER, payload[:hb])
            if len(payload) != hb + head["count"] * GATHER_ADDR_BYTES:
                return Status.BAD_LENGTH, b""
            if not head["count"]:
                return Status.OUT_OF_RANGE, b""
            return self._gather(head, payload[hb:]), b""
        if op == Op.STATS:
            sums = (0, 0)
            if payload:             # region sums: a device with SDRAM only
                if len(payload) != layout_bytes(STATS_ARGS) or not self.ext:
                    return Status.BAD_LENGTH, b""
                args = unpack_fields(STATS_ARGS, payload)
                if args["addr"] + -(-args["count"] // self.nib) > self.mem_words:
                    return Status.OUT_OF_RANGE, b""
                sums = code_sums(self.mem, self.nib, args["addr"], args["count"])
            return op, self._stats(sums)
        return Status.UNKNOWN_OP, b""

    def _stats(self, sums=(0, 0)):
        return pack_fields(STATS_LAYOUT, {
            "busy": 0, "absmax": self.absmax, "gemm_cycles": 0, "beats": 0, "cycles": 0,
            "sum_abs": sums[0], "sum_sq": sums[1], "rx_errors": self.rx_errors,
            "vec_cycles": 0, "w_sum_abs": self.w_sums[0], "w_sum_sq": self.w_sums[1],
            "clip_sum": self.clip_sum, "dma_cycles": 0})

    def _unit(self, op, payload, fold=None):
        """Check and run a GEMM, VECTOR or DMA (its argument bytes); returns the status.
        ``fold``: inside a RUN, the units that have run before in it (``gemm``,
        ``update``): their statistics combine with this one's (absmax: the largest; the
        sums: the total, wrapping as the device's registers do)."""
        cfg = unpack_fields(PROGRAM_OPS[op], payload)
        if op in (Op.FENCE, Op.BESIDE):   # every unit has ended: nothing to wait for here
            return op
        if op == Op.GEMM:
            if not gemm_check(cfg, self.rows, self.cols, self.mem_words):
                return Status.OUT_OF_RANGE
            absmax, clip = gemm_apply(self.mem, cfg, self.rows, self.cols)
            if fold is not None and "gemm" in fold:
                absmax = max(absmax, self.absmax)
                clip = _wrap_signed(clip + self.clip_sum, CLIP_SUM_BITS)
            self.absmax, self.clip_sum = absmax, clip
            if fold is not None:
                fold.add("gemm")
        elif op == Op.VECTOR:
            if not vector_check(cfg, self.rows, self.cols, self.mem_words, self.vec_ops):
                return Status.OUT_OF_RANGE
            sums = vector_apply(self.mem, cfg, self.rows, self.cols)
            if sums is not None:
                if fold is not None and "update" in fold:
                    sums = ((sums[0] + self.w_sums[0]) % (1 << SAWB_SUM_BITS),
                            (sums[1] + self.w_sums[1]) % (1 << SAWB_SQ_BITS))
                self.w_sums = sums
                if fold is not None:
                    fold.add("update")
        else:
            if not dma_check(cfg, self.nib, self.mem_words, self.ext_bursts):
                return Status.OUT_OF_RANGE
            dma_apply(self.mem, self.ext, cfg, self.nib)
        return op

    def _run(self, args):
        """RUN: the program's entries in turn, from word ``addr``; the first that fails
        ends it (the ones before have run) and its status is the RUN's."""
        wb, pc, fold = self.nib // 2, args["addr"], set()
        most = longest_entry_words(self.nib)
        if not args["entries"]:
            return Status.OUT_OF_RANGE
        for _ in range(args["entries"]):
            if pc + most > self.mem_words:          # the device fetches the longest entry
                return Status.OUT_OF_RANGE
            op = self.mem[pc * wb]
            if op not in PROGRAM_OPS:
                return Status.UNKNOWN_OP
            raw = bytes(self.mem[pc * wb + 1:pc * wb + entry_bytes(op)])
            status = self._unit(op, merge_params(op, raw, args["params"], args["requant"]), fold)
            if status != op:
                return status
            pc += entry_words(op, self.nib)
        return Op.RUN

    def _gather(self, head, addrs):
        """GATHER: one DMA LOAD a burst address, into rows ``mem_stride`` words apart."""
        wpb = words_per_burst(self.nib)
        for k in range(len(addrs) // GATHER_ADDR_BYTES):
            ext = int.from_bytes(addrs[k * GATHER_ADDR_BYTES:(k + 1) * GATHER_ADDR_BYTES],
                                 "little")
            cfg = {"store": 0, "rows": 1, "bursts": head["bursts"],
                   "mem_addr": head["mem_addr"] + k * head["mem_stride"],
                   "mem_stride": head["bursts"] * wpb, "ext_addr": ext,
                   "ext_stride": head["bursts"]}
            if not dma_check(cfg, self.nib, self.mem_words, self.ext_bursts):
                return Status.OUT_OF_RANGE
            dma_apply(self.mem, self.ext, cfg, self.nib)
        return Op.GATHER


def _wrap_signed(x, bits):
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >> (bits - 1) else x


class EmuTransport:
    """pyserial-style ``write``/``read`` over an in-process :class:`Emulator`."""

    def __init__(self, emulator=None, rows=2, cols=4, words=1 << 16, clk_hz=0, sdram="",
                 vec_ops=VEC_OPS_ALL):
        self.emu = emulator or Emulator(rows, cols, words, clk_hz, sdram, vec_ops)
        self.timeout = 0
        #: Replies are complete as soon as ``write`` returns: nothing more will arrive.
        self.instant = True
        #: No byte is lost or damaged on the way (``Device.pipeline``).
        self.lossless = True

    def write(self, data):
        self.emu.feed(data)
        return len(data)

    def read(self, size=1):
        out = bytes(self.emu.out[:size])
        del self.emu.out[:size]
        return out

    @property
    def in_waiting(self):
        return len(self.emu.out)

    def reset_input_buffer(self):
        self.emu.out.clear()

    def close(self):
        pass
