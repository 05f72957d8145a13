"""A device's SDRAM as its tensor memory: the host pages each command's buffers through the
scratchpad.

:class:`PagedDevice` wraps a :class:`~nibble.host.device.driver.Device` that has an SDRAM
and looks like a device whose tensor memory is that SDRAM (``mem_words`` = the SDRAM's
words), so a model whose training state does not fit the scratchpad trains with the same
code (:class:`~nibble.host.training.device.DeviceMLP`), bit for bit as it would on a device
with that much block RAM. Per GEMM or VECTOR command:

1. the regions its arguments name (:func:`~nibble.host.device.emu.gemm_regions`,
   :func:`~nibble.host.device.emu.vec_regions`) become spans of whole 16-byte bursts; spans
   that share a burst merge into one block, so a store never writes a burst that another
   copy of it holds;
2. every block is loaded into the scratchpad by DMA (LOADs are sent back to back: the DMA
   queues them), but one the command only writes, every nibble of whole bursts (a GEMM's
   output, a REQUANT's codes, a TRANSPOSE's result whose rows fill whole words: a
   Fashion-MNIST step on the ULX3S configuration moves 3.23 MB instead of 3.74); the
   command runs on the copies with its addresses moved, and the blocks it wrote are
   stored back once it has ended (its STATS poll says so); the host does not wait
   for the stores: the next command's loads queue behind them on the DMA, and a WRITE or
   READ is answered BUSY until every unit is idle;
3. a command whose blocks do not fit the scratchpad is split first: a GEMM along N (its
   output rows, B's columns, in multiples of a word's codes), an UPDATE or REQUANT along
   its rows; the parts' statistics combine exactly (absmax: the largest; clip and SAWB
   sums, cycles and beats: the total). Parts that fit half the scratchpad each run in its
   two halves in turn, the next part's loads and the last part's stores beside each part
   (double buffering; one part after the other took about a million cycles more a
   Fashion-MNIST step, measured with the sequential element-wise unit). A split GEMM's A,
   which every part reads whole, is loaded once, before the halves, for all of them;
4. on a scratchpad of 64 KB or more (the ULX3S's is 128 KB) all of this is a **program**
   (protocol RUN): the same loads, parts and stores as entries, with a FENCE where the
   host would wait for a part to end before storing it, stored once in the program area at
   the top of the scratchpad (an eighth of it) with the command's settings zeroed, and
   run with one RUN that gives them and answers with the parts' STATS combined by the
   device. The link then carries one RUN and its reply a command instead of every DMA,
   part and poll (a Fashion-MNIST step on the ULX3S configuration: 5.8 KB instead of
   17.8 KB, ``make bench-train``); a program too long for the area is paged by the host.
   In a program a split command's next part starts beside the last part's stores (a
   FENCE, the first store, BESIDE before the part's GEMM and VECTOR: protocol v9; a GEMM
   or VECTOR otherwise waits for every DMA; the fused GEMM+UPDATE of a Fashion-MNIST
   step: 528 K cycles -> 476 K), and a command that fits the scratchpad whole but not a quarter
   of it runs in quarter parts (:data:`SMALL_PARTS`), its first part's loads before it
   and the rest beside.
   A step sends the same command shapes every step, so the host works out a shape's parts,
   placement and program bytes once and remembers them (``_plan_key``: the arguments but
   the settings a RUN gives); planning them every step was most of the host's time a step
   on the ULX3S configuration;
5. a backward-weight GEMM and the UPDATE that takes its gradient run **fused**
   (:meth:`PagedDevice.gemm_update`, which ``DeviceMLP`` calls where it exists): one
   program whose parts each compute some rows of the gradient into the scratchpad and
   update the same rows of the masters and momenta from there (the GEMM entries keep their
   own settings, the UPDATEs take the RUN's: protocol v8), so the gradient, 4 bytes a
   weight, is neither stored nor loaded. With A loaded once, a Fashion-MNIST step on the
   ULX3S configuration moves 2.34 MB of SDRAM instead of 3.23 (``make bench-train``,
   ``sdram_bytes_by_command``). From protocol v10 the REQUANT of the new masters joins
   them (a REQUANT entry takes the RUN's ``requant`` settings, the UPDATE its
   ``params``): each part requantizes the masters it has just updated, in the
   scratchpad, and stores their codes with them, so the masters are not loaded again
   (4 bytes a weight; the step's REQUANT step is known before it, ``DeviceMLP``). In
   overlapped parts a part's REQUANT runs beside the next part's GEMM, when the
   element-wise unit is free, its codes stored behind that part's UPDATE (which starts
   only once the REQUANT has ended); placed behind its own UPDATE, the entry held the
   program's stores and loads after it until the UPDATE ended, the DMA idle meanwhile
   (the Fashion-MNIST step's first layer: 575.6 K cycles so, 439.0 K as it is, against
   414.0 K + 123.8 K for the fused GEMM+UPDATE and the REQUANT apart).

WRITE and READ from the host go to the SDRAM through a staging area (the driver's
``ext_write``/``ext_read``). Whole commands are not overlapped with one another (each waits
for the STATS of the one before, which the host needs for the next); the schedule that
streams a layer's GEMMs at the array's rate is :mod:`nibble.host.bench.streaming`'s
(``make bench-system``). ``counters`` says what the paging moved.
"""

