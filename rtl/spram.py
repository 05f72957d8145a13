"""The iCE40UP5K's single-port RAM (SB_SPRAM256KA) as a component, and its simulation model.

The UP5K has four 16K x 16 SPRAM blocks (128 KB, 8x its block RAM): the tensor memory the
iCEBreaker needs (issue 14). yosys does not infer SPRAM from an Amaranth memory (Amaranth
always gives a memory an initial value, which SPRAM cannot have), so :class:`Spram`
instantiates the primitive when it is elaborated for an iCE40 platform, and elsewhere (the
Amaranth simulator, the Verilator system model) builds the same behaviour from an Amaranth
memory, so one RTL runs on the board and in simulation.

The port is one address for both directions, as the primitive's is: a cycle with ``en``
either reads (``we`` low; ``r_data`` holds the word from the next cycle on, until the next
read) or writes the nibbles ``mask`` selects (``we`` high). This follows yosys's own model
of the primitive (``share/ice40/cells_sim.v``): a read registers the word; a write leaves
the output undefined there, so the model makes it ``WRITE_POISON`` and a user that reads
``r_data`` after a write fails in simulation as it would on the chip; without ``en`` the
output holds. The low-power pins are tied to "on".

:class:`SpramMemory` is tensor memory built from them, behind the same
:class:`~nibble.rtl.memory.TensorBus` as :class:`~nibble.rtl.memory.BlockRAM`. A word wider
than 16 bits takes SPRAMs side by side (a *bank*: the iCEBreaker's 32-bit words take two, so
its four SPRAMs are two banks of 16K words, 128 KB); the address's top bits pick the bank.
A bank serves one request a cycle, so the bus's four ports take turns: each cycle each bank
goes to the first port asking for it in the order ``wr``, ``rd0``, ``rd1``, ``rd2``, and the
others see ``ready`` low and wait (the units all do: :mod:`nibble.rtl.memory`). Operands in
different banks stream at one word a cycle each; in one bank they share its cycles. Each
read port keeps its own word in a register (another port's read replaces the bank's
output), which the port contract needs: the word holds until the port's next read. Behind
a :class:`~nibble.rtl.memory.TensorArbiter`, which keeps each unit's word itself, the
device builds it without them (``hold=False``: 185 LCs less on the UP5K).
"""

from amaranth.hdl import Array, Cat, ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from .formats import CODE_BITS
from .memory import TensorBus, read_ports

__all__ = ["BLOCKS", "DEPTH", "WIDTH", "WRITE_POISON", "Spram", "SpramMemory", "spram_words"]

DEPTH = 16384
WIDTH = 16
#: SPRAM blocks on an iCE40UP5K.
BLOCKS = 4
#: What the model's ``r_data`` shows after a write (the primitive's is undefined).
WRITE_POISON = 0xDEAD


class Spram(wiring.Component):
    """One SB_SPRAM256KA: 16K words of 16 bits, one port, a write mask per nibble.

    ``primitive``: instantiate SB_SPRAM256KA (True), build the model (False), or decide by
    the platform (None: the primitive on an iCE40 platform).

    Ports
    -----
    addr : In(14)
    en : In(1)
        This cycle reads or writes.
    we : In(1)
        Write (else read).
    mask : In(4)
        The nibbles a write changes (bit i: bits 4i .. 4i + 3).
    w_data : In(16)
    r_data : Out(16)
        The word of the last read, from the cycle after it.
    """

    def __init__(self, primitive=None):
        self.primitive = primitive
        super().__init__({"addr": In(14), "en": In(1), "we": In(1), "mask": In(4),
                          "w_data": In(WIDTH), "r_data": Out(WIDTH)})
        self._model = None

    @property
    def model(self):
        """The model's storage, a :class:`amaranth.lib.memory.Memory` (testbenches preload
        and dump it through ``.data``)."""
        if self._model is None:
            self._model = memory.Memory(shape=WIDTH, depth=DEPTH, init=[])
        return self._model

    def elaborate(self, platform):
        m = Module()
        prim = self.primitive
        if prim is None:
            prim = "iCE40" in str(getattr(platform, "device", ""))
        if prim:
            m.submodules.spram = Instance(
                "SB_SPRAM256KA", i_ADDRESS=self.addr, i_DATAIN=self.w_data,
                i_MASKWREN=self.mask, i_WREN=self.we, i_CHIPSELECT=self.en,
                i_CLOCK=ClockSignal("sync"), i_STANDBY=0, i_SLEEP=0, i_POWEROFF=1,
                o_DATAOUT=self.r_data)
            return m
        m.submodules.mem = mem = self.model
        wr = mem.write_port(granularity=4)
        rd = mem.read_port(transparent_for=())
        write = self.en & self.we
        m.d.comb += [wr.addr.eq(self.addr), rd.addr.eq(self.addr), wr.data.eq(self.w_data),
                     wr.en.eq(self.mask & write.replicate(4)),
                     rd.en.eq(self.en & ~self.we)]
        poisoned = Signal()                  # a write since the last read: undefined output
        with m.If(self.en):
            m.d.sync += poisoned.eq(self.we)
        m.d.comb += self.r_data.eq(Mux(poisoned, WRITE_POISON, rd.data))
        return m


