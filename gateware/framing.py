"""Link framing in the gateware: byte stuffing, CRC-32 and a watchdog (see gateware.protocol).

:class:`FrameRx` unstuffs received bytes into the frame buffer while computing the CRC, and
reports each frame once its closing ``FLAG`` arrives: good, bad CRC, or too long. It then
holds its input (``i.ready`` low, ``held`` high) until the command decoder has answered, so
a frame is never overwritten while it is being executed. A frame that stops arriving for
``timeout`` cycles is dropped (the watchdog), and so is a body shorter than a header and a
CRC.

:class:`FrameTx` sends a reply body as ``FLAG stuffed(body | crc32) FLAG``.

The two take turns at one CRC-32 unit (:class:`SharedCrc`): the device only answers a
frame it has received, and holds the receiver until the whole reply, CRC and closing flag
included, has left, so the receiver never needs the CRC while the transmitter has it. A
byte-wide CRC-32 is 32 flip-flops and a few hundred XOR inputs; the UP5K saves its second
copy (``gateware/budget.py``'s framing block).
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from .protocol import CRC, CRC_BYTES, ESC, ESC_XOR, FLAG, HEADER_BYTES, MAX_PAYLOAD

__all__ = ["BUFFER_BYTES", "TX_BYTE", "CrcPort", "FrameRx", "FrameTx", "RxStatus", "SharedCrc"]

#: Largest frame body (header, payload, CRC): the frame buffer's size.
BUFFER_BYTES = HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES
#: A reply body byte for FrameTx; ``last`` on the final one (the CRC follows it).
TX_BYTE = data.StructLayout({"data": 8, "last": 1})


class RxStatus(enum.IntEnum, shape=2):
    """What :class:`FrameRx` found at the end of a frame."""

    OK = 0
    BAD_CRC = 1
    TOO_LONG = 2


class CrcPort:
    class Signature(wiring.Signature):
        """A user's side of a byte-wide CRC-32 (``amaranth.lib.crc.Processor``'s ports):
        ``start``, ``data`` and ``valid`` out, the ``crc`` and ``match_detected`` in."""

        def __init__(self):
            super().__init__({"start": Out(1), "data": Out(8), "valid": Out(1),
                              "crc": In(32), "match_detected": In(1)})


class SharedCrc(wiring.Component):
    """One CRC unit for the receiver and the transmitter: ``tx`` has it while ``tx_turn``
    is high (the receiver holds a frame), ``rx`` otherwise."""

    def __init__(self):
        super().__init__({"rx": In(CrcPort.Signature()), "tx": In(CrcPort.Signature()),
                          "tx_turn": In(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = crc = CRC.create()
        for user in (self.rx, self.tx):
            m.d.comb += [user.crc.eq(crc.crc), user.match_detected.eq(crc.match_detected)]
        user = {name: Mux(self.tx_turn, getattr(self.tx, name), getattr(self.rx, name))
                for name in ("start", "data", "valid")}
        m.d.comb += [crc.start.eq(user["start"]), crc.data.eq(user["data"]),
                     crc.valid.eq(user["valid"])]
        return m


class FrameRx(wiring.Component):
    """Received bytes in; frame buffer writes and a frame report out.

    Ports
    -----
    i : In(stream.Signature(8))
    wr_addr, wr_data, wr_en : Out
        Frame buffer writes (body byte ``k`` at address ``k``).
    frame : Out(1)
        One-cycle pulse: a frame ended; ``status`` (RxStatus) and ``length`` (body bytes,
        CRC included) tell which. The input then stays held until ``ack``.
    ack : In(1)
        The decoder is done with the frame in the buffer.
    errors : Out(16)
        Frames dropped: bad CRC, too long, too short, or timed out (saturating).
    in_frame : Out(1)
        Part of a frame has arrived.
    held : Out(1)
        A frame is reported and not yet acknowledged (the CRC unit is free meanwhile).
    crc : Out(CrcPort.Signature())
    """

    def __init__(self, timeout):
        self.timeout = timeout
        super().__init__({
            "i": In(stream.Signature(8)),
            "wr_addr": Out(range(BUFFER_BYTES)), "wr_data": Out(8), "wr_en": Out(1),
            "frame": Out(1), "status": Out(RxStatus), "length": Out(range(BUFFER_BYTES + 1)),
            "ack": In(1),
            "errors": Out(16),
            "in_frame": Out(1), "held": Out(1),
            "crc": Out(CrcPort.Signature()),
        })

    def elaborate(self, platform):
        m = Module()
        crc = self.crc
        length = Signal(range(BUFFER_BYTES + 1))
        esc = Signal()
        overflow = Signal()
        held = self.held
        timer = Signal(range(self.timeout + 1))
        byte = self.i.payload
        take = Signal()
        m.d.comb += [
            self.i.ready.eq(~held),
            take.eq(self.i.valid & self.i.ready),
            self.in_frame.eq((length != 0) | esc | overflow),
            crc.data.eq(byte ^ Mux(esc, ESC_XOR, 0)),
            self.wr_addr.eq(length),
            self.wr_data.eq(byte ^ Mux(esc, ESC_XOR, 0)),
        ]
        m.d.sync += self.frame.eq(0)
        error = Signal()
        with m.If(error & (self.errors != 0xFFFF)):
            m.d.sync += self.errors.eq(self.errors + 1)
        with m.If(self.ack):
            m.d.sync += held.eq(0)

        with m.If(take):
            m.d.sync += timer.eq(0)
            with m.If(byte == FLAG):
                m.d.comb += crc.start.eq(1)
                m.d.sync += [length.eq(0), esc.eq(0), overflow.eq(0)]
                with m.If(overflow):
                    m.d.sync += [self.frame.eq(1), self.status.eq(RxStatus.TOO_LONG),
                                 self.length.eq(length), held.eq(1)]
                    m.d.comb += error.eq(1)
                with m.Elif(length >= HEADER_BYTES + CRC_BYTES):
                    m.d.sync += [self.frame.eq(1), self.length.eq(length), held.eq(1),
                                 self.status.eq(Mux(crc.match_detected, RxStatus.OK,
                                                    RxStatus.BAD_CRC))]
                    m.d.comb += error.eq(~crc.match_detected)
                with m.Elif(length != 0):
                    m.d.comb += error.eq(1)           # too short to answer: dropped
            with m.Elif(byte == ESC):
                m.d.sync += esc.eq(1)
            with m.Else():
                m.d.sync += esc.eq(0)
                with m.If(length < BUFFER_BYTES):
                    m.d.comb += [self.wr_en.eq(1), crc.valid.eq(1)]
                    m.d.sync += length.eq(length + 1)
                with m.Else():
                    m.d.sync += overflow.eq(1)
        with m.Elif(self.in_frame & ~held):
            with m.If(timer == self.timeout):         # the watchdog
                m.d.comb += [crc.start.eq(1), error.eq(1)]
                m.d.sync += [length.eq(0), esc.eq(0), overflow.eq(0), timer.eq(0)]
            with m.Else():
                m.d.sync += timer.eq(timer + 1)
        return m


class FrameTx(wiring.Component):
    """Reply body bytes in (``last`` on the final one); wire bytes out.

    Ports
    -----
    i : In(stream.Signature(TX_BYTE))
    o : Out(stream.Signature(8))
    busy : Out(1)
        A frame is being sent.
    crc : Out(CrcPort.Signature())
    """

    def __init__(self):
        super().__init__({"i": In(stream.Signature(TX_BYTE)), "o": Out(stream.Signature(8)),
                          "busy": Out(1), "crc": Out(CrcPort.Signature())})

    def elaborate(self, platform):
        m = Module()
        crc = self.crc
        cur = Signal(8)
        escaped = Signal()           # the ESC of the current byte has been sent
        k = Signal(range(CRC_BYTES))
        need = (cur == FLAG) | (cur == ESC)
        sent = Signal()
        m.d.comb += [
            self.o.payload.eq(Mux(need & ~escaped, ESC, cur ^ Mux(need, ESC_XOR, 0))),
            sent.eq(self.o.valid & self.o.ready & (~need | escaped)),
            crc.data.eq(self.i.payload.data),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += escaped.eq(need & ~escaped)
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += [self.o.valid.eq(self.i.valid), self.o.payload.eq(FLAG),
                             crc.start.eq(1)]
                with m.If(self.o.valid & self.o.ready):
                    m.d.sync += escaped.eq(0)
                    m.next = "BODY"
            with m.State("BODY"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(self.i.valid),
                             cur.eq(self.i.payload.data),
                             self.i.ready.eq(sent), crc.valid.eq(sent)]
                with m.If(sent & self.i.payload.last):
                    m.d.sync += k.eq(0)
                    m.next = "CRC"
            with m.State("CRC"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1),
                             cur.eq(crc.crc.word_select(k, 8))]
                with m.If(sent):
                    m.d.sync += k.eq(k + 1)
                    with m.If(k == CRC_BYTES - 1):
                        m.next = "END"
            with m.State("END"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(FLAG)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
        return m
