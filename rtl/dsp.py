"""A multiply-accumulate and a multiply on the iCE40UP5K's DSP block (SB_MAC16), and their
models.

:class:`MulAdd` accumulates, ``o <- o + a * b``, or restarts, ``o <- 0`` on ``clear``,
through two pipeline registers: ``b`` and the product are registered inside the block, the
sum is its output register, and the sum feeds back inside the block (the adders' upper
inputs are the output register). ``clear`` is the block's OLOAD with C and D tied to 0:
the register loads 0 instead of the sum and that cycle's product is dropped, so a one-row
array's PE (:class:`~nibble.rtl.array.BroadcastRow`) feeds a bubble, a zero product, at
each tile's restart (one cycle a tile). The accumulator, its restart and the product
register all live in the block: the PE costs no LUT but its B operand's. (Its first form
fed the sum back through the fabric with ``c`` gated to 0 at the restart, 32 LUTs a PE that
the builds did not show while yosys rebuilt the block: ``gateware.synth.ICE40_DSP_GUARD``.)

yosys's ``synth_ice40 -dsp`` maps a ``*`` to an SB_MAC16 but packs neither the product's
register nor the accumulator into it, so the block is instantiated directly when the
component is elaborated for an iCE40 platform (as :class:`~nibble.rtl.spram.Spram` is),
and elsewhere (the Amaranth simulator, the Verilator system model, another FPGA) the same
behaviour is built from Amaranth arithmetic. The primitive's configuration
(``SB_MAC16_PARAMS``) is checked against yosys's own model of the block
(``share/ice40/cells_sim.v``) on Verilator by the ``row_ice40`` cocotb unit
(``sim/runner.py``), which runs the datapath suite on the one-row array built with the
primitive; ``tests/test_dsp_synth.py`` checks that synthesis keeps it.

:class:`Mul16` is the block as a registered 16 x 16 multiplier with a clock enable: the
rescale unit's two partial products on the UP5K, with its first two pipeline stages inside.

Configuration (:class:`MulAdd`): a signed 16 x 16 multiply, the product registered
(``PIPELINE_16x16_MULT_REG2``); the upper 16-bit adder sums the product's top half and
the output register's, the lower one the bottom halves, the lower's carry into the upper
(a 32-bit accumulator); both outputs registered. ``B`` is registered at the block's input
(``B_REG``), ``A`` is not (a one-row array shares one registered ``A`` among its PEs).
"""

from amaranth.hdl import ClockSignal, Const, Instance, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SB_MAC16_PARAMS", "SB_MAC16_PORTS", "Mul16", "MulAdd", "is_ice40"]

#: The SB_MAC16's parameters for :class:`MulAdd` (names as in yosys's cells_sim.v).
SB_MAC16_PARAMS = {
    "A_SIGNED": 1, "B_SIGNED": 1, "MODE_8x8": 0,
    "A_REG": 0, "B_REG": 1, "C_REG": 0, "D_REG": 0,
    "TOP_8x8_MULT_REG": 0, "BOT_8x8_MULT_REG": 0,
    "PIPELINE_16x16_MULT_REG1": 0, "PIPELINE_16x16_MULT_REG2": 1,
    "TOPADDSUB_LOWERINPUT": 2, "TOPADDSUB_UPPERINPUT": 0, "TOPADDSUB_CARRYSELECT": 2,
    "BOTADDSUB_LOWERINPUT": 2, "BOTADDSUB_UPPERINPUT": 0, "BOTADDSUB_CARRYSELECT": 0,
    "TOPOUTPUT_SELECT": 1, "BOTOUTPUT_SELECT": 1, "NEG_TRIGGER": 0,
}
_WIDTHS = {"TOPADDSUB_LOWERINPUT": 2, "TOPADDSUB_CARRYSELECT": 2, "BOTADDSUB_LOWERINPUT": 2,
           "BOTADDSUB_CARRYSELECT": 2, "TOPOUTPUT_SELECT": 2, "BOTOUTPUT_SELECT": 2}


#: The primitive's ports (as in cells_sim.v): name -> (width, direction); its parameters
#: are the keys of ``SB_MAC16_PARAMS``. ``gateware.synth`` declares the block from these.
SB_MAC16_PORTS = {
    "CLK": (1, "input"), "CE": (1, "input"),
    **{k: (16, "input") for k in ("C", "A", "B", "D")},
    **{k: (1, "input") for k in (
        "AHOLD", "BHOLD", "CHOLD", "DHOLD", "IRSTTOP", "IRSTBOT", "ORSTTOP", "ORSTBOT",
        "OLOADTOP", "OLOADBOT", "ADDSUBTOP", "ADDSUBBOT", "OHOLDTOP", "OHOLDBOT", "CI",
        "ACCUMCI", "SIGNEXTIN")},
    "O": (32, "output"), "CO": (1, "output"), "ACCUMCO": (1, "output"),
    "SIGNEXTOUT": (1, "output"),
}


