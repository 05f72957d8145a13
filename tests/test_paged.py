"""Training state in the SDRAM (host/device/paged.py): a device whose scratchpad is far too
small trains bit-identically to one whose block RAM holds everything, and the paging's own
parts (unaligned host writes, GEMMs split along N, VECTORs split along rows) are exact."""

import collections

import numpy as np
import pytest

from nibble.gateware.protocol import Op
from nibble.host.device.commands import lane_cfg, plan_gemm, vector_args
from nibble.host.device.driver import Device
from nibble.host.device.paged import PagedDevice
from nibble.host.golden.tiling import Gemm
from nibble.host.training import datasets
from nibble.host.training.device import DeviceTrainConfig
from nibble.host.training.session import Session
from nibble.rtl.formats import MaskMode, Operand, OutputPath, VecOp

SMALL = "emu://?words=1024&sdram=is42s16160"        # 4 KB of scratchpad, 32 MB of SDRAM


@pytest.mark.parametrize("small, hidden", [(SMALL, 32), ("emu://?words=16384&sdram=is42s16160",
                                                          320)],
                         ids=["host-driven", "programs"])
def test_a_model_in_the_sdram_trains_bit_identically(small, hidden):
    """Paged through 4 KB of scratchpad (every part sent by the host), or through 64 KB
    with a program area (RUNs; each backward-weight GEMM fused with its UPDATE)."""
    data = datasets.load("digits")
    cfg = DeviceTrainConfig(sizes=[64, hidden, 10], batch_size=16, seed=3)
    runs = []
    for url in ("emu://?words=524288", small):
        with Device.open(url) as dev:
            session = Session(dev, data, cfg, 1)
            session.run(progress=False, max_steps=12)
            runs.append((session.losses, session.mlp.masters(), session.mlp.weight_codes(),
                         session.mlp.paged, getattr(session.mlp.dev, "counters", None),
                         getattr(session.mlp.dev, "by_op", None)))
    (l0, (w0, v0), c0, p0, _, _), (l1, (w1, v1), c1, p1, counters, by_op) = runs
    assert not p0 and p1
    assert l0 == l1 and len(l0) == 12
    for a, b in zip([*w0, *v0, *c0], [*w1, *v1, *c1], strict=True):
        assert np.array_equal(a, b)
    assert counters["split_commands"] >= counters["overlapped_commands"] > 0
    assert counters["dma_stores"] > 0
    assert (counters["runs"] > 0) == (small != SMALL)
    # (with programs, protocol v10: each part's new masters requantized in the scratchpad)
    assert ("GEMM+UPDATE+REQUANT store" in by_op) == (small != SMALL)


def test_posted_commands_train_as_waited_ones_and_overlap():
    """A paged device's commands are sent without waiting for the replies the step does
    not need yet (``DeviceMLP.posting``): the same losses and state as with every reply
    waited for, the same counters, and RUNs sent while earlier ones are unanswered; the
    step waits for the logits only (a REQUANT's scale comes from the sums of the step
    before), and the next batch is gathered (and transposed) while the host computes the
    loss."""
    data = datasets.load("digits")
    cfg = DeviceTrainConfig(sizes=[64, 320, 10], batch_size=16, seed=3)
    runs = []
    for posting in (False, True):
        with Device.open("emu://?words=16384&sdram=is42s16160") as dev:
            session = Session(dev, data, cfg, 1)
            session.run(progress=False, max_steps=2)
            session.mlp.posting = posting
            trace = dev.start_trace()
            session.run(progress=False, max_steps=3)
            c = session.mlp.counters
            runs.append((session.losses, session.mlp.masters(), session.mlp.weight_codes(),
                         # (GEMMs are counted as their replies are taken)
                         (c["gemm_cycles"], c["vec_cycles"], sorted(c["gemms"])), trace))
    (l0, (w0, v0), c0, n0, t0), (l1, (w1, v1), c1, n1, t1) = runs
    assert l0 == l1 and n0 == n1
    for a, b in zip([*w0, *v0, *c0], [*w1, *v1, *c1], strict=True):
        assert np.array_equal(a, b)

    def most_unanswered_runs(trace):
        open_, most = set(), 0
        for kind, p, _ in trace:
            if p.op == Op.RUN:
                (open_.add if kind == "send" else open_.discard)(id(p))
                most = max(most, len(open_))
        return most

    assert most_unanswered_runs(t0) == 1
    assert most_unanswered_runs(t1) >= 4

    def gathers_while_the_loss_is_computed(trace):
        """The next batch's GATHER sent between the logits' READs and the gradient's
        WRITE."""
        ops = [p.op for kind, p, _ in trace if kind == "send"]
        read = ops.index(Op.READ)
        return Op.GATHER in ops[read:ops.index(Op.WRITE, read)]

    assert not gathers_while_the_loss_is_computed(t0)
    assert gathers_while_the_loss_is_computed(t1)
    assert sum(k == "send" for k, *_ in t0) == sum(k == "send" for k, *_ in t1)


