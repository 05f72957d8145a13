"""Stored programs (RUN), GATHER and FENCE (protocol v7) on ``emu://`` and on the RTL
(``pysim://`` with the SDRAM controller on the chip model): the same driver calls give the
same memory, SDRAM and statistics; a program's settings come from the RUN (v8: unless an
entry has its own); its statistics combine over its GEMMs and UPDATEs; a failing entry, a
resent RUN and bad lengths behave as the protocol says. ``gateware/stats.py`` alone at the end."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from nibble.gateware.protocol import GATHER_HEADER, RUN_ARGS, Op, longest_entry_words
from nibble.gateware.stats import SETTLE, CommandStats
from nibble.host.device.commands import (
    lane_cfg,
    plan_gemm,
    program_entry,
    program_params,
    vector_args,
)
from nibble.host.device.driver import (
    BadLengthError,
    Device,
    OutOfRangeError,
    UnknownOpError,
)
from nibble.host.device.packing import pack_fields
from nibble.host.golden.tiling import Gemm
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import MaskMode, Operand, OutputPath, VecOp

WORDS = 2048
URLS = (f"emu://?sdram=tiny&words={WORDS}", f"pysim://?sdram=tiny&words={WORDS}")
PROGRAM = 1600                          # where the tests store their programs


def store(dev, entries, at=PROGRAM):
    dev.write(at, b"".join(program_entry(op, cfg, dev.word_nibbles) for op, cfg in entries))
    return at


def zeroed(cfg):
    """A GEMM's arguments with its lane settings zeroed (the RUN gives them)."""
    return dict(cfg, lane=lane_cfg(OutputPath.RAW, m=0))


def script(dev, rng):
    """Two LOG4 GEMMs (masked, PACT) as one program between a DMA load of their operands
    and a DMA store of their results, their lane from the RUN; an UPDATE program of two
    parts; returns what they left and their combined STATS."""
    nib = dev.word_nibbles
    m, red, n = 8, 24, 16
    gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(-8, 8, (red, n)), Operand.INT4,
                Operand.INT4)
    lane = lane_cfg(OutputPath.LOG4, exp=1, mask=MaskMode.PACT)
    plan = plan_gemm(gemm, lane, nib, dev.rows, dev.cols, base=0,
                     mask_codes=rng.integers(0, 16, (m, n)))
    for buf, raw in plan.uploads:
        dev.write(buf.addr, raw)
    end = max(b.end for b in (plan.a, plan.b, plan.out, plan.mask))
    assert end <= 256
    dev.dma({"store": 1, "rows": 1, "bursts": 64, "mem_addr": 0, "ext_addr": 100})
    dev.write(0, bytes(256 * dev.word_bytes))          # the operands only in the SDRAM now
    second = dict(plan.cfg, out_addr=300)
    load = {"store": 0, "rows": 1, "bursts": 64, "mem_addr": 0, "mem_stride": 256,
            "ext_addr": 100, "ext_stride": 64}
    keep = {"store": 1, "rows": 1, "bursts": 64, "mem_addr": 256, "mem_stride": 256,
            "ext_addr": 400, "ext_stride": 64}
    at = store(dev, [(Op.DMA, load), (Op.GEMM, zeroed(plan.cfg)), (Op.GEMM, zeroed(second)),
                     (Op.FENCE, {}), (Op.DMA, keep)])
    gemms = dev.run(at, 5, program_params(Op.GEMM, plan.cfg))
    update = vector_args(VecOp.UPDATE, 8, 4, (600, 4), (700, 4), 800, mu=900, m=20000, s=18)
    dev.write(600, rng.integers(0, 256, 300 * dev.word_bytes, dtype=np.uint8).tobytes())
    halves = [dict(update, rows=4), dict(update, rows=4, a_addr=616, b_addr=716, c_addr=816)]
    at = store(dev, [(Op.VECTOR, dict(h, mu=0, m=0, s=0)) for h in halves])
    updates = dev.run(at, 2, program_params(Op.VECTOR, update))
    return (dev.read(0, 1000), dev.ext_read(400, 64, (1024, 512)), gemms["absmax"],
            gemms["clip_sum"], updates["w_sum_abs"], updates["w_sum_sq"])


