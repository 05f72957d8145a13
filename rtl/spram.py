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
"""

from amaranth.hdl import ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["DEPTH", "WIDTH", "WRITE_POISON", "Spram"]

DEPTH = 16384
WIDTH = 16
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
        m.submodules.mem = mem = memory.Memory(shape=WIDTH, depth=DEPTH, init=[])
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
