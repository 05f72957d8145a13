"""The device behind the link: framing, the command decoder, tensor memory and the units.

:class:`Device` is a byte stream in, a byte stream out; a board top puts a UART in front of
it, and the Verilator system model drives its streams from a TCP socket. Inside::

    bytes -> FrameRx --> frame buffer --> CommandDecoder --> Transfer ------+ bus
       (one CRC unit)     (EBR, 1030 B)    |  args, start  \\-> GemmEngine --+ bus
    bytes <- FrameTx <---- Reply <---------+                \\-> VectorUnit -+ bus
                                                                   or Transposer
                                                                            |
                                  TensorArbiter (engine, unit, DMA, decoder) <--+
                                        |                                      |
                      BlockRAM or SpramMemory (tensor memory)                  |
                                                       (with SDRAM) Dma -- bus +
                                                                     | burst streams
                                                              SdramController -> sdram pins

The receiver, the decoder, the transfer and the reply take turns at the frame buffer (the
decoder's ``phase`` says whose turn it is), and the receiver and the transmitter at one CRC
unit; the three units reach tensor memory through one :class:`~nibble.rtl.memory.TensorBus`
each and the arbiter. A device built with an SDRAM chip also has a
:class:`~nibble.rtl.dma.Dma` (a fourth unit on the arbiter) and the
:class:`~nibble.rtl.sdram.SdramController` behind it, and its ``sdram`` pins; INFO reports
the SDRAM's size (``ext_bursts``, 0 without). The commands are those of
:mod:`nibble.gateware.protocol`; :mod:`nibble.gateware.decoder` has the rules.
"""

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.dma import Dma
from nibble.rtl.engine import GEMM_CFG, GemmEngine
from nibble.rtl.formats import VEC_OPS_ALL, VecOp, word_nibbles
from nibble.rtl.memory import BlockRAM, ForwardRegister, TensorArbiter, TensorBus
from nibble.rtl.sdram import BURST_BITS, SdramController, SdramPins
from nibble.rtl.sdram_clock import SdramCrossing
from nibble.rtl.spram import SpramMemory, spram_words
from nibble.rtl.transpose import Transposer
from nibble.rtl.vector import VEC_CFG, VectorUnit

from .decoder import CommandDecoder, Phase
from .framing import BUFFER_BYTES, TX_BYTE, FrameRx, FrameTx, SharedCrc
from .protocol import INFO_LAYOUT, MAX_PAYLOAD, STATS_LAYOUT, VERSION
from .reply import Reply
from .stats import CommandStats
from .transfer import Transfer

__all__ = ["SIM_DEVICE", "Device"]

#: The simulated device (``sim.system``) and ``emu://`` by default: a small array, fast to
#: simulate, and a memory that holds the Fashion-MNIST MLP's training state with its master
#: weights (2 MiB).
SIM_DEVICE = {"rows": 2, "cols": 4, "words": 1 << 19, "clk_hz": 36_000_000,
              "sdram": "is42s16160", "vec_ops": VEC_OPS_ALL}


