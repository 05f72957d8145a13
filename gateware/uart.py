"""UART PHY: 8N1 transmitter and receiver as byte streams, baud rate as a parameter.

``divisor = round(clk_hz / baud)`` clock cycles per bit (at least 3): 12 Mbaud from a 36 MHz
clock is 3, 3 Mbaud from 45 MHz is 15. At 3 the receiver samples each bit one cycle after
its middle or at it, so both ends' clocks must be exact multiples of the baud rate (the
FT2232H's 12 Mbaud is 120 MHz / 10; the iCEBreaker's 36 MHz is its 12 MHz crystal x 3).

The receiver samples the middle of each bit after a
two-flop synchronizer, drops a byte whose stop bit is low (counted in ``framing_errors``),
and never blocks: a byte that arrives while its output is full is dropped and counted in
``overruns``; the framing layer above retries.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTRx", "UARTTx", "divisor_for"]


def divisor_for(clk_hz, baud):
    """Clock cycles per bit; raises if the rate error exceeds 2% or the divisor is < 3."""
    div = round(clk_hz / baud)
    if div < 3:
        raise ValueError(f"{baud} baud needs at least 3 clocks per bit at {clk_hz} Hz")
    err = abs(clk_hz / div - baud) / baud
    if err > 0.02:
        raise ValueError(f"{baud} baud from {clk_hz} Hz is off by {100 * err:.1f}%")
    return div


class UARTTx(wiring.Component):
    """Transmitter: bytes in, the ``tx`` line out (idle high).

    Ports
    -----
    i : In(stream.Signature(8))
        Bytes to send; ``ready`` while the line is idle.
    tx : Out(1)
        The serial line.
    """

    def __init__(self, divisor):
        self.divisor = divisor
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        shift = Signal(10)                 # start bit, 8 data bits LSB first, stop bit
        bits = Signal(range(11))
        timer = Signal(range(self.divisor))
        m.d.comb += self.i.ready.eq(bits == 0)
        with m.If(bits == 0):
            with m.If(self.i.valid):
                m.d.sync += [shift.eq((1 << 9) | (self.i.payload << 1)), bits.eq(10),
                             timer.eq(0)]
        with m.Else():
            m.d.comb += self.tx.eq(shift[0])
            with m.If(timer == self.divisor - 1):
                m.d.sync += [timer.eq(0), shift.eq(shift >> 1), bits.eq(bits - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer + 1)
        with m.If(bits == 0):
            m.d.comb += self.tx.eq(1)
        return m


class UARTRx(wiring.Component):
    """Receiver: the ``rx`` line in, bytes out.

    Ports
    -----
    rx : In(1)
        The serial line (asynchronous; synchronized inside).
    o : Out(stream.Signature(8))
        Received bytes.
    framing_errors, overruns : Out(16)
        Saturating counters of dropped bytes.
    """

    def __init__(self, divisor):
        if divisor < 3:
            raise ValueError("divisor must be at least 3")
        self.divisor = divisor
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "framing_errors": Out(16),
            "overruns": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        rx = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, rx, init=1)
        timer = Signal(range(self.divisor))
        bit = Signal(range(10))
        data = Signal(8)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += [timer.eq(self.divisor // 2), bit.eq(0)]
                    m.next = "START"
            with m.State("START"):               # confirm the start bit at its middle
                with m.If(timer == 1):
                    with m.If(rx):
                        m.next = "IDLE"          # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += timer.eq(self.divisor - 1)
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(self.divisor - 1), data.eq((rx << 7) | (data >> 1)),
                                 bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("STOP"):
                with m.If(timer == 0):
                    with m.If(~rx):
                        with m.If(self.framing_errors != 0xFFFF):
                            m.d.sync += self.framing_errors.eq(self.framing_errors + 1)
                        m.next = "BREAK"
                    with m.Else():
                        with m.If(self.o.valid & ~self.o.ready):
                            with m.If(self.overruns != 0xFFFF):
                                m.d.sync += self.overruns.eq(self.overruns + 1)
                        with m.Else():
                            m.d.sync += [self.o.payload.eq(data), self.o.valid.eq(1)]
                        m.next = "IDLE"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("BREAK"):               # wait for the line to return high
                with m.If(rx):
                    m.next = "IDLE"
        return m