def test_programs_on_the_device_match_the_emulator_and_the_commands_one_by_one():
    runs = []
    for url in URLS:
        with Device.open(url) as dev:
            runs.append(script(dev, np.random.default_rng(5)))
    assert runs[0][2:] == runs[1][2:]
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    # the same commands one by one on a device that holds them: the same results, and the
    # program's statistics are the two GEMMs' and the two UPDATE halves' combined
    rng = np.random.default_rng(5)
    with Device.open(URLS[0]) as dev:
        nib = dev.word_nibbles
        gemm = Gemm(rng.integers(-8, 8, (8, 24)), rng.integers(-8, 8, (24, 16)),
                    Operand.INT4, Operand.INT4)
        plan = plan_gemm(gemm, lane_cfg(OutputPath.LOG4, exp=1, mask=MaskMode.PACT), nib,
                         dev.rows, dev.cols, base=0, mask_codes=rng.integers(0, 16, (8, 16)))
        for buf, raw in plan.uploads:
            dev.write(buf.addr, raw)
        one, two = dev.gemm(plan.cfg), dev.gemm(dict(plan.cfg, out_addr=300))
        assert runs[0][2] == max(one["absmax"], two["absmax"])
        assert runs[0][3] == one["clip_sum"] + two["clip_sum"]
        assert dev.read(256, 64) == runs[0][1][:64 * dev.word_bytes]


@pytest.mark.parametrize("url", URLS)
def test_an_entry_with_settings_of_its_own_keeps_them(url):
    """A program of two kinds (protocol v8): a RAW GEMM (phase 1) stored with its own lane
    settings, then the UPDATE that takes its result, stored with its settings zeroed, run
    with the UPDATE's as the RUN's params: the GEMM keeps its own, the UPDATE takes the
    RUN's, and memory and SAWB sums equal the two commands sent one by one. (The params'
    low bits, ``mu``'s, would make the GEMM's lane a RESCALE one.)"""
    rng = np.random.default_rng(11)
    gemm = Gemm(rng.integers(-8, 8, (8, 16)), rng.integers(0, 16, (16, 8)), Operand.FP4,
                Operand.UINT4)
    state = rng.integers(0, 256, 300 * 4, dtype=np.uint8).tobytes()
    got = []
    for target in (url, URLS[0]):
        with Device.open(target) as dev:
            plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW, phase=1), dev.word_nibbles,
                             dev.rows, dev.cols, base=0)
            assert plan.out.end <= 600
            for buf, raw in plan.uploads:
                dev.write(buf.addr, raw)
            dev.write(600, state[:300 * dev.word_bytes])
            update = vector_args(VecOp.UPDATE, 8, 8, (plan.out.addr, plan.out.stride),
                                 (600, 8), 700, mu=1001, m=20000, s=18)
            if target == url:
                at = store(dev, [(Op.GEMM, plan.cfg),
                                 (Op.VECTOR, dict(update, mu=0, m=0, s=0))])
                st = dev.run(at, 2, program_params(Op.VECTOR, update))
            else:
                dev.gemm(plan.cfg)
                st = dev.vector(update)
            got.append((dev.read(0, 900), st["w_sum_abs"], st["w_sum_sq"]))
    assert got[0] == got[1]


