"""Host-side packing of the gateware's ``data.StructLayout`` payloads (little-endian).

The layouts are defined once, in the gateware (:mod:`gateware.protocol`, :mod:`rtl.engine`);
these helpers turn nested dicts of field values into payload bytes and back.
"""

import functools

from amaranth.lib import data

from nibble.gateware.protocol import layout_bytes

__all__ = ["pack_fields", "to_int", "unpack_fields"]


@functools.cache
def _fields(layout):
    """``(name, offset, width, signed, sublayout or None)`` of each field of ``layout``;
    remembered, since ``data.Layout`` works its offsets and widths out again on every
    access (packing a step's program entries asked a quarter of a million times: most of
    the host's time on the ULX3S configuration)."""
    return tuple((name, f.offset, f.width, bool(getattr(f.shape, "signed", False)),
                  f.shape if isinstance(f.shape, data.Layout) else None) for name, f in layout)


def to_int(layout, values):
    """The integer a layout holds for nested ``values`` (missing fields are 0)."""
    word = 0
    for name, offset, width, _, sub in _fields(layout):
        if name not in values:
            continue
        value = values[name]
        if sub is not None:
            v = to_int(sub, value)
        else:
            v = int(value) & ((1 << width) - 1)
            if int(value) >> width not in (0, -1):
                raise ValueError(f"{name}={value} does not fit {width} bits")
        word |= v << offset
    return word


def from_int(layout, word):
    out = {}
    for name, offset, width, signed, sub in _fields(layout):
        v = (word >> offset) & ((1 << width) - 1)
        if sub is not None:
            out[name] = from_int(sub, v)
        else:
            if signed and v >> (width - 1):
                v -= 1 << width
            out[name] = v
    return out


def pack_fields(layout, values):
    return to_int(layout, values).to_bytes(layout_bytes(layout), "little")


def unpack_fields(layout, raw):
    return from_int(layout, int.from_bytes(bytes(raw), "little"))
