"""``pysim://``: the device's RTL in Amaranth's simulator, behind the driver.

:class:`PysimTransport` has pyserial's ``write``/``read``: the bytes the driver writes are
offered to :class:`~nibble.gateware.device.Device`'s input stream one per cycle, and a read
runs the simulation until the device is *listening* again (every byte taken, nothing being
parsed, carried out or answered) and returns what it sent. So a request's reply is complete
when ``read`` returns, and a lost reply is known at once (``instant``, like ``emu://``),
while a GEMM or VECTOR keeps running between requests exactly as on a board: a WRITE right
after a GEMM meets BUSY, and the driver's polls let simulated time pass.

It is the fast way to run the driver's retries, BUSY and error paths against the real RTL
(seconds, where the Verilator model takes minutes to build); the Verilator model
(``socket://``) is the fast way to run long workloads.

``link=usb`` puts the device behind the native USB link a board has on its USB port
(:class:`~nibble.gateware.boards.UsbTop`: LUNA's CDC-ACM device and its clock crossings),
and the bytes go through :class:`~nibble.sim.usb_host.UsbHost`, a full-speed host at the
packet level: it enumerates the device, then sends what the driver writes in bulk OUT
packets and polls bulk IN for the replies, in 1 ms frames at 12 Mbit/s, the device's
``sync`` clock at ``clk_hz`` beside it. ``usb_stats`` are the host's counts (bit times,
frames, transactions, NAKs, payload bytes each way): the link's time on the wire.
"""

import warnings

from amaranth.hdl import DomainRenamer, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from nibble.gateware.boards import UsbTop
from nibble.gateware.device import Device
from nibble.gateware.usb import DATA_ENDPOINT, PACKET_BYTES
from nibble.rtl.formats import VEC_OPS_ALL
from nibble.rtl.sdram import CHIPS
from nibble.sim.sdram_model import SdramChipModel
from nibble.sim.usb_host import UsbHost

__all__ = ["PYSIM_DEVICE", "PysimTransport"]

#: The pysim device by default: the simulated device's array with a smaller memory (the
#: simulator keeps every word as a Python integer) and a short watchdog.
PYSIM_DEVICE = {"rows": 2, "cols": 4, "words": 1 << 14, "clk_hz": 36_000_000,
                "timeout": 4096, "sdram": "", "vec_ops": VEC_OPS_ALL, "memory": "bram",
                "dsp_pes": 0, "link": "", "sdram_hz": 0}

#: The USB device's address after enumeration.
USB_ADDRESS = 5


class _WithSdram(wiring.Component):
    """The device (or its USB top) with the SDRAM chip model on its pins."""

    def __init__(self, device, model):
        self.device, self.model = device, model
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.device, m.submodules.model = self.device, self.model
        wiring.connect(m, self.device.sdram, self.model.pins)
        return m


