"""Host-side packing of the gateware's ``data.StructLayout`` payloads (little-endian).

The layouts are defined once, in the gateware (:mod:`gateware.protocol`, :mod:`rtl.engine`);
these helpers turn nested dicts of field values into payload bytes and back.
"""

from amaranth.lib import data

__all__ = ["pack_fields", "to_int", "unpack_fields"]


def to_int(layout, values):
    """The integer a layout holds for nested ``values`` (missing fields are 0)."""
    word = 0
    for name, field in layout:
        if name not in values:
            continue
        shape = field.shape
        value = values[name]
        if isinstance(shape, data.Layout):
            v = to_int(shape, value)
        else:
            v = int(value) & ((1 << field.width) - 1)
            if int(value) >> field.width not in (0, -1):
                raise ValueError(f"{name}={value} does not fit {field.width} bits")
        word |= v << field.offset
    return word


def from_int(layout, word):
    out = {}
    for name, field in layout:
        v = (word >> field.offset) & ((1 << field.width) - 1)
        shape = field.shape
        if isinstance(shape, data.Layout):
            out[name] = from_int(shape, v)
        else:
            if getattr(shape, "signed", False) and v >> (field.width - 1):
                v -= 1 << field.width
            out[name] = v
    return out


def pack_fields(layout, values):
    return to_int(layout, values).to_bytes((layout.size + 7) // 8, "little")


def unpack_fields(layout, raw):
    return from_int(layout, int.from_bytes(bytes(raw), "little"))