@pytest.fixture(params=[(SMALL, 0), (SMALL.replace("1024", "2048"), 1024)],
                ids=["host-driven", "programs"])
def pair(request):
    """A paged small device, 1,024 words of scratchpad (the host sending every part, or
    RUNs of stored programs from a program area of 1,024 words more), and a big one."""
    url, program_words = request.param
    with Device.open(url) as small, Device.open("emu://?words=65536&sdram=") as big:
        yield PagedDevice(small, program_words=program_words), big


def test_host_writes_and_reads_at_any_word(pair):
    paged, big = pair
    rng = np.random.default_rng(1)
    for _ in range(20):
        addr, n = int(rng.integers(0, 5000)), int(rng.integers(1, 900))
        data = rng.integers(0, 256, n * paged.word_bytes, dtype=np.uint8).tobytes()
        paged.write(addr, data)
        big.write(addr, data)
    assert paged.read(0, 6000) == big.read(0, 6000)


@pytest.mark.parametrize("pair", [(SMALL.replace("1024", "2048"), 1024)], indirect=True,
                         ids=["programs"])
def test_a_shape_is_planned_once_and_run_with_each_commands_settings(pair):
    """The second GEMM and UPDATE of a shape reuse its plan and its stored program (one plan
    and one program each), with their own settings: the same memory and statistics as on
    the big device, whose results differ from the first commands'."""
    paged, big = pair
    rng = np.random.default_rng(5)
    m, red, n = 16, 40, 640
    gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(-8, 8, (red, n)), Operand.INT4,
                Operand.INT4)
    base = rng.integers(0, 256, 6000 * paged.word_bytes, dtype=np.uint8).tobytes()
    for dev in (paged, big):
        dev.write(0, base)
    got = [[], []]
    for exp, (mu, mm, s) in ((2, (900, 20000, 18)), (5, (1200, 31000, 17))):
        plan = plan_gemm(gemm, lane_cfg(OutputPath.LOG4, exp=exp, mask=MaskMode.PACT),
                         paged.word_nibbles, paged.rows, paged.cols,
                         mask_codes=rng.integers(0, 16, (m, n)), base=100)
        for dev, out in zip((paged, big), got, strict=True):
            for buf, raw in plan.uploads:
                dev.write(buf.addr, raw)
            st = dev.gemm(plan.cfg)
            upd = dev.vector(vector_args(VecOp.UPDATE, 300, 4, (0, 4), (1300, 4), 2500,
                                         mu=mu, m=mm, s=s))
            out.append((dev.read(0, 6000), st["absmax"], st["clip_sum"],
                        upd["w_sum_abs"], upd["w_sum_sq"]))
    assert got[0] == got[1] and got[1][0] != got[1][1]
    assert len(paged._plans) == 2 and paged.counters["programs_stored"] == 2
    assert paged.counters["runs"] == 4


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("path", [OutputPath.RAW, OutputPath.LOG4])
def test_split_commands_equal_whole_ones(pair, path, overlap):
    """A GEMM too big for the scratchpad (split along N) and an UPDATE (split along rows)
    leave the same memory and statistics as on a device that holds them whole, their parts
    double-buffered in the scratchpad's halves or one after the other."""
    paged, big = pair
    paged.overlap = overlap
    rng = np.random.default_rng(int(path))
    m, red, n = 16, 40, 640
    gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(-8, 8, (red, n)), Operand.INT4,
                Operand.INT4)
    lane = lane_cfg(path, exp=2, mask=MaskMode.PACT) if path is OutputPath.LOG4 else \
        lane_cfg(path)
    plan = plan_gemm(gemm, lane, paged.word_nibbles, paged.rows, paged.cols,
                     mask_codes=rng.integers(0, 16, (m, n)), base=100)
    words = max(b.end for b in (plan.a, plan.b, plan.out, plan.mask) if b is not None)
    base = rng.integers(0, 256, words * paged.word_bytes, dtype=np.uint8).tobytes()
    got = []
    for dev in (paged, big):
        dev.write(0, base)
        for buf, raw in plan.uploads:
            dev.write(buf.addr, raw)
        st = dev.gemm(plan.cfg)
        upd = dev.vector(vector_args(VecOp.UPDATE, 300, 4, (0, 4), (1300, 4), 2500, mu=900,
                                     m=20000, s=18))
        got.append((dev.read(0, words), st["absmax"], st["clip_sum"], upd["w_sum_abs"],
                    upd["w_sum_sq"]))
    assert got[0] == got[1]
    assert paged.counters["runs"] == (2 if paged.scratch < paged.dev.mem_words else 0)
    assert paged.counters["split_commands"] == 2
    assert paged.counters["overlapped_commands"] == (2 if overlap else 0)