class PysimTransport:
    """The RTL device in Amaranth's simulator, as a serial port.

    ``max_cycles`` bounds one ``read`` (a device that never goes quiet is a bug: the read
    returns what arrived); ``idle_cycles`` is how far a read lets a running GEMM or VECTOR
    advance once the link is quiet, at most (the time a host waits between polls).
    """

    instant = True
    lossless = True

    def __init__(self, rows=2, cols=4, words=1 << 14, clk_hz=36_000_000, timeout=4096,
                 max_cycles=2_000_000, idle_cycles=2048, sdram="", vec_ops=VEC_OPS_ALL,
                 memory="bram", dsp_pes=0, link="", sdram_hz=0):
        if link not in ("", "usb"):
            raise ValueError(f"link={link}: '' (the device's byte streams) or 'usb'")
        chip = CHIPS[sdram] if sdram else None
        if link == "usb":
            # a frame's bytes come in 64-byte packets, up to a 1 ms frame apart: the
            # watchdog that ends a stalled frame waits as long as on a board (10 ms)
            timeout = max(timeout, clk_hz // 100)
            with warnings.catch_warnings():        # LUNA's Records
                warnings.simplefilter("ignore", DeprecationWarning)
                from luna.gateware.interface.utmi import UTMIInterface
            self.utmi = UTMIInterface()
            self.dut = UsbTop(self.utmi, rows, cols, words, clk_hz, sdram=chip,
                              vec_ops=vec_ops, memory=memory, dsp_pes=dsp_pes, timeout=timeout,
                              sdram_hz=sdram_hz or None)
            self.host = UsbHost(self.utmi)
        else:
            self.dut = Device(rows, cols, words, clk_hz=clk_hz, timeout=timeout, sdram=chip,
                              vec_ops=vec_ops, memory=memory, dsp_pes=dsp_pes,
                              sdram_hz=sdram_hz or None)
        top = self.dut
        if chip:                     # the chip model on the device's SDRAM pins
            model = SdramChipModel(chip, sdram_hz or clk_hz)
            if model.storage != "memory":
                raise ValueError(f"sdram={sdram}: the simulator holds only small SDRAMs "
                                 "(sdram=tiny); the large parts' storage is Verilog, for "
                                 "the Verilator model (sim:)")
            top = _WithSdram(self.dut, DomainRenamer("sdram")(model) if sdram_hz else model)
        self.model = top.model if chip else None
        self.max_cycles, self.idle_cycles = max_cycles, idle_cycles
        self.cycles = 0                        # clock cycles simulated
        self._steps = 0                        # run_until's deadline, in cycles
        self._in, self._out = bytearray(), bytearray()
        self._listening = self._idle = False
        self._sim = Simulator(top)
        self.period = 1e-6                     # simulated seconds a cycle (any, without USB)
        if link == "usb":
            self.period = 1 / clk_hz
            self._sim.add_clock(1 / 12e6, domain="usb")
            self._sim.add_testbench(self._usb_io, background=True)
        else:
            self._sim.add_testbench(self._io, background=True)
        self._sim.add_clock(self.period)
        if sdram_hz:                 # the SDRAM's own clock, at its rate to the design's
            self._sim.add_clock(self.period * clk_hz / sdram_hz, domain="sdram")
        self.timeout = 0

    async def _io(self, ctx):
        dut = self.dut
        ctx.set(dut.o.ready, 1)
        while True:
            ctx.set(dut.i.valid, bool(self._in))
            if self._in:
                ctx.set(dut.i.payload, self._in[0])
            _, _, took, sent, byte, listening, idle = await ctx.tick().sample(
                dut.i.valid & dut.i.ready, dut.o.valid, dut.o.payload, dut.listening,
                dut.idle)
            self.cycles += 1
            if took:
                del self._in[0]
            if sent:
                self._out.append(byte)
            self._listening, self._idle = listening and not self._in, idle and not self._in

    async def _usb_io(self, ctx):
        """The host: enumerate, then OUT what the driver wrote, IN what the device sends.
        The link is quiet (``_listening``) once every byte has gone out and two IN polls
        in a row, each started while the device listened, found nothing to send."""
        host, dut = self.host, self.dut
        await host.enumerate(ctx, USB_ADDRESS)
        empty = 0
        while True:
            sending = bool(self._in) or not ctx.get(dut.listening)
            if self._in:
                self._listening = self._idle = False
                chunk = bytes(self._in[:PACKET_BYTES])
                if await host.out(ctx, USB_ADDRESS, DATA_ENDPOINT, chunk):
                    del self._in[:len(chunk)]
            data = await host.in_(ctx, USB_ADDRESS, DATA_ENDPOINT)
            self._out += data or b""
            empty = 0 if data or sending else empty + 1
            quiet = empty >= 2 and not self._in
            self._listening = quiet and ctx.get(dut.listening)
            self._idle = quiet and ctx.get(dut.idle)

    @property
    def usb_stats(self):
        return dict(self.host.stats)

    def _run(self, cycles):
        self._steps += cycles
        self._sim.run_until(self._steps * self.period)
        self.cycles = self._steps

    def write(self, data):
        self._in += data
        self._listening = self._idle = False
        return len(data)

    def read(self, size=1):
        if not self._out:
            start = self.cycles
            self._run(1)
            while not self._listening and self.cycles - start < self.max_cycles:
                self._run(64)
            start = self.cycles                # a unit runs: let it go on meanwhile
            while not self._idle and self.cycles - start < self.idle_cycles:
                self._run(64)
        out = bytes(self._out[:size])
        del self._out[:size]
        return out

    @property
    def in_waiting(self):
        return len(self._out)

    def reset_input_buffer(self):
        self._out.clear()

    def close(self):
        pass
