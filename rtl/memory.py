"""Tensor memory: typed ports, the bus every unit holds, an arbiter and the block-RAM backend.

Ports
    :class:`ReadPort` and :class:`WritePort` are named and timed like
    :class:`amaranth.lib.memory.ReadPort` / ``WritePort`` (``addr``, ``en``, ``data``; a
    write enable per 4-bit nibble, the memory's granularity), with two differences. Their
    signatures are written from the side that issues requests, like amaranth-soc's buses, so
    a unit declares ``Out(TensorBus.Signature(...))`` and a memory ``In(...)``. And each port
    has a grant, ``ready``: a request (``en`` high) is taken at the clock edge where
    ``ready`` is high, and otherwise stays pending. Block RAM grants every request; a
    single-ported or banked backend (the UP5K's SPRAM) or a shared one may not, and the units
    only ever wait for ``ready``, so any backend fits behind the same ports. Two rules keep a
    bus free of combinational loops: ``en`` never depends on any ``ready``, and ``ready``
    never depends on the same port's ``en``.

    A read returns its word one cycle after it was taken, and ``data`` holds that word until
    the port's next read is taken (block RAM does this with its read enable).

Bus
    :class:`TensorBus` is what a unit holds: read ports ``rd0``, ``rd1``, ``rd2`` (the engine's
    A, B and mask streams, the element-wise unit's three operands; :func:`read_ports` lists
    them) and one write port ``wr``. (Named members, not an array: Amaranth 0.5 cannot flip
    an interface whose member is an array of interfaces.)
    :class:`TensorArbiter` gives one memory bus to several units that run at the same time
    (a GEMM, an element-wise operation, a DMA transfer, the sequencer): each port goes, each
    cycle, to the first unit in its list that asks for it, and the others wait (``ready``
    low). A unit's read data stay its own: the arbiter holds each unit's last word.

Backend
    :class:`BlockRAM` is ``words`` words of ``nibbles`` codes in block RAM, one copy per read
    port, all copies written together: block RAM is plentiful next to the LUTs the
    alternative (banks and stalls) costs on the ECP5. A deep copy is built in slices of a
    few bits, each as deep as the copy (see the class).

Stream adapters
    :class:`Reader` turns a stream of read requests into a stream of words through one read
    port (a request's tag travels with its word); :class:`Writer` puts a stream of write
    requests on a write port; :class:`StreamArbiter` merges streams by fixed priority (the
    engine's lane writers share the write port through it, its mask readers a read port);
    :class:`RegisterSlice` and :class:`ForwardRegister` cut a stream's combinational paths
    for a cycle of latency (both ways, or the forward one).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .dsp import is_ice40
from .formats import CODE_BITS

__all__ = ["ADDR_BITS", "STRIDE_BITS", "BlockRAM", "ForwardRegister", "ReadPort", "Reader",
           "RegisterSlice",
           "StreamArbiter", "TensorArbiter", "TensorBus", "WritePort", "Writer", "read_ports",
           "write_request"]

#: Tensor memory addresses in commands are ADDR_BITS wide (in words), row strides STRIDE_BITS.
ADDR_BITS = 24
STRIDE_BITS = 16


class ReadPort:
    """A tensor-memory read port (see the module docstring for its timing)."""

    class Signature(wiring.Signature):
        """``addr``: Out(addr_width); ``en``: Out(1), a read request; ``ready``: In(1), the
        request is taken this cycle; ``data``: In(4 * nibbles), the word of the last taken
        read, from the next cycle on."""

        def __init__(self, *, addr_width, nibbles):
            self.addr_width, self.nibbles = addr_width, nibbles
            super().__init__({
                "addr": Out(addr_width), "en": Out(1), "ready": In(1),
                "data": In(unsigned(CODE_BITS * nibbles)),
            })


class WritePort:
    """A tensor-memory write port, one enable bit per nibble (the write granularity)."""

    class Signature(wiring.Signature):
        """``addr``: Out(addr_width); ``data``: Out(4 * nibbles); ``en``: Out(nibbles), the
        nibbles to write (a request when any is set); ``ready``: In(1), taken this cycle."""

        def __init__(self, *, addr_width, nibbles):
            self.addr_width, self.nibbles = addr_width, nibbles
            super().__init__({
                "addr": Out(addr_width), "data": Out(unsigned(CODE_BITS * nibbles)),
                "en": Out(nibbles), "ready": In(1),
            })


class TensorBus:
    """Everything a unit reaches tensor memory through."""

    class Signature(wiring.Signature):
        def __init__(self, *, addr_width, nibbles, reads=3):
            self.addr_width, self.nibbles, self.reads = addr_width, nibbles, reads
            port = ReadPort.Signature(addr_width=addr_width, nibbles=nibbles)
            super().__init__({
                **{f"rd{k}": Out(port) for k in range(reads)},
                "wr": Out(WritePort.Signature(addr_width=addr_width, nibbles=nibbles)),
            })


def read_ports(bus):
    """The read ports of a :class:`TensorBus` interface, in order."""
    return [getattr(bus, f"rd{k}") for k in range(bus.signature.reads)]


def write_request(addr_width, nibbles):
    """Payload of a stream of write requests (see :class:`Writer`)."""
    return data.StructLayout({"addr": addr_width, "data": CODE_BITS * nibbles,
                              "en": nibbles})


class BlockRAM(wiring.Component):
    """``words`` x ``nibbles`` codes in block RAM behind a :class:`TensorBus` (one copy per
    read port, written together); every request is granted.

    A copy of 4,096 words or more is built as slices of :attr:`slice_bits` bits, each one
    memory as deep as the copy (a 16 Kbit block RAM in its ``words x 16K/words``
    configuration: 16K x 1 on the ECP5 for the ULX3S's 16K words). yosys left to itself
    builds a deep, wide memory from blocks in their widest configuration (512 x 36), a
    block's data bus carrying 36 bits of a word to every one of them and a read multiplexer
    gathering them back; sliced, each block sees its own bits alone.

    ``copies``: per copy, its slices' :class:`amaranth.lib.memory.Memory` objects;
    :meth:`peek` and :meth:`poke` read and write a word from a testbench.
    """

    def __init__(self, words, nibbles, reads=3):
        self.words, self.nibbles = words, nibbles
        aw = (words - 1).bit_length()
        super().__init__({"bus": In(TensorBus.Signature(addr_width=aw, nibbles=nibbles,
                                                          reads=reads))})
        width = CODE_BITS * nibbles
        #: bits of each slice (the whole word below 4,096 words); at most a nibble, so a
        #: slice has one write enable
        self.slice_bits = max(1, min(CODE_BITS, 16384 // words)) if words >= 4096 else width
        self.copies = [[memory.Memory(shape=unsigned(self.slice_bits), depth=words, init=[])
                        for _ in range(width // self.slice_bits)] for _ in range(reads)]

    def peek(self, ctx, addr):
        """The word at ``addr`` (of the first copy; the copies are written together)."""
        b = self.slice_bits
        return sum(ctx.get(mem.data[addr]) << (k * b) for k, mem in enumerate(self.copies[0]))

    def poke(self, ctx, addr, word):
        """Write ``word`` at ``addr`` in every copy."""
        b = self.slice_bits
        for copy in self.copies:
            for k, mem in enumerate(copy):
                ctx.set(mem.data[addr], word >> (k * b) & ((1 << b) - 1))

    def elaborate(self, platform):
        m = Module()
        bus, b = self.bus, self.slice_bits
        m.d.comb += bus.wr.ready.eq(1)
        for c, (copy, rd) in enumerate(zip(self.copies, read_ports(bus), strict=True)):
            data = []
            for k, mem in enumerate(copy):
                m.submodules[f"copy{c}_{k}"] = mem
                lo = k * b
                w = mem.write_port(granularity=min(b, CODE_BITS))
                r = mem.read_port()
                en = (bus.wr.en[lo // CODE_BITS] if b <= CODE_BITS else
                      bus.wr.en[lo // CODE_BITS:(lo + b) // CODE_BITS])
                m.d.comb += [w.addr.eq(bus.wr.addr), w.data.eq(bus.wr.data[lo:lo + b]),
                             w.en.eq(en), r.addr.eq(rd.addr), r.en.eq(rd.en)]
                data.append(r.data)
            m.d.comb += [rd.data.eq(Cat(*data)), rd.ready.eq(1)]
        return m


class TensorArbiter(wiring.Component):
    """One memory bus for ``n`` units, port by port and cycle by cycle: on each port the
    first unit (in ``units`` order) with a request this cycle is granted it; the others
    wait (``ready`` low). Each unit's read ports hold the word of the unit's own last read
    until its next one (a register per unit and read port, read through while the word
    arrives), so units that share a port never see each other's words.

    ``write_first`` names a unit that goes before the others on the write port (the DMA:
    its loads arrive at the SDRAM's pace, a quarter of the port, and a unit that only gets
    the cycles a backward-weight GEMM's lanes leave, none, would hold up the next tile; the
    lanes' writes wait in their streams instead, for as many cycles as the load takes).

    ``held`` lists, per unit, the read ports (``"rd0"`` ...) whose words it reads after the
    cycle they arrive (its ``held_reads``; default: every port). A unit that takes each word
    in the cycle it arrives needs no register: its port shows the memory's output, which is
    its word in that cycle (on the UP5K a held 32-bit word is about 64 LCs)."""

    def __init__(self, signature, n, write_first=None, held=None):
        self.n, self.write_first = n, write_first
        self.held = held if held is not None else [("rd0", "rd1", "rd2")] * n
        super().__init__({"units": In(signature).array(n), "mem": Out(signature)})

    def elaborate(self, platform):
        m = Module()
        mem, units = self.mem, self.units
        # the write port: the first requester, ``write_first`` before the others
        order = list(units)
        if self.write_first is not None:
            order.insert(0, order.pop(self.write_first))
        taken = Const(0, 1)
        for unit in order:
            m.d.comb += unit.wr.ready.eq(mem.wr.ready & ~taken)
            with m.If(~taken & (unit.wr.en != 0)):
                m.d.comb += [mem.wr.addr.eq(unit.wr.addr), mem.wr.data.eq(unit.wr.data),
                             mem.wr.en.eq(unit.wr.en)]
            taken = taken | (unit.wr.en != 0)
        # the read ports: the first requester, and each unit's word held
        for j, p in enumerate(read_ports(mem)):
            taken = Const(0, 1)
            for k, unit in enumerate(units):
                q = read_ports(unit)[j]
                grant = Signal(name=f"grant{k}_rd{j}")
                m.d.comb += [grant.eq(q.en & ~taken & p.ready), q.ready.eq(p.ready & ~taken)]
                with m.If(~taken & q.en):
                    m.d.comb += [p.addr.eq(q.addr), p.en.eq(1)]
                taken = taken | q.en
                if f"rd{j}" not in self.held[k]:
                    m.d.comb += q.data.eq(p.data)
                    continue
                arrived = Signal(name=f"arrived{k}_rd{j}")
                held = Signal.like(q.data, name=f"held{k}_rd{j}")
                m.d.sync += [arrived.eq(grant), held.eq(q.data)]
                m.d.comb += q.data.eq(Mux(arrived, p.data, held))
        return m


class Reader(wiring.Component):
    """Read requests in (``addr`` and a ``tag``), words out (``data`` and the same ``tag``).

    A word is out one cycle after its request was taken, as from the port itself, and at
    full speed (the consumer always ready) the reader takes one request a cycle. Whether it
    may issue a request is decided from its own registers, never from the consumer's
    ``ready`` of the same cycle: when the consumer stalls, the word on the port moves into
    a skid register as the next read is taken, and no request goes out while that register
    is full. (Issuing on ``o.ready`` put the whole consumer, the systolic array's input
    handshake for the engine's operand reads, in front of every block RAM's address: the
    ULX3S's critical path at 45.6 MHz.) ``skid``: False builds the reader without that
    register, issuing while its word slot is free or being emptied (the consumer's
    ``ready`` in the same cycle); None (default) decides by the platform: not on an iCE40,
    where the UP5K's clock does not need it and its LCs (about 100 for the iCEBreaker's
    readers) are not there.
    """

    def __init__(self, addr_width, nibbles, tag_shape, skid=None):
        self.skid = skid
        self.request = data.StructLayout({"addr": addr_width, "tag": tag_shape})
        self.word = data.StructLayout({"data": CODE_BITS * nibbles, "tag": tag_shape})
        super().__init__({
            "i": In(stream.Signature(self.request)),
            "o": Out(stream.Signature(self.word)),
            "port": Out(ReadPort.Signature(addr_width=addr_width, nibbles=nibbles)),
        })

    def elaborate(self, platform):
        m = Module()
        if not (not is_ice40(platform) if self.skid is None else self.skid):
            return self._without_skid(m)
        held = Signal()                  # port.data is a word not yet handed out
        held_tag = Signal.like(self.i.payload.tag)
        skid = Signal(self.word)
        skid_valid = Signal()
        take = Signal()
        out = Signal()
        m.d.comb += [
            self.port.addr.eq(self.i.payload.addr),
            self.port.en.eq(self.i.valid & ~skid_valid),
            self.i.ready.eq(self.port.ready & ~skid_valid),
            take.eq(self.i.valid & self.i.ready),
            self.o.valid.eq(skid_valid | held),
            self.o.payload.eq(Mux(skid_valid, skid, Cat(self.port.data, held_tag))),
            out.eq(self.o.valid & self.o.ready),
        ]
        with m.If(take):
            m.d.sync += [held.eq(1), held_tag.eq(self.i.payload.tag)]
            with m.If(held & ~(out & ~skid_valid)):   # the word on the port is not taken
                m.d.sync += [skid.data.eq(self.port.data), skid.tag.eq(held_tag),
                             skid_valid.eq(1)]
        with m.Elif(out):
            with m.If(skid_valid):
                m.d.sync += skid_valid.eq(0)
            with m.Else():
                m.d.sync += held.eq(0)
        return m

    def _without_skid(self, m):
        free = Signal()
        m.d.comb += [
            free.eq(~self.o.valid | self.o.ready),
            self.port.addr.eq(self.i.payload.addr),
            self.port.en.eq(self.i.valid & free),
            self.i.ready.eq(self.port.ready & free),
            self.o.payload.data.eq(self.port.data),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.tag.eq(self.i.payload.tag)]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m


class Writer(wiring.Component):
    """A stream of write requests (:func:`write_request`) onto a write port."""

    def __init__(self, addr_width, nibbles):
        super().__init__({
            "i": In(stream.Signature(write_request(addr_width, nibbles))),
            "port": Out(WritePort.Signature(addr_width=addr_width, nibbles=nibbles)),
        })

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [
            self.port.addr.eq(self.i.payload.addr), self.port.data.eq(self.i.payload.data),
            self.port.en.eq(Mux(self.i.valid, self.i.payload.en, 0)),
            self.i.ready.eq(self.port.ready),
        ]
        return m


class RegisterSlice(wiring.Component):
    """A stream through registers both ways, at one transfer a cycle: ``o``'s valid and
    payload come from a register, and so does ``i.ready`` (a second, skid register takes
    the transfer that arrives in the cycle ``o`` stalls). It cuts a combinational path
    between producer and consumer for one cycle of latency."""

    def __init__(self, payload_shape):
        super().__init__({"i": In(stream.Signature(payload_shape)),
                          "o": Out(stream.Signature(payload_shape))})

    def elaborate(self, platform):
        m = Module()
        skid = Signal.like(self.i.payload)
        skid_valid = Signal()
        m.d.comb += self.i.ready.eq(~skid_valid)
        with m.If(self.o.ready | ~self.o.valid):        # the output register is free
            with m.If(skid_valid):
                m.d.sync += [self.o.payload.eq(skid), self.o.valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [self.o.payload.eq(self.i.payload), self.o.valid.eq(self.i.valid)]
        with m.Elif(self.i.valid & ~skid_valid):        # it stalls: keep the arrival
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m


class ForwardRegister(wiring.Component):
    """A stream's valid and payload through a register, at one transfer a cycle; ``i.ready``
    is ``o``'s, passed through (the register takes a transfer while it is empty or being
    emptied). Half a :class:`RegisterSlice`, for a consumer whose ``ready`` is cheap: it cuts
    the forward path only, with no skid register."""

    def __init__(self, payload_shape):
        super().__init__({"i": In(stream.Signature(payload_shape)),
                          "o": Out(stream.Signature(payload_shape))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.i.ready.eq(self.o.ready | ~self.o.valid)
        with m.If(self.i.ready):
            m.d.sync += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload)]
        return m


class StreamArbiter(wiring.Component):
    """``n`` streams into one by fixed priority (input 0 first), in the same cycle; the
    output carries the winner's index (``o.payload.index``) beside its payload."""

    def __init__(self, payload_shape, n):
        self.n = n
        super().__init__({
            "i": In(stream.Signature(payload_shape)).array(n),
            "o": Out(stream.Signature(data.StructLayout({
                "payload": payload_shape, "index": range(max(n, 2))}))),
        })

    def elaborate(self, platform):
        m = Module()
        for k in reversed(range(self.n)):
            with m.If(self.i[k].valid):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.payload.eq(self.i[k].payload),
                             self.o.payload.index.eq(k)]
        for k in range(self.n):
            m.d.comb += self.i[k].ready.eq(self.o.ready & (self.o.payload.index == k))
        return m