@pytest.mark.parametrize("url", URLS)
def test_failing_entries_end_the_run(url):
    with Device.open(url) as dev:
        nib = dev.word_nibbles
        dev.write(PROGRAM, bytes([0x11]) + bytes(63))          # READ: not a program's
        with pytest.raises(UnknownOpError):
            dev.run(PROGRAM, 1)
        dev.write(PROGRAM, bytes([Op.RUN]) + bytes(63))        # nested
        with pytest.raises(UnknownOpError):
            dev.run(PROGRAM, 1)
        with pytest.raises(OutOfRangeError):                   # no entries
            dev.run(PROGRAM, 0)
        most = longest_entry_words(nib)
        store(dev, [(Op.FENCE, {})], WORDS - most)
        assert not dev.run(WORDS - most, 1)["busy"]           # the longest entry fits
        store(dev, [(Op.FENCE, {})], WORDS - most + 1)
        with pytest.raises(OutOfRangeError):                   # ... and does not
            dev.run(WORDS - most + 1, 1)
        bad = {"store": 0, "rows": 1, "bursts": 4, "mem_addr": WORDS - 2, "mem_stride": 16,
               "ext_addr": 0, "ext_stride": 4}
        ok = dict(bad, mem_addr=0)
        dev.write(0, bytes(16 * dev.word_bytes))
        dev.ext_write(0, bytes(range(64)), (512, 256))
        store(dev, [(Op.DMA, ok), (Op.DMA, bad), (Op.DMA, dict(ok, mem_addr=32))])
        with pytest.raises(OutOfRangeError):                   # the second fails: the first
            dev.run(PROGRAM, 3)                                # has run, the third not
        dev.wait()
        assert dev.read(0, 16) == bytes(range(64))
        assert dev.read(32, 16) == bytes(64)
        with pytest.raises(BadLengthError):
            dev.request(Op.RUN, pack_fields(RUN_ARGS, {"addr": 0, "entries": 1}) + b"\0")
        with pytest.raises(BadLengthError):
            dev.request(Op.FENCE, b"\0")
        assert dev.request(Op.FENCE) == b""


@pytest.mark.parametrize("url", URLS)
def test_a_resent_run_answers_its_stats_and_runs_once(url):
    """An UPDATE program sent twice with one seq (a host retry after a lost reply): the
    second gets the same STATS and the masters are updated once (as by one RUN on
    ``emu://``)."""
    after = []
    for where in (url, URLS[0]):
        with Device.open(where) as dev:
            rng = np.random.default_rng(2)
            dev.write(0, rng.integers(0, 256, 200 * dev.word_bytes, dtype=np.uint8).tobytes())
            cfg = vector_args(VecOp.UPDATE, 4, 4, (0, 4), (50, 4), 100, mu=900, m=20000, s=18)
            at = store(dev, [(Op.VECTOR, cfg)])
            first = dev.run(at, 1, program_params(Op.VECTOR, cfg))
            if where == url:
                dev._seq = (dev._seq - 1) & 0xFF                   # the same seq again
                again = dev.run(at, 1, program_params(Op.VECTOR, cfg))
                assert (again["w_sum_abs"], again["w_sum_sq"]) == (first["w_sum_abs"],
                                                                   first["w_sum_sq"])
            after.append(dev.read(50, 40))
    assert after[0] == after[1]


@pytest.mark.parametrize("url", URLS)
def test_gather_loads_rows_from_scattered_bursts(url):
    with Device.open(url) as dev:
        wb = dev.word_bytes
        rng = np.random.default_rng(3)
        sdram = rng.integers(0, 256, 256 * 16, dtype=np.uint8).tobytes()
        dev.ext_write(0, sdram, (1024, 512))
        dev.write(0, bytes(400 * wb))
        rows = [17, 3, 250, 3, 100]
        dev.gather(40, 24, 2, rows)                            # 2 bursts a row, 24 words apart
        dev.wait()
        got = dev.read(0, 400)
        wpb = 16 // wb
        for k, r in enumerate(rows):
            at = (40 + 24 * k) * wb
            assert got[at:at + 32] == sdram[r * 16:r * 16 + 32]
        assert got[:40 * wb] == bytes(40 * wb)
        head = pack_fields(GATHER_HEADER, {"mem_addr": 0, "mem_stride": 8, "bursts": 2,
                                           "count": 2})
        with pytest.raises(BadLengthError):
            dev.request(Op.GATHER, head + bytes(5))
        with pytest.raises(OutOfRangeError):                   # past the SDRAM's end
            dev.gather(0, 8, 2, [2047])
        with pytest.raises(OutOfRangeError):
            dev.gather(WORDS - wpb, 8, 2, [0])                 # past the scratchpad's
        dev.wait()