def test_a_command_that_fits_runs_in_overlapped_parts_in_a_program(pair):
    """A GEMM that fits the scratchpad whole, but not a quarter of it: in a program it runs
    in overlapped parts of at most a quarter (its first part's loads before it, the rest
    beside), host-driven whole; the same memory and statistics either way."""
    paged, big = pair
    rng = np.random.default_rng(11)
    m, red, n = 16, 40, 96
    gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(-8, 8, (red, n)), Operand.INT4,
                Operand.INT4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RESCALE, m=40000, s=14), paged.word_nibbles,
                     paged.rows, paged.cols, base=100)
    assert paged._fits("gemm", plan.cfg, paged.scratch)
    got = []
    for dev in (paged, big):
        for buf, raw in plan.uploads:
            dev.write(buf.addr, raw)
        st = dev.gemm(plan.cfg)
        got.append((dev.read(plan.out.addr, plan.out.words), st["absmax"]))
    assert got[0] == got[1]
    programs = paged.scratch < paged.dev.mem_words
    assert paged.counters["split_commands"] == paged.counters["overlapped_commands"] == programs
    parts, _ = paged._parts("gemm", plan.cfg)
    assert (len(parts) > 1) == programs


def test_overlapped_parts_never_share_a_written_burst(pair):
    """A REQUANT whose codes rows are half a burst apart: split at an odd row, two parts
    would write one burst, and overlapped the later part's load would bring back the earlier
    part's stale half. The split keeps neighbours' written bursts apart, and the result is
    the whole command's."""
    paged, big = pair
    cfg = vector_args(VecOp.REQUANT, 32, 10, (6556, 36), (6400, 2), m=46189, s=36)
    data = np.random.default_rng(0).integers(0, 256, 8000 * paged.word_bytes,
                                             dtype=np.uint8).tobytes()
    for dev in (paged, big):
        dev.write(0, data)
        dev.vector(cfg)
    assert paged.read(0, 8000) == big.read(0, 8000)
    parts, overlap = paged._parts("vector", cfg)
    assert overlap and len(parts) > 1 and paged._apart("vector", parts)


@pytest.mark.parametrize("m", [16, 5])
def test_an_output_written_whole_is_stored_not_loaded(pair, m):
    """A GEMM's output rows that fill whole words (16 INT4 codes: two words of 8 nibbles)
    are only written: the paging stores them and does not load them first. Rows that end
    inside a word (5 codes) keep the rest of that word, so they are loaded as before; either
    way the memory ends as on the big device (the split-command and training tests)."""
    paged, _ = pair
    rng = np.random.default_rng(m)
    gemm = Gemm(rng.integers(-8, 8, (m, 12)), rng.integers(-8, 8, (12, 8)), Operand.INT4,
                Operand.INT4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RESCALE, m=40000, s=20), paged.word_nibbles,
                     paged.rows, paged.cols, base=40)
    placed = paged._place("gemm", plan.cfg, 0)
    loads = list(paged._dma_list(placed, False))
    stores = list(paged._dma_list(placed, True))
    out = plan.out.addr // paged.wpb, -(-plan.out.end // paged.wpb)

    def covers(cfgs):
        return any(c["ext_addr"] < out[1] and c["ext_addr"] + c["bursts"] * c["rows"] > out[0]
                   for c in cfgs)
    assert covers(stores)
    assert covers(loads) == (m % paged.word_nibbles != 0)


