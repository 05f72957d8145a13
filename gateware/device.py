"""The device behind the link: framing, the command decoder, tensor memory and the GEMM engine.

:class:`Device` is a byte stream in, a byte stream out; a board top puts a UART in front of
it, and the Verilator system model drives its streams from a TCP socket. The commands are
those of :mod:`gateware.protocol`:

* every check (length, range, busy) happens before anything changes, so a rejected frame
  changes no state;
* a WRITE or GEMM whose ``seq`` and opcode repeat the previous request's is a host retry
  after a lost reply: it is answered with the previous status and not executed again;
* GEMM replies as soon as the engine has checked the arguments and runs on; until it is
  done, WRITE, READ, GEMM and STATS with a region are answered BUSY, while PING, INFO and
  plain STATS (which reports ``busy``) still work.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.engine import GEMM_CFG, GemmEngine, TensorMemory, word_nibbles
from nibble.rtl.vector import VEC_CFG, VectorUnit

from .framing import BUFFER_BYTES, FrameRx, FrameTx, RxStatus
from .protocol import (
    CRC_BYTES,
    HEADER_BYTES,
    INFO_LAYOUT,
    MAX_PAYLOAD,
    READ_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    VERSION,
    WRITE_HEADER,
    Op,
    Status,
    layout_bytes,
)

__all__ = ["SIM_DEVICE", "Device"]

#: The simulated device (``sim.system``) and ``emu://`` by default: a small array, fast to
#: simulate, and a memory that holds the Fashion-MNIST MLP's training state with its master
#: weights (2 MiB).
SIM_DEVICE = {"rows": 2, "cols": 4, "words": 1 << 19, "clk_hz": 36_000_000}

ARGS_BYTES = max(layout_bytes(GEMM_CFG), layout_bytes(VEC_CFG))


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

    Ports
    -----
    i : In(stream.Signature(8))
        Bytes from the host.
    o : Out(stream.Signature(8))
        Bytes to the host.
    idle : Out(1)
        Nothing in progress (no frame, no reply, no GEMM): the simulation harness may sleep.
    """

    def __init__(self, rows, cols, mem_words, clk_hz=0, timeout=None):
        self.rows, self.cols, self.mem_words, self.clk_hz = rows, cols, mem_words, clk_hz
        self.nib = word_nibbles(rows, cols)
        self.timeout = timeout or max(1 << 16, clk_hz // 100)    # 10 ms at clk_hz
        super().__init__({
            "i": In(stream.Signature(8)),
            "o": Out(stream.Signature(8)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        nib, words = self.nib, self.mem_words
        wb = nib // 2
        m.submodules.rx = rx = FrameRx(self.timeout)
        m.submodules.tx = tx = FrameTx()
        m.submodules.engine = engine = GemmEngine(self.rows, self.cols, words)
        m.submodules.vec = vec = VectorUnit(self.rows, self.cols, words)
        m.submodules.mem = mem = TensorMemory(words, nib, 3)
        busy = Signal()               # the engine or the element-wise unit is running
        m.d.comb += busy.eq(engine.busy | vec.busy)
        m.submodules.fb = fb = memory.Memory(shape=8, depth=BUFFER_BYTES, init=[])
        fb_rd = fb.read_port()
        fb_wr = fb.write_port()
        wiring.connect(m, wiring.flipped(self.i), rx.i)
        wiring.connect(m, tx.o, wiring.flipped(self.o))

        # tensor memory: the engine while it runs, the decoder otherwise
        # read ports 1 and 2: the engine's B and mask readers, or the element-wise unit's
        for port, eng in ((1, engine.rd_b), (2, engine.rd_m)):
            with m.If(vec.busy):
                m.d.comb += [mem.rd[port].addr.eq(vec.rd[port].addr),
                             mem.rd[port].en.eq(vec.rd[port].en)]
            with m.Else():
                m.d.comb += [mem.rd[port].addr.eq(eng.addr), mem.rd[port].en.eq(eng.en)]
            m.d.comb += [eng.data.eq(mem.rd[port].data), vec.rd[port].data.eq(mem.rd[port].data)]
        d_addr = Signal(range(words))
        d_en = Signal()
        d_wr_addr = Signal(range(words))
        d_wr_data = Signal(4 * nib)
        d_wr_en = Signal()
        with m.If(engine.busy):
            m.d.comb += [mem.rd[0].addr.eq(engine.rd_a.addr), mem.rd[0].en.eq(engine.rd_a.en),
                         mem.wr_addr.eq(engine.wr_addr), mem.wr_data.eq(engine.wr_data),
                         mem.wr_en.eq(engine.wr_en)]
        with m.Elif(vec.busy):
            m.d.comb += [mem.rd[0].addr.eq(vec.rd[0].addr), mem.rd[0].en.eq(vec.rd[0].en),
                         mem.wr_addr.eq(vec.wr_addr), mem.wr_data.eq(vec.wr_data),
                         mem.wr_en.eq(vec.wr_en)]
        with m.Else():
            m.d.comb += [mem.rd[0].addr.eq(d_addr), mem.rd[0].en.eq(d_en),
                         mem.wr_addr.eq(d_wr_addr), mem.wr_data.eq(d_wr_data),
                         mem.wr_en.eq(Mux(d_wr_en, (1 << nib) - 1, 0))]
        m.d.comb += [engine.rd_a.data.eq(mem.rd[0].data), vec.rd[0].data.eq(mem.rd[0].data)]

        # frame buffer: the receiver fills it, the decoder reads and rewrites it
        d_fb_addr = Signal(range(BUFFER_BYTES))
        d_fb_data = Signal(8)
        d_fb_en = Signal()
        with m.If(rx.i.ready):
            m.d.comb += [fb_wr.addr.eq(rx.wr_addr), fb_wr.data.eq(rx.wr_data),
                         fb_wr.en.eq(rx.wr_en)]
        with m.Else():
            m.d.comb += [fb_wr.addr.eq(d_fb_addr), fb_wr.data.eq(d_fb_data),
                         fb_wr.en.eq(d_fb_en)]

        cycles = Signal(32)
        m.d.sync += cycles.eq(cycles + 1)

        length = Signal(range(BUFFER_BYTES + 1))      # body bytes incl. CRC
        plen = Signal(range(BUFFER_BYTES + 1))        # payload bytes
        seq = Signal(8)
        op = Signal(8)
        args = Signal(8 * ARGS_BYTES)
        status = Signal(8)
        last = Signal(24)                             # seq, op, status of the last answer
        last_valid = Signal()
        m.d.comb += plen.eq(length - HEADER_BYTES - CRC_BYTES)

        p = Signal(range(BUFFER_BYTES + 1))           # buffer index
        q = Signal(range(BUFFER_BYTES + 1))           # second index / counter
        have = Signal()                               # fb_rd.data is valid
        count = Signal(24)
        word = Signal(4 * nib)
        sum_abs = Signal(32)
        sum_sq = Signal(32)
        code = Signal(signed(4))
        code_valid = Signal()
        mag = Signal(4)
        m.d.comb += mag.eq(Mux(code < 0, -code, code))
        with m.If(code_valid):
            m.d.sync += [sum_abs.eq(sum_abs + mag),
                         sum_sq.eq(sum_sq + Array(Const(k * k, 7) for k in range(16))[mag])]
        n_reply = Signal(range(BUFFER_BYTES + 1))     # reply body bytes (seq, op, payload)
        fill_info = Signal()                          # FILL writes INFO (else STATS)
        fill_len = Signal(range(max(layout_bytes(STATS_LAYOUT), layout_bytes(INFO_LAYOUT)) + 1))
        cycles_at = Signal(32)                        # `cycles` when the STATS began

        write_addr = data.View(WRITE_HEADER, args[:WRITE_HEADER.size]).addr
        write_words = (plen - layout_bytes(WRITE_HEADER)) >> (wb.bit_length() - 1)
        read_args = data.View(READ_ARGS, args[:READ_ARGS.size])
        read_addr, read_words = read_args.addr, read_args.words
        stats_args = data.View(STATS_ARGS, args[:STATS_ARGS.size])
        stats_addr, stats_count = stats_args.addr, stats_args.count

        info = Signal(INFO_LAYOUT)
        m.d.comb += [info.version.eq(VERSION), info.rows.eq(self.rows), info.cols.eq(self.cols),
                     info.word_nibbles.eq(nib), info.mem_words.eq(words),
                     info.max_payload.eq(MAX_PAYLOAD), info.clk_hz.eq(self.clk_hz)]
        stats = Signal(STATS_LAYOUT)
        m.d.comb += [stats.busy.eq(busy), stats.vec_cycles.eq(vec.cycles),
                     stats.w_sum_abs.eq(vec.sum_abs), stats.w_sum_sq.eq(vec.sum_sq),
                     stats.absmax.eq(engine.absmax),
                     stats.gemm_cycles.eq(engine.cycles), stats.beats.eq(engine.beats),
                     stats.cycles.eq(cycles_at), stats.sum_abs.eq(sum_abs),
                     stats.sum_sq.eq(sum_sq), stats.rx_errors.eq(rx.errors)]

        m.d.comb += [fb_rd.en.eq(1), tx.i.payload.data.eq(fb_rd.data)]
        m.d.comb += [engine.cfg.eq(args[:GEMM_CFG.size]), vec.cfg.eq(args[:VEC_CFG.size])]

        def reply(m_, code):
            """Answer with an empty payload: status ``code`` (a Value or int)."""
            m_.d.sync += status.eq(code)
            m_.next = "STATUS"

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.idle.eq(~rx.in_frame & ~rx.frame & ~busy & ~tx.busy)
                with m.If(rx.frame):
                    m.d.sync += [length.eq(rx.length), p.eq(0), have.eq(0)]
                    with m.If(rx.status == RxStatus.OK):
                        m.next = "PARSE"
                    with m.Elif(rx.status == RxStatus.BAD_CRC):
                        m.d.sync += [status.eq(Status.BAD_CRC)]
                        m.next = "STATUS_NORECORD"
                    with m.Else():
                        m.d.sync += [status.eq(Status.BAD_LENGTH)]
                        m.next = "STATUS_NORECORD"

            with m.State("PARSE"):        # bytes 0 .. 1 + ARGS_BYTES: seq, op, args
                m.d.comb += fb_rd.addr.eq(p)
                m.d.sync += [p.eq(p + 1), have.eq(1)]
                with m.If(have):
                    with m.If(p == 1):
                        m.d.sync += seq.eq(fb_rd.data)
                    with m.Elif(p == 2):
                        m.d.sync += op.eq(fb_rd.data)
                    with m.Elif(~busy):       # a running GEMM or VECTOR reads args
                        m.d.sync += args.eq(Cat(args[8:], fb_rd.data))
                with m.If(p == HEADER_BYTES + ARGS_BYTES):
                    m.next = "DISPATCH"

            with m.State("DISPATCH"):
                m.d.sync += [have.eq(0), p.eq(0), q.eq(0)]
                retry = (last_valid & (Cat(seq, op) == last[:16])
                         & ((op == Op.WRITE) | (op == Op.GEMM) | (op == Op.VECTOR)))
                uses_mem = ((op == Op.WRITE) | (op == Op.READ) | (op == Op.GEMM)
                            | (op == Op.VECTOR) | ((op == Op.STATS) & (plen != 0)))
                with m.If(retry):
                    reply(m, last[16:])
                with m.Elif(uses_mem & busy):
                    reply(m, Status.BUSY)
                with m.Elif(op == Op.PING):
                    m.d.sync += [status.eq(op), n_reply.eq(HEADER_BYTES + plen)]
                    m.next = "SEND_RECORD"
                with m.Elif(op == Op.INFO):
                    with m.If(plen != 0):
                        reply(m, Status.BAD_LENGTH)
                    with m.Else():
                        m.d.sync += [fill_info.eq(1), status.eq(op),
                                     fill_len.eq(layout_bytes(INFO_LAYOUT))]
                        m.next = "FILL"
                with m.Elif(op == Op.WRITE):
                    hb = layout_bytes(WRITE_HEADER)
                    with m.If((plen < hb + wb) | ((plen - hb)[:wb.bit_length() - 1] != 0)):
                        reply(m, Status.BAD_LENGTH)
                    with m.Elif(write_addr + write_words > words):
                        reply(m, Status.OUT_OF_RANGE)
                    with m.Else():
                        m.d.sync += [p.eq(HEADER_BYTES + hb), count.eq(write_words),
                                     d_wr_addr.eq(write_addr), q.eq(0)]
                        m.next = "WRITE"
                with m.Elif(op == Op.READ):
                    with m.If((plen != layout_bytes(READ_ARGS)) | (read_words == 0)
                              | (read_words > MAX_PAYLOAD // wb)):
                        reply(m, Status.BAD_LENGTH)
                    with m.Elif(read_addr + read_words > words):
                        reply(m, Status.OUT_OF_RANGE)
                    with m.Else():
                        m.d.sync += [count.eq(read_words), d_addr.eq(read_addr),
                                     p.eq(HEADER_BYTES), q.eq(0)]
                        m.next = "READ"
                with m.Elif(op == Op.GEMM):
                    with m.If(plen != ARGS_BYTES):
                        reply(m, Status.BAD_LENGTH)
                    with m.Else():
                        m.d.comb += engine.start.eq(1)
                        m.next = "GEMM"
                with m.Elif(op == Op.VECTOR):
                    with m.If(plen != layout_bytes(VEC_CFG)):
                        reply(m, Status.BAD_LENGTH)
                    with m.Else():
                        m.d.comb += vec.start.eq(1)
                        m.next = "VECTOR"
                with m.Elif(op == Op.STATS):
                    m.d.sync += cycles_at.eq(cycles)
                    with m.If(plen == 0):
                        m.d.sync += [sum_abs.eq(0), sum_sq.eq(0)]
                        m.next = "STATS"
                    with m.Elif(plen != layout_bytes(STATS_ARGS)):
                        reply(m, Status.BAD_LENGTH)
                    with m.Elif(stats_addr + ((stats_count + nib - 1) >> (nib.bit_length() - 1))
                                > words):
                        reply(m, Status.OUT_OF_RANGE)
                    with m.Else():
                        m.d.sync += [sum_abs.eq(0), sum_sq.eq(0), d_addr.eq(stats_addr),
                                     count.eq(stats_count), q.eq(0)]
                        m.next = "SUMS"
                with m.Else():
                    reply(m, Status.UNKNOWN_OP)

            with m.State("WRITE"):        # payload bytes -> words -> tensor memory
                m.d.comb += fb_rd.addr.eq(p)
                m.d.sync += [p.eq(p + 1), have.eq(1)]
                with m.If(have):
                    m.d.sync += [word.eq(Cat(word[8:], fb_rd.data)), q.eq(q + 1)]
                    with m.If(q == wb - 1):
                        m.d.sync += q.eq(0)
                        m.d.comb += [d_wr_en.eq(1), d_wr_data.eq(Cat(word[8:], fb_rd.data))]
                        m.d.sync += [d_wr_addr.eq(d_wr_addr + 1), count.eq(count - 1)]
                        with m.If(count == 1):
                            reply(m, Op.WRITE)

            with m.State("READ"):         # tensor memory -> bytes -> frame buffer
                # one word read, then its bytes written one per cycle
                with m.If(q == 0):
                    m.d.comb += d_en.eq(1)
                    m.d.sync += [q.eq(1), d_addr.eq(d_addr + 1)]
                with m.Else():
                    m.d.comb += [d_fb_en.eq(1), d_fb_addr.eq(p),
                                 d_fb_data.eq(mem.rd[0].data.word_select((q - 1)[:len(q)], 8))]
                    m.d.sync += [p.eq(p + 1), q.eq(Mux(q == wb, 0, q + 1))]
                    with m.If(q == wb):
                        m.d.sync += count.eq(count - 1)
                        with m.If(count == 1):
                            m.d.sync += [status.eq(Op.READ), n_reply.eq(p + 1)]
                            m.next = "SEND_RECORD"

            with m.State("GEMM"):
                with m.If(engine.checked):
                    reply(m, Mux(engine.ok, Op.GEMM, Status.OUT_OF_RANGE))

            with m.State("VECTOR"):
                with m.If(vec.checked):
                    reply(m, Mux(vec.ok, Op.VECTOR, Status.OUT_OF_RANGE))

            with m.State("SUMS"):         # sum |c| and c^2 over INT4 codes, one per cycle
                # pipelined: the code is registered, then its magnitude accumulated (the
                # square from a 9-entry table, not a multiplier)
                with m.If(q == 0):
                    m.d.comb += d_en.eq(1)
                    m.d.sync += [q.eq(1), d_addr.eq(d_addr + 1), code_valid.eq(0)]
                with m.Else():
                    m.d.sync += [code.eq(mem.rd[0].data.word_select((q - 1)[:len(q)], 4)),
                                 code_valid.eq(1), q.eq(Mux(q == nib, 0, q + 1)),
                                 count.eq(count - 1)]
                    with m.If(count == 1):
                        m.next = "SUMS_LAST"
                with m.If(count == 0):
                    m.next = "STATS"
            with m.State("SUMS_LAST"):
                m.d.sync += code_valid.eq(0)
                m.next = "STATS"

            with m.State("STATS"):
                m.d.sync += code_valid.eq(0)
                m.d.sync += [fill_info.eq(0), fill_len.eq(layout_bytes(STATS_LAYOUT)),
                             status.eq(Op.STATS), q.eq(0)]
                m.next = "FILL"

            with m.State("FILL"):         # a register reply into the buffer
                qb = max(layout_bytes(STATS_LAYOUT), layout_bytes(INFO_LAYOUT)).bit_length()
                byte = Mux(fill_info, info.as_value().word_select(q[:qb], 8),
                           stats.as_value().word_select(q[:qb], 8))
                m.d.comb += [d_fb_en.eq(1), d_fb_addr.eq(HEADER_BYTES + q), d_fb_data.eq(byte)]
                m.d.sync += q.eq(q + 1)
                with m.If(q == fill_len - 1):
                    m.d.sync += n_reply.eq(HEADER_BYTES + fill_len)
                    m.next = "SEND_RECORD"

            with m.State("STATUS"):       # an empty reply with `status`
                m.d.sync += n_reply.eq(HEADER_BYTES)
                m.next = "SEND_RECORD"

            with m.State("STATUS_NORECORD"):
                m.d.sync += [n_reply.eq(HEADER_BYTES), p.eq(0), q.eq(0), have.eq(0)]
                m.next = "OPBYTE"

            with m.State("SEND_RECORD"):  # remember the answer for a retry of this request
                # only a success is remembered: a rejected request may be sent again as is
                m.d.sync += [last.eq(Cat(seq, op, status)), last_valid.eq(~status[7]),
                             p.eq(0), q.eq(0), have.eq(0)]
                m.next = "OPBYTE"

            with m.State("OPBYTE"):
                m.d.comb += [d_fb_en.eq(1), d_fb_addr.eq(1), d_fb_data.eq(status)]
                m.next = "SEND"

            with m.State("SEND"):         # buffer bytes 0 .. n_reply - 1 to the framer
                advance = ~have | tx.i.ready
                m.d.comb += [fb_rd.addr.eq(p), fb_rd.en.eq(advance),
                             tx.i.valid.eq(have), tx.i.payload.last.eq(q == n_reply - 1)]
                with m.If(advance):
                    m.d.sync += [have.eq(p < n_reply), p.eq(p + 1)]
                with m.If(tx.i.valid & tx.i.ready):
                    m.d.sync += q.eq(q + 1)
                    with m.If(q == n_reply - 1):
                        m.d.comb += rx.ack.eq(1)
                        m.d.sync += [q.eq(0), have.eq(0)]
                        m.next = "IDLE"
        return m