def spram_words(nibbles, blocks=BLOCKS):
    """Words of ``nibbles`` codes that ``blocks`` SPRAMs hold as :class:`SpramMemory`."""
    width = CODE_BITS * nibbles
    if width % WIDTH or blocks % (width // WIDTH):
        raise ValueError(f"{width}-bit words do not divide {blocks} 16-bit SPRAMs")
    return blocks // (width // WIDTH) * DEPTH


class SpramMemory(wiring.Component):
    """Tensor memory in ``blocks`` SPRAMs: words of ``nibbles`` codes, banks of
    ``4 * nibbles / 16`` SPRAMs side by side, ``words`` = banks x 16K (module docstring).

    ``primitive`` is passed to each :class:`Spram`; ``banks`` are the SPRAMs, bank by bank
    (testbenches preload and dump them through :attr:`Spram.model`).

    ``hold=False`` drops the read ports' registers: a read's word is then there only in the
    cycle after it was taken (until the bank's next access), which is all a
    :class:`~nibble.rtl.memory.TensorArbiter` in front reads (it keeps each unit's word
    itself). The device builds it so: on the UP5K the three 32-bit registers and their muxes
    are LCs it does not have.
    """

    def __init__(self, nibbles, blocks=BLOCKS, reads=3, primitive=None, hold=True):
        self.hold = hold
        self.words = spram_words(nibbles, blocks)
        self.nibbles, self.per_bank = nibbles, CODE_BITS * nibbles // WIDTH
        self.n_banks = blocks // self.per_bank
        super().__init__({"bus": In(TensorBus.Signature(
            addr_width=(self.words - 1).bit_length(), nibbles=nibbles, reads=reads))})
        self.banks = [[Spram(primitive) for _ in range(self.per_bank)]
                      for _ in range(self.n_banks)]

    def elaborate(self, platform):
        m = Module()
        bus, lo = self.bus, (DEPTH - 1).bit_length()
        ports = [bus.wr, *read_ports(bus)]           # the order each bank serves them in
        def bank_of(p):
            return p.addr[lo:] if self.n_banks > 1 else Const(0)
        asks = [(p.en != 0) for p in ports]
        words = []                                    # each bank's read word
        grants = [Signal(self.n_banks, name=f"grant{k}") for k in range(len(ports))]
        for b, bank in enumerate(self.banks):
            taken = Const(0, 1)
            addr, write = Signal(lo, name=f"addr{b}"), Signal(name=f"write{b}")
            for k, p in enumerate(ports):
                mine = asks[k] & (bank_of(p) == b)
                m.d.comb += grants[k][b].eq(mine & ~taken)
                with m.If(mine & ~taken):
                    m.d.comb += [addr.eq(p.addr[:lo]), write.eq(k == 0)]
                taken = taken | mine
            for j, sp in enumerate(bank):
                m.submodules[f"spram{b}_{j}"] = sp
                m.d.comb += [sp.addr.eq(addr), sp.en.eq(taken), sp.we.eq(write),
                             sp.mask.eq(bus.wr.en[4 * j:4 * j + 4]),
                             sp.w_data.eq(bus.wr.data[WIDTH * j:WIDTH * (j + 1)])]
            words.append(Cat(sp.r_data for sp in bank))
        m.d.comb += bus.wr.ready.eq(1)                # first everywhere
        words = Array(words)
        for k, p in enumerate(ports[1:], start=1):
            # ready: no port before this one asks for its bank (not a function of its en)
            ahead = Const(0, 1)
            for j, q in enumerate(ports[:k]):
                ahead = ahead | (asks[j] & (bank_of(q) == bank_of(p)))
            m.d.comb += p.ready.eq(~ahead)
            bank = Signal(range(max(self.n_banks, 2)), name=f"bank{k}")
            with m.If(grants[k].any()):
                m.d.sync += bank.eq(bank_of(p))
            if not self.hold:
                m.d.comb += p.data.eq(words[bank])
                continue
            arrived = Signal(name=f"arrived{k}")
            held = Signal.like(p.data, name=f"held{k}")
            m.d.sync += [arrived.eq(grants[k].any()), held.eq(p.data)]
            m.d.comb += p.data.eq(Mux(arrived, words[bank], held))
        return m