def test_programs_need_an_sdram():
    with Device.open("emu://?words=4096&sdram=") as dev:
        for op in (Op.RUN, Op.GATHER, Op.FENCE):
            with pytest.raises(UnknownOpError):
                dev.request(op, b"")


def test_command_stats_replace_or_combine():
    """gateware/stats.py: outside a program each unit's statistics replace the last's;
    inside one they combine (absmax the largest, the sums added) from the first unit
    that ends in it; an UPDATE's sums only from UPDATEs; ``settled`` low meanwhile."""
    dut = CommandStats()
    seen = []

    async def bench(ctx):
        async def end_gemm(absmax, clip):
            ctx.set(dut.gemm_busy, 1)
            await ctx.tick()
            ctx.set(dut.absmax, absmax)
            ctx.set(dut.clip_sum, clip)
            ctx.set(dut.gemm_busy, 0)
            await ctx.tick()
            assert not ctx.get(dut.settled)
            await ctx.tick().repeat(SETTLE + 1)
            assert ctx.get(dut.settled)
            return ctx.get(dut.o_absmax), ctx.get(dut.o_clip_sum)

        async def end_vec(update, s):
            ctx.set(dut.update, update)
            ctx.set(dut.vec_busy, 1)
            await ctx.tick()
            ctx.set(dut.w_sum_abs, s)
            ctx.set(dut.vec_busy, 0)
            await ctx.tick().repeat(SETTLE + 2)
            return ctx.get(dut.o_w_sum_abs)

        seen.append(await end_gemm(5, -3))
        seen.append(await end_gemm(2, 7))                  # replaces
        ctx.set(dut.begin, 1)
        ctx.set(dut.program, 1)
        await ctx.tick()
        ctx.set(dut.begin, 0)
        seen.append(await end_gemm(4, 10))                 # the program's first
        seen.append(await end_gemm(9, -1))                 # combines
        seen.append(await end_gemm(1, 100))
        seen.append(await end_vec(0, 77))                  # not an UPDATE: kept
        seen.append(await end_vec(1, 11))
        seen.append(await end_vec(1, 30))
        ctx.set(dut.program, 0)
        seen.append(await end_vec(1, 6))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert seen == [(5, -3), (2, 7), (4, 10), (9, 9), (9, 109), 0, 11, 41, 6]


def test_a_programs_transfers_run_beside_its_unit():
    """A RUN of a REQUANT and then a DMA load and store (on ``pysim://``): the decoder
    fetches the next entries, and the DMA stores, through the read port the REQUANT does
    not read, so the transfers run while it does and the RUN ends sooner than the three
    alone one after the other (on the port REQUANT reads, the entries waited for it)."""
    with Device.open(URLS[1]) as dev:
        rng = np.random.default_rng(3)
        dev.write(0, rng.integers(0, 256, 1024 * dev.word_bytes, dtype=np.uint8).tobytes())
        requant = vector_args(VecOp.REQUANT, 16, 64, (0, 64), (1024, 8), m=30000, s=20)
        load = {"store": 0, "rows": 1, "bursts": 64, "mem_addr": 1200, "mem_stride": 256,
                "ext_addr": 0, "ext_stride": 64}
        keep = dict(load, store=1, ext_addr=100)
        alone = dev.vector(requant)["vec_cycles"]
        for dma in (load, keep):
            dev.dma(dma)
            alone += dev.stats()["dma_cycles"]
        codes = dev.read(1024, 128)
        dev.write(1024, bytes(128 * dev.word_bytes))
        at = store(dev, [(Op.VECTOR, dict(requant, m=0, s=0)), (Op.DMA, load), (Op.DMA, keep)])
        before = dev.stats()["cycles"]
        run = dev.run(at, 3, program_params(Op.VECTOR, requant))
        assert dev.read(1024, 128) == codes
        assert run["cycles"] - before < alone


