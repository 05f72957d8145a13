"""The training set resident in the device's SDRAM: uploaded once, gathered by index.

Streaming a Fashion-MNIST batch costs 25 KB of link every step (784 UINT4 codes an image):
at the ULX3S's 3 Mbaud that is most of a step. The SDRAM (32 MB) holds the whole training
set as the same codes (60,000 images in 24 MB), so :class:`ResidentSet` uploads it once and
a step sends only the batch's indices, one GATHER frame (a DMA LOAD per image on the
device):

* **layout**: image ``i`` is one row of ``row_bursts`` whole 16-byte bursts from burst
  ``base + i * row_bursts`` (784 codes: 392 bytes, 25 bursts with the last half empty), so
  any image lands on any burst-aligned row of tensor memory in one DMA;
* **upload** (:meth:`ResidentSet.upload`): WRITE into a staging area of the scratchpad,
  DMA STORE to the SDRAM, a staging area at a time, with a progress bar;
* **check** (:meth:`ResidentSet.verify`): every chunk is loaded back from the SDRAM into
  the scratchpad and the device sums its codes (STATS: sum |c| and sum c^2 as INT4) against
  the host's; a few link bytes a chunk instead of a readback of the 24 MB. The link's
  frames carry their own CRC-32; :attr:`ResidentSet.crc` (of the packed codes) names the
  set in checkpoints, so a resumed run checks the device still holds *this* set (a board
  that was power-cycled holds noise) and uploads it again if not;
* **gather** (:meth:`ResidentSet.gather`): one GATHER frame carries the batch's burst
  addresses (3 bytes an image); the device DMA-loads each image into a row of a
  burst-aligned buffer, and the GEMM or VECTOR sent next starts only when the loads have
  ended, so no poll is needed.

A batch of 64 costs 218 bytes of link (the frame and its reply) instead of 25 KB; with a
DMA frame an image (protocol v6) it cost 1.9 KB.
"""

import zlib

import numpy as np
from tqdm.auto import tqdm

from nibble.gateware.protocol import GATHER_ADDR_BYTES
from nibble.host.device.driver import DeviceError
from nibble.host.device.layout import pack, row_words
from nibble.rtl.dma import words_per_burst

__all__ = ["GATHER_WIRE_BYTES", "ResidentError", "ResidentSet", "staging_area"]

#: What gathering an image costs the link: its burst address in a GATHER frame (the frame's
#: header, CRC and reply are shared by the batch).
GATHER_WIRE_BYTES = GATHER_ADDR_BYTES
#: Most codes one STATS sum covers (its count field is 24 bits).
_MAX_COUNT = (1 << 24) - 1


class ResidentError(DeviceError):
    """The training set does not fit the device's SDRAM, or its copy there is not intact."""


