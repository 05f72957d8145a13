"""The DMA through the whole device (``pysim://`` with the SDRAM controller on the chip
model) against ``emu://``: the same driver calls, the same memory and SDRAM contents, a
transfer overlapped with an element-wise operation, the BUSY rules and the range check."""

import numpy as np
import pytest

from nibble.gateware.protocol import DMA_ARGS, Op
from nibble.host.device.commands import vector_args
from nibble.host.device.driver import (
    BusyError,
    Device,
    DeviceError,
    OutOfRangeError,
    UnknownOpError,
)
from nibble.host.device.packing import pack_fields
from nibble.rtl.formats import VecOp

WORDS = 4096
URLS = (f"emu://?sdram=tiny&words={WORDS}", f"pysim://?sdram=tiny&words={WORDS}")


def script(dev, rng):
    """Random memory and SDRAM, strided loads and stores, and a load overlapped with a
    TRANSPOSE of another region; returns (tensor memory, SDRAM bursts 0..319, whether the
    DMA was seen running while the TRANSPOSE was started)."""
    wb = dev.word_bytes
    dev.write(0, rng.integers(0, 256, WORDS * wb, dtype=np.uint8).tobytes())
    dev.ext_write(0, rng.integers(0, 256, 128 * 16, dtype=np.uint8).tobytes(), (1536, 512))
    dev.dma({"store": 0, "rows": 5, "bursts": 3, "mem_addr": 40, "mem_stride": 13,
             "ext_addr": 7, "ext_stride": 11})
    dev.dma({"store": 1, "rows": 4, "bursts": 2, "mem_addr": 100, "mem_stride": 5,
             "ext_addr": 200, "ext_stride": 3})
    # a TRANSPOSE of words 0..1151 into 2900..4051 (9,216 elements, a cycle each), and
    # while it runs a long load (320 bursts) into words 1200..2479; then a TRANSPOSE of
    # what the load brought, queued
    dev.vector(vector_args(VecOp.TRANSPOSE, 96, 96, (0, 12), (2900, 12)), wait=False)
    dev.dma({"store": 0, "rows": 8, "bursts": 40, "mem_addr": 1200, "ext_addr": 0,
             "ext_stride": 40}, wait=False)
    overlapped = dev.stats()["busy"] == 3
    dev.vector(vector_args(VecOp.TRANSPOSE, 16, 16, (1200, 2), (2500, 2)), wait=False)
    dev.wait()
    # STATS sums over regions of what the load brought (a device with SDRAM sums them)
    sums = [(st["sum_abs"], st["sum_sq"]) for st in
            (dev.stats(addr, count) for addr, count in ((1200, 37), (1203, 1), (2470, 80)))]
    with pytest.raises(OutOfRangeError):
        dev.stats(WORDS - 2, 3 * dev.word_nibbles)
    return dev.read(0, WORDS), dev.ext_read(0, 320, (1536, 512)), overlapped, sums


@pytest.mark.parametrize("sdram_hz", [0, 90_000_000], ids=["sdram-on-sync", "sdram-clock"])
def test_dma_on_the_device_matches_the_emulator(sdram_hz):
    """On the design's clock, or on an SDRAM clock of its own (2.5 times pysim's 36 MHz,
    through the clock-crossing FIFOs: ``rtl/sdram_clock.py``; there the load ends before
    the host's next poll can see it running)."""
    got = []
    for url in (URLS[0], URLS[1] + (f"&sdram_hz={sdram_hz}" if sdram_hz else "")):
        with Device.open(url) as dev:
            assert dev.ext_bursts == 2048
            got.append(script(dev, np.random.default_rng(7)))
    (emu_mem, emu_ext, _, emu_sums), (rtl_mem, rtl_ext, overlapped, rtl_sums) = got
    assert overlapped or sdram_hz     # the RTL was still loading when the TRANSPOSE began
    assert rtl_mem == emu_mem and rtl_ext == emu_ext
    nib, words = len(emu_mem) * 2 // WORDS, np.frombuffer(emu_mem, np.uint8)
    codes = np.stack([words & 15, words >> 4], axis=1).ravel().astype(np.int64)
    codes = np.where(codes >= 8, codes - 16, codes)
    want = [(int(np.abs(c).sum()), int((c * c).sum())) for c in
            (codes[a * nib:a * nib + n] for a, n in ((1200, 37), (1203, 1), (2470, 80)))]
    assert rtl_sums == emu_sums == want


