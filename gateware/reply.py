"""Reply building: a reply frame's body from the frame buffer to the framer.

A reply is ``seq | status | payload``. The request's ``seq`` is still in byte 0 of the
frame buffer, and a payload is already in place when the command made one (PING leaves its
payload where it arrived, READ writes its words from byte 2 on). :class:`Reply` adds the
rest: it writes INFO or STATS (a register layout, byte by byte) as the payload when asked,
writes the status byte over byte 1, then sends bytes ``0 .. length - 1`` to
:class:`~nibble.gateware.framing.FrameTx`, which adds the CRC and the stuffing.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .framing import BUFFER_BYTES, TX_BYTE
from .protocol import HEADER_BYTES, INFO_LAYOUT, STATS_LAYOUT, layout_bytes
from .transfer import FB_ADDR

__all__ = ["Fill", "Reply", "ReplyControl"]


class Fill(enum.Enum, shape=2):
    """The payload a reply gets from registers."""

    NONE = 0
    INFO = 1
    STATS = 2


class ReplyControl:
    class Signature(wiring.Signature):
        """From the decoder's side: ``start`` (a pulse with ``status``, ``length``, the body
        bytes, and ``fill``), ``done`` (a pulse once the last byte is sent)."""

        def __init__(self):
            super().__init__({
                "start": Out(1), "status": Out(8), "length": Out(range(BUFFER_BYTES + 1)),
                "fill": Out(Fill), "done": In(1),
            })


class Reply(wiring.Component):
    """Ports: ``ctl`` (In ``ReplyControl``), ``info`` and ``stats`` (In: the register
    payloads), ``buf_rd`` and ``buf_wr`` (the frame buffer), ``tx`` (Out: body bytes to
    FrameTx), ``busy`` (Out)."""

    def __init__(self):
        super().__init__({
            "ctl": In(ReplyControl.Signature()), "info": In(INFO_LAYOUT),
            "stats": In(STATS_LAYOUT),
            "buf_rd": In(memory.ReadPort.Signature(addr_width=FB_ADDR, shape=8)),
            "buf_wr": In(memory.WritePort.Signature(addr_width=FB_ADDR, shape=8)),
            "tx": Out(stream.Signature(TX_BYTE)), "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        ctl = self.ctl
        status = Signal(8)
        length = Signal.like(ctl.length)
        fill = Signal(Fill)
        q = Signal(range(BUFFER_BYTES + 1))     # bytes filled, then bytes sent
        p = Signal(range(BUFFER_BYTES + 1))     # the next byte to read for sending
        have = Signal()                         # buf_rd.data holds byte p - 1
        n_fill = max(layout_bytes(INFO_LAYOUT), layout_bytes(STATS_LAYOUT))
        qb = (n_fill - 1).bit_length()
        m.d.comb += [self.buf_rd.addr.eq(p), self.tx.payload.data.eq(self.buf_rd.data)]
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(ctl.start):
                    m.d.sync += [status.eq(ctl.status), length.eq(ctl.length), fill.eq(ctl.fill),
                                 q.eq(0), p.eq(0), have.eq(0)]
                    m.next = "FILL"
            with m.State("FILL"):                 # a register payload from byte 2 on
                with m.If(fill == Fill.NONE):
                    m.next = "OPBYTE"
                with m.Else():
                    byte = Mux(fill == Fill.INFO, self.info.as_value().word_select(q[:qb], 8),
                               self.stats.as_value().word_select(q[:qb], 8))
                    last = Mux(fill == Fill.INFO, layout_bytes(INFO_LAYOUT),
                               layout_bytes(STATS_LAYOUT)) - 1
                    m.d.comb += [self.buf_wr.en.eq(1), self.buf_wr.addr.eq(HEADER_BYTES + q),
                                 self.buf_wr.data.eq(byte)]
                    m.d.sync += q.eq(q + 1)
                    with m.If(q == last):
                        m.d.sync += q.eq(0)
                        m.next = "OPBYTE"
            with m.State("OPBYTE"):               # the status over the request's opcode
                m.d.comb += [self.buf_wr.en.eq(1), self.buf_wr.addr.eq(1),
                             self.buf_wr.data.eq(status)]
                m.next = "SEND"
            with m.State("SEND"):                 # bytes 0 .. length - 1 to the framer
                advance = ~have | self.tx.ready
                m.d.comb += [self.buf_rd.en.eq(advance), self.tx.valid.eq(have),
                             self.tx.payload.last.eq(q == length - 1)]
                with m.If(advance):
                    m.d.sync += [have.eq(p < length), p.eq(p + 1)]
                with m.If(self.tx.valid & self.tx.ready):
                    m.d.sync += q.eq(q + 1)
                    with m.If(q == length - 1):
                        m.d.comb += ctl.done.eq(1)
                        m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
