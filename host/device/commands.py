"""The arguments of the device's commands, built in one place.

* :func:`lane_cfg`: an output lane's settings (``LANE_CFG``);
* :func:`gemm_args`: a GEMM command on buffers already in device memory (``GEMM_ARGS``), and
  :func:`plan_gemm`, which also places a GEMM's operands in memory (the driver's one-off
  GEMMs and the tests' random commands);
* :func:`vector_args`: a VECTOR command (``VEC_ARGS``);
* :func:`program_entry` and :func:`program_params`: a command as an entry of a stored
  program, and the settings a RUN gives all of a program's GEMM or VECTOR entries.

The layouts are those of :mod:`nibble.rtl.engine`: A stored as A^T (L rows of M codes), B
as itself, the result as out^T (N rows of M elements), the LOG4 mask codes as act^T.
"""

from dataclasses import dataclass

import numpy as np

from nibble.gateware.protocol import PARAMS_FROM, PROGRAM_OPS, layout_bytes
from nibble.host.device.layout import Buffer, pack, row_words
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.host.golden.tiling import code_bits
from nibble.rtl.formats import MaskMode, OutputPath, VecOp, element_nibbles, operand_cfg

__all__ = ["GemmPlan", "gemm_args", "lane_cfg", "plan_gemm", "program_entry", "program_params",
           "settings_zeroed", "vector_args"]


def lane_cfg(path=OutputPath.RAW, phase=0, m=1 << 15, s=0, relu=0, out_signed=0, exp=0,
             mask=MaskMode.NONE):
    """LANE_CFG values: the output ``path``, the TPR ``phase``, the rescale settings (``m``,
    ``s``, ``relu``, ``out_signed``) and the log4 settings (GradScale ``exp``, ``mask``)."""
    return {"path": int(path), "phase": phase,
            "rescale": {"m": m, "s": s, "relu": relu, "out_signed": out_signed},
            "log4": {"exp": exp, "mask": int(mask)}}


@dataclass
class GemmPlan:
    a: Buffer
    b: Buffer
    out: Buffer
    mask: Buffer | None
    cfg: dict                 # GEMM_ARGS values
    uploads: list             # (Buffer, bytes)