def test_stats_sums_need_sdram():
    """Without SDRAM the device sums no region: the driver says so before sending, and the
    device answers such a STATS with BAD_LENGTH (tests/test_device.py)."""
    with Device.open("emu://?sdram=") as dev:
        with pytest.raises(DeviceError, match="no SDRAM"):
            dev.stats(0, 8)


@pytest.mark.parametrize("url", URLS)
def test_dma_busy_rules_and_range(url):
    """While a DMA runs, a WRITE is BUSY and another DMA waits for it; while a VECTOR runs,
    a DMA starts (its arguments have their own register), a WRITE is BUSY and a second
    VECTOR waits for both (that it waits for a load is in the test above: it transposes
    what the load brought); out-of-range tiles are refused and move nothing."""
    with Device.open(url) as dev:
        bad = [{"store": 0, "rows": 2, "bursts": 1, "mem_addr": 4092, "ext_addr": 0},
               {"store": 1, "rows": 1, "bursts": 1, "mem_addr": 0, "ext_addr": 2048},
               {"store": 1, "rows": 2, "bursts": 2, "mem_addr": 0, "ext_addr": 0,
                "ext_stride": 1}]                   # a written region's rows overlap
        for cfg in bad:
            with pytest.raises(OutOfRangeError):
                dev.dma(cfg)
        if not url.startswith("pysim"):
            return                                  # emu:// finishes every command at once
        long = {"store": 0, "rows": 16, "bursts": 64, "mem_addr": 0, "ext_addr": 0,
                "mem_stride": 256, "ext_stride": 64}     # 1,024 bursts: > 8,000 cycles
        payload = pack_fields(DMA_ARGS, long)
        dev.request(Op.DMA, payload)
        with pytest.raises(BusyError):
            dev.request(Op.WRITE, bytes(3) + bytes(dev.word_bytes), wait_busy=False)
        c0 = dev.stats()["cycles"]
        dev.request(Op.DMA, payload, wait_busy=False)   # answered when the first one ends
        st = dev.stats()
        assert st["busy"] == 2 and st["dma_cycles"] < st["cycles"] - c0
        dev.wait()
        vec = vector_args(VecOp.TRANSPOSE, 128, 64, (0, 8), (1024, 16))  # 8,192 cycles
        dev.vector(vec, wait=False)
        other = {**long, "rows": 8, "mem_addr": 2048}
        dev.request(Op.DMA, pack_fields(DMA_ARGS, other), wait_busy=False)
        assert dev.stats()["busy"] == 3                 # both run
        with pytest.raises(BusyError):
            dev.request(Op.WRITE, bytes(3) + bytes(dev.word_bytes), wait_busy=False)
        dev.vector(vec, wait=False)                     # answered when both have ended
        assert dev.stats()["busy"] == 1
        dev.wait()


@pytest.mark.parametrize("url", ["emu://?sdram=&words=1024", "pysim://?words=1024"])
def test_a_device_without_sdram_knows_no_dma(url):
    with Device.open(url) as dev:
        assert dev.ext_bursts == 0
        with pytest.raises(UnknownOpError):
            dev.request(Op.DMA, pack_fields(DMA_ARGS, {"rows": 1, "bursts": 1}))


def test_pysim_refuses_an_sdram_it_cannot_hold():
    """The large parts' storage is a Verilog array (the Verilator model's): in Amaranth's
    simulator it would hold nothing, so pysim says so instead of losing every write."""
    with pytest.raises(DeviceError, match="only small SDRAMs"):
        Device.open("pysim://?sdram=is42s16160&words=1024")