def staging_area(dev, first_free, end=None):
    """The scratchpad words ``(addr, words)`` from ``first_free`` (rounded up to a burst)
    to ``end`` (default: the end of it): where uploads and checks stage their chunks."""
    wpb = words_per_burst(dev.word_nibbles)
    addr = -(-first_free // wpb) * wpb
    words = ((dev.mem_words if end is None else end) - addr) // wpb * wpb
    if words < wpb:
        raise ResidentError(f"{dev.url} has no free scratchpad burst to stage the training "
                            "set through")
    return addr, words


class ResidentSet:
    """``codes`` (images x K UINT4 codes) laid out in ``dev``'s SDRAM from burst ``base``.

    ``dev`` is the driver's :class:`~nibble.host.device.driver.Device` (not a paged view):
    addresses here are the scratchpad's and the SDRAM's own. An image's row is
    ``row_words_`` words (default: its codes' words), rounded up to whole bursts.
    """

    def __init__(self, dev, codes, base, row_words_=None):
        codes = np.asarray(codes)
        if not dev.ext_bursts:
            raise ResidentError(f"{dev.url} has no SDRAM to hold the training set")
        self.dev, self.base = dev, base
        self.images, self.k = codes.shape
        nib = dev.word_nibbles
        self.wpb = words_per_burst(nib)
        self.row_bursts = -(-(row_words_ or row_words(self.k, 1, nib)) // self.wpb)
        self.row_words = self.row_bursts * self.wpb
        self.end = base + self.images * self.row_bursts
        if self.end > dev.ext_bursts:
            raise ResidentError(
                f"the training set ({self.images:,} images, {self.bytes / 2**20:.1f} MiB as "
                f"4-bit codes) does not fit {dev.url}'s SDRAM after the model's state "
                f"({dev.ext_bursts * 16 / 2**20:.1f} MiB from burst {base:,})")
        self._codes = codes
        self._raw = None
        #: link counters of the upload and the checks
        self.counters = {"upload_bytes": 0, "verify_bytes": 0, "gathers": 0}

    @property
    def image_bytes(self):
        """An image's codes as a streamed batch carries them."""
        return -(-self.k // 2)

    @property
    def worth_it(self):
        """True when gathering saves link bytes: an image's codes are at least twice what
        fetching it costs."""
        return self.image_bytes >= 2 * GATHER_WIRE_BYTES

    @property
    def bytes(self):
        return self.images * self.row_bursts * 16

    @property
    def raw(self):
        """The set's bytes as the SDRAM holds them (packed once, on first use)."""
        if self._raw is None:
            self._raw = pack(self._codes, 1, self.dev.word_nibbles, self.row_words)
        return self._raw

    @property
    def crc(self):
        """CRC-32 of :attr:`raw`: names this set (and its layout) in a checkpoint."""
        return zlib.crc32(self.raw) ^ zlib.crc32(np.int64([self.base, self.row_bursts]))

    def describe(self):
        return {"images": self.images, "k": self.k, "base_burst": self.base,
                "row_bursts": self.row_bursts, "crc32": self.crc}

    # -- upload and check ---------------------------------------------------------------------
    def _chunks(self, staging):
        """(first image, images) chunks that fit the staging area (and one STATS count)."""
        per = min(staging[1] // self.row_words,
                  _MAX_COUNT // (self.row_words * self.dev.word_nibbles),
                  self.dev.dma_row_bursts // self.row_bursts)
        if per < 1:
            raise ResidentError(f"a staging area of {staging[1]} words holds no image")
        return [(i, min(per, self.images - i)) for i in range(0, self.images, per)]

    def upload(self, staging, progress=True):
        """Write the set into the SDRAM through ``staging`` (scratchpad ``(addr, words)``),
        then :meth:`verify` it."""
        dev, wire0 = self.dev, self.dev.wire_sent + self.dev.wire_received
        rb, raw = self.row_bursts, self.raw
        with tqdm(total=self.bytes, unit="B", unit_scale=True, disable=not progress,
                  desc=f"uploading {self.images:,} images to {dev.url}", leave=False) as bar:
            for first, n in self._chunks(staging):
                lo, hi = first * rb * 16, (first + n) * rb * 16
                dev.ext_write(self.base + first * rb, raw[lo:hi], staging)
                bar.update(hi - lo)
        self.counters["upload_bytes"] += dev.wire_sent + dev.wire_received - wire0
        self.verify(staging, progress)

    def verify(self, staging, progress=True, raise_=True):
        """Load every chunk back from the SDRAM and compare the device's code sums with the
        host's. Returns True when all match; else raises :class:`ResidentError` (or returns
        False with ``raise_=False``)."""
        dev, wire0 = self.dev, self.dev.wire_sent + self.dev.wire_received
        rb, nib = self.row_bursts, dev.word_nibbles
        signed = np.asarray(self._codes, np.int64)
        signed = np.where(signed >= 8, signed - 16, signed)
        ok = True
        chunks = self._chunks(staging)
        for first, n in tqdm(chunks, disable=not progress, unit="chunk", leave=False,
                             desc="checking the training set in the SDRAM"):
            dev.dma({"store": 0, "rows": 1, "bursts": n * rb, "mem_addr": staging[0],
                     "ext_addr": self.base + first * rb})
            st = dev.stats(staging[0], n * self.row_words * nib)
            part = signed[first:first + n]
            if (st["sum_abs"], st["sum_sq"]) != (int(np.abs(part).sum()),
                                                 int((part * part).sum())):
                ok = False
                break
        self.counters["verify_bytes"] += dev.wire_sent + dev.wire_received - wire0
        if not ok and raise_:
            raise ResidentError(f"the training set in {dev.url}'s SDRAM does not match the "
                                f"host's (images {first:,}..{first + n - 1:,})")
        return ok

    # -- a step ------------------------------------------------------------------------------
    def gather(self, idx, addr, post=False):
        """DMA images ``idx`` into consecutive rows of ``row_words`` words from scratchpad
        word ``addr`` (burst-aligned); returns without waiting for the loads (the device
        queues them), with ``post`` without waiting for its answers either: returns them
        (``Device.gather``)."""
        if addr % self.wpb:
            raise ValueError(f"gather destination {addr} is not burst-aligned")
        rb = self.row_bursts
        answers = self.dev.gather(addr, self.row_words, rb,
                                  [self.base + int(i) * rb for i in np.asarray(idx, np.int64)],
                                  post=post)
        self.counters["gathers"] += len(idx)
        return answers
