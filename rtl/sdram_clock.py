"""The SDRAM controller on a clock of its own, faster than the design's.

Why: the SDRAM bounds a training step on the ULX3S. A Fashion-MNIST step moves 2.34 MB
between the SDRAM and the scratchpad (masters and momenta read and written, the weights
read again for their codes: ``make bench-train``), 24.4 ms at 2 bytes a cycle of the 48 MHz
design clock, where the 16-bit part runs to 143 MHz (CL 3; 100 MHz at CL 2). The design
cannot follow it there, the controller can: it is a few hundred LUTs beside the pins. On a
clock of its own the bus carries ``2 x sdram_hz`` bytes a second whatever the design's
clock, and the DMA on the design's side takes a 16-byte burst in ``wpb`` <= 4 cycles of a
tensor-memory port, so it keeps up with up to 4 bytes a design cycle.

:class:`SdramCrossing` is the :class:`~nibble.rtl.sdram.SdramController` in clock domain
``domain`` (default ``"sdram"``, which the top provides), with the same ports as the
controller on the design's side (``req``, ``rdata``) and the pins in ``domain``. Requests
and read bursts cross through two :class:`~amaranth.lib.fifo.AsyncFIFO` (Gray-coded
pointers, two synchronizer stages): the clocks need not be related, so a board's PLL may
pick any SDRAM clock its VCO makes beside the design's, or a second PLL makes (the
ULX3S: 100 MHz from a PLL of its own beside the 48 MHz design and USB's 12 from a 720 MHz
VCO, which made 90; 90 met once the controller's read FIFO stopped deciding its entries'
enables from its fill level: docs/results.md, Boards). The
controller reads a request as soon as the FIFO shows it and starts a READ only with room
in its own read FIFO for the burst (``rdata.ready`` drains it, as on the design's side),
so neither crossing FIFO limits the bus: a burst is 8 cycles of the SDRAM's clock, and
four entries cover the pointers' synchronization both ways.
"""

from amaranth.hdl import DomainRenamer, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import AsyncFIFO
from amaranth.lib.wiring import In, Out

from .sdram import BURST_BITS, SdramController, SdramPins, burst_request

__all__ = ["FIFO_DEPTH", "SdramCrossing"]

#: Entries of each clock-crossing FIFO.
FIFO_DEPTH = 4


class SdramCrossing(wiring.Component):
    """An :class:`~nibble.rtl.sdram.SdramController` at ``hz`` in clock domain ``domain``,
    its request and read streams crossing to ``sync`` (see the module).

    Ports: ``req`` (In), ``rdata`` (Out), in ``sync``; ``pins`` (Out
    ``SdramPins.Signature``) and ``ready`` (Out, the power-up sequence is done), in
    ``domain``. ``read_latency`` is the controller's, in its own cycles."""

    def __init__(self, chip, hz, domain="sdram"):
        self.chip, self.hz, self.domain = chip, hz, domain
        self.ctrl = SdramController(chip, hz)
        self.read_latency = self.ctrl.read_latency
        super().__init__({
            "req": In(stream.Signature(burst_request(chip))),
            "rdata": Out(stream.Signature(BURST_BITS)),
            "pins": Out(SdramPins.Signature(chip)),
            "ready": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.ctrl = ctrl = DomainRenamer(self.domain)(self.ctrl)
        layout = burst_request(self.chip)
        m.submodules.requests = requests = AsyncFIFO(
            width=layout.size, depth=FIFO_DEPTH, w_domain="sync", r_domain=self.domain)
        m.submodules.bursts = bursts = AsyncFIFO(
            width=BURST_BITS, depth=FIFO_DEPTH, w_domain=self.domain, r_domain="sync")
        payload = Signal(layout)
        m.d.comb += [
            requests.w_data.eq(self.req.payload), requests.w_en.eq(self.req.valid),
            self.req.ready.eq(requests.w_rdy),
            payload.eq(requests.r_data),
            ctrl.req.payload.eq(payload), ctrl.req.valid.eq(requests.r_rdy),
            requests.r_en.eq(ctrl.req.ready),
            bursts.w_data.eq(ctrl.rdata.payload), bursts.w_en.eq(ctrl.rdata.valid),
            ctrl.rdata.ready.eq(bursts.w_rdy),
            self.rdata.payload.eq(bursts.r_data), self.rdata.valid.eq(bursts.r_rdy),
            bursts.r_en.eq(self.rdata.ready),
            self.ready.eq(ctrl.ready),
        ]
        wiring.connect(m, ctrl.pins, wiring.flipped(self.pins))
        return m
