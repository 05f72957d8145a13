"""The docs' generated sections are current: protocol tables match the layouts."""

import re
from pathlib import Path

import pytest

from nibble.gateware.protocol import DMA_ARGS, GEMM_ARGS, VEC_ARGS, Op, layout_bytes
from nibble.host.device.driver import BadLengthError, Device, OutOfRangeError
from nibble.host.docs import protocol_sections

ROOT = Path(__file__).resolve().parent.parent


def section(text, name):
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert m, f"no section {name}"
    return m.group(1)


def test_protocol_doc_is_generated_from_the_layouts():
    """docs/protocol.md holds exactly what `nibble docs` renders (run it after a layout
    changes)."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for name, text in protocol_sections().items():
        assert section(doc, name).strip() == text.strip(), f"run `nibble docs`: {name}"


@pytest.mark.parametrize("op,name,layout", [(Op.GEMM, "GEMM_ARGS", GEMM_ARGS),
                                            (Op.VECTOR, "VEC_ARGS", VEC_ARGS),
                                            (Op.DMA, "DMA_ARGS", DMA_ARGS)])
def test_documented_sizes_are_the_accepted_sizes(op, name, layout):
    """The emulator (and the RTL, tests/test_device.py) takes exactly the layout's bytes."""
    n = layout_bytes(layout)
    assert f"`{name}` ({n} bytes)" in protocol_sections()["protocol-requests"]
    with Device.open("emu://", retries=0) as dev:
        for wrong in (n - 1, n + 1):
            with pytest.raises(BadLengthError):
                dev.request(op, bytes(wrong))
        with pytest.raises(OutOfRangeError):      # the right length: all-zero dims
            dev.request(op, bytes(n))