@pytest.mark.parametrize("aligned, requant", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_a_gemm_and_its_update_fused_equal_them_apart(pair, aligned, requant):
    """A GEMM into a RAW gradient and the UPDATE that takes it (and the REQUANT of its new
    masters, protocol v10), fused (``gemm_update``), split in parts (masters and momenta
    starting mid-burst: one part after the other; on whole bursts: overlapped in the
    scratchpad's halves): every buffer but the gradient ends as on the big device after
    the commands one by one, with the same SAWB sums, no DMA touches the gradient (its
    SDRAM copy keeps what it held), A, which every part reads whole, is loaded once, and
    the masters are loaded once (the REQUANT reads them in the scratchpad). Without a
    program area the paged device declines (None)."""
    _fused_against_apart(*pair, aligned, requant)


def test_a_fused_requant_runs_on_the_rtl_as_apart():
    """The fused GEMM, UPDATE and REQUANT in overlapped parts on the RTL (``pysim://`` with
    the chip model; each part's REQUANT beside the next part's GEMM, its codes stored
    behind that part's UPDATE): the same memory and sums as the three commands on
    ``emu://``."""
    with Device.open("pysim://?sdram=tiny&words=2048") as small, \
            Device.open("emu://?words=65536&sdram=") as big:
        _fused_against_apart(PagedDevice(small, program_words=1024), big, True, True, n=64)


def _fused_against_apart(paged, big, aligned, requant, n=160):
    rng = np.random.default_rng(7)
    m, red = 8, 24
    gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(0, 16, (red, n)), Operand.FP4,
                Operand.UINT4)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW, phase=1), paged.word_nibbles, paged.rows,
                     paged.cols, base=100)
    g = plan.out
    wm = -(-g.end // paged.wpb) * paged.wpb + (0 if aligned else 2)
    vm = wm + n * m + (8 if aligned else 10)
    wc = vm + n * m + (8 if aligned else 10)            # the codes: a word a row
    words = wc + n + 10
    base = rng.integers(0, 256, words * paged.word_bytes, dtype=np.uint8).tobytes()
    update = vector_args(VecOp.UPDATE, n, m, (g.addr, g.stride), (wm, m), vm, mu=900,
                         m=20000, s=18)
    rq = vector_args(VecOp.REQUANT, n, m, (wm, m), (wc, 1), m=30000, s=20) if requant \
        else None
    for dev in (paged, big):
        dev.write(0, base)
        for buf, raw in plan.uploads:
            dev.write(buf.addr, raw)
    dmas = []
    record = paged._moved
    paged._moved = lambda cfg: (dmas.append(cfg), record(cfg))
    fused = paged.gemm_update(plan.cfg, update, rq)
    if paged.scratch == paged.dev.mem_words:        # no program area: sent one by one
        assert fused is None and not dmas
        return
    big.gemm(plan.cfg)
    apart = big.vector(update)
    if requant:
        big.vector(rq)
    assert (fused["w_sum_abs"], fused["w_sum_sq"]) == (apart["w_sum_abs"], apart["w_sum_sq"])
    wb = paged.word_bytes
    mine, theirs = paged.read(0, words), big.read(0, words)
    grad = slice(g.addr * wb, g.end * wb)
    assert mine[:grad.start] == theirs[:grad.start] and mine[grad.stop:] == theirs[grad.stop:]
    assert mine[grad] == base[grad] != theirs[grad]
    assert paged.counters["split_commands"] == 1 and paged.counters["runs"] == 1
    assert paged.counters["overlapped_commands"] == aligned

    def touching(buf):
        lo, hi = buf.addr // paged.wpb, -(-buf.end // paged.wpb)
        return [c for c in dmas for r in range(c["rows"])
                if c["ext_addr"] + r * c["ext_stride"] < hi
                and c["ext_addr"] + r * c["ext_stride"] + c["bursts"] > lo]
    assert not touching(g)
    assert [c["store"] for c in touching(plan.a)] == [False]      # A: loaded once, for all
    assert {c["store"] for c in dmas} == {False, True}

    def loads(lo, hi):
        """How many times each burst of words lo .. hi - 1 was loaded."""
        lo, hi = lo // paged.wpb, -(-hi // paged.wpb)
        return collections.Counter(
            b for c in dmas if not c["store"] for r in range(c["rows"])
            for b in range(c["ext_addr"] + r * c["ext_stride"],
                           c["ext_addr"] + r * c["ext_stride"] + c["bursts"]) if lo <= b < hi)
    if aligned:       # (else a burst across two parts' rows is loaded by both)
        assert set(loads(wm, wm + n * m).values()) == {1}       # the masters: once
        assert not requant or not loads(wc, wc + n)             # the codes: only written


def test_a_fused_program_too_long_for_its_area_is_declined_uncounted():
    """A GEMM and its UPDATE whose program does not fit the program area: ``gemm_update``
    declines (None) before anything moves, and counts no split command (the caller runs
    the two apart, and those count)."""
    with Device.open(SMALL.replace("1024", "2048")) as small:
        paged = PagedDevice(small, program_words=2 * 4)     # two bursts: no program fits
        rng = np.random.default_rng(7)
        m, red, n = 8, 24, 160
        gemm = Gemm(rng.integers(-8, 8, (m, red)), rng.integers(0, 16, (red, n)),
                    Operand.FP4, Operand.UINT4)
        plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW, phase=1), paged.word_nibbles,
                         paged.rows, paged.cols, base=100)
        wm = -(-plan.out.end // paged.wpb) * paged.wpb
        update = vector_args(VecOp.UPDATE, n, m, (plan.out.addr, plan.out.stride), (wm, m),
                             wm + n * m + 8, mu=900, m=20000, s=18)
        assert paged.scratch < small.mem_words
        assert paged.gemm_update(plan.cfg, update) is None
        assert paged.counters["split_commands"] == paged.counters["dma_loads"] == 0