def plan_gemm(gemm, lane, nib, rows, cols, base=0, mask_codes=None, a_pair=None,
              spacing=0):
    """Buffers from word ``base`` on for ``gemm`` (a :class:`~nibble.host.golden.tiling.Gemm`)
    with output lane settings ``lane`` (LANE_CFG values). ``a_pair=(pairs, sel)`` stores A as
    LOG4 pairs (the ``pairs`` M x L array of ``p0 | p1 << 4``) and reads nibble ``sel``.
    ``spacing`` extra words are left between buffers (and added to the strides)."""
    m, red, n = gemm.shape
    m_pad = -(-m // rows) * rows
    n_pad = -(-n // cols) * cols
    addr = base
    uploads = []

    def place(rows_, elems, en, values=None, stride_extra=0):
        nonlocal addr
        stride = row_words(elems, en, nib) + stride_extra
        buf = Buffer(addr, rows_, elems, en, stride)
        addr = buf.end + spacing
        if values is not None:
            uploads.append((buf, pack(values, en, nib, stride)))
        return buf

    if a_pair is not None:
        pairs = a_pair[0]
        a_buf = place(red, m_pad, 2, np.pad(np.asarray(pairs).T, ((0, 0), (0, m_pad - m))),
                      spacing)
    else:
        a_buf = place(red, m_pad, 1, np.pad(code_bits(gemm.a).T, ((0, 0), (0, m_pad - m))),
                      spacing)
    b_buf = place(red, n_pad, 1, np.pad(code_bits(gemm.b), ((0, 0), (0, n_pad - n))), spacing)
    path = OutputPath(lane["path"])
    out_buf = place(n, m, element_nibbles(path), None, spacing)
    mask_buf = None
    if path is OutputPath.LOG4 and lane["log4"]["mask"] != MaskMode.NONE:
        codes = np.zeros((m, n), np.int64) if mask_codes is None else np.asarray(mask_codes)
        mask_buf = place(n, m_pad, 1, np.pad(codes.T, ((0, 0), (0, m_pad - m))), spacing)
    cfg = gemm_args(a_buf, b_buf, out_buf, (m, red, n), gemm.a_kind, gemm.b_kind, lane,
                    a_sel=a_pair[1] if a_pair is not None else None, mask=mask_buf)
    return GemmPlan(a_buf, b_buf, out_buf, mask_buf, cfg, uploads)


def gemm_args(a, b, out, shape, a_kind, b_kind, lane, a_sel=None, mask=None):
    """GEMM_ARGS values for buffers already in device memory: ``a`` (A^T, LOG4 pairs read
    at nibble ``a_sel`` unless it is None), ``b``, ``out``, the optional ``mask`` codes, and
    ``shape`` = (M, L, N)."""
    m, red, n = shape
    return {
        "a_addr": a.addr, "a_stride": a.stride, "b_addr": b.addr, "b_stride": b.stride,
        "out_addr": out.addr, "out_stride": out.stride,
        "mask_addr": mask.addr if mask else 0, "mask_stride": mask.stride if mask else 0,
        "m": m, "l": red, "n": n,
        "a_pair": int(a_sel is not None), "a_sel": a_sel or 0,
        "operands": operand_cfg(a_kind, b_kind), "lane": lane,
    }


def _place(buf):
    """(addr, stride) of a :class:`Buffer` or of an ``(addr, stride)`` pair."""
    return (buf.addr, buf.stride) if isinstance(buf, Buffer) else tuple(buf)


def vector_args(op, rows, cols, a, b, c=None, pair=0, mu=0, m=0, s=0):
    """VEC_ARGS values for ``op`` (:class:`~nibble.rtl.formats.VecOp`) over ``rows`` x
    ``cols`` elements; ``a``, ``b`` (and UPDATE's ``c``, which shares ``b``'s stride) are
    :class:`Buffer` objects or ``(addr, stride)`` pairs. See :mod:`nibble.rtl.vector`."""
    (a_addr, a_stride), (b_addr, b_stride) = _place(a), _place(b)
    c_addr = 0 if c is None else (c if isinstance(c, int) else _place(c)[0])
    return {"op": int(VecOp(op)) if op in set(VecOp) else int(op), "pair": pair,
            "rows": rows, "cols": cols, "a_addr": a_addr, "a_stride": a_stride,
            "b_addr": b_addr, "b_stride": b_stride, "c_addr": c_addr, "mu": mu, "m": m,
            "s": s}


def program_entry(op, cfg, nib):
    """The bytes of a program entry (protocol ``PROGRAM_OPS``): the opcode, the command's
    arguments, zeros to a whole ``nib``-nibble word."""
    raw = bytes([int(op)]) + pack_fields(PROGRAM_OPS[op], cfg)
    wb = nib // 2
    return raw + bytes(-len(raw) % wb)


def program_params(op, cfg):
    """A GEMM's or VECTOR's settings (``PARAMS_FROM`` on) as a RUN's ``params``."""
    bits = int.from_bytes(pack_fields(PROGRAM_OPS[op], cfg), "little")
    return bits >> PARAMS_FROM[op]


def settings_zeroed(op, cfg):
    """``cfg`` with the settings a RUN gives (``PARAMS_FROM`` on) zeroed: what a stored
    program holds."""
    if op not in PARAMS_FROM:
        return cfg
    layout = PROGRAM_OPS[op]
    bits = int.from_bytes(pack_fields(layout, cfg), "little") & ((1 << PARAMS_FROM[op]) - 1)
    return unpack_fields(layout, bits.to_bytes(layout_bytes(layout), "little"))
