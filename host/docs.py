"""The generated parts of the docs: the protocol's request table and its payload layouts.

Payload sizes and field tables written by hand drift from the layouts (the VECTOR payload was
documented as 24 bytes while it packs to 23). ``nibble docs`` rewrites the marked sections of
``docs/protocol.md`` from the layouts themselves, and ``tests/test_docs.py`` fails when the
committed file differs from what this module renders.
"""

import enum
from pathlib import Path

from amaranth.hdl import Shape
from amaranth.lib import data

from nibble.gateware.protocol import (
    DMA_ARGS,
    GATHER_HEADER,
    GEMM_ARGS,
    INFO_LAYOUT,
    MAX_PAYLOAD,
    READ_ARGS,
    RUN_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VEC_ARGS,
    WRITE_HEADER,
    Op,
    layout_bytes,
)
from nibble.host.report import update_doc_section

__all__ = ["LAYOUTS", "layout_table", "protocol_sections", "update_protocol_doc"]

#: Every payload layout, by the name the docs and the code use.
LAYOUTS = {"INFO_LAYOUT": INFO_LAYOUT, "WRITE_HEADER": WRITE_HEADER, "READ_ARGS": READ_ARGS,
           "STATS_ARGS": STATS_ARGS, "STATS_LAYOUT": STATS_LAYOUT, "GEMM_ARGS": GEMM_ARGS,
           "VEC_ARGS": VEC_ARGS, "DMA_ARGS": DMA_ARGS, "RUN_ARGS": RUN_ARGS,
           "GATHER_HEADER": GATHER_HEADER}


def _size(name):
    return f"`{name}` ({layout_bytes(LAYOUTS[name])} bytes)"


#: (op, payload, reply payload) of each request.
REQUESTS = [
    (Op.PING, f"anything (up to {MAX_PAYLOAD} bytes)", "the same bytes"),
    (Op.INFO, "none", _size("INFO_LAYOUT")),
    (Op.WRITE, f"{_size('WRITE_HEADER')}, then whole words", "none"),
    (Op.READ, f"{_size('READ_ARGS')}; at most {MAX_PAYLOAD} bytes of words (with `low16`, "
     f"{2 * MAX_PAYLOAD})", "the words (with `low16`, the low 2 of every 4 bytes)"),
    (Op.GEMM, _size("GEMM_ARGS"), "none: the engine has checked the arguments and runs on"),
    (Op.STATS, f"none, or {_size('STATS_ARGS')} (a device with SDRAM only: BAD_LENGTH "
     "without)", _size("STATS_LAYOUT")),
    (Op.VECTOR, _size("VEC_ARGS"),
     "none: the element-wise unit has checked the arguments and runs on"),
    (Op.DMA, _size("DMA_ARGS"),
     "none: the DMA has checked both regions and runs on (a device with SDRAM only; "
     "UNKNOWN_OP without)"),
    (Op.RUN, _size("RUN_ARGS"),
     f"{_size('STATS_LAYOUT')} once the program has ended: its GEMMs' and UPDATEs' "
     "statistics combined (a device with SDRAM only)"),
    (Op.GATHER, f"{_size('GATHER_HEADER')}, then `count` burst addresses of 3 bytes",
     "none: the last row's DMA LOAD has been checked and runs on (a device with SDRAM only)"),
    (Op.FENCE, "none", "none, once every unit has ended (a device with SDRAM only)"),
    (Op.BESIDE, "none; a program's entry only (UNKNOWN_OP as a request)",
     "none: the next GEMM or VECTOR entry starts while a DMA runs"),
]


def _kind(shape):
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        return f"`{shape.__name__}` ({', '.join(f'{m.name} {m.value}' for m in shape)})"
    s = Shape.cast(shape)
    return "signed" if s.signed else "unsigned"


def _fields(layout, prefix="", base=0):
    for name, field in layout:
        if isinstance(field.shape, data.StructLayout):
            yield from _fields(field.shape, f"{prefix}{name}.", base + field.offset)
        else:
            yield f"{prefix}{name}", base + field.offset, field.width, _kind(field.shape)


def layout_table(layout):
    """A markdown table of a layout's fields: name, bits, first bit (byte.bit), kind."""
    rows = ["| field | bits | at (byte.bit) | kind |", "|---|---|---|---|"]
    for name, offset, width, kind in _fields(layout):
        rows.append(f"| `{name}` | {width} | {offset // 8}.{offset % 8} | {kind} |")
    return "\n".join(rows) + "\n"


def protocol_sections():
    """{section name: markdown} for ``docs/protocol.md``."""
    req = ["| op | name | payload | reply payload |", "|---|---|---|---|"]
    for op, payload, reply in REQUESTS:
        req.append(f"| 0x{op.value:02X} | {op.name} | {payload} | {reply} |")
    layouts = []
    for name, layout in LAYOUTS.items():
        layouts.append(f"#### `{name}`: {layout_bytes(layout)} bytes ({layout.size} bits)\n\n"
                       + layout_table(layout))
    return {"protocol-requests": "\n".join(req) + "\n", "protocol-layouts": "\n".join(layouts)}


def update_protocol_doc(path="docs/protocol.md"):
    for name, text in protocol_sections().items():
        update_doc_section(path, name, text)
    return Path(path)
