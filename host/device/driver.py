"""The host driver: one API for a board, the simulated device and the emulator.

``Device.open(url)`` takes

* ``emu://`` (optionally ``emu://?rows=2&cols=4&words=65536``): the golden model in process,
  by default configured as the simulated device (``gateware.device.SIM_DEVICE``);
* ``pysim://`` (same parameters): the device's RTL in Amaranth's simulator, in process
  (:mod:`nibble.host.device.pysim`);
* ``socket://127.0.0.1:PORT``: the Verilator system model (``nibble sim serve``);
* a serial port (``/dev/ttyUSB1``, ``COM5``): a board, at its baud rate.

Every request is a frame with a sequence number; the driver waits for the reply with the
same number, resends on a timeout or a BAD_CRC reply (the device answers a repeated WRITE or
GEMM without redoing it), waits out BUSY, and raises a :class:`DeviceError` subclass with a
clear message for every other error reply. A reply is accepted only with a good CRC, so a
result is either exact or an exception. On a noisy link a long WRITE or READ frame can fail
every retry (at 1e-3 damaged bytes, a 1 KB frame and its reply get through only a third of
the time); when the device is heard but the frame never gets through (every try answered
BAD_CRC, BAD_LENGTH, which a lost flag byte gives a frame the driver built in range, or
nothing valid), the driver sends it again as two halves (a rejected frame changes nothing),
down to :data:`MIN_SPLIT_WORDS`.
"""

import select
import time
import urllib.parse
from collections import Counter

import numpy as np
from amaranth.hdl import Shape

from nibble.gateware.protocol import (
    DMA_ARGS,
    GATHER_ADDR_BYTES,
    GATHER_HEADER,
    GEMM_ARGS,
    INFO_LAYOUT,
    MAX_PAYLOAD,
    READ_ARGS,
    RUN_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VEC_ARGS,
    WRITE_HEADER,
    Op,
    Status,
    layout_bytes,
)
from nibble.host.device.commands import lane_cfg, plan_gemm
from nibble.host.device.layout import unpack
from nibble.host.device.link import Frame, FrameDecoder, encode_frame
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.host.golden.tiling import Gemm
from nibble.rtl.dma import words_per_burst
from nibble.rtl.formats import VEC_OPS_ALL, Operand, OutputPath

__all__ = ["MAX_IN_FLIGHT", "Answered", "BadCrcError", "BadLengthError", "BusyError", "Device",
           "DeviceError", "LinkTimeout", "OutOfRangeError", "Pending", "UnknownOpError",
           "open_transport"]

#: Default baud rates by board link (the driver's default for serial ports).
DEFAULT_BAUD = 3_000_000


class DeviceError(RuntimeError):
    """Anything the device or the link refused."""


class ReplyError(DeviceError):
    status = None


class BadCrcError(ReplyError):
    status = Status.BAD_CRC


class UnknownOpError(ReplyError):
    status = Status.UNKNOWN_OP


class BadLengthError(ReplyError):
    status = Status.BAD_LENGTH


class OutOfRangeError(ReplyError):
    status = Status.OUT_OF_RANGE


class BusyError(ReplyError):
    status = Status.BUSY


class LinkTimeout(DeviceError):
    """No valid reply after every retry. ``heard``: bytes came back meanwhile (a noisy link,
    not a silent one)."""

    heard = False


#: A WRITE or READ that fails every retry on a noisy link is split in halves down to this.
MIN_SPLIT_WORDS = 8

#: Requests the driver has sent and not had answered, at most (:meth:`Device.post`); far
#: below the 256 sequence numbers, so a late reply to an earlier try is never taken for a
#: newer request's.
MAX_IN_FLIGHT = 64


