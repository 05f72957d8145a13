"""Moving words between the frame buffer and tensor memory: WRITE, READ and STATS sums.

:class:`Transfer` is the command decoder's access to tensor memory, through its own
:class:`~nibble.rtl.memory.TensorBus` (one read port and the write port):

* WRITE: the payload bytes in the frame buffer, little-endian, become whole words written
  from ``addr`` on (every nibble enabled);
* READ: ``count`` words from ``addr`` on become reply bytes in the frame buffer; with
  ``low16`` only the low two of every four bytes (RAW elements that fit 16 bits: a
  Fashion-MNIST step's logits cross the link in half the bytes, 1.2 ms of full-speed USB a
  step that the device waited for);
* SUMS: ``count`` INT4 codes from word ``addr`` on are summed as ``sum |c|`` and ``sum c^2``
  (SAWB's statistics of a weight tensor), one code per cycle: the code is registered, then
  its magnitude accumulated and its square looked up in a 9-entry table (no multiplier).
  The sums restart with every SUMS; a STATS without a region is a SUMS of 0 codes.
  Only a device with SDRAM sums (``sums``): the sums check what a DMA loaded from SDRAM
  (``host.training.resident``); without SDRAM the host holds every tensor it wrote, and
  leaving them out takes this block from 434 to 198 LCs on the UP5K (``make bitstream
  BOARD=icebreaker``'s budget), and the STATS bytes they filled.

It moves one byte (WRITE, READ) or one code (SUMS) per cycle while the memory grants its
requests, and waits when it does not. The decoder has checked every argument before.

On a device with SDRAM its read port is ``rd2`` (:data:`READ_PORT`), the one the compute
units use least (the engine's mask, UPDATE's V): a RUN's program reaches the decoder
through READs, and on
``rd0``, which the engine's A and REQUANT and TRANSPOSE read every cycle, the next entry
waited for the unit beside it to end, so a program's DMA transfers never ran beside its
parts (a Fashion-MNIST step's REQUANT on the ULX3S configuration took its transfers'
cycles plus its own). Without SDRAM (no programs) it stays on ``rd0``: on the UP5K, whose
SPRAM banks serve ``rd2`` last, ``rd2`` took the iCEBreaker from 24.7 to 23.9 MHz.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import enum, memory, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.formats import CODE_BITS
from nibble.rtl.memory import TensorBus

from .framing import BUFFER_BYTES

__all__ = ["READ_PORT", "Transfer", "TransferControl", "TransferOp"]

#: The tensor-memory read port a transfer reads through on a device with SDRAM (see the
#: module; ``rd0`` without).
READ_PORT = "rd2"

#: Frame-buffer addresses.
FB_ADDR = (BUFFER_BYTES - 1).bit_length()


class TransferOp(enum.Enum, shape=2):
    WRITE = 0      # frame buffer -> tensor memory
    READ = 1       # tensor memory -> frame buffer
    SUMS = 2       # tensor memory codes -> sum_abs, sum_sq


class TransferControl:
    class Signature(wiring.Signature):
        """From the decoder's side: ``start`` (a pulse with ``op``, ``addr``, ``count`` (words
        for WRITE and READ, codes for SUMS), ``pos``, the first frame-buffer byte to read
        or write, and ``low16``, a READ's), ``done`` (a pulse at the end)."""

        def __init__(self, addr_width):
            super().__init__({
                "start": Out(1), "op": Out(TransferOp), "addr": Out(addr_width),
                "count": Out(24), "pos": Out(FB_ADDR), "low16": Out(1), "done": In(1),
            })