def _sb_mac16(m, params, **ports):
    """An SB_MAC16 instance with ``params`` (names as in cells_sim.v) and the given ports;
    the controls not given are 0, the carry and cascade outputs unused."""
    params = {f"p_{k}": Const(v, _WIDTHS.get(k, 1)) for k, v in params.items()}
    zero = {f"i_{k}": 0 for k, (width, way) in SB_MAC16_PORTS.items()
            if way == "input" and width == 1 and f"i_{k}" not in ports and k != "CLK"}
    m.submodules.mac = Instance("SB_MAC16", **params, **zero, i_CLK=ClockSignal("sync"),
                                **ports, o_CO=Signal(), o_ACCUMCO=Signal(),
                                o_SIGNEXTOUT=Signal())


def is_ice40(platform):
    """Whether ``platform`` is an iCE40's (its primitives can be instantiated)."""
    return "iCE40" in str(getattr(platform, "device", ""))


class MulAdd(wiring.Component):
    """``o <- 0`` if ``clear`` else ``o <- o + a * b`` (modulo 2^32), where the product is
    of ``b`` sampled two clock edges before and ``a`` one before; ``clear`` is sampled at
    the edge it acts on (it drops the product arriving there).

    ``primitive``: instantiate SB_MAC16 (True), build the model (False), or decide by the
    platform (None: the primitive on an iCE40).

    Ports
    -----
    a, b : In(signed(16))
    clear : In(1)
    en : In(1)
        The block's clock enable: every register holds while it is low (a stalled row).
    o : Out(signed(32))
    """

    def __init__(self, primitive=None):
        self.primitive = primitive
        super().__init__({"a": In(signed(16)), "b": In(signed(16)), "clear": In(1),
                          "en": In(1, init=1), "o": Out(signed(32))})

    def elaborate(self, platform):
        m = Module()
        prim = is_ice40(platform) if self.primitive is None else self.primitive
        if prim:
            _sb_mac16(m, SB_MAC16_PARAMS, i_CE=self.en, i_A=self.a, i_B=self.b, i_C=0,
                      i_D=0, i_OLOADTOP=self.clear, i_OLOADBOT=self.clear, o_O=self.o)
            return m
        b, product = Signal(signed(16)), Signal(signed(32))
        with m.If(self.en):
            m.d.sync += [b.eq(self.b), product.eq(self.a * b),
                         self.o.eq(Mux(self.clear, 0, self.o + product))]
        return m


class Mul16(wiring.Component):
    """``o <- a * b``, a 16 x 16 product of ``a_signed`` / ``b_signed`` operands, two
    cycles after ``b`` and one after ``a``: ``b`` is registered at the block's input and the
    product inside it, both only while ``en`` is high (the block's clock enable), so a
    stalling pipeline's registers are the block's own. :class:`~nibble.rtl.rescale.Rescale`
    multiplies with two of these on the UP5K: with yosys's own mapping of its ``*`` the
    enabled registers stayed in the fabric. (The saving measured then, 34 LCs, was of
    netlists where yosys had rebuilt the blocks, ``gateware.synth.ICE40_DSP_GUARD``; not
    measured again.)

    Ports
    -----
    a, b : In(16)
    en : In(1)
    o : Out(32)
        The product's bits (signed where either operand is).
    """

    def __init__(self, a_signed, b_signed, primitive=None):
        self.a_signed, self.b_signed, self.primitive = a_signed, b_signed, primitive
        super().__init__({"a": In(16), "b": In(16), "en": In(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        prim = is_ice40(platform) if self.primitive is None else self.primitive
        if prim:
            params = dict(SB_MAC16_PARAMS, A_SIGNED=int(self.a_signed),
                          B_SIGNED=int(self.b_signed), TOPOUTPUT_SELECT=3,
                          BOTOUTPUT_SELECT=3)          # the registered 16 x 16 product
            _sb_mac16(m, params, i_CE=self.en, i_A=self.a, i_B=self.b, i_C=0, i_D=0,
                      o_O=self.o)
            return m
        a = self.a.as_signed() if self.a_signed else self.a
        b = Signal(signed(16) if self.b_signed else 16)
        with m.If(self.en):
            m.d.sync += [b.eq(self.b), self.o.eq(a * b)]
        return m
