"""UART PHY: 8N1 transmitter and receiver as byte streams, baud rate as a parameter.

``divisor = round(clk_hz / baud)`` clock cycles per bit (at least 3): 12 Mbaud from a 36 MHz
clock is 3, 3 Mbaud from 45 MHz is 15. At 3 the receiver samples each bit one cycle after
its middle or at it, so both ends' clocks must be exact multiples of the baud rate (the
FT2232H's 12 Mbaud is 120 MHz / 10; the iCEBreaker's 24 MHz is its 12 MHz crystal x 2).

The receiver samples the middle of each bit after a
two-flop synchronizer, drops a byte whose stop bit is low (counted in ``framing_errors``),
and never blocks: a byte that arrives while its output is full is dropped and counted in
``overruns``; the framing layer above retries.

With ``ddr`` the receiver takes two samples of the line a cycle (the pin's DDR input
register: one at the rising clock edge, one at the falling), so 2 cycles a bit are enough:
12 Mbaud from 24 MHz is 4 samples a bit. It finds the start bit's edge to half a cycle
(which of the two samples is the first low one) and from then on reads, every ``divisor``
cycles, the sample ``divisor`` samples after that edge: at most half a sample (an eighth
of a bit at 4 samples a bit) from the bit's middle. The iCEBreaker runs so at 24 MHz
instead of 36, which its full UP5K does not reach.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTRx", "UARTTx", "divisor_for", "least_divisor"]


def least_divisor(ddr=False):
    """Clock cycles a bit the receiver needs: 3, or 2 with ``ddr`` (two samples a cycle)."""
    return 2 if ddr else 3


def divisor_for(clk_hz, baud, ddr=False):
    """Clock cycles per bit; raises if the rate error exceeds 2% or the divisor is under
    :func:`least_divisor`."""
    div = round(clk_hz / baud)
    least = least_divisor(ddr)
    if div < least:
        raise ValueError(f"{baud} baud needs at least {least} clocks per bit at {clk_hz} Hz"
                         + ("" if ddr else " (2 with a DDR receiver)"))
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
    rx : In(1), or In(2) with ``ddr``
        The serial line (asynchronous; synchronized inside). With ``ddr``, two samples a
        cycle: ``rx[0]`` taken before ``rx[1]``.
    o : Out(stream.Signature(8))
        Received bytes.
    framing_errors, overruns : Out(16)
        Saturating counters of dropped bytes.
    """

    def __init__(self, divisor, ddr=False):
        if divisor < least_divisor(ddr):
            raise ValueError(f"divisor must be at least {least_divisor(ddr)}")
        self.divisor, self.ddr = divisor, ddr
        width = 2 if ddr else 1
        super().__init__({
            "rx": In(width, init=(1 << width) - 1),
            "o": Out(stream.Signature(8)),
            "framing_errors": Out(16),
            "overruns": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        line = Signal.like(self.rx)
        m.submodules.sync = FFSynchronizer(self.rx, line, init=self.rx.init)
        timer = Signal(range(d))
        bit = Signal(range(10))
        data = Signal(8)
        if self.ddr:
            sel = Signal()                       # which sample is a bit's middle
            rx = line.bit_select(sel, 1)
            edge = ~line.all()
            # the edge at sample p (0: the first of its cycle); the middle p + d samples on
            after = line[0] + d
            start = [timer.eq(after >> 1), sel.eq(after[0])]
        else:
            rx = line
            edge = ~line
            start = [timer.eq(d // 2)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(edge):
                    m.d.sync += [*start, bit.eq(0)]
                    m.next = "START"
            with m.State("START"):               # confirm the start bit at its middle
                with m.If(timer == 1):
                    with m.If(rx):
                        m.next = "IDLE"          # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += timer.eq(d - 1)
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(d - 1), data.eq((rx << 7) | (data >> 1)),
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
                with m.If(line.all()):
                    m.next = "IDLE"
        return m