class Transfer(wiring.Component):
    """One transfer at a time.

    Ports
    -----
    ctl : In(TransferControl.Signature)
    sum_abs, sum_sq : Out(32)
        The last SUMS' statistics (0 without ``sums``).
    buf_rd, buf_wr : the frame buffer's ports (``amaranth.lib.memory`` signatures).
    bus : Out(TensorBus.Signature)
        Tensor memory: :data:`READ_PORT` (``rd0`` without ``sums``) and ``wr``.
    """

    def __init__(self, addr_width, nibbles, sums=True):
        self.nib, self.sums = nibbles, sums
        # A READ takes its word in the cycle it arrives (into ``word``, then shifted out a
        # byte a cycle); SUMS reads its codes from the word held on the port.
        self.port = READ_PORT if sums else "rd0"
        self.held_reads = (self.port,) if sums else ()
        super().__init__({
            "ctl": In(TransferControl.Signature(addr_width)),
            "sum_abs": Out(32), "sum_sq": Out(32),
            "buf_rd": In(memory.ReadPort.Signature(addr_width=FB_ADDR, shape=8)),
            "buf_wr": In(memory.WritePort.Signature(addr_width=FB_ADDR, shape=8)),
            "bus": Out(TensorBus.Signature(addr_width=addr_width, nibbles=nibbles)),
        })

    def elaborate(self, platform):
        m = Module()
        nib, bus = self.nib, self.bus
        rd = getattr(bus, self.port)
        wb = nib // 2                                 # bytes per word
        p = Signal(FB_ADDR + 1)                       # frame-buffer index
        q = Signal(range(max(wb, nib) + 1))           # byte or code within the word
        have = Signal()                               # buf_rd.data holds byte p - 1
        count = Signal(24 if self.sums else range(BUFFER_BYTES + 1))
        ended = Signal()                              # SUMS: count is 0 (registered: the
        ctl = self.ctl                                # read enable must not wait for a
                                                      # 24-bit compare; it was the ULX3S's
                                                      # critical path into the RAM address)
        addr = Signal.like(ctl.addr)
        low16 = Signal()                              # READ: skip bytes 2 and 3 of every 4
        word = Signal(4 * nib)
        code, code_valid = Signal(signed(CODE_BITS)), Signal()
        mag = Signal(CODE_BITS)
        m.d.comb += [mag.eq(Mux(code < 0, -code, code)),
                     rd.addr.eq(addr), bus.wr.addr.eq(addr), bus.wr.data.eq(word),
                     self.buf_rd.addr.eq(p), self.buf_wr.addr.eq(p)]
        if self.sums:
            with m.If(code_valid):
                m.d.sync += [self.sum_abs.eq(self.sum_abs + mag),
                             self.sum_sq.eq(self.sum_sq + Array(Const(k * k, 7)
                                                                for k in range(16))[mag])]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(ctl.start):
                    m.d.sync += [p.eq(ctl.pos), q.eq(0), have.eq(0), count.eq(ctl.count),
                                 addr.eq(ctl.addr), code_valid.eq(0), low16.eq(ctl.low16),
                                 ended.eq(ctl.count == 0)]
                    with m.Switch(ctl.op):
                        with m.Case(TransferOp.WRITE):
                            m.next = "WRITE"
                        with m.Case(TransferOp.READ):
                            m.next = "READ"
                        if self.sums:
                            with m.Case(TransferOp.SUMS):
                                m.d.sync += [self.sum_abs.eq(0), self.sum_sq.eq(0)]
                                m.next = "SUMS"

            with m.State("WRITE"):        # payload bytes -> words -> tensor memory
                full = have & (q == wb - 1)               # this byte completes a word
                advance = ~full | bus.wr.ready
                m.d.comb += [self.buf_rd.en.eq(advance),
                             bus.wr.en.eq(Mux(full, (1 << nib) - 1, 0))]
                with m.If(advance):
                    m.d.sync += [p.eq(p + 1), have.eq(1)]
                    with m.If(have):
                        m.d.sync += [word.eq(Cat(word[8:], self.buf_rd.data)), q.eq(q + 1)]
                with m.If(full):
                    m.d.comb += bus.wr.data.eq(Cat(word[8:], self.buf_rd.data))
                    with m.If(bus.wr.ready):
                        m.d.sync += [q.eq(0), addr.eq(addr + 1), count.eq(count - 1)]
                        with m.If(count == 1):
                            m.d.comb += ctl.done.eq(1)
                            m.next = "IDLE"

            with m.State("READ"):         # one word read, then its bytes written one a cycle
                with m.If(q == 0):
                    m.d.comb += rd.en.eq(1)
                    with m.If(rd.ready):
                        m.d.sync += [q.eq(1), addr.eq(addr + 1)]
                with m.Else():            # byte 0 as the word arrives, the rest from `word`
                    arrived = q == 1
                    keep = ~(low16 & (q - 1)[1])          # (byte q - 1 of the word)
                    m.d.comb += [self.buf_wr.en.eq(keep),
                                 self.buf_wr.data.eq(Mux(arrived, rd.data, word)[:8])]
                    with m.If(keep):
                        m.d.sync += p.eq(p + 1)
                    m.d.sync += [q.eq(Mux(q == wb, 0, q + 1)),
                                 word.eq(Mux(arrived, rd.data, word) >> 8)]
                    with m.If(q == wb):
                        m.d.sync += count.eq(count - 1)
                        with m.If(count == 1):
                            m.d.comb += ctl.done.eq(1)
                            m.next = "IDLE"

            if self.sums:
                with m.State("SUMS"):         # one code a cycle into the sums
                    with m.If(ended):                     # the last code is being added
                        m.d.sync += code_valid.eq(0)
                        m.d.comb += ctl.done.eq(1)
                        m.next = "IDLE"
                    with m.Elif(q == 0):
                        m.d.comb += rd.en.eq(1)
                        m.d.sync += code_valid.eq(0)
                        with m.If(rd.ready):
                            m.d.sync += [q.eq(1), addr.eq(addr + 1)]
                    with m.Else():
                        code_now = rd.data.word_select((q - 1)[:len(q)], CODE_BITS)
                        m.d.sync += [code.eq(code_now), code_valid.eq(1),
                                     q.eq(Mux(q == nib, 0, q + 1)), count.eq(count - 1),
                                     ended.eq(count == 1)]
        return m
