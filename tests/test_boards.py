"""Board tops elaborate for every board, and the board commands fail with one clear line."""

import subprocess
import sys

import pytest

from nibble.gateware.boards import BOARDS, BoardError, BoardTop, resolve


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