def test_a_beside_entry_starts_its_unit_while_a_dma_runs():
    """BESIDE (protocol v9): the next GEMM starts while the DMA store before it runs, where
    a GEMM alone waits for every DMA sent before it: the same memory and SDRAM, in fewer
    cycles on ``pysim://``; the entry alone in a program changes nothing, and outside a RUN
    it is UNKNOWN_OP."""
    rng = np.random.default_rng(8)
    got = {}
    for url in URLS:
        for beside in (False, True):
            with Device.open(url) as dev:
                gemm = Gemm(rng.integers(-8, 8, (8, 64)), rng.integers(-8, 8, (64, 16)),
                            Operand.INT4, Operand.INT4)
                plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW), dev.word_nibbles, dev.rows,
                                 dev.cols, base=0)
                for buf, raw in plan.uploads:
                    dev.write(buf.addr, raw)
                dev.write(1000, rng.integers(0, 256, 512 * dev.word_bytes,
                                             dtype=np.uint8).tobytes())
                keep = {"store": 1, "rows": 1, "bursts": 128, "mem_addr": 1000,
                        "mem_stride": 512, "ext_addr": 300, "ext_stride": 128}
                entries = [(Op.DMA, keep), *([(Op.BESIDE, {})] if beside else []),
                           (Op.GEMM, zeroed(plan.cfg)), (Op.BESIDE, {}), (Op.FENCE, {})]
                at = store(dev, entries)
                before = dev.stats()["cycles"]
                run = dev.run(at, len(entries), program_params(Op.GEMM, plan.cfg))
                got[url, beside] = (dev.read(plan.out.addr, plan.out.words),
                                    dev.ext_read(300, 128, (1024, 512)),
                                    run["cycles"] - before)
                with pytest.raises(UnknownOpError):
                    dev.request(Op.BESIDE)
            rng = np.random.default_rng(8)
    assert len({v[:2] for v in got.values()}) == 1
    assert got[URLS[1], True][2] < got[URLS[1], False][2]


