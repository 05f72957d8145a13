"""The host link over native USB: LUNA's full-speed CDC-ACM device as two byte streams.

A board with a USB port wired to the FPGA (the ULX3S's US2) needs no USB-serial chip: the
FPGA is the USB device. :class:`USBLink` is LUNA's :class:`~luna.usb2.USBSerialDevice`
(the gateware PHY on the raw D+/D- pins on a board, a UTMI bus in simulation) with a clock
domain crossing on each side, so the device sees the same two byte streams a UART gives
it (:class:`~nibble.gateware.uart.UARTRx`'s ``o``, :class:`~nibble.gateware.uart.UARTTx`'s
``i``)::

    D+/D- -- GatewarePHY (usb_io, 48 MHz) -- USB device, control EP 0,       (usb, 12 MHz)
                                    bulk OUT 4 -> AsyncFIFO -> buffer --> o   (sync)
                                    bulk IN 4  <- AsyncFIFO <- buffer <-- i   (sync)

The transmit FIFO is deep (:data:`TX_DEPTH`): a reply of a few kilobytes (a step's logits)
goes into it at the device's clock, and the decoder takes the next frame (a RUN sent
behind the READs) while USB carries the reply, at a twentieth of that rate.

The two small buffers (``SyncFIFOBuffered``, registered both ways) keep the device's
logic apart from the FIFOs': without them the ULX3S build's critical path ran from the
frame buffer's read port through the reply's byte logic into the transmit FIFO's write
and back (39.5 MHz, 16.9 of its 25.3 ns in routing across the die).

The host sees ``/dev/ttyACM*`` (Linux's cdc-acm driver; macOS and Windows have theirs), and
the driver opens it as it opens a UART: the protocol's frames are a byte stream either way.

Why the two FIFOs: LUNA's device runs in the 12 MHz ``usb`` domain, the design in ``sync``.
Flow control is USB's own: when the receive FIFO and the OUT endpoint's packet buffer are
full the endpoint answers NAK and the host sends the packet again later; the IN endpoint
answers NAK while it has no packet ready. (LUNA's issue #161, open, reports an OUT packet
ACKed and dropped when its buffer fills on the packet's last byte; the host model has not
met it: 3,000 bytes to a consumer slower than the bus, 162 NAKs, every byte delivered in
order, ``tests/test_usb.py`` the same with 700.) A packet goes to the host when 64 bytes are
waiting or when the transmit FIFO runs empty (``last`` on the byte that empties it): a
reply the device writes faster than USB carries it (every reply: ``sync`` is faster than
12 MHz) leaves in full packets and one short one.

Full-speed bulk carries at most 19 packets of 64 bytes in a 1 ms frame; what the link
carries for the protocol's frames is measured by ``sim.usb_host``'s host model
(``tests/test_usb.py``, ``nibble bench link``).

LUNA builds on Amaranth's ``Record`` (deprecated in Amaranth 0.5): its warnings are
LUNA's.
"""

import warnings

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import AsyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = ["DATA_ENDPOINT", "PACKET_BYTES", "RX_DEPTH", "STATUS_ENDPOINT", "TX_DEPTH", "USB_PID",
           "USB_VID", "USBLink", "usb_serial_device"]

#: pid.codes' vendor ID, and its test product ID (for devices not distributed).
USB_VID, USB_PID = 0x1209, 0x0001
#: The bulk endpoints' packet size (the largest at full speed).
PACKET_BYTES = 64
#: The bulk endpoints' numbers (as LUNA's ``USBSerialDevice`` and its descriptors have
#: them: data on 4, the serial status on 3).
DATA_ENDPOINT, STATUS_ENDPOINT = 4, 3
#: Bytes of the clock-crossing FIFOs: from the host, a few waiting commands' frames (the
#: OUT endpoint NAKs the rest); to the host, a step's logits (three READ replies, 2.6 KB
#: for the Fashion-MNIST MLP) whole, so the device serves them at its clock and runs the
#: next command while USB carries them (two DP16KD on the ECP5).
RX_DEPTH, TX_DEPTH = 64, 4096


def usb_serial_device(bus):
    """LUNA's CDC-ACM device on ``bus`` (a UTMI record or the board's ``usb`` pins)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from luna.gateware.usb.devices.acm import USBSerialDevice
    return USBSerialDevice(bus=bus, idVendor=USB_VID, idProduct=USB_PID,
                           manufacturer_string="nibble",
                           product_string="nibble 4-bit training accelerator",
                           max_packet_size=PACKET_BYTES)


class USBLink(wiring.Component):
    """Byte streams to and from a USB host, in the ``sync`` domain.

    Ports
    -----
    o : Out(stream.Signature(8))
        Bytes from the host (bulk OUT).
    i : In(stream.Signature(8))
        Bytes to the host (bulk IN).

    Parameters
    ----------
    bus : the UTMI record (simulation) or the platform's ``usb`` resource (d_p, d_n,
        pullup) for LUNA's gateware PHY, which also needs a 48 MHz ``usb_io`` domain.
    rx_depth, tx_depth : the clock-crossing FIFOs' bytes.
    """

    def __init__(self, bus, rx_depth=RX_DEPTH, tx_depth=TX_DEPTH):
        self.bus, self.rx_depth, self.tx_depth = bus, rx_depth, tx_depth
        super().__init__({"o": Out(stream.Signature(8)), "i": In(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.serial = serial = usb_serial_device(self.bus)
        m.submodules.rx_fifo = rx = AsyncFIFO(width=8, depth=self.rx_depth,
                                              w_domain="usb", r_domain="sync")
        m.submodules.tx_fifo = tx = AsyncFIFO(width=8, depth=self.tx_depth,
                                              w_domain="sync", r_domain="usb")
        m.submodules.rx_buf = rx_buf = SyncFIFOBuffered(width=8, depth=2)
        m.submodules.tx_buf = tx_buf = SyncFIFOBuffered(width=8, depth=2)
        m.d.comb += [
            serial.connect.eq(1),
            # host -> device: the OUT endpoint NAKs while its buffer is full
            rx.w_data.eq(serial.rx.payload), rx.w_en.eq(serial.rx.valid),
            serial.rx.ready.eq(rx.w_rdy),
            rx_buf.w_data.eq(rx.r_data), rx_buf.w_en.eq(rx.r_rdy), rx.r_en.eq(rx_buf.w_rdy),
            self.o.payload.eq(rx_buf.r_data), self.o.valid.eq(rx_buf.r_rdy),
            rx_buf.r_en.eq(self.o.ready),
            # device -> host: a short packet whenever the FIFO runs empty
            tx_buf.w_data.eq(self.i.payload), tx_buf.w_en.eq(self.i.valid),
            self.i.ready.eq(tx_buf.w_rdy),
            tx.w_data.eq(tx_buf.r_data), tx.w_en.eq(tx_buf.r_rdy), tx_buf.r_en.eq(tx.w_rdy),
            serial.tx.payload.eq(tx.r_data), serial.tx.valid.eq(tx.r_rdy),
            serial.tx.last.eq(tx.r_level == 1), tx.r_en.eq(serial.tx.ready),
        ]
        return m