import itertools
import time

from nibble.gateware.protocol import RUN_ARGS, Op, longest_entry_words
from nibble.host.device.commands import program_entry, program_params, settings_zeroed
from nibble.host.device.driver import Answered, DeviceError
from nibble.host.device.emu import WHOLE, gemm_regions, vec_regions
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import OutputPath, VecOp

__all__ = ["PagedDevice"]

#: The smallest program area, in nibbles (8 KB): a scratchpad of 8 times that or more keeps
#: an eighth of itself for programs (the ULX3S's 128 KB: 16 KB; a Fashion-MNIST step's 17
#: programs took 933 words of 16 nibbles, and a step that fetches its next batch early
#: alternates two X buffers, so two of its transpose's and its first layer's fused
#: GEMM+UPDATE's, 510 words more: in the 8 KB before, the area was written again every
#: step)
PROGRAM_NIBBLES = 16384

#: A command that fits the scratchpad whole but not a quarter of it runs, in a program, in
#: parts of at most a quarter, overlapped: whole, its loads came before it and its stores
#: after (the forward GEMM of a Fashion-MNIST step's first layer: 75 KB of operands loaded
#: while the array waited)
SMALL_PARTS = 4

#: A region a fused command writes and then reads itself, of no use after it (the
#: gradient between a GEMM and its UPDATE): neither loaded nor stored.
DEAD = "dead"

_GEMM_FIELDS = [("a_addr", "a_stride"), ("b_addr", "b_stride"), ("out_addr", "out_stride"),
                ("mask_addr", "mask_stride")]

#: The address field of a GEMM's A, by the kind of command it is in.
_A_FIELD = {"gemm": "a_addr", "fused": "g.a_addr"}

#: Command shapes whose programs the host remembers (a training step has about 20).
_PLANS_KEPT = 256

#: A program entry whose settings the RUN's ``requant`` gives (protocol v10).
FROM_REQUANT = "requant"

_SUMMED = ("clip_sum", "gemm_cycles", "beats", "vec_cycles", "w_sum_abs", "w_sum_sq")


