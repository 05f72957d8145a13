"""The training set resident in the SDRAM (host/training/resident.py): uploaded once and
checked, gathered by index into the right rows, trained on bit-identically to streamed
batches, kept or uploaded again on resume, and refused clearly where it does not fit."""

from dataclasses import replace

import numpy as np
import pytest

from nibble.host.device.driver import Device
from nibble.host.device.layout import unpack
from nibble.host.golden.numerics import quantize_int
from nibble.host.training import datasets
from nibble.host.training.datasets import Dataset
from nibble.host.training.device import DeviceTrainConfig
from nibble.host.training.resident import ResidentError, ResidentSet
from nibble.host.training.session import CHECKPOINT, Session
from nibble.rtl.formats import UINT4_MAX, UINT4_MIN

SIZES = [64, 32, 10]
PAGED = "emu://?words=1024&sdram=is42s16160"       # the state paged through 2 KB
PAGED_WIDE = "emu://?words=32768&sdram=is42s16160"  # a 784-input model's, through 64 KB


@pytest.fixture(scope="module")
def small():
    d = datasets.load("digits")
    return Dataset("digits", d.x_train[:320], d.y_train[:320], d.x_test[:128], d.y_test[:128])


@pytest.fixture(scope="module")
def wide():
    """Fashion-MNIST-shaped images (784 pixels): an image's codes are 392 bytes, a DMA's
    frames 30."""
    rng = np.random.default_rng(1)
    x = rng.random((256, 784)).astype(np.float32) * (rng.random((256, 784)) < 0.5)
    y = rng.integers(0, 10, 256)
    return Dataset("wide", x, y, x[:64], y[:64])


def codes_of(data):
    return quantize_int(data.x_train, 1.0 / UINT4_MAX, UINT4_MIN, UINT4_MAX)