class Device(wiring.Component):
    """The accelerator as a byte-stream device.

    Parameters
    ----------
    rows, cols : int
        The systolic array.
    mem_words : int
        Tensor memory size in words of ``word_nibbles(rows, cols)`` codes.
    clk_hz : int
        Reported by INFO (the host uses it for timeouts and projections).
    timeout : int
        Watchdog: cycles without a byte after which a half-received frame is dropped.
    sdram : SdramChip or None
        An SDRAM behind a DMA, or none.
    sdram_hz : int or None
        The SDRAM's clock: None, the design's (the controller in ``sync``); else the
        controller runs at ``sdram_hz`` in clock domain ``sdram``, which the top provides,
        behind clock-crossing FIFOs (:class:`~nibble.rtl.sdram_clock.SdramCrossing`).
    vec_ops : int
        The element-wise unit's operations (a mask, bit ``VecOp``; INFO reports it). With
        none the device has no element-wise unit and refuses every VECTOR command (its
        range check fails, as for an operation a unit lacks); the host runs them. With
        TRANSPOSE alone the unit is the lean :class:`~nibble.rtl.transpose.Transposer`.
    memory : str
        Tensor memory: ``"bram"`` (:class:`~nibble.rtl.memory.BlockRAM`) or ``"spram"``
        (:class:`~nibble.rtl.spram.SpramMemory`, the UP5K's SPRAM: ``mem_words`` must be
        its size).
    dsp_pes : int
        PEs whose product is a hardware multiplier (a one-row array's, the UP5K's
        SB_MAC16s: :class:`~nibble.rtl.array.BroadcastRow`); results are the same.

    Ports
    -----
    i : In(stream.Signature(8))
        Bytes from the host.
    o : Out(stream.Signature(8))
        Bytes to the host.
    idle : Out(1)
        Nothing in progress (no frame, no reply, no GEMM): the simulation harness may sleep.
    listening : Out(1)
        No frame is being received, carried out or answered (a GEMM or VECTOR may run).
    sdram : Out(SdramPins.Signature(sdram))
        With an SDRAM only (in clock domain ``sdram`` with ``sdram_hz``).
    """

    def __init__(self, rows, cols, mem_words, clk_hz=0, timeout=None, sdram=None,
                 vec_ops=VEC_OPS_ALL, memory="bram", dsp_pes=0, sdram_hz=None):
        self.rows, self.cols, self.mem_words, self.clk_hz = rows, cols, mem_words, clk_hz
        self.sdram_hz = sdram_hz
        self.dsp_pes = dsp_pes
        self.vec_ops, self.memory = vec_ops, memory
        self.nib = word_nibbles(rows, cols)
        if memory not in ("bram", "spram"):
            raise ValueError(f"memory: 'bram' or 'spram', not {memory!r}")
        if memory == "spram" and spram_words(self.nib) != mem_words:
            raise ValueError(f"SPRAM tensor memory of {self.nib}-nibble words holds "
                             f"{spram_words(self.nib)} words, not {mem_words}")
        self.timeout = timeout or max(1 << 16, clk_hz // 100)    # 10 ms at clk_hz
        self.chip = sdram
        pins = {"sdram": Out(SdramPins.Signature(sdram))} if sdram else {}
        super().__init__({
            "i": In(stream.Signature(8)), "o": Out(stream.Signature(8)),
            "idle": Out(1), "listening": Out(1), **pins,
        })

    def elaborate(self, platform):
        m = Module()
        nib, words = self.nib, self.mem_words
        aw = (words - 1).bit_length()
        m.submodules.rx = rx = FrameRx(self.timeout)
        m.submodules.tx = tx = FrameTx()
        m.submodules.crc_unit = crc = SharedCrc()
        wiring.connect(m, rx.crc, crc.rx)
        wiring.connect(m, tx.crc, crc.tx)
        m.submodules.decoder = dec = CommandDecoder(aw, nib, words, dma=self.chip is not None)
        m.submodules.transfer = xfer = Transfer(aw, nib, sums=self.chip is not None)
        m.submodules.reply = reply = Reply()
        m.submodules.engine = engine = GemmEngine(self.rows, self.cols, words, self.dsp_pes)
        # each port goes to the first of these that asks. With an SDRAM: the engine, the
        # DMA, the decoder's transfer, the element-wise unit. An UPDATE reads rd2 (its V)
        # every cycle, and rd2 is where a program's entries and a DMA STORE's words are
        # read: behind it, a part's stores (and the entry that starts them) waited for its
        # end, the SDRAM idle meanwhile (a Fashion-MNIST step's fused GEMM+UPDATE: 611 K
        # cycles with the unit before them, 510 K after, make bench-train). Without one
        # (no programs, no DMA) the transfer goes last, as it always did.
        units = [engine, xfer]
        if self.vec_ops:
            m.submodules.vec = vec = (
                Transposer(self.rows, self.cols, words) if self.vec_ops == 1 << VecOp.TRANSPOSE
                else VectorUnit(self.rows, self.cols, words, self.vec_ops))
            units.insert(len(units) if self.chip else 1, vec)
        if self.chip:
            m.submodules.dma = dma = Dma(aw, nib, words, self.chip)
            m.submodules.sdram = ctrl = (
                SdramController(self.chip, self.clk_hz) if self.sdram_hz is None
                else SdramCrossing(self.chip, self.sdram_hz))
            wiring.connect(m, dma.req, ctrl.req)
            wiring.connect(m, ctrl.rdata, dma.rdata)
            wiring.connect(m, ctrl.pins, wiring.flipped(self.sdram))
            units.insert(1, dma)
            m.d.comb += [dma.cfg.eq(dec.dma_args), dma.start.eq(dec.dma_start)]
        m.submodules.arbiter = arb = TensorArbiter(
            TensorBus.Signature(addr_width=aw, nibbles=nib), len(units),
            write_first=units.index(dma) if self.chip else None,
            held=[unit.held_reads for unit in units])
        m.submodules.mem = mem = (SpramMemory(nib, hold=False)   # the arbiter holds words
                                  if self.memory == "spram" else BlockRAM(words, nib))
        wiring.connect(m, wiring.flipped(self.i), rx.i)
        # the frame buffer's read data (a block RAM's output, slow to leave it) reaches the
        # framer's escape logic and, through its ready, the reply's and the decoder's state
        # only after a register: that path was the ULX3S build's critical one (44.0 MHz)
        m.submodules.tx_reg = tx_reg = ForwardRegister(TX_BYTE)
        wiring.connect(m, reply.tx, tx_reg.i)
        wiring.connect(m, tx_reg.o, tx.i)
        wiring.connect(m, tx.o, wiring.flipped(self.o))
        wiring.connect(m, dec.transfer, xfer.ctl)
        wiring.connect(m, dec.reply, reply.ctl)
        for k, unit in enumerate(units):
            wiring.connect(m, unit.bus, arb.units[k])
        wiring.connect(m, arb.mem, mem.bus)

        # The receiver holds its frame until the reply has left whole (the decoder's ack
        # comes with the body's last byte, before the CRC's): the two share one CRC unit.
        release = Signal()
        with m.If(dec.ack):
            m.d.sync += release.eq(1)
        with m.Elif(rx.ack):
            m.d.sync += release.eq(0)
        dma_busy = dma.busy if self.chip else 0
        if self.vec_ops:
            busy = engine.busy | vec.busy
            checked, ok = engine.checked | vec.checked, Mux(engine.checked, engine.ok, vec.ok)
        else:                                          # VECTOR: refused a cycle later
            busy = engine.busy
            refused = Signal()
            m.d.sync += refused.eq(dec.vec_start)
            checked, ok = engine.checked | refused, engine.checked & engine.ok
        if self.chip:
            checked, ok = checked | dma.checked, Mux(dma.checked, dma.ok, ok)
        m.d.comb += [
            dec.frame.eq(rx.frame), dec.rx_status.eq(rx.status), dec.length.eq(rx.length),
            rx.ack.eq(release & ~tx.busy), crc.tx_turn.eq(rx.held),
            dec.busy.eq(busy), dec.dma_busy.eq(dma_busy),
            engine.cfg.eq(dec.args[:GEMM_CFG.size]),
            *([vec.cfg.eq(dec.args[:VEC_CFG.size])] if self.vec_ops else []),
            engine.start.eq(dec.gemm_start),
            *([vec.start.eq(dec.vec_start)] if self.vec_ops else []),
            dec.checked.eq(checked), dec.ok.eq(ok),
            self.listening.eq(dec.waiting & ~rx.in_frame & ~rx.frame & ~tx.busy),
            self.idle.eq(self.listening & ~busy & ~dma_busy),
        ]
        self._frame_buffer(m, rx, dec, xfer, reply)

        cycles, cycles_at = Signal(32), Signal(32)    # `cycles` when the STATS began
        m.d.sync += cycles.eq(cycles + 1)
        with m.If(dec.stats_snapshot):
            m.d.sync += cycles_at.eq(cycles)
        info, stats = reply.info, reply.stats
        m.d.comb += [
            info.version.eq(VERSION), info.rows.eq(self.rows), info.cols.eq(self.cols),
            info.word_nibbles.eq(nib), info.mem_words.eq(words),
            info.max_payload.eq(MAX_PAYLOAD), info.clk_hz.eq(self.clk_hz),
            info.ext_bursts.eq(self.chip.bytes // (BURST_BITS // 8) if self.chip else 0),
            info.vec_ops.eq(self.vec_ops),
            stats.cycles.eq(cycles_at), stats.sum_abs.eq(xfer.sum_abs),
            stats.sum_sq.eq(xfer.sum_sq), stats.rx_errors.eq(rx.errors),
            stats.dma_cycles.eq(dma.cycles if self.chip else 0),
        ]
        units = {"absmax": engine.absmax, "clip_sum": engine.clip_sum,
                 "gemm_cycles": engine.cycles, "beats": engine.beats,
                 **({"vec_cycles": vec.cycles, "w_sum_abs": vec.sum_abs,
                     "w_sum_sq": vec.sum_sq} if self.vec_ops else {})}
        settled = Const(1)
        if self.chip:             # RUN: a program's statistics combined (gateware.stats)
            m.submodules.stats = st = CommandStats()
            m.d.comb += [st.gemm_busy.eq(engine.busy), st.program.eq(dec.program),
                         st.begin.eq(dec.program_begin), dec.settled.eq(st.settled)]
            if self.vec_ops:
                m.d.comb += [st.vec_busy.eq(vec.busy),
                             st.update.eq(vec.cfg.op == VecOp.UPDATE)]
            for name, value in units.items():
                m.d.comb += getattr(st, name).eq(value)
            units = {name: getattr(st, f"o_{name}") for name in units}
            settled = st.settled      # busy until they have taken in the unit that ended
        m.d.comb += stats.busy.eq((busy | ~settled) | (dma_busy << 1))
        for name, value in units.items():
            m.d.comb += getattr(stats, name).eq(value)
        assert len(info.as_value()) == INFO_LAYOUT.size
        assert len(stats.as_value()) == STATS_LAYOUT.size
        return m

    @staticmethod
    def _frame_buffer(m, rx, dec, xfer, reply):
        """The frame buffer's two ports, lent out by the decoder's phase: the receiver
        writes while no frame is pending; the decoder reads while parsing; the transfer
        and the reply in their turns."""
        m.submodules.fb = fb = memory.Memory(shape=8, depth=BUFFER_BYTES, init=[])
        rd, wr = fb.read_port(), fb.write_port()
        readers = {Phase.PARSE: dec.buf, Phase.TRANSFER: xfer.buf_rd, Phase.REPLY: reply.buf_rd}
        writers = {Phase.TRANSFER: xfer.buf_wr, Phase.REPLY: reply.buf_wr}
        with m.Switch(dec.phase):
            for phase, port in readers.items():
                with m.Case(phase):
                    m.d.comb += [rd.addr.eq(port.addr), rd.en.eq(port.en)]
                    if phase in writers:
                        w = writers[phase]
                        m.d.comb += [wr.addr.eq(w.addr), wr.data.eq(w.data), wr.en.eq(w.en)]
        with m.If(rx.i.ready):
            m.d.comb += [wr.addr.eq(rx.wr_addr), wr.data.eq(rx.wr_data), wr.en.eq(rx.wr_en)]
        for port in readers.values():
            m.d.comb += port.data.eq(rd.data)