def test_a_program_ending_on_beside_leaves_the_next_gemm_waiting():
    """A program whose last entry is BESIDE: its effect ends with the RUN, so the GEMM the
    link sends next still waits for a GATHER's load of its operands sent before it (a
    GATHER answers once its last load has started), and multiplies what the load brought
    (on the RTL as on ``emu://``); started beside the load it would read the operands the
    load was overwriting."""
    rng = np.random.default_rng(9)
    shapes = ((8, 64), (64, 16))
    new = Gemm(rng.integers(-8, 8, shapes[0]), rng.integers(-8, 8, shapes[1]),
               Operand.INT4, Operand.INT4)
    old = Gemm(rng.integers(-8, 8, shapes[0]), rng.integers(-8, 8, shapes[1]),
               Operand.INT4, Operand.INT4)
    got = []
    for url in URLS:
        with Device.open(url) as dev:
            nib = dev.word_nibbles
            wpb = words_per_burst(nib)
            # the operands last in a long load: it starts at word 0
            plans = [plan_gemm(g, lane_cfg(OutputPath.RAW), nib, dev.rows, dev.cols,
                               base=1024) for g in (new, old)]
            hi = max(plans[0].a.end, plans[0].b.end)
            assert plans[0].out.addr >= hi and PROGRAM >= plans[0].out.end
            load = {"store": 0, "rows": 1, "bursts": -(-hi // wpb), "mem_addr": 0,
                    "ext_addr": 400}
            for plan, op in zip(plans, ("store", None), strict=True):
                for buf, raw in plan.uploads:
                    dev.write(buf.addr, raw)
                if op:                            # the new operands in the SDRAM
                    dev.dma(dict(load, store=1))
            at = store(dev, [(Op.BESIDE, {})])
            dev.run(at, 1, program_params(Op.GEMM, plans[1].cfg))
            dev.gather(0, 0, load["bursts"], [load["ext_addr"]])   # (its loads not waited
            dev.gemm(plans[1].cfg)                                  # for: the GEMM's job)
            got.append(dev.read(plans[1].out.addr, plans[1].out.words))
    assert got[0] == got[1]
    with Device.open(URLS[0]) as dev:                     # and that is the new product
        plan = plan_gemm(new, lane_cfg(OutputPath.RAW), dev.word_nibbles, dev.rows,
                         dev.cols, base=1024)
        for buf, raw in plan.uploads:
            dev.write(buf.addr, raw)
        dev.gemm(plan.cfg)
        assert dev.read(plan.out.addr, plan.out.words) == got[0]


def test_a_requant_entry_takes_the_runs_requant_settings():
    """(v10) A program of an UPDATE and a REQUANT of its new masters, both without
    settings: the UPDATE takes the RUN's ``params``, the REQUANT its ``requant`` (with
    ``requant`` 0 the REQUANT takes ``params`` too, as before): the same memory and SAWB
    sums on the RTL as on ``emu://``, and as the two commands sent with their own."""
    rng = np.random.default_rng(11)
    rows, cols = 8, 16
    w8 = cols                                        # a master a word
    update = vector_args(VecOp.UPDATE, rows, cols, (0, w8), (200, w8), 400, mu=60000,
                         m=20000, s=12)
    requant = vector_args(VecOp.REQUANT, rows, cols, (200, w8), (600, 2), m=30000, s=28)
    words = np.concatenate([rng.integers(-1 << 12, 1 << 12, 200),    # gradients
                            rng.integers(-1 << 16, 1 << 16, 200),    # masters (codes -7..7)
                            rng.integers(-1 << 12, 1 << 12, 200),    # momenta
                            rng.integers(-1 << 31, 1 << 31, 100)])
    image = words.astype("<i4").tobytes()
    got = {}
    for url in URLS:
        for how in ("own", "run", "params"):
            with Device.open(url) as dev:
                dev.write(0, image[:700 * dev.word_bytes])
                if how == "own":
                    sums = dev.vector(update)
                    dev.vector(requant)
                else:
                    at = store(dev, [(Op.VECTOR, dict(update, mu=0, m=0, s=0)),
                                     (Op.VECTOR, dict(requant, mu=0, m=0, s=0))])
                    sums = dev.run(at, 2, program_params(Op.VECTOR, update),
                                   requant=program_params(Op.VECTOR, requant)
                                   if how == "run" else 0)
                got[url, how] = (dev.read(0, 700), sums["w_sum_abs"], sums["w_sum_sq"])
    for how in ("own", "run", "params"):
        assert got[URLS[0], how] == got[URLS[1], how]
    assert got[URLS[0], "run"] == got[URLS[0], "own"]
    assert got[URLS[0], "params"][0][:600 * 4] == got[URLS[0], "own"][0][:600 * 4]
    assert got[URLS[0], "params"][0] != got[URLS[0], "own"][0]     # other codes


def test_runs_sent_without_waiting_equal_runs_one_by_one():
    """Three UPDATE programs sent back to back (``Device.post``: the later frames wait in
    the RTL's receive path while a RUN runs), then a READ: the same masters and the same
    STATS for each as RUNs sent one after the other, on the RTL and on ``emu://``."""
    results = []
    for url, posted in ((URLS[1], True), (URLS[0], True), (URLS[0], False)):
        with Device.open(url) as dev:
            assert dev.pipeline
            rng = np.random.default_rng(4)
            dev.write(0, rng.integers(0, 256, 200 * dev.word_bytes, dtype=np.uint8).tobytes())
            cfgs = [vector_args(VecOp.UPDATE, 4, 4, (0, 4), (50, 4), 100, mu=900 + k,
                                m=20000, s=18) for k in range(3)]
            at = store(dev, [(Op.VECTOR, dict(cfgs[0], mu=0, m=0, s=0))])
            runs = [dev.run(at, 1, program_params(Op.VECTOR, c), wait=not posted)
                    for c in cfgs]
            if posted:
                assert len(dev._in_flight) == 3
                runs = [r.result() for r in runs]
            results.append(([(r["w_sum_abs"], r["w_sum_sq"]) for r in runs],
                            dev.read(50, 40)))
    assert results[0] == results[1] == results[2]