def test_upload_check_and_gather(small):
    codes = codes_of(small)
    with Device.open("emu://?rows=4&cols=8&words=8192&sdram=is42s16160") as dev:
        rs = ResidentSet(dev, codes, base=100, row_words_=64 // dev.word_nibbles + 1)
        assert rs.row_words > 64 // dev.word_nibbles           # a padded row, whole bursts
        staging = (4096, 256)                        # a few images a chunk: many chunks
        rs.upload(staging, progress=False)
        assert rs.counters["upload_bytes"] > rs.bytes and rs.counters["verify_bytes"] > 0
        assert len(rs._chunks(staging)) > 10
        idx = np.array([7, 0, 319, 7, 100])
        rs.gather(idx, 64)
        dev.wait()
        got = unpack(dev.read(64, len(idx) * rs.row_words), len(idx), 64, 1, dev.word_nibbles,
                     rs.row_words)
        assert np.array_equal(got, codes[idx])
        with pytest.raises(ValueError, match="burst-aligned"):
            rs.gather(idx, 65)
        # one flipped code in the SDRAM: the check finds it (and names the chunk)
        burst = rs.base + 200 * rs.row_bursts
        raw = bytearray(dev.ext_read(burst, 1, staging))
        raw[3] ^= 0x10
        dev.ext_write(burst, bytes(raw), staging)
        assert not rs.verify(staging, progress=False, raise_=False)
        with pytest.raises(ResidentError, match="does not match"):
            rs.verify(staging, progress=False)


@pytest.mark.parametrize("url", ["emu://", PAGED_WIDE])
def test_resident_training_is_bit_identical_to_streamed(wide, url):
    """Scratchpad-resident state (DMAs straight into layer 0's rows) and paged state (via
    the scratchpad into the SDRAM): the same losses and weights as streamed batches, and
    fewer link bytes."""
    cfg = DeviceTrainConfig(sizes=[784, 32, 10], batch_size=64, lr=0.05)
    runs = {}
    for resident in (False, None):
        with Device.open(url) as dev:
            s = Session(dev, wide, cfg, 1, resident=resident)
            r = s.run(progress=False)
            runs[resident] = (s.history[0]["loss"], s.mlp.masters(), r)
            assert s.mlp.paged == (url == PAGED_WIDE)
            assert (s.mlp.resident is not None) == (resident is None)
    (l0, (w0, v0), r0), (l1, (w1, v1), r1) = runs[False], runs[None]
    assert l0 == l1
    for a, b in zip([*w0, *v0], [*w1, *v1], strict=True):
        assert np.array_equal(a, b)
    assert r0["upload"] is None and r1["upload"]["kept"] is False
    assert r1["config"]["resident"]["images"] == 256
    saved = r0["history"][0]["link_bytes_per_step"] - r1["history"][0]["link_bytes_per_step"]
    assert saved > 0.85 * 64 * 784 / 2                # the batch's codes stay on the device


def test_resume_keeps_or_uploads_the_set(small, tmp_path):
    """A resumed run on the same device keeps its copy (the sums match); on a fresh device
    it uploads again; both end bit-identical to a run never stopped."""
    cfg = DeviceTrainConfig(sizes=SIZES, batch_size=64, lr=0.1)
    small = replace(small, x_train=small.x_train[:256], y_train=small.y_train[:256])
    with Device.open(PAGED) as dev:
        whole = Session(dev, small, cfg, 2, resident=True)
        whole.run(progress=False)
        ref = whole.mlp.masters()
    for fresh in (False, True):
        out = tmp_path / f"fresh{fresh}"
        with Device.open(PAGED) as dev:
            Session(dev, small, cfg, 2, out=out, resident=True).run(progress=False,
                                                                   max_steps=3)
            if fresh:
                dev.close()
                dev = Device.open(PAGED)
            s = Session(dev, small, cfg, 2, out=out, resume=out / CHECKPOINT, resident=True)
            r = s.run(progress=False)
            assert r["upload"]["kept"] is (not fresh)
            w, v = s.mlp.masters()
            dev.close()
        for a, b in zip([*w, *v], [*ref[0], *ref[1]], strict=True):
            assert np.array_equal(a, b)


def test_digits_stream_a_set_that_does_not_fit_says_why(small):
    """Auto: a digits image (32 bytes of codes) costs ten times its address in a GATHER,
    so it is gathered; an image of 5 bytes would not be; a set that does not fit streams
    (or, required, fails) with the reason."""
    cfg = DeviceTrainConfig(sizes=SIZES, batch_size=64)
    with Device.open("emu://") as dev:
        s = Session(dev, small, cfg, 1)
        assert s.mlp.resident is not None and s.streamed_because is None
        tiny = replace(small, x_train=small.x_train[:, :10], x_test=small.x_test[:, :10])
        s = Session(dev, tiny, DeviceTrainConfig(sizes=[10, 8, 10], batch_size=64), 1)
        assert s.mlp.resident is None and "saves no link bytes" in s.streamed_because
    with Device.open("emu://?words=65536&sdram=is42s16160") as dev:
        with pytest.raises(ResidentError, match="does not fit"):
            ResidentSet(dev, codes_of(small), base=dev.ext_bursts - 100)
        dev.ext_bursts = 300                   # 4.7 KB of SDRAM: the state fits, the set not
        s = Session(dev, small, cfg, 1)
        assert s.mlp.resident is None and "does not fit" in s.streamed_because
        with pytest.raises(ResidentError, match="does not fit"):
            Session(dev, small, cfg, 1, resident=True)
    with Device.open("emu://?words=65536&sdram=") as dev, \
            pytest.raises(ResidentError, match="no SDRAM"):
        Session(dev, small, cfg, 1, resident=True)


@pytest.mark.long
def test_paged_and_resident_on_the_simulated_device(small, simdev):
    """The Verilator model with only 1,024 words of its scratchpad in use: the state paged
    through it (the host not waiting for stores: DMA order, the held GEMMs and the BUSY
    WRITEs and READs keep it exact), the batches gathered from the resident set: the same
    losses and weights as emu:// with everything in block RAM and streamed batches. The
    paging's device cycles, measured, add up by command."""
    small = replace(small, x_train=small.x_train[:192], y_train=small.y_train[:192])
    cfg = DeviceTrainConfig(sizes=SIZES, batch_size=64, lr=0.1)
    with Device.open(simdev, timeout=30) as dev:
        dev.mem_words = 1024
        s = Session(dev, small, cfg, 1, resident=True)
        s.mlp.dev.measure = True                    # device cycles, by command
        s.run(progress=False)
        assert s.mlp.paged and s.mlp.resident is not None
        counters, by_op = s.mlp.dev.counters, s.mlp.dev.cycles_by_op
        assert counters["overlapped_commands"] > 0
        assert sum(by_op.values()) == counters["cycles"] > 0
        assert {"GEMM", "REQUANT", "TRANSPOSE"} <= set(by_op) <= {
            "GEMM", "GEMM+UPDATE", "GEMM+UPDATE+REQUANT", "UPDATE", "REQUANT", "TRANSPOSE"}
        sim = (s.losses, *s.mlp.masters(), s.mlp.weight_codes())
    with Device.open("emu://?words=65536&sdram=") as dev:
        s = Session(dev, small, cfg, 1)
        s.run(progress=False)
        emu = (s.losses, *s.mlp.masters(), s.mlp.weight_codes())
    assert sim[0] == emu[0] and len(sim[0]) == 3
    for a, b in zip(sim[1:], emu[1:], strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_resident_training_survives_link_faults(wide):
    """Damaged, dropped and duplicated bytes at 1e-3 both ways through the upload, its
    check and the gathers (DMAs sent without waiting, retried on lost replies): the same
    losses and weights as a clean run."""
    from nibble.host.device.faults import FaultyTransport

    cfg = DeviceTrainConfig(sizes=[784, 32, 10], batch_size=64, lr=0.05)
    runs = []
    for wrap in (None, lambda t: FaultyTransport(t, rate=1e-3, seed=7)):
        with Device.open(PAGED_WIDE, wrap=wrap) as dev:
            s = Session(dev, wide, cfg, 1, resident=True)
            s.run(progress=False)
            runs.append((s.losses, s.mlp.masters(), dev.resends))
    (l0, (w0, v0), _), (l1, (w1, v1), resends) = runs
    assert l0 == l1 and resends > 10
    for a, b in zip([*w0, *v0], [*w1, *v1], strict=True):
        assert np.array_equal(a, b)