class PagedDevice:
    """``dev`` (with an SDRAM) with the SDRAM as its tensor memory (see the module).
    ``program_words``: scratchpad words kept for stored programs (0: the host sends every
    transfer and part itself; by default an eighth of a scratchpad of 8 times
    ``PROGRAM_NIBBLES`` or more, else 0)."""

    def __init__(self, dev, program_words=None):
        if not dev.ext_bursts:
            raise DeviceError(f"{dev.url} has no SDRAM to page through")
        self.dev = dev
        self.rows, self.cols, self.url = dev.rows, dev.cols, dev.url
        self.word_nibbles, self.info = dev.word_nibbles, dev.info
        self.wpb = words_per_burst(dev.word_nibbles)
        self.mem_words = dev.ext_bursts * self.wpb
        if program_words is None:             # by default a small scratchpad keeps it all
            nib = dev.word_nibbles
            program_words = (dev.mem_words // 8
                             if dev.mem_words * nib >= 8 * PROGRAM_NIBBLES else 0)
        program_words = program_words // self.wpb * self.wpb
        self.scratch = dev.mem_words - program_words
        #: the program area (from ``scratch`` to the end) and what it holds now: program
        #: bytes (the settings zeroed) -> (word, entries)
        self.programs, self.program_end = {}, self.scratch
        #: each command shape's program (:meth:`_planned`)
        self._plans = {}
        # the device reads the longest entry's words whatever the entry: keep them there
        self._slack = longest_entry_words(dev.word_nibbles)
        #: what the paging did; ``cycles``: device cycles from each command's first load to
        #: its last store (STATS ``cycles``; 0 on emu://), transfers and compute together,
        #: counted only with ``measure`` (it costs two STATS polls a command)
        self.counters = {"dma_loads": 0, "dma_stores": 0, "dma_bytes": 0, "cycles": 0,
                         "split_commands": 0, "overlapped_commands": 0, "runs": 0,
                         "programs_stored": 0, "program_bytes": 0}
        #: SDRAM bytes the paging moved, by command and direction ("UPDATE load": ...)
        self.by_op, self._op = {}, "WRITE"
        #: device cycles (measured only with ``measure``) by command ("GEMM+UPDATE": ...),
        #: and of each RUN in turn
        self.cycles_by_op, self.run_cycles = {}, []
        self.measure = False
        #: split commands run in the scratchpad's two halves, transfers beside compute
        self.overlap = True

    # the driver's link counters, for link-byte accounting
    def __getattr__(self, name):
        if name in ("wire_sent", "wire_received", "io_seconds", "frames_sent",
                    "payload_sent", "payload_received", "word_bytes", "wire_by_op"):
            return getattr(self.dev, name)
        raise AttributeError(name)

    def stats(self):
        return self.dev.stats()

    # -- host data ---------------------------------------------------------------------------
    def write(self, addr, data):
        data = bytes(data)
        wb, wpb = self.dev.word_bytes, self.wpb
        lo, hi = addr // wpb, -(-(addr + len(data) // wb) // wpb)
        raw = bytearray(self.dev.ext_read(lo, hi - lo, self._staging())
                        if (addr % wpb or (addr + len(data) // wb) % wpb) else
                        bytes((hi - lo) * 16))
        off = (addr - lo * wpb) * wb
        raw[off:off + len(data)] = data
        self.dev.ext_write(lo, bytes(raw), self._staging())

    def read(self, addr, words, later=False, low16=False):
        """``words`` words from word ``addr`` of the SDRAM, through the staging area. With
        ``later`` (where a program area is and the words fit the staging area at once) a
        handle whose ``result()`` is the bytes: the load is a program (its DMA and a
        FENCE, so the READs behind it find every unit idle) and the READs are sent without
        waiting, so the host may send more behind them. ``low16``: only the low two of
        every four bytes (``Device.read``)."""
        wb, wpb = self.dev.word_bytes, self.wpb
        lo, hi = addr // wpb, -(-(addr + words) // wpb)
        off, size = (addr - lo * wpb) * wb, words * wb
        if low16:                               # (words of whole 4-byte groups)
            off, size = off // 2, size // 2
        chunks = list(self.dev._ext_chunks(lo, hi - lo, self._staging()))
        if later and self.scratch < self.dev.mem_words and len(chunks) == 1:
            at, n, mem = chunks[0]
            load = {"store": 0, "rows": 1, "bursts": n, "mem_addr": mem, "mem_stride": n * wpb,
                    "ext_addr": at, "ext_stride": n}
            self._op = "READ"
            program = (program_entry(Op.DMA, load, self.word_nibbles)
                       + program_entry(Op.FENCE, {}, self.word_nibbles))
            run = self._run_program(program, 2, 0, [load], later=True)
            if run is not None:
                reads = self.dev.read(mem, n * wpb, later=True, low16=low16)
                return _Bytes(run, reads, off, size)
        raw = self.dev.ext_read(lo, hi - lo, self._staging(), low16=low16)[off:off + size]
        return Answered(raw) if later else raw

    def _staging(self):
        return (0, self.scratch - self.scratch % self.wpb)

    # -- commands ------------------------------------------------------------------------------
    def gemm(self, cfg, wait=True, later=False):
        """Run a GEMM; its STATS, or with ``later`` a handle whose ``result()`` is (see
        :meth:`_command`)."""
        self._op = "GEMM"
        return self._command("gemm", cfg, later)

    def vector(self, cfg, wait=True, later=False):
        """Run a VECTOR operation; its STATS, or with ``later`` a handle (:meth:`gemm`)."""
        self._op = VecOp(cfg["op"]).name
        return self._command("vector", cfg, later)

    def _command(self, kind, cfg, later=False):
        """Run a GEMM or VECTOR: as a stored program (:meth:`_planned`) where there is a
        program area and it fits, else paged by the host (:meth:`_run`). With ``later``
        the result is a handle whose ``result()`` is the STATS: a program's RUN is then
        sent without waiting for its reply (``Device.post``; not while ``measure``, which
        reads the cycle counter before and after), so the host prepares and sends the
        next commands while the device runs it."""
        if self.scratch < self.dev.mem_words:
            stats = self._planned(kind, cfg, later)
            if stats is not None:
                return stats
        stats = self._run(kind, *self._parts(kind, cfg))
        return Answered(stats) if later else stats

    def gemm_update(self, gemm, update, requant=None, later=False):
        """A GEMM into a RAW buffer and the UPDATE that takes it as its gradient (and is
        the last to read it), as one program, part by part: each part's GEMM writes its
        rows of the gradient into the scratchpad and the UPDATE of the same rows reads
        them there, so the gradient is neither stored nor loaded (its SDRAM copy keeps
        what it held). With ``requant`` (a REQUANT of the UPDATE's masters, protocol v10)
        each part also requantizes its new masters there: they are not loaded again.
        Returns the STATS combined (the RUN's; with ``later`` a handle whose ``result()``
        is, as :meth:`_command`), or None where they cannot run so (no program area, a
        device before protocol 8, or 10 with a REQUANT, the UPDATE's gradient not the
        GEMM's output, a GEMM without settings of its own: a program's entries of that
        kind take the RUN's; a REQUANT not of the UPDATE's masters, or without settings);
        the caller then sends them one by one."""
        fits = (self.scratch < self.dev.mem_words and self.info.get("version", 0) >= 8
                and update["op"] == VecOp.UPDATE
                and gemm["lane"]["path"] == OutputPath.RAW
                and (update["a_addr"], update["a_stride"], update["rows"], update["cols"])
                == (gemm["out_addr"], gemm["out_stride"], gemm["n"], gemm["m"])
                and program_params(Op.GEMM, gemm) != 0)
        if requant is not None:
            fits = (fits and self.info.get("version", 0) >= 10
                    and requant["op"] == VecOp.REQUANT
                    and (requant["a_addr"], requant["a_stride"], requant["rows"],
                         requant["cols"]) == (update["b_addr"], update["b_stride"],
                                              update["rows"], update["cols"])
                    and program_params(Op.VECTOR, requant) != 0)
        if not fits:
            return None
        self._op = "GEMM+UPDATE" + ("+REQUANT" if requant is not None else "")
        # (None: the caller runs them apart, and they count)
        return self._planned("fused", _fused(gemm, update, requant), later)

    def wait(self):
        return self.dev.wait()

    def _regions(self, kind, cfg):
        """(addr, stride, rows, row words, written, [(address field, stride field)]),
        where ``written`` is :data:`~nibble.host.device.emu.WHOLE` for a region the command
        only writes, every nibble of each row's words (it need not be loaded before), and
        ``DEAD`` for one a fused command writes and reads and leaves unused (neither loaded
        nor stored)."""
        if kind == "fused":           # the GEMM's output: the UPDATE's input, then dead
            g, u, rq = _unfused(cfg)
            gemm = [(*r[:4], DEAD if i == 2 else r[4], [("g." + fa, "g." + fs)] + (
                     [("u.a_addr", "u.a_stride")] if i == 2 else []))
                    for i, (r, (fa, fs)) in enumerate(zip(gemm_regions(g, self.rows, self.cols),
                                                          _GEMM_FIELDS, strict=False))]
            # the REQUANT's masters are the UPDATE's (their spans merge); its codes its own
            return gemm + [(*x, [(p + fa, None)]) for p, c, fas in
                           (("u.", u, ("b_addr", "c_addr")), ("r.", rq, ("a_addr", "b_addr")))
                           if c for x, fa in zip(vec_regions(c, self.word_nibbles)[-2:], fas,
                                                 strict=True)]
        if kind == "gemm":
            regions = gemm_regions(cfg, self.rows, self.cols)
            fields = _GEMM_FIELDS
        else:
            regions = vec_regions(cfg, self.word_nibbles)
            fields = [("a_addr", None), ("b_addr", None), ("c_addr", None)]
        return [(*r, [f]) for r, f in zip(regions, fields, strict=False)]

    def _blocks(self, kind, cfg):
        """How a command's regions are copied: a list of blocks ``[first burst, rows,
        bursts a row, SDRAM stride in bursts, written, [(address field, stride field)]]``.
        A region whose rows are a whole number of bursts apart and far apart (a column
        slice of a wider buffer) and that shares no burst with another is copied row by row
        (packed); the others as one span of bursts, merged with any span they share a burst
        with."""
        wpb = self.wpb
        spans = []
        for addr, stride, n, words, written, fields in self._regions(kind, cfg):
            end = addr + (n - 1) * stride + words
            spans.append([addr // wpb, -(-end // wpb), written, fields, addr, stride, n,
                          words])
        spans.sort(key=lambda x: x[:2])
        merged = []
        for sp in spans:
            if merged and sp[0] < merged[-1][1]:
                last = merged[-1]
                last[1] = max(last[1], sp[1])
                last[2] = bool(last[2] or sp[2])         # (merged: loaded whatever it is)
                last[3] += sp[3]
                last[4] = None                       # a merged span: copied whole
            else:
                merged.append(sp)
        blocks = []
        for lo, hi, written, fields, addr, stride, n, words in merged:
            per = -(-(addr % wpb + words) // wpb) if addr is not None else 0
            if (addr is not None and fields[0][1] and stride % wpb == 0 and n > 1
                    and per * n < hi - lo):
                packed, covered = [lo, n, per, stride // wpb], per * wpb == words
            else:
                packed, covered = [lo, 1, hi - lo, hi - lo], stride == words or n == 1
            # a write-only region is loaded unless its block is exactly its words, whole
            # bursts of them (merged with another region it is a plain written block)
            if written is WHOLE and not (addr is not None and addr % wpb == 0 and covered
                                         and (words * (1 if packed[1] > 1 else n)) % wpb == 0):
                written = True
            blocks.append([*packed, written, fields])
        return blocks

    def _fits(self, kind, cfg, room, shared=None):
        """The command's blocks, but the ``shared`` one (:meth:`_shared`), fit ``room``."""
        return sum(rows * per for *key, _, fields in self._blocks(kind, cfg)
                   for rows, per in [key[1:3]]
                   if not _is_shared(key, fields, shared)) * self.wpb <= room

    def _shared(self, kind, cfg):
        """``(key, words)`` of a GEMM's A block when it is a block of its own (every part of
        a GEMM split along N reads all of A: it is loaded once, at the scratchpad's start,
        for all of them); None for a VECTOR or an A that shares a burst with another
        buffer."""
        if kind == "vector":
            return None
        for *key, written, fields in self._blocks(kind, cfg):
            if not written and [f for f, _ in fields] == [_A_FIELD[kind]]:
                return (*key, _A_FIELD[kind]), key[1] * key[2] * self.wpb
        return None

    def _parts(self, kind, cfg):
        """``(parts, overlap)``: the command whole when it fits the scratchpad; else in parts
        that each fit half of it, so the next part's loads and the last one's stores run
        beside a part (``overlap``, with ``self.overlap``); else in parts that fit the
        whole scratchpad, one after the other."""
        split = {"gemm": self._gemm_parts, "vector": self._vec_parts,
                 "fused": self._fused_parts}[kind]
        key, sw = self._shared(kind, cfg) or (None, 0)
        if self._fits(kind, cfg, self.scratch):
            # whole, its loads all before it and its stores after: in a program, one
            # larger than a part of SMALL_PARTS runs in such parts (the first part's loads
            # before it, the others' beside)
            small = (self.scratch - sw) // SMALL_PARTS // self.wpb * self.wpb
            if (not self.overlap or self.scratch == self.dev.mem_words
                    or self._fits(kind, cfg, small, key)):
                return [cfg], False
            try:
                return split(cfg, small, True, key), True
            except DeviceError:             # (a TRANSPOSE does not split)
                return [cfg], False
        if self.overlap:
            try:
                return split(cfg, (self.scratch - sw) // 2 // self.wpb * self.wpb, True,
                             key), True
            except DeviceError:
                pass
        return split(cfg, self.scratch - sw, False, key), False

    def _written(self, kind, cfg):
        """The bursts a command writes, as (first, end) spans."""
        wpb = self.wpb
        return [(addr // wpb, -(-(addr + (n - 1) * stride + words) // wpb))
                for addr, stride, n, words, written, _ in self._regions(kind, cfg)
                if written and written is not DEAD]

    def _apart(self, kind, parts):
        """True when no two neighbouring parts write into one burst: overlapped, a part's
        loads come before its neighbour's stores, and a shared burst would be stored stale."""
        spans = [self._written(kind, p) for p in parts]
        return not any(a0 < b1 and b0 < a1 for s, t in itertools.pairwise(spans)
                       for a0, a1 in s for b0, b1 in t)

    def _gemm_parts(self, cfg, room, apart=False, shared=None):
        """The GEMM as parts along N that each fit ``room`` words (and with ``apart``, write
        no burst in common with their neighbours)."""
        return self._along_n("gemm", cfg, cfg, room, apart, shared,
                             lambda n0, n1: replace_cfg(cfg, n0, n1, self.word_nibbles))

    def _vec_parts(self, cfg, room, apart=False, shared=None):
        """The VECTOR operation as parts along its rows (UPDATE, REQUANT) that each fit
        (and with ``apart``, write no burst in common with their neighbours)."""
        if cfg["op"] == VecOp.TRANSPOSE:
            raise DeviceError(f"a {cfg['rows']}x{cfg['cols']} TRANSPOSE does not fit "
                              f"{self.scratch:,} words of scratchpad")
        rows = cfg["rows"]
        for parts in range(2, rows + 1):
            height = _ceil(rows, parts)
            cut = [_vec_rows(cfg, r0, min(r0 + height, rows)) for r0 in range(0, rows, height)]
            if all(self._fits("vector", c, room) for c in cut) and (
                    not apart or self._apart("vector", cut)):
                return cut
        raise DeviceError(f"a VECTOR row of {cfg['cols']} elements does not fit the scratchpad")

    def _fused_parts(self, cfg, room, apart=False, shared=None):
        """A fused GEMM and UPDATE as parts along the GEMM's N (the UPDATE's rows)."""
        g, u, r = _unfused(cfg)
        return self._along_n("fused", cfg, g, room, apart, shared, lambda n0, n1: _fused(
            replace_cfg(g, n0, n1, self.word_nibbles), _vec_rows(u, n0, n1),
            r and _vec_rows(r, n0, n1)))

    def _along_n(self, kind, cfg, gemm, room, apart, shared, cut):
        """``cut(n0, n1)`` for spans of the GEMM's N in whole words of B's codes, as few as
        fit ``room`` words each (and with ``apart``, write no burst in common with their
        neighbours)."""
        step, n = self.word_nibbles, gemm["n"]
        for parts in range(2, _ceil(n, step) + 1):
            width = _ceil(_ceil(n, parts), step) * step
            cuts = [cut(n0, min(n0 + width, n)) for n0 in range(0, n, width)]
            if all(self._fits(kind, c, room, shared) for c in cuts) and (
                    not apart or self._apart(kind, cuts)):
                return cuts
        raise DeviceError(f"a GEMM of {gemm['m']}x{gemm['l']}x{n}"
                          f"{' and its UPDATE' if kind == 'fused' else ''} does not fit "
                          f"{room:,} words of scratchpad even one word of B wide")

    def _place(self, kind, cfg, base, shared=None):
        """(blocks, each block's scratchpad word from ``base``, the ``shared`` one at word
        0, the command with its addresses moved onto them)."""
        wpb = self.wpb
        blocks = self._blocks(kind, cfg)
        places, at = [], base
        for *key, _, fields in blocks:
            if _is_shared(key, fields, shared):
                places.append(0)
            else:
                places.append(at)
                at += key[1] * key[2] * wpb
        moved = dict(cfg)
        for (lo, rows, per, _, _, fields), at in zip(blocks, places, strict=True):
            for fa, fs in fields:
                if rows > 1:                          # packed rows: a new stride
                    moved[fa] = at + cfg[fa] % wpb
                    moved[fs] = per * wpb
                else:
                    moved[fa] = cfg[fa] - lo * wpb + at
        return blocks, places, moved

    def _copy(self, placed, store):
        """DMA a placed command's blocks in (every one) or out (the ones it wrote)."""
        for cfg in self._dma_list(placed, store):
            self.dev.dma(cfg, wait=False)
            self._moved(cfg)

    def _start(self, kind, cfg):
        (self.dev.gemm if kind == "gemm" else self.dev.vector)(cfg, wait=False)

    def _computed(self):
        """Poll until the GEMM or VECTOR has ended (DMAs may run on): its STATS."""
        pause = self.dev.poll
        while True:
            stats = self.dev.stats()
            if not stats["busy"] & 1:
                return stats
            time.sleep(pause)
            pause = min(2 * pause, 0.01)

    def _run(self, kind, parts, overlap):
        """Run ``parts`` through the scratchpad, combining their STATS: each part loaded,
        run and stored; with ``overlap`` in the two halves of the scratchpad in turn, part
        i+1's loads and part i-1's stores beside part i (a GEMM or VECTOR starts only when
        every DMA sent before it has ended, and the DMA runs its commands in order, so a
        half is stored before it is loaded again). The host sends every step and reads a
        part's STATS before it starts the next: on a device without a program area, or for
        a program that does not fit it (else :meth:`_planned` runs them as one)."""
        dev = self.dev
        placed = self._placed(parts, overlap, kind)
        self._count_split(len(parts), overlap)
        c0 = dev.stats()["cycles"] if self.measure else None
        total = None
        for step, i in _schedule(len(placed), overlap):
            if step == "load" or step == "store":
                self._copy(placed[i], store=step == "store")
            elif step == "start":
                self._start(kind, placed[i][2])
            else:
                stats = self._computed()
                if total is None:
                    total = dict(stats)
                else:
                    for key in _SUMMED:
                        if key in stats:
                            total[key] += stats[key]
                    total["absmax"] = max(total["absmax"], stats["absmax"])
                    total["cycles"] = stats["cycles"]
        if self.measure:      # else the stores run on: the next DMA queues behind them, and
            # a GEMM or VECTOR waits for every unit, a WRITE or READ is BUSY until then
            self._cycles(dev.wait()["cycles"] - c0)
        return total

    def _placed(self, parts, overlap, kind="fused"):
        """Each part placed (:meth:`_place`): in the scratchpad's two halves in turn with
        ``overlap``, else from its start; a split GEMM's A (:meth:`_shared`) before them,
        loaded with the first part only."""
        key, sw = (self._shared(kind, parts[0]) if len(parts) > 1 else None) or (None, 0)
        half = (self.scratch - sw) // 2 // self.wpb * self.wpb
        placed = []
        for i, p in enumerate(parts):
            blocks, places, moved = self._place(kind, p, sw + ((i % 2) * half if overlap
                                                               else 0), key)
            if i:                               # A is in place: neither loaded nor stored
                blocks = [[*b[:4], DEAD, b[5]] if _is_shared(b[:4], b[5], key) else b
                          for b in blocks]
            placed.append((blocks, places, moved))
        return placed

    def _count_split(self, parts, overlap):
        if parts > 1:
            self.counters["split_commands"] += 1
            self.counters["overlapped_commands"] += overlap

    def _planned(self, kind, cfg, later=False):
        """Run a command as a stored program: its parts, placement and program bytes
        worked out once for its shape (:func:`_plan_key`: all but the settings a RUN gives)
        and remembered, since a training step sends the same shapes every step; the RUN
        gives this command's settings. None when the program does not fit the area; with
        ``later`` a handle (:meth:`_command`)."""
        key = _plan_key(kind, cfg)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            parts, overlap = self._parts(kind, cfg)
            plan = self._plans[key] = (*self._program(kind, self._placed(parts, overlap, kind),
                                                      overlap, cfg), len(parts), overlap)
        program, entries, op, dmas, parts, overlap = plan
        requant = _unfused(cfg)[2] if kind == "fused" else None
        stats = self._run_program(program, entries, program_params(op, _given(kind, cfg)),
                                  dmas, later,
                                  program_params(Op.VECTOR, requant) if requant else 0)
        if stats is not None:
            self._count_split(parts, overlap)
        return stats

    def _program(self, kind, placed, overlap, cfg):
        """A command's placed parts as a program: the schedule's loads, parts and stores in
        the same order, a wait for a part's end a FENCE unless a GEMM or VECTOR follows (it
        waits for every unit itself). Returns ``(bytes, entries, op, DMA arguments)``: the
        settings the RUN gives zeroed, ``op`` the kind of entry that takes them (every part
        of ``cfg`` has the same)."""
        beside = self.info.get("version", 0) >= 9
        steps = list(_schedule(len(placed), overlap, beside))
        # a fused REQUANT in overlapped parts runs beside the next part's GEMM (the
        # element-wise unit is free then): behind the UPDATE an entry would hold the
        # stores and loads after it until the UPDATE ends, the DMA idle meanwhile
        defer = kind == "fused" and overlap and _unfused(cfg)[2] is not None

        def requant(i):
            return Op.VECTOR, _unfused(placed[i][2])[2], FROM_REQUANT

        entries = []                   # (opcode, arguments, settings from the RUN)
        # a store's DMAs after its first, behind the next part's start: ``before`` ahead of
        # its UPDATE (beside its REQUANT and GEMM), ``after`` behind the whole start
        before, after = [], []
        for k, (step, i) in enumerate(steps):
            starts_next = k + 1 < len(steps) and steps[k + 1][0] == "start"
            if step == "store" and defer:
                # the codes stored last: behind the next part's UPDATE, which starts once
                # the REQUANT has ended; after the last part, behind a FENCE
                rest, codes = ([(Op.DMA, c, False) for c in
                                self._dma_list(placed[i], True, codes=c)] for c in (False, True))
                if starts_next:         # the first two beside the REQUANT and the GEMM
                    entries += rest[:1]
                    before, after = rest[1:2], rest[2:] + codes
                else:
                    entries += [requant(i), *rest, (Op.FENCE, {}, False), *codes]
                continue
            if step == "load" or step == "store":
                dmas = [(Op.DMA, c, False) for c in self._dma_list(placed[i], step == "store")]
                if step == "store" and starts_next:
                    dmas, after = dmas[:1], dmas[1:]   # the DMA busy while the part starts
                entries += dmas
                continue
            if step == "start":
                if kind == "fused":                     # the GEMM keeps its settings
                    g, u, r = _unfused(placed[i][2])    # (the REQUANT's: the RUN's own)
                    starts = [(Op.GEMM, g, False), (Op.VECTOR, u, True)]
                    if defer and i:
                        starts.insert(0, requant(i - 1))
                    elif r and not defer:
                        starts.append((Op.VECTOR, r, FROM_REQUANT))
                else:
                    starts = [(Op.GEMM if kind == "gemm" else Op.VECTOR, placed[i][2], True)]
                if k and steps[k - 1][0] == "store":    # beside the stores (a FENCE before)
                    starts = [e for s in starts for e in ((Op.BESIDE, {}, False), s)]
                    starts[-2:-2] = before      # (the UPDATE waits for the REQUANT)
                entries += starts + after
                before, after = [], []
            elif k + 1 == len(steps) or steps[k + 1][0] != "start":
                entries.append((Op.FENCE, {}, False))
        op = next(o for o, _, given in entries if given is True)
        assert all(program_params(o, c) == program_params(op, _given(kind, cfg))
                   for o, c, given in entries if given is True)
        program = b"".join(program_entry(o, settings_zeroed(o, c) if given else c,
                                         self.word_nibbles) for o, c, given in entries)
        return program, len(entries), op, [c for o, c, _ in entries if o == Op.DMA]

    def _run_program(self, program, entries, params, dmas, later=False, requant=0):
        """Store ``program`` in the program area the first time (:meth:`_store`), then RUN
        it with ``params`` (and its REQUANTs with ``requant``); its STATS (with ``later`` a
        handle, :meth:`_command`), or None when it does not fit the area."""
        addr = self._store(program, entries)
        if addr is None:
            return None
        self.counters["runs"] += 1
        for c in dmas:
            self._moved(c)
        if later and not self.measure:
            return self.dev.run(addr, entries, params, wait=False, requant=requant)
        c0 = self.dev.stats()["cycles"] if self.measure else None
        stats = self.dev.run(addr, entries, params, requant=requant)
        if self.measure:
            self._cycles(stats["cycles"] - c0)
            self.run_cycles.append(stats["cycles"] - c0)
        return Answered(stats) if later else stats

    def _store(self, program, entries):
        """The program's word in the program area: where it is already, or written after
        the last one (the area starts over when it is full: every RUN has ended); None
        when it is longer than the area or has more entries than a RUN runs."""
        if program in self.programs:
            return self.programs[program][0]
        if entries >= 1 << RUN_ARGS["entries"].width:
            return None
        wb = self.dev.word_bytes
        words = len(program) // wb
        if self.program_end + words > self.dev.mem_words - self._slack:
            self.programs.clear()
            self.program_end = self.scratch
            if self.program_end + words > self.dev.mem_words - self._slack:
                return None
        addr = self.program_end
        self.dev.write(addr, program)
        self.programs[program] = (addr, entries)
        self.program_end += words
        self.counters["programs_stored"] += 1
        self.counters["program_bytes"] += len(program)
        return addr

    def _dma_list(self, placed, store, codes=None):
        """The DMA_ARGS that load a placed command's blocks (every one but those it only
        writes, whole) or store them (the ones it writes); with ``codes`` only the blocks
        that hold a fused REQUANT's codes (True) or the others (False)."""
        blocks, places, _ = placed
        for (lo, rows, per, ext_stride, written, fields), at in zip(blocks, places,
                                                                    strict=True):
            if codes is not None and codes != any(f == "r.b_addr" for f, _ in fields):
                continue
            if written is not DEAD and (written if store else written is not WHOLE):
                yield from self._dma_cfgs(store, lo, rows, per, ext_stride, at)

    def _dma_cfgs(self, store, burst, rows, per, ext_stride, mem):
        """DMA_ARGS that move ``rows`` rows of ``per`` bursts (``ext_stride`` apart in the
        SDRAM, packed from word ``mem`` in the scratchpad), at most a DMA row's bursts
        each."""
        most = self.dev.dma_row_bursts
        if rows > 1:
            chunks = [(0, rows, per)]
        else:
            chunks = [(off, 1, min(most, per - off)) for off in range(0, per, most)]
        for off, r, k in chunks:
            yield {"store": store, "rows": r, "bursts": k,
                   "mem_addr": mem + off * self.wpb, "mem_stride": k * self.wpb,
                   "ext_addr": burst + off, "ext_stride": ext_stride if r > 1 else k}

    def _cycles(self, n):
        self.counters["cycles"] += n
        self.cycles_by_op[self._op] = self.cycles_by_op.get(self._op, 0) + n

    def _moved(self, cfg):
        self.counters["dma_stores" if cfg["store"] else "dma_loads"] += 1
        n = 16 * cfg["rows"] * cfg["bursts"]
        self.counters["dma_bytes"] += n
        key = f"{self._op} {'store' if cfg['store'] else 'load'}"
        self.by_op[key] = self.by_op.get(key, 0) + n


class _Bytes:
    """The bytes of posted READs behind a posted load (:meth:`PagedDevice.read`)."""

    def __init__(self, run, reads, off, size):
        self.run, self.reads, self.off, self.size = run, reads, off, size

    def result(self):
        self.run.result()
        raw = b"".join(r.result() for r in self.reads)
        return raw[self.off:self.off + self.size]


def _schedule(parts, overlap, beside=False):
    """The steps of ``parts`` parts through the scratchpad, ``(step, part)`` with step
    "load", "start", "wait" (for the part's end) or "store": each part loaded, started,
    waited for and stored; with ``overlap`` the next part's loads go before the wait and
    it starts before the stores (the two halves of the scratchpad), else after them. With
    ``beside`` (a program's BESIDE entries) the stores go first and the next part starts
    beside them: it waits for no DMA, as a plain start does."""
    yield "load", 0
    yield "start", 0
    for i in range(parts):
        more = i + 1 < parts
        if more and overlap:
            yield "load", i + 1
        yield "wait", i
        if more and overlap and not beside:
            yield "start", i + 1
        yield "store", i
        if more and overlap and beside:
            yield "start", i + 1
        if more and not overlap:
            yield "load", i + 1
            yield "start", i + 1


def replace_cfg(cfg, n0, n1, nib):
    """GEMM_ARGS of output rows (B columns) ``n0 .. n1 - 1`` of ``cfg``; ``n0`` a multiple of
    a word's codes."""
    out = dict(cfg, n=n1 - n0, b_addr=cfg["b_addr"] + n0 // nib,
               out_addr=cfg["out_addr"] + n0 * cfg["out_stride"])
    if cfg["mask_stride"] or cfg["mask_addr"]:
        out["mask_addr"] = cfg["mask_addr"] + n0 * cfg["mask_stride"]
    return out


def _is_shared(key, fields, shared):
    """Block ``key`` (first burst, rows, bursts a row, SDRAM stride) with ``fields`` is the
    ``shared`` one (:meth:`PagedDevice._shared`)."""
    return shared is not None and (*key, fields[0][0]) == shared and len(fields) == 1


#: The settings a RUN gives, by command kind (the fused command's GEMM keeps its own): a
#: program's shape is its arguments without them. (A GEMM's lane path, mask and phase stay
#: in the key: they decide its output's width and its regions.)
_GIVEN = {"gemm": (("lane", "rescale", "m"), ("lane", "rescale", "s"), ("lane", "log4", "exp")),
          "vector": (("mu",), ("m",), ("s",)),
          "fused": (("u.mu",), ("u.m",), ("u.s",), ("r.mu",), ("r.m",), ("r.s",))}


def _plan_key(kind, cfg):
    """A hashable key of ``cfg``'s shape: everything but the settings a RUN gives."""
    def frozen(value, path):
        if isinstance(value, dict):
            return tuple(sorted((k, frozen(v, (*path, k))) for k, v in value.items()
                                if (*path, k) not in _GIVEN[kind]))
        return value
    return kind, frozen(cfg, ())


def _given(kind, cfg):
    """The arguments of ``cfg`` whose settings a program's RUN gives: the UPDATE's of a
    fused command, else the command's own."""
    return _unfused(cfg)[1] if kind == "fused" else cfg


def _fused(gemm, update, requant=None):
    """A GEMM, an UPDATE (and a REQUANT) as one flat argument dict (fields ``g.*``, ``u.*``,
    ``r.*``)."""
    return {f"{p}.{k}": v for p, c in (("g", gemm), ("u", update), ("r", requant or {}))
            for k, v in c.items()}


def _unfused(cfg):
    """The GEMM's, the UPDATE's and the REQUANT's (None without) arguments of a
    :func:`_fused` dict."""
    g, u, r = ({k[2:]: v for k, v in cfg.items() if k.startswith(p)} for p in ("g.", "u.", "r."))
    return g, u, r or None


def _vec_rows(cfg, r0, r1):
    return dict(cfg, rows=r1 - r0, a_addr=cfg["a_addr"] + r0 * cfg["a_stride"],
                b_addr=cfg["b_addr"] + r0 * cfg["b_stride"],
                c_addr=cfg["c_addr"] + r0 * cfg["b_stride"])


def _ceil(a, b):
    return -(-a // b)
