"""The command decoder: a received frame in, a command carried out and answered.

:class:`CommandDecoder` reads a frame's header and arguments from the frame buffer, checks
everything (length, range, busy) before anything changes, so a rejected frame changes no
state, and then runs the command through the component that does it:

=======  ===================================================  ==============================
op       what runs                                            reply
=======  ===================================================  ==============================
PING     nothing: the payload stays in the frame buffer       the payload
INFO     nothing                                              ``INFO_LAYOUT`` (:class:`Reply`)
WRITE    :class:`~nibble.gateware.transfer.Transfer`          empty
READ     :class:`~nibble.gateware.transfer.Transfer`          the words
STATS    a SUMS :class:`~nibble.gateware.transfer.Transfer`   ``STATS_LAYOUT``
GEMM     the GEMM engine: the reply follows its check         empty, or OUT_OF_RANGE
VECTOR   the element-wise unit, the same way                  empty, or OUT_OF_RANGE
DMA      the DMA (a device with SDRAM), the same way         empty, or OUT_OF_RANGE
=======  ===================================================  ==============================

Commands that start a unit queue, one deep: a GEMM or VECTOR that arrives while any unit
runs (GEMM, VECTOR or DMA) is held in the frame buffer, and parsed again and started the
cycle every unit is idle; a DMA that arrives while a DMA runs is held until that one ends.
Its reply comes when it starts. So the host keeps the array busy without polling: it sends
the next GEMM while the current one runs, and a GEMM never starts before the transfers sent
ahead of it have ended (it reads what they loaded). A DMA's arguments land in a register of
their own (``dma_args``, which the DMA copies when it starts), so a DMA starts at once while
a GEMM or VECTOR runs: that is how a transfer overlaps compute (start the compute, then the
prefetch of the next operands, or the store of the previous result; the host keeps their
regions apart, as it plans double buffers). The GEMM and VECTOR arguments stay in the
decoder's argument register while those units run (they read their settings from it; no
copy). WRITE, READ and STATS with a region are answered BUSY while any unit runs; PING, INFO
and plain STATS are served. A WRITE, GEMM, VECTOR or DMA whose ``seq`` and opcode
repeat the previous request's is a host retry after a lost reply: it is answered with the
remembered status and not run again (any other reply forgets it; receiver errors do not
touch it).

``phase`` tells the device which component owns the frame buffer.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, memory, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.dma import DMA_CFG, words_per_burst
from nibble.rtl.engine import GEMM_CFG
from nibble.rtl.formats import VecOp
from nibble.rtl.vector import VEC_CFG

from .framing import BUFFER_BYTES, RxStatus
from .protocol import (
    CRC_BYTES,
    GATHER_ADDR_BYTES,
    GATHER_HEADER,
    HEADER_BYTES,
    INFO_LAYOUT,
    MAX_PAYLOAD,
    PARAM_BITS,
    PARAMS_FROM,
    PROGRAM_OPS,
    READ_ARGS,
    REQUANT_PARAM_BITS,
    RUN_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VEC_ARGS,
    WRITE_HEADER,
    Op,
    Status,
    entry_words,
    layout_bytes,
    longest_entry_words,
)
from .reply import Fill, ReplyControl
from .transfer import FB_ADDR, TransferControl, TransferOp

__all__ = ["ARGS_BYTES", "CommandDecoder", "Phase"]

#: The argument register: the longest fixed payload (GEMM's).
ARGS_BYTES = max(layout_bytes(GEMM_CFG), layout_bytes(VEC_CFG), layout_bytes(DMA_CFG))


class Phase(enum.Enum, shape=2):
    """Who owns the frame buffer."""

    IDLE = 0        # the receiver (it writes a frame while one arrives)
    PARSE = 1       # the decoder reads the header and arguments
    TRANSFER = 2    # a WRITE, READ or STATS transfer
    REPLY = 3       # the reply


class CommandDecoder(wiring.Component):
    """Ports
    -----
    frame, rx_status, length : In
        The receiver's report (a frame ended; how; its body length); ``ack`` (Out) releases
        the receiver once the reply is sent.
    buf : the frame buffer's read port while parsing.
    phase : Out(Phase)
    waiting : Out(1)
        Waiting for a frame (nothing parsed, carried out or answered).
    busy : In(1)
        The engine or the element-wise unit runs (the argument register is in use).
    dma_busy : In(1)
        The DMA runs.
    args : Out(8 * ARGS_BYTES)
        The argument register (the engine's and the unit's settings).
    dma_args : Out(DMA_CFG)
        A DMA's arguments (a device with SDRAM), written while any unit runs.
    gemm_start, vec_start, dma_start : Out(1); checked, ok : In(1)
        Start a unit; its check's verdict (from whichever runs).
    stats_snapshot : Out(1)
        A STATS is being answered: freeze the cycle counter it reports.
    program, program_begin : Out(1); settled : In(1)
        (A device with SDRAM.) A RUN's program runs; it begins (the statistics start
        over); the statistics have taken in every unit that has ended.
    transfer, reply : Out(TransferControl / ReplyControl)
    """

    def __init__(self, addr_width, nibbles, mem_words, dma=False):
        self.nib, self.mem_words, self.dma = nibbles, mem_words, dma
        super().__init__({
            "frame": In(1), "rx_status": In(RxStatus), "length": In(range(BUFFER_BYTES + 1)),
            "ack": Out(1),
            "buf": In(memory.ReadPort.Signature(addr_width=FB_ADDR, shape=8)),
            "phase": Out(Phase), "waiting": Out(1), "busy": In(1), "dma_busy": In(1),
            "args": Out(8 * ARGS_BYTES), **({"dma_args": Out(DMA_CFG)} if dma else {}),
            "gemm_start": Out(1), "vec_start": Out(1), "dma_start": Out(1),
            "checked": In(1), "ok": In(1),
            "stats_snapshot": Out(1),
            **({"program": Out(1), "program_begin": Out(1), "settled": In(1)} if dma else {}),
            "transfer": Out(TransferControl.Signature(addr_width)),
            "reply": Out(ReplyControl.Signature()),
        })

    def elaborate(self, platform):
        m = Module()
        nib, words, args = self.nib, self.mem_words, self.args
        wb = nib // 2
        plen = Signal(range(BUFFER_BYTES + 1))          # payload bytes
        seq, op = Signal(8), Signal(8)               # op: any byte; Op names the known ones
        last = Signal(data.StructLayout({"seq": 8, "op": 8, "status": 8}))
        last_valid = Signal()                           # `last` may be retried
        p = Signal(range(BUFFER_BYTES + 1))
        have = Signal()                                 # buf.data holds byte p - 1
        stale = Signal()                                # a unit ran during PARSE
        reply = self.reply                              # the reply's settings, held
        record = Signal()                               # ... and whether to remember it
        xfer = self.transfer
        m.d.comb += [self.buf.addr.eq(p), self.buf.en.eq(1)]
        byte, have_q = Signal(8), Signal()              # PARSE: byte p - 2, if have_q
        m.d.sync += byte.eq(self.buf.data)
        write_addr = data.View(WRITE_HEADER, args[:WRITE_HEADER.size]).addr
        write_words = (plen - layout_bytes(WRITE_HEADER)) >> (wb.bit_length() - 1)
        write_over, read_over = Signal(), Signal()      # past the memory's end
        stats_over, gather_bad = Signal(), Signal()     # ... and a GATHER's length wrong
        read = data.View(READ_ARGS, args[:READ_ARGS.size])
        stats = data.View(STATS_ARGS, args[:STATS_ARGS.size])

        def answer(status, length=HEADER_BYTES, fill=Fill.NONE, remember=1):
            m.d.sync += [reply.status.eq(status), reply.length.eq(length),
                         reply.fill.eq(fill), record.eq(remember)]
            m.next = "REPLY"

        def send():
            m.d.comb += reply.start.eq(1)
            with m.If(record):           # only a success may be retried
                m.d.sync += [last.seq.eq(seq), last.op.eq(op), last.status.eq(reply.status),
                             last_valid.eq(~reply.status[7])]
            m.next = "SENDING"

        def transfer(op_, addr, count, pos, status, length=HEADER_BYTES, fill=Fill.NONE):
            m.d.comb += [xfer.start.eq(1), xfer.op.eq(op_), xfer.addr.eq(addr),
                         xfer.count.eq(count), xfer.pos.eq(pos)]
            answer(status, length, fill)
            m.next = "TRANSFER"

        # a RUN's program (only a device with SDRAM): it runs; the next entry's word; the
        # entries left; the settings its GEMMs or VECTORs take
        most = longest_entry_words(nib)
        running = Signal() if self.dma else Const(0)
        # a BESIDE entry went: the next GEMM or VECTOR entry does not wait for the DMA
        # (cleared when a unit starts and wherever ``running`` drops: a program that ends
        # on BESIDE leaves the link's next GEMM waiting as any other)
        beside = Signal() if self.dma else Const(0)
        pc = Signal(RUN_ARGS["addr"].width + 1)
        left = Signal(RUN_ARGS["entries"].width)
        params = Signal(PARAM_BITS)
        requant = Signal(REQUANT_PARAM_BITS)      # (v10) a REQUANT entry's, where not 0
        entry_len = Signal(range(most + 1))
        run = data.View(RUN_ARGS, args[:RUN_ARGS.size])
        # a GATHER: the addresses left, the next row's word, the address being read and
        # its bytes read (only a device with SDRAM)
        gather = data.View(GATHER_HEADER, args[:GATHER_HEADER.size])
        g_left, g_mem = Signal(16), Signal(GATHER_HEADER["mem_addr"].width)
        g_ext, g_byte = Signal(8 * GATHER_ADDR_BYTES), Signal(range(GATHER_ADDR_BYTES))
        if self.dma:
            with m.Switch(op):
                for code in PROGRAM_OPS:
                    with m.Case(code):
                        m.d.comb += entry_len.eq(entry_words(code, nib))

        def merged(x):
            """Argument bits ``x`` of a GEMM or VECTOR with the RUN's settings in place of
            its own, when it has none (zero): a program's entries of the other kind keep
            theirs; a REQUANT takes the RUN's ``requant`` where that is not zero."""
            out = x
            vec_op = VEC_ARGS["op"]
            is_requant = ((x[vec_op.offset:vec_op.offset + vec_op.width] == VecOp.REQUANT)
                          & requant.any())
            for code, at in PARAMS_FROM.items():
                size = PROGRAM_OPS[code].size
                given = params[:size - at]
                if code == Op.VECTOR:
                    given = Mux(is_requant, requant, given)
                out = Mux((op == code) & (x[at:size] == 0),
                          Cat(x[:at], given, x[size:]), out)
            return out

        # the units a command starts (only a device with SDRAM knows DMA)
        units = [(Op.GEMM, GEMM_CFG, self.gemm_start), (Op.VECTOR, VEC_CFG, self.vec_start)]
        if self.dma:
            units.append((Op.DMA, DMA_CFG, self.dma_start))

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.frame):      # (the receiver holds its length until ack)
                    m.d.sync += [p.eq(0), have.eq(0), stale.eq(0),
                                 plen.eq(self.length - HEADER_BYTES - CRC_BYTES)]
                    with m.If(self.rx_status == RxStatus.OK):
                        m.next = "PARSE"
                    with m.Elif(self.rx_status == RxStatus.BAD_CRC):
                        answer(Status.BAD_CRC, remember=0)
                    with m.Else():
                        answer(Status.BAD_LENGTH, remember=0)

            with m.State("PARSE"):        # bytes 0 .. 1 + ARGS_BYTES: seq, op, arguments
                # byte p - 2 in `byte` (the frame buffer's output a cycle later, registered:
                # from the block RAM's output into the arguments' shift and the RUN's
                # settings merge was the 8x32 ULX3S build's critical path)
                m.d.sync += [p.eq(p + 1), have.eq(1)]
                with m.If(have_q):
                    with m.If(p == 2):
                        m.d.sync += seq.eq(byte)
                    with m.Elif(p == 3):
                        m.d.sync += op.eq(byte)
                    with m.Elif(~self.busy):       # a running unit reads the arguments
                        m.d.sync += args.eq(Cat(args[8:], byte))
                    with m.Else():
                        m.d.sync += stale.eq(1)
                    if self.dma:                   # argument byte i arrives at p = i + 4
                        raw = self.dma_args.as_value()
                        with m.Switch(p):
                            for i in range(layout_bytes(DMA_CFG)):
                                with m.Case(HEADER_BYTES + 2 + i):
                                    m.d.sync += raw.word_select(i, 8).eq(byte)
                with m.If(p == HEADER_BYTES + ARGS_BYTES + 1):
                    m.next = "CHECK"
                    if self.dma:                   # a program's GEMM or VECTOR: the RUN's
                        with m.If(running & have_q & ~self.busy):   # settings in its own
                            m.d.sync += args.eq(merged(Cat(args[8:], byte)))

            with m.State("CHECK"):        # the sums the checks compare, registered (a
                # GATHER's length through a multiplier into DISPATCH's choice was the
                # ULX3S's critical path, 45.5 MHz)
                m.d.sync += [write_over.eq(write_addr + write_words > words),
                             read_over.eq(read.addr + read.words > words)]
                if self.dma:
                    ghb, count = layout_bytes(GATHER_HEADER), gather.count
                    m.d.sync += [
                        stats_over.eq(stats.addr + ((stats.count + nib - 1)
                                                    >> (nib.bit_length() - 1)) > words),
                        gather_bad.eq((plen < ghb) | (plen != ghb + (count << 1) + count)),
                    ]
                    assert GATHER_ADDR_BYTES == 3
                m.next = "DISPATCH"

            with m.State("DISPATCH"):
                compute = (op == Op.GEMM) | (op == Op.VECTOR)
                is_dma = (op == Op.DMA) if self.dma else 0
                once = (op == Op.WRITE) | compute | is_dma
                # a RUN, GATHER or FENCE waits for every unit, as a GEMM does
                whole = compute
                if self.dma:
                    once |= (op == Op.RUN) | (op == Op.GATHER)
                    whole |= (op == Op.RUN) | (op == Op.GATHER) | (op == Op.FENCE)
                retry = last_valid & (last.seq == seq) & (last.op == op) & once
                if self.dma:
                    retry &= ~running
                uses_mem = (op == Op.WRITE) | compute | (op == Op.READ)
                if self.dma:                        # (STATS sums only with SDRAM)
                    uses_mem |= (op == Op.STATS) & (plen != 0)
                with m.If(retry):                   # a RUN's reply is its STATS again
                    if self.dma:
                        with m.If(op == Op.RUN):
                            m.d.comb += self.stats_snapshot.eq(1)
                            answer(last.status, HEADER_BYTES + layout_bytes(STATS_LAYOUT),
                                   Fill.STATS)
                        with m.Else():
                            answer(last.status)
                    else:
                        answer(last.status)
                if self.dma:
                    with m.Elif(running & ~(compute | is_dma | (op == Op.FENCE)
                                            | (op == Op.BESIDE))):
                        answer(Status.UNKNOWN_OP)   # a program holds only these
                dma_waits = self.dma_busy & ~(beside & compute)
                with m.Elif(whole & (self.busy | stale | dma_waits) |
                            is_dma & self.dma_busy):
                    m.next = "HOLD"                 # started when its units are free
                with m.Elif(uses_mem & (self.busy | stale)):   # stale: args half-read
                    answer(Status.BUSY)
                with m.Elif(uses_mem & dma_waits):
                    answer(Status.BUSY)
                with m.Elif(op == Op.PING):
                    answer(op, HEADER_BYTES + plen)
                with m.Elif(op == Op.INFO):
                    with m.If(plen != 0):
                        answer(Status.BAD_LENGTH)
                    with m.Else():
                        answer(op, HEADER_BYTES + layout_bytes(INFO_LAYOUT), Fill.INFO)
                with m.Elif(op == Op.WRITE):
                    hb = layout_bytes(WRITE_HEADER)
                    with m.If((plen < hb + wb) | ((plen - hb)[:wb.bit_length() - 1] != 0)):
                        answer(Status.BAD_LENGTH)
                    with m.Elif(write_over):
                        answer(Status.OUT_OF_RANGE)
                    with m.Else():
                        transfer(TransferOp.WRITE, write_addr, write_words,
                                 HEADER_BYTES + hb, op)
                with m.Elif(op == Op.READ):
                    with m.If((plen != layout_bytes(READ_ARGS)) | (read.words == 0)
                              | (read.words > Mux(read.low16, 2 * MAX_PAYLOAD // wb,
                                                  MAX_PAYLOAD // wb))):
                        answer(Status.BAD_LENGTH)
                    with m.Elif(read_over):
                        answer(Status.OUT_OF_RANGE)
                    with m.Else():
                        m.d.comb += xfer.low16.eq(read.low16)
                        transfer(TransferOp.READ, read.addr, read.words, HEADER_BYTES, op,
                                 HEADER_BYTES + ((read.words * wb) >> read.low16))
                for code, layout, start in units:     # the unit answers after its check
                    with m.Elif(op == code):
                        bad_length = plen != layout_bytes(layout)
                        if self.dma:
                            bad_length &= ~running
                        with m.If(bad_length):
                            answer(Status.BAD_LENGTH)
                        with m.Else():
                            m.d.comb += start.eq(1)
                            if self.dma:
                                m.d.sync += beside.eq(0)
                            m.next = "UNIT"
                with m.Elif(op == Op.STATS):
                    m.d.comb += self.stats_snapshot.eq(1)
                    n = HEADER_BYTES + layout_bytes(STATS_LAYOUT)
                    # a region's sums only on a device with SDRAM (gateware.transfer)
                    args_ok = plen == layout_bytes(STATS_ARGS) if self.dma else Const(0)
                    with m.If((plen != 0) & ~args_ok):
                        answer(Status.BAD_LENGTH)
                    if not self.dma:
                        with m.Else():
                            answer(op, n, Fill.STATS)
                    else:
                        with m.Elif((plen != 0) & stats_over):
                            answer(Status.OUT_OF_RANGE)
                        with m.Else():         # a plain STATS sums nothing
                            transfer(TransferOp.SUMS, stats.addr, Mux(plen == 0, 0, stats.count),
                                     0, op, n, Fill.STATS)
                if self.dma:
                    with m.Elif((op == Op.BESIDE) & running):   # (else UNKNOWN_OP below)
                        m.d.sync += beside.eq(1)
                        answer(op)
                    with m.Elif(op == Op.FENCE):     # every unit is idle (HOLD before)
                        with m.If((plen != 0) & ~running):
                            answer(Status.BAD_LENGTH)
                        with m.Else():
                            answer(op)
                    with m.Elif(op == Op.RUN):
                        with m.If(plen != layout_bytes(RUN_ARGS)):
                            answer(Status.BAD_LENGTH)
                        with m.Elif(run.entries == 0):
                            answer(Status.OUT_OF_RANGE)
                        with m.Else():
                            m.d.comb += self.program_begin.eq(1)
                            m.d.sync += [running.eq(1), beside.eq(0), pc.eq(run.addr),
                                         left.eq(run.entries), params.eq(run.params),
                                         requant.eq(run.requant)]
                            m.next = "FETCH"
                    with m.Elif(op == Op.GATHER):
                        with m.If(gather_bad):
                            answer(Status.BAD_LENGTH)
                        with m.Elif(gather.count == 0):
                            answer(Status.OUT_OF_RANGE)
                        with m.Else():
                            m.d.sync += [g_left.eq(gather.count), g_mem.eq(gather.mem_addr),
                                         g_byte.eq(0), have.eq(0),
                                         p.eq(HEADER_BYTES + layout_bytes(GATHER_HEADER))]
                            m.next = "GREAD"
                with m.Else():
                    answer(Status.UNKNOWN_OP)

            with m.State("HOLD"):         # then parse the frame again and start it
                beside_ok = beside & ((op == Op.GEMM) | (op == Op.VECTOR))
                with m.If((~self.dma_busy | beside_ok) & ~(self.busy & (op != Op.DMA))):
                    m.d.sync += [p.eq(0), have.eq(0), stale.eq(0)]
                    m.next = "PARSE"

            with m.State("TRANSFER"):
                with m.If(xfer.done):
                    m.next = "REPLY"

            with m.State("UNIT"):         # a GEMM, VECTOR or DMA answer follows its check
                with m.If(self.checked):
                    answer(Mux(self.ok, op, Status.OUT_OF_RANGE))

            with m.State("REPLY"):
                if self.dma:
                    with m.If(running & ~reply.status[7]):   # a program's entry went: on
                        m.d.sync += [pc.eq(pc + entry_len), left.eq(left - 1)]
                        with m.If(left == 1):
                            m.next = "DRAIN"
                        with m.Else():
                            m.next = "FETCH"
                    with m.If(~running | reply.status[7]):   # (a failing entry ends it)
                        m.d.sync += [running.eq(0), beside.eq(0)]
                        send()
                else:
                    send()
            with m.State("SENDING"):
                with m.If(reply.done):
                    m.d.comb += self.ack.eq(1)
                    m.next = "IDLE"

            if self.dma:
                self._program_states(m, running=running, beside=beside, pc=pc, p=p,
                                     have=have, stale=stale, op=op, answer=answer, most=most,
                                     gather=gather,
                                     g_left=g_left, g_mem=g_mem, g_ext=g_ext, g_byte=g_byte)
        if self.dma:
            m.d.comb += self.program.eq(running)
        m.d.sync += have_q.eq(have & fsm.ongoing("PARSE"))
        return self._phases(m, fsm)

    def _program_states(self, m, *, running, beside, pc, p, have, stale, op, answer, most,
                        gather, g_left, g_mem, g_ext, g_byte):
        """(A device with SDRAM.) The states of RUN and GATHER, on the decoder's registers
        (see ``elaborate``) and its ``answer``."""
        xfer, words, nib = self.transfer, self.mem_words, self.nib
        # -- RUN: each entry read into the frame buffer after the seq, then parsed and
        # carried out as if it had arrived (its answer goes on to the next entry) -------
        with m.State("FETCH"):
            with m.If(pc + most > words):
                answer(Status.OUT_OF_RANGE)
            with m.Else():
                m.d.comb += [xfer.start.eq(1), xfer.op.eq(TransferOp.READ),
                             xfer.addr.eq(pc), xfer.count.eq(most), xfer.pos.eq(1)]
                m.next = "FETCHING"
        with m.State("FETCHING"):
            with m.If(xfer.done):
                m.d.sync += [p.eq(0), have.eq(0), stale.eq(0)]
                m.next = "PARSE"
        with m.State("DRAIN"):        # the last entry went: its units end, the
            with m.If(~self.busy & ~self.dma_busy & self.settled):   # statistics settle
                m.d.comb += self.stats_snapshot.eq(1)
                m.d.sync += [running.eq(0), beside.eq(0), op.eq(Op.RUN)]
                answer(Op.RUN, HEADER_BYTES + layout_bytes(STATS_LAYOUT), Fill.STATS)

        # -- GATHER: each address's bytes read, then a DMA LOAD of its row ---------------
        with m.State("GREAD"):
            m.d.sync += [p.eq(p + 1), have.eq(1)]
            with m.If(have):
                m.d.sync += [g_ext.eq(Cat(g_ext[8:], self.buf.data)), g_byte.eq(g_byte + 1)]
                with m.If(g_byte == GATHER_ADDR_BYTES - 1):
                    m.d.sync += [p.eq(p), have.eq(0), g_byte.eq(0)]
                    m.next = "GSTART"
        with m.State("GSTART"):
            with m.If(~self.dma_busy):
                cfg = self.dma_args
                m.d.sync += [cfg.store.eq(0), cfg.rows.eq(1), cfg.bursts.eq(gather.bursts),
                             cfg.mem_addr.eq(g_mem),
                             cfg.mem_stride.eq(gather.bursts * words_per_burst(nib)),
                             cfg.ext_addr.eq(g_ext), cfg.ext_stride.eq(gather.bursts)]
                m.next = "GGO"
        with m.State("GGO"):
            m.d.comb += self.dma_start.eq(1)
            m.next = "GCHECK"
        with m.State("GCHECK"):
            with m.If(self.checked):
                with m.If(~self.ok):
                    answer(Status.OUT_OF_RANGE)
                with m.Elif(g_left == 1):
                    answer(Op.GATHER)
                with m.Else():
                    m.d.sync += [g_left.eq(g_left - 1),
                                 g_mem.eq(g_mem + gather.mem_stride)]
                    m.next = "GREAD"

    def _phases(self, m, fsm):
        """Who owns the frame buffer, and whether the decoder waits for a frame."""
        parse, transfer = fsm.ongoing("PARSE"), fsm.ongoing("TRANSFER")
        if self.dma:
            parse, transfer = parse | fsm.ongoing("GREAD"), transfer | fsm.ongoing("FETCHING")
        m.d.comb += self.waiting.eq(fsm.ongoing("IDLE"))
        with m.If(parse):
            m.d.comb += self.phase.eq(Phase.PARSE)
        with m.Elif(transfer):
            m.d.comb += self.phase.eq(Phase.TRANSFER)
        with m.Elif(fsm.ongoing("REPLY") | fsm.ongoing("SENDING")):
            m.d.comb += self.phase.eq(Phase.REPLY)
        return m