class Answered:
    """A result already in hand, with :class:`Pending`'s ``result()``."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Pending:
    """A request sent (:meth:`Device.post`) whose reply has not been taken yet."""

    def __init__(self, dev, op, payload, wait_busy, timeout, convert=None):
        self.dev, self.op, self.payload = dev, op, payload
        self.wait_busy, self.timeout, self.convert = wait_busy, timeout, convert
        self.seq, self.wire, self.reply_wire = None, b"", 0
        self._done, self._value, self._error = False, None, None

    def result(self):
        """The reply's payload (converted), waiting for it; raises what the request met.
        Requests sent before this one are answered first: their replies are kept."""
        if not self._done:
            dev = self.dev
            dev._traced("wait", self, time.perf_counter())
            try:
                payload = dev._finish(self)
                self._value = payload if self.convert is None else self.convert(payload)
            except DeviceError as e:
                self._error = e
            finally:
                self._done = True
                dev._in_flight.pop(self.seq, None)
                dev._host_since = time.perf_counter()
        if self._error is not None:
            raise self._error
        return self._value


_ERRORS = {cls.status: cls for cls in (BadCrcError, UnknownOpError, BadLengthError,
                                       OutOfRangeError, BusyError)}
_MESSAGES = {
    Status.BAD_CRC: "every copy of the {op} frame reached the device corrupted "
                    "(bad CRC) after {tries} tries: the link is too noisy",
    Status.UNKNOWN_OP: "the device does not know opcode {op}: host and bitstream are from "
                       "different versions",
    Status.BAD_LENGTH: "the device rejected the length of a {op} frame ({n} payload bytes)",
    Status.OUT_OF_RANGE: "{op} is out of range for the device (dims, or a buffer beyond its "
                         "{words} words of tensor memory)",
    Status.BUSY: "the device is busy with a GEMM and refused {op}",
}


def open_transport(url, baudrate=None, timeout=0.002):
    """A pyserial-style object for ``url`` (see the module docstring)."""
    for scheme, module, cls, defaults in (
            ("emu://", "nibble.host.device.emu", "EmuTransport", None),
            ("pysim://", "nibble.host.device.pysim", "PysimTransport", "PYSIM_DEVICE")):
        if not url.startswith(scheme):
            continue
        import importlib
        mod = importlib.import_module(module)
        if defaults is None:
            from nibble.gateware.device import SIM_DEVICE as config
        else:
            config = getattr(mod, defaults)
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query,
                                      keep_blank_values=True)     # sdram= : none
        kw = dict(config)
        try:
            for key, value in query.items():
                if key not in kw:
                    raise ValueError(f"unknown parameter {key!r} (one of {', '.join(kw)})")
                kw[key] = type(kw[key])(value[0])
            return getattr(mod, cls)(**kw)
        except ValueError as e:
            raise DeviceError(f"bad device URL {url}: {e}") from e
    import serial
    try:
        t = serial.serial_for_url(url, baudrate=baudrate or DEFAULT_BAUD, timeout=timeout)
    except (serial.SerialException, OSError, ValueError) as e:
        raise DeviceError(f"cannot open {url}: {e}") from e
    # a TCP socket (the simulated device) and a USB CDC-ACM port lose no byte: USB
    # checks each packet's CRC and resends it (``Device.pipeline``)
    t.lossless = url.startswith("socket://") or "ttyACM" in url or "usbmodem" in url
    if hasattr(t, "fileno"):
        # pyserial's read(n) waits out its whole timeout unless n bytes come: read what has
        # arrived (timeout 0) and wait for more with select() on the port instead, so a
        # reply is taken the moment it lands (2 ms a request otherwise)
        t.timeout = 0
    return t


class Device:
    """A connected nibble device.

    Attributes after :meth:`open`: ``rows``, ``cols``, ``word_nibbles``, ``mem_words``,
    ``clk_hz``, ``ext_bursts`` (16-byte bursts of SDRAM, 0 without); link counters
    ``wire_sent``, ``wire_received`` (bytes on the wire),
    ``payload_sent``, ``payload_received`` (frame payload bytes), ``frames_sent``,
    ``resends``; ``wire_by_op``: wire bytes both ways by request opcode name (what each
    kind of command costs the link).
    """

    def __init__(self, transport, url="?", timeout=2.0, retries=10, poll=0.0005):
        self.t = transport
        self.url = url
        self.timeout = timeout
        #: Seconds to wait for a RUN's reply, which comes when its program has ended
        self.run_timeout = 120.0
        self.retries = retries
        self.poll = poll
        self._seq = int(time.monotonic_ns()) & 0xFF
        self._dec = FrameDecoder()
        self.wire_sent = self.wire_received = 0
        self.payload_sent = self.payload_received = 0
        self.resends = 0
        self.frames_sent = 0
        self.wire_by_op = Counter()
        #: requests sent and not answered yet (seq -> Pending, oldest first), and replies
        #: taken for them while waiting for another
        self._in_flight, self._replies = {}, {}
        #: send requests without waiting for the replies before them (:meth:`post`) only
        #: on a link that loses no byte (``lossless``: emu://, pysim://, the simulated
        #: device's socket, a USB CDC-ACM port): where a reply can be lost, a posted
        #: request's could not be asked for again behind later ones
        self.pipeline = bool(getattr(transport, "lossless", False))
        #: a list to record the host's side of the link in (:meth:`start_trace`), or None
        self.trace = None
        self._host_since = 0.0
        #: VECTOR operations run on the host (the device's unit is built without them)
        self.host_vectors = 0
        self.vec_ops = VEC_OPS_ALL
        #: Seconds spent writing to the transport and waiting for replies (the link and
        #: the device; for ``emu://`` also the emulator's own work).
        self.io_seconds = 0.0
        self.info = None

    @classmethod
    def open(cls, url, baudrate=None, timeout=None, retries=10, wrap=None):
        """Open ``url`` and read the device's INFO; ``wrap`` wraps the transport (tests use
        it to inject faults)."""
        transport = open_transport(url, baudrate)
        if wrap is not None:
            transport = wrap(transport)
        if timeout is None:
            timeout = 0.2 if url.startswith(("emu://", "pysim://")) else 2.0
        dev = cls(transport, url, timeout=timeout, retries=retries)
        try:
            dev.info = unpack_fields(INFO_LAYOUT, dev.request(Op.INFO))
        except LinkTimeout as e:
            dev.close()
            raise LinkTimeout(f"no answer from {url}: is the device there, and is it a "
                              f"nibble bitstream? ({e})") from None
        dev.rows, dev.cols = dev.info["rows"], dev.info["cols"]
        dev.word_nibbles = dev.info["word_nibbles"]
        dev.mem_words = dev.info["mem_words"]
        dev.clk_hz = dev.info["clk_hz"]
        dev.ext_bursts = dev.info["ext_bursts"]
        dev.vec_ops = dev.info["vec_ops"]
        return dev

    def close(self):
        self.t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests -------------------------------------------------------------------------
    def _next_seq(self):
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _await(self, seq, deadline):
        """The reply frame numbered ``seq``, or None at the deadline. Replies to other
        requests in flight that arrive meanwhile are kept for them; any other frame (a
        late reply to an earlier try) is dropped."""
        instant = getattr(self.t, "instant", False)
        fileno = getattr(self.t, "fileno", None)
        while True:
            if seq in self._replies:
                return self._replies.pop(seq)
            # what has arrived (a port with a file number), or what arrives within the
            # transport's short read timeout
            chunk = self.t.read(4096)
            if chunk:
                self.wire_received += len(chunk)
                for frame in self._dec.feed(chunk):
                    p = self._in_flight.get(frame.seq)
                    if p is not None:
                        self.wire_by_op[_op_name(p.op)] += frame.wire
                        p.reply_wire += frame.wire
                        self._replies[frame.seq] = frame
                continue
            left = deadline - time.monotonic()
            if instant or left < 0:
                return None
            if fileno is not None:
                select.select([fileno()], [], [], min(left, 0.05))

    def request(self, op, payload=b"", wait_busy=True, timeout=None):
        """Send one request; returns the reply payload or raises. ``timeout``: seconds to
        wait for each try's reply (default: the device's ``timeout``)."""
        return self.post(op, payload, wait_busy, timeout).result()

    def post(self, op, payload=b"", wait_busy=True, timeout=None, convert=None):
        """Send one request and return at once: a :class:`Pending` whose ``result()``
        waits for the reply (``convert(payload)`` where given). The device carries out
        frames in the order they arrive and holds a GEMM, VECTOR, DMA, RUN, GATHER or
        FENCE until its unit is free, so the host may send the next ones while it works:
        their bytes cross the link, and the host prepares them, while the device computes
        (at most :data:`MAX_IN_FLIGHT` unanswered; one more waits for the oldest). A
        request is resent only while it is the newest one sent (the device recognizes a
        repeat of its last request and does not carry it out again): a posted request's
        reply lost behind later ones is a :class:`LinkTimeout`. So on a link that may lose
        bytes (not :attr:`pipeline`) a request is sent only once the one before has been
        answered."""
        while len(self._in_flight) >= (MAX_IN_FLIGHT if self.pipeline else 1):
            next(iter(self._in_flight.values())).result()
        p = Pending(self, op, bytes(payload), wait_busy, timeout or self.timeout, convert)
        self._send(p)
        return p

    def start_trace(self):
        """Record from now on, in :attr:`trace`, what the host does on the link: ``("send",
        p, seconds)`` when it sends request ``p`` (a :class:`Pending`: its ``op``, ``wire``
        and, once answered, ``reply_wire`` bytes), ``("wait", p, seconds)`` when it waits
        for ``p``'s reply; ``seconds`` is the host's own time since it last returned from
        the driver. :mod:`nibble.host.bench.timeline` replays a trace on a link and a
        device of given speeds."""
        self.trace = []
        self._host_since = time.perf_counter()
        return self.trace

    def _traced(self, kind, p, t0):
        if self.trace is not None:
            self.trace.append((kind, p, max(t0 - self._host_since, 0.0)))

    def _send(self, p, new_seq=True):
        """Write ``p``'s frame (a new sequence number unless it is a resend)."""
        t0 = time.perf_counter()
        self._traced("send", p, t0)
        if new_seq:
            self._in_flight.pop(p.seq, None)
            p.seq = self._next_seq()
            while p.seq in self._in_flight:     # (a request left unanswered 256 back)
                self._in_flight[p.seq].result()
            p.wire = encode_frame(Frame(p.seq, p.op, p.payload))
            self._in_flight[p.seq] = p
        else:
            self.resends += 1
        self.t.write(p.wire)
        self.wire_sent += len(p.wire)
        self.wire_by_op[_op_name(p.op)] += len(p.wire)
        self.frames_sent += 1
        self._host_since = time.perf_counter()
        self.io_seconds += self._host_since - t0

    def _newest(self, p):
        return next(reversed(self._in_flight)) == p.seq

    def _finish(self, p):
        """Wait for ``p``'s reply (resending it while it is the newest request) and return
        its payload or raise (see :meth:`post`)."""
        bad_crc = 0
        tries = 1
        heard_from = self.wire_received
        while True:
            t0 = time.perf_counter()
            reply = self._await(p.seq, time.monotonic() + p.timeout)
            self.io_seconds += time.perf_counter() - t0
            retry = reply is None
            # BAD_CRC: the frame was corrupted. BAD_LENGTH: either a real length error or two
            # frames run together because a flag byte was lost (the device cannot check the
            # CRC of an over-long frame); a resend tells them apart.
            if reply is not None and reply.op in (Status.BAD_CRC, Status.BAD_LENGTH):
                bad_crc += 1
                retry = bad_crc <= self.retries
            if retry and not self._newest(p):
                what = "no reply" if reply is None else f"{Status(reply.op).name}"
                raise LinkTimeout(
                    f"{what} to a {_op_name(p.op)} sent before {len(self._in_flight) - 1} "
                    f"more requests to {self.url}: it cannot be resent behind them (the "
                    "device carried out the later ones); a link that loses frames needs "
                    "one request at a time")
            if retry:
                tries += 1
                if tries > self.retries + 1:
                    e = LinkTimeout(f"no valid reply to {_op_name(p.op)} from {self.url} "
                                    f"after {tries - 1} tries of {p.timeout:g} s")
                    e.heard = self.wire_received > heard_from
                    raise e
                self._send(p, new_seq=False)
                continue
            if reply.op == Status.BUSY and p.wait_busy and self._newest(p):
                time.sleep(self.poll)
                self._send(p)                          # a new request, not a retry
                tries = 1
                continue
            if reply.op >= 0x80:
                status = Status(reply.op) if reply.op in set(Status) else None
                if status is None:
                    raise DeviceError(f"unknown error reply 0x{reply.op:02x} to "
                                      f"{_op_name(p.op)}")
                msg = _MESSAGES[status].format(op=_op_name(p.op), tries=tries,
                                               n=len(p.payload),
                                               words=getattr(self, "mem_words", "?"))
                raise _ERRORS[status](msg)
            if reply.op != p.op:
                raise DeviceError(f"reply opcode 0x{reply.op:02x} to {_op_name(p.op)}")
            self.payload_sent += len(p.payload)
            self.payload_received += len(reply.payload)
            return reply.payload

    # -- commands -------------------------------------------------------------------------
    @property
    def word_bytes(self):
        return self.word_nibbles // 2

    def ping(self, payload=b""):
        return self.request(Op.PING, payload)

    def write(self, addr, data):
        """Write whole words from word ``addr`` on (several frames if needed)."""
        data = bytes(data)
        wb = self.word_bytes
        if len(data) % wb:
            raise ValueError(f"write of {len(data)} bytes is not whole {wb}-byte words")
        if addr < 0 or addr + len(data) // wb > self.mem_words:
            raise OutOfRangeError(f"write of {len(data) // wb} words at {addr} exceeds the "
                                  f"device's {self.mem_words} words")
        hb = layout_bytes(WRITE_HEADER)
        step = (MAX_PAYLOAD - hb) // wb * wb
        for off in range(0, len(data), step):
            self._halving(lambda a, d: self.request(
                Op.WRITE, pack_fields(WRITE_HEADER, {"addr": a}) + d), addr + off // wb,
                data[off:off + step])

    def read(self, addr, words, later=False, low16=False):
        """Read ``words`` words from word ``addr`` on. With ``later`` the READs are sent
        without waiting (:meth:`post`): returns their :class:`Pending` s, whose results
        joined are the words (a READ that meets a running unit is BUSY: send it behind a
        request answered once every unit is idle, a RUN or a FENCE). With ``low16`` only
        the low two of every four bytes come back (half the bytes: RAW elements known to
        fit 16 bits; :func:`~nibble.host.device.layout.widen16` gives the words back)."""
        wb = self.word_bytes
        if addr < 0 or addr + words > self.mem_words:
            raise OutOfRangeError(f"read of {words} words at {addr} exceeds the device's "
                                  f"{self.mem_words} words")
        step = (MAX_PAYLOAD // wb) << bool(low16)

        def args(a, n):
            return pack_fields(READ_ARGS, {"addr": a, "words": n, "low16": int(bool(low16))})

        if later:
            return [self.post(Op.READ, args(addr + off, min(step, words - off)),
                              wait_busy=False) for off in range(0, words, step)]
        out = bytearray()
        for off in range(0, words, step):
            n = min(step, words - off)
            out += self._halving(lambda a, d: self.request(Op.READ, args(a, len(d) // wb)),
                                 addr + off, bytes(n * wb))
        return bytes(out)

    def _halving(self, send, addr, data):
        """``send(addr, data)``; when it fails every retry on a link that answers, the two
        halves of ``data`` (whole words) one after the other. Returns the replies, joined."""
        try:
            return send(addr, data)
        except (BadCrcError, BadLengthError, LinkTimeout) as e:
            words = len(data) // self.word_bytes
            if words < 2 * MIN_SPLIT_WORDS or not getattr(e, "heard", True):
                raise
            half = words // 2 * self.word_bytes
            return (self._halving(send, addr, data[:half])
                    + self._halving(send, addr + words // 2, data[half:]))

    def stats(self, addr=None, count=None):
        """The device statistics (STATS_LAYOUT fields); with ``addr, count`` also the sums
        of |c| and c^2 over that many INT4 codes (a device with SDRAM only: they check what
        its DMA loaded)."""
        if addr is not None and self.info is not None and not self.info["ext_bursts"]:
            raise DeviceError(f"{self.url} has no SDRAM, so STATS sums no region (INFO "
                              "ext_bursts is 0): read the words back instead")
        payload = b"" if addr is None else pack_fields(STATS_ARGS, {"addr": addr,
                                                                    "count": count})
        return unpack_fields(STATS_LAYOUT, self.request(Op.STATS, payload))

    def gemm(self, cfg, wait=True):
        """Start a GEMM (GEMM_ARGS values); with ``wait``, return its STATS when done."""
        self.request(Op.GEMM, pack_fields(GEMM_ARGS, cfg))
        return self.wait() if wait else None

    def vector(self, cfg, wait=True):
        """Start an element-wise operation (VEC_ARGS values, see :mod:`rtl.vector`); with
        ``wait``, return the STATS when it is done. An operation the device's unit is built
        without (INFO ``vec_ops``) runs here instead (:meth:`host_vector`; it waits)."""
        if not self.vec_ops >> cfg["op"] & 1:
            stats = self.host_vector(cfg)
            return stats if wait else None
        self.request(Op.VECTOR, pack_fields(VEC_ARGS, cfg))
        return self.wait() if wait else None

    def host_vector(self, cfg):
        """Run a VECTOR operation on the host, bit for bit as the element-wise unit would:
        once every unit is idle, read its buffers back, apply it (the emulator's
        ``vector_apply``: the golden fixed-point update and rescale) and write back the
        buffers it writes, whole spans with the words between their rows as read. Returns
        the STATS, with an UPDATE's SAWB sums in ``w_sum_abs``/``w_sum_sq`` and
        ``vec_cycles`` 0 (no device cycles)."""
        from .emu import vec_regions, vector_apply, vector_check
        if not vector_check(cfg, self.rows, self.cols, self.mem_words):
            raise OutOfRangeError(_MESSAGES[Status.OUT_OF_RANGE].format(
                op="VECTOR", words=self.mem_words))
        self.wait()
        wb = self.word_bytes
        spans = [(addr, (rows - 1) * stride + words, written)
                 for addr, stride, rows, words, written in vec_regions(cfg, self.word_nibbles)]
        mem = bytearray(self.mem_words * wb)        # the buffers as read, zeros elsewhere
        for addr, words, _ in spans:
            mem[addr * wb:(addr + words) * wb] = self.read(addr, words)
        sums = vector_apply(mem, cfg, self.rows, self.cols)
        for addr, words, written in spans:
            if written:
                self.write(addr, mem[addr * wb:(addr + words) * wb])
        self.host_vectors += 1
        stats = self.stats()
        stats["vec_cycles"] = 0
        if sums is not None:
            stats["w_sum_abs"], stats["w_sum_sq"] = sums
        return stats

    def dma(self, cfg, wait=True, post=False):
        """Start a tile transfer between tensor memory and the SDRAM (DMA_ARGS values, see
        :mod:`nibble.rtl.dma`; missing strides default to a row's length); with ``wait``,
        return the STATS when it is done. With ``post`` (and not ``wait``) return at once
        the :class:`Pending` of the device's answer (that it has checked and started the
        transfer: :meth:`post`); the caller must take its ``result()``, which raises
        what the device refused."""
        if not self.ext_bursts:
            raise DeviceError(f"{self.url} has no SDRAM (INFO ext_bursts is 0)")
        wpb = words_per_burst(self.word_nibbles)
        cfg = {"mem_stride": cfg["bursts"] * wpb, "ext_stride": cfg["bursts"], **cfg}
        p = self.post(Op.DMA, pack_fields(DMA_ARGS, cfg))
        if post and not wait:
            return p
        p.result()
        return self.wait() if wait else None

    def run(self, addr, entries, params=0, wait=True, requant=0):
        """Run the program of ``entries`` entries stored from word ``addr`` (protocol
        ``RUN``; :func:`~nibble.host.device.commands.program_entry` builds them), its GEMM
        and VECTOR entries with the settings ``params``
        (:func:`~nibble.host.device.commands.program_params`), its REQUANT entries with
        ``requant`` where that is not 0 (v10). The device answers when
        the program has ended: returns that STATS, the statistics combined over the
        program's GEMMs and UPDATEs (absmax: the largest; the sums: the total). Without
        ``wait``, returns at once a :class:`Pending` whose ``result()`` is that STATS
        (:meth:`post`: the host goes on while the program runs)."""
        if not self.ext_bursts:
            raise DeviceError(f"{self.url} has no SDRAM, and no RUN (INFO ext_bursts is 0)")
        payload = pack_fields(RUN_ARGS, {"addr": addr, "entries": entries, "params": params,
                                         "requant": requant})
        p = self.post(Op.RUN, payload, timeout=max(self.timeout, self.run_timeout),
                      convert=lambda reply: unpack_fields(STATS_LAYOUT, reply))
        return p.result() if wait else p

    def gather(self, mem_addr, mem_stride, bursts, ext_addrs, post=False):
        """DMA LOAD ``bursts`` bursts from each SDRAM burst address of ``ext_addrs`` into
        tensor memory rows ``mem_stride`` words apart from word ``mem_addr`` (protocol
        ``GATHER``, as many addresses a frame as fit); does not wait for the loads (a GEMM
        or VECTOR sent next waits for them). With ``post`` it does not wait for the
        answers either: returns their :class:`Pending` s (as :meth:`dma`)."""
        if not self.ext_bursts:
            raise DeviceError(f"{self.url} has no SDRAM (INFO ext_bursts is 0)")
        hb = layout_bytes(GATHER_HEADER)
        most = (MAX_PAYLOAD - hb) // GATHER_ADDR_BYTES
        ext_addrs = [int(a) for a in ext_addrs]
        answers = []
        for k in range(0, len(ext_addrs), most):
            part = ext_addrs[k:k + most]
            head = pack_fields(GATHER_HEADER, {
                "mem_addr": mem_addr + k * mem_stride, "mem_stride": mem_stride,
                "bursts": bursts, "count": len(part)})
            answers.append(self.post(Op.GATHER, head + b"".join(
                a.to_bytes(GATHER_ADDR_BYTES, "little") for a in part)))
            if not post:
                answers[-1].result()
        return answers if post else None

    @property
    def dma_row_bursts(self):
        """The most bursts one DMA row moves: its ``bursts`` field, and its words within a
        ``mem_stride`` (a row's stride is at least its length)."""
        return min((1 << Shape.cast(DMA_ARGS["bursts"].shape).width) - 1,
                   ((1 << Shape.cast(DMA_ARGS["mem_stride"].shape).width) - 1)
                   // words_per_burst(self.word_nibbles))

    def _ext_chunks(self, burst, n, staging):
        addr, words = staging
        per = min(words // words_per_burst(self.word_nibbles), self.dma_row_bursts)
        if per < 1:
            raise ValueError(f"a staging area of {words} words holds no 16-byte burst")
        if burst < 0 or burst + n > self.ext_bursts:
            raise OutOfRangeError(f"{n} bursts at burst {burst} exceed the device's "
                                  f"{self.ext_bursts} bursts of SDRAM")
        for off in range(0, n, per):
            yield burst + off, min(per, n - off), addr

    def ext_write(self, burst, data, staging):
        """Write ``data`` (whole 16-byte bursts) to the SDRAM from burst ``burst`` on,
        through tensor memory at ``staging`` = (word address, words): WRITE, then DMA STORE,
        a chunk at a time; returns once the last STORE has started."""
        data = bytes(data)
        if len(data) % 16:
            raise ValueError(f"{len(data)} bytes are not whole 16-byte bursts")
        chunks = list(self._ext_chunks(burst, len(data) // 16, staging))
        for k, (at, n, addr) in enumerate(chunks):
            self.write(addr, data[(at - burst) * 16:(at - burst + n) * 16])
            # the last chunk's store is not waited for: a WRITE, READ or STATS with a
            # region is BUSY until it has ended, a GEMM, VECTOR, DMA or RUN waits for it
            self.dma({"store": 1, "rows": 1, "bursts": n, "mem_addr": addr, "ext_addr": at},
                     wait=k + 1 < len(chunks))

    def ext_read(self, burst, n, staging, low16=False):
        """Read ``n`` 16-byte bursts of the SDRAM from burst ``burst`` on, through tensor
        memory at ``staging`` (DMA LOAD, then READ, a chunk at a time; ``low16`` as
        :meth:`read`)."""
        out = bytearray()
        for at, k, addr in self._ext_chunks(burst, n, staging):
            self.dma({"store": 0, "rows": 1, "bursts": k, "mem_addr": addr, "ext_addr": at})
            out += self.read(addr, k * 16 // self.word_bytes, low16=low16)
        return bytes(out)

    def wait(self):
        """Poll until every unit is idle (backing off from ``poll`` to 10 ms between polls);
        returns the STATS."""
        pause = self.poll
        while True:
            stats = self.stats()
            if not stats["busy"]:
                return stats
            time.sleep(pause)
            pause = min(2 * pause, 0.01)

    # -- tensors --------------------------------------------------------------------------
    def upload(self, buf, raw):
        self.write(buf.addr, raw)

    def download(self, buf, signed_bits=None):
        raw = self.read(buf.addr, buf.words)
        return unpack(raw, buf.rows, buf.elems, buf.elem_nibbles, self.word_nibbles,
                      buf.stride, signed_bits)

    def matmul(self, gemm, lane, mask=None, a_pair=None, base=0):
        """One GEMM on arbitrary shapes: upload the operands, run, download the result.

        Returns ``(result, stats)``: RAW ints, RESCALE codes (INT4 signed when
        ``out_signed``), or for LOG4 a pair of FP4 code arrays (phase 0, phase 1), each
        M x N."""
        plan = plan_gemm(gemm, lane, self.word_nibbles, self.rows, self.cols, base=base,
                         mask_codes=mask, a_pair=a_pair)
        end = max(b.end for b in (plan.a, plan.b, plan.out, plan.mask) if b is not None)
        if end > self.mem_words:
            raise OutOfRangeError(
                f"a {gemm.shape[0]}x{gemm.shape[1]}x{gemm.shape[2]} GEMM needs {end} words "
                f"of tensor memory; {self.url} has {self.mem_words}")
        for buf, raw in plan.uploads:
            self.upload(buf, raw)
        stats = self.gemm(plan.cfg)
        path = OutputPath(lane["path"])
        signed = {OutputPath.RAW: 32,
                  OutputPath.RESCALE: 4 if lane["rescale"]["out_signed"] else None,
                  OutputPath.LOG4: None}[path]
        out = self.download(plan.out, signed).T
        if path is OutputPath.LOG4:
            return (out & 0xF, out >> 4), stats
        return out, stats

    # -- the three GEMMs of a training step (golden results: nibble.host.golden.gemm) ------
    def forward(self, x_codes, w_codes, lane, x_kind=Operand.UINT4):
        """``Y = X @ W.T``: X (B x K) activation codes of ``x_kind``, W (N x K) INT4
        weights; ``lane`` usually rescales (RESCALE) to the next layer's codes."""
        x, w = np.asarray(x_codes), np.asarray(w_codes)
        return self.matmul(Gemm(x, w.T, x_kind, Operand.INT4), dict(lane, phase=0))

    def backward_data(self, dy_codes, w_codes, lane, act_codes=None):
        """``dX = dY @ W``: dY (B x N) FP4 codes at phase 0, W (N x K) INT4; ``lane``
        usually log4-quantizes (LOG4) under the mask of ``act_codes`` (B x K)."""
        dy, w = np.asarray(dy_codes), np.asarray(w_codes)
        return self.matmul(Gemm(dy, w, Operand.FP4, Operand.INT4), dict(lane, phase=0),
                           mask=act_codes)

    def backward_weight(self, dy_codes, x_codes, lane=None, x_kind=Operand.UINT4):
        """``dW = dY.T @ X``: dY (B x N) FP4 codes at phase 1, X (B x K) activation
        codes; RAW (exact accumulators) unless ``lane`` says otherwise."""
        dy, x = np.asarray(dy_codes), np.asarray(x_codes)
        lane = dict(lane or lane_cfg(OutputPath.RAW), phase=1)
        return self.matmul(Gemm(dy.T, x, Operand.FP4, x_kind), lane)


def _op_name(op):
    try:
        return Op(op).name
    except ValueError:
        return f"0x{op:02x}"

