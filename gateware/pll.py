"""PLLs for the board tops: a design clock derived from any board's oscillator.

A board's oscillator is rarely the clock the design meets (the ULX3S has 25 MHz, the
iCEBreaker 12 MHz; an 8x16 array closes near 45 MHz on the ECP5, a 1x4 row alone near
36 MHz on the UP5K, the whole 1x8 system at 24). :func:`ice40_pll` and :func:`ecp5_pll`
search the PLL's dividers for the highest output at or below a target, within the PLL's
documented ranges, the way the vendors' ``icepll`` and ``ecppll`` do:

* iCE40 (SB_PLL40, simple feedback): ``f = fin (DIVF+1) / ((DIVR+1) 2^DIVQ)``, phase
  detector ``fin / (DIVR+1)`` in 10..133 MHz, VCO ``fin (DIVF+1) / (DIVR+1)`` in
  533..1066 MHz, output 16..275 MHz;
* ECP5 (EHXPLLL, CLKOP feedback): ``f = fin CLKFB_DIV / CLKI_DIV``, phase detector
  ``fin / CLKI_DIV`` >= 3.125 MHz, VCO ``f CLKOP_DIV`` in 400..800 MHz (the divider that
  puts it nearest 600 MHz); CLKOS is the same clock 90 degrees later (the SDRAM's). With
  ``usb``, the VCO must also divide to exactly 48 MHz (CLKOS2, LUNA's ``usb_io``) and
  12 MHz (CLKOS3, its ``usb``): USB's bit rate allows 0.25 %, and one VCO keeps all four
  outputs in step. From the ULX3S's 25 MHz that is 45 MHz at 720 MHz, or 60 MHz: no
  design clock between has a VCO that 48 MHz divides (CLKOP feedback). So for a target
  from 48 MHz to below 60 the design runs on the 48 MHz clock itself (``clk_on_usb_io``):
  CLKOS2 drives both the design and ``usb_io``, CLKOS is it 90 degrees later, and CLKOP
  (45 MHz at a 720 MHz VCO) only closes the loop;
* the SDRAM on a clock of its own (``sdram``: :mod:`nibble.rtl.sdram_clock`): where CLKOP
  only closes the loop it is that clock, the loop chosen for the highest CLKOP at or below
  the SDRAM's target whose VCO still divides to 48 and 12 MHz (from 25 MHz: 90 or 120 MHz,
  720 / 8 and 480 / 4), and CLKOS is it 90 degrees later for the SDRAM's clock pin;
  without USB it is CLKOS2. Where a **second EHXPLLL** makes a clock nearer the target
  (every ECP5 has two or more; the clocks cross through asynchronous FIFOs, so they need
  not be related), that one makes it on its own CLKOP loop, with CLKOS 90 degrees later
  (``Ecp5Setting.sdram_pll``; the ULX3S: 100 MHz, 25 x 4, the parts' fastest at CAS
  latency 2, where the design's VCO made 90).

The parameters reproduce the hand-derived ones the iCEBreaker (12 -> 36 MHz, now 24) and
ULX3S (25 -> 45 MHz) builds used.
"""

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from amaranth.hdl import Elaboratable, Instance, Module, Signal

__all__ = ["USB_HZ", "USB_IO_HZ", "Ecp5Pll", "Ice40Pll", "PllError", "ecp5_pll", "ice40_pll"]

#: LUNA's full-speed USB clocks: its ``usb`` domain (the bit rate) and ``usb_io`` (4x).
USB_HZ, USB_IO_HZ = 12_000_000, 48_000_000


class PllError(ValueError):
    """No PLL setting reaches a usable clock from this input."""


@dataclass(frozen=True)
class Ice40Setting:
    divr: int
    divf: int
    divq: int
    filter_range: int
    hz: float


@dataclass(frozen=True)
class Ecp5Setting:
    clki_div: int
    clkfb_div: int
    clkop_div: int
    hz: float
    usb_io_div: int | None = None   # CLKOS2: 48 MHz (with ``usb``)
    usb_div: int | None = None      # CLKOS3: 12 MHz
    clk_on_usb_io: bool = False     # the design clock is CLKOS2's 48 MHz; CLKOP only feeds back
    #: the SDRAM's own clock (``sdram``), as a divider of the VCO: CLKOP itself where the
    #: design is on CLKOS2's 48 MHz, else CLKOS2 (no USB); None: the SDRAM on the design's
    sdram_div: int | None = None
    #: or the SDRAM's clock from a second EHXPLLL (its CLKOP, and CLKOS 90 degrees later),
    #: where this PLL's VCO makes none as near the target
    sdram_pll: "Ecp5Setting | None" = None

    @property
    def vco_hz(self):
        return float(Fraction(self.hz) * (self.usb_io_div if self.clk_on_usb_io
                                          else self.clkop_div))

    @property
    def sdram_hz(self):
        if self.sdram_pll is not None:
            return self.sdram_pll.hz
        return self.vco_hz / self.sdram_div if self.sdram_div else None


def ice40_pll(fin, target, accept=None):
    """The SB_PLL40 setting with the highest output at or below ``target`` Hz (that
    ``accept(hz)`` takes, if given)."""
    best = None
    for divr in range(16):
        pfd = fin / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533e6 <= vco <= 1066e6:
                continue
            for divq in range(1, 7):
                f = vco / (1 << divq)
                if 16e6 <= f <= target and (best is None or f > best.hz) \
                        and (accept is None or accept(f)):
                    rng = next(i for i, top in enumerate((17e6, 26e6, 44e6, 66e6, 101e6,
                                                          float("inf")), 1) if pfd < top)
                    best = Ice40Setting(divr, divf, divq, rng, f)
    if best is None:
        raise PllError(f"no iCE40 PLL setting from {fin / 1e6:g} MHz reaches a clock of "
                       f"16 MHz to {target / 1e6:g} MHz")
    return best


def ecp5_pll(fin, target, usb=False, accept=None, sdram=None):
    """The EHXPLLL setting with the highest output at or below ``target`` Hz (that
    ``accept(hz)`` takes, if given); with ``usb`` one whose VCO also makes 48 and 12 MHz
    exactly (the design clock may be that 48 MHz); with ``sdram`` (Hz) also an SDRAM clock
    of its own, the highest at or below it: an output of this PLL left free, or a second
    PLL's (``sdram_pll``) where that is higher."""
    best = _ecp5_design(fin, target, usb, accept)
    if sdram is None:
        return best
    one = best
    if best.clk_on_usb_io:     # CLKOP, which only fed the loop back, is the SDRAM's clock:
        # the loop with the highest CLKOP at or below it (then the VCO nearest 600 MHz)
        clki, fb, f, divs = max((c for c in _ecp5_loops(fin, usb) if c[2] <= sdram),
                                key=lambda c: (c[2], -min(abs(c[2] * d - 600_000_000)
                                                          for d in c[3])))
        s = _ecp5_setting(clki, fb, f, divs, usb)
        one = dataclasses.replace(s, hz=float(USB_IO_HZ), clk_on_usb_io=True,
                                  sdram_div=s.clkop_div)
    elif not usb:              # CLKOS2, free without USB
        one = dataclasses.replace(best, sdram_div=min(128, math.ceil(best.vco_hz / sdram)))
    try:                       # a second PLL: its CLKOP (its loop) at or below the target
        two = _ecp5_design(fin, sdram, False, None)
    except PllError:
        return one
    if two.hz > (one.sdram_hz or 0):
        return dataclasses.replace(best, sdram_pll=two)
    return one


def _ecp5_design(fin, target, usb, accept):
    best = None
    for clki, fb, f, divs in _ecp5_loops(fin, usb):
        if f <= target and (best is None or f > best.hz) and (accept is None or accept(f)):
            best = _ecp5_setting(clki, fb, f, divs, usb)
    if usb and USB_IO_HZ <= target and (best is None or best.hz < USB_IO_HZ) \
            and (accept is None or accept(USB_IO_HZ)):
        # the design on CLKOS2's 48 MHz, CLKOP (any frequency) closing the loop
        # (the VCO nearest 600 MHz, then the loop nearest 48 MHz)
        clki, fb, f, divs = min(_ecp5_loops(fin, usb), key=lambda c: (
            min(abs(c[2] * d - 600_000_000) for d in c[3]), abs(c[2] - USB_IO_HZ)))
        best = dataclasses.replace(_ecp5_setting(clki, fb, f, divs, usb), hz=float(USB_IO_HZ),
                                   clk_on_usb_io=True)
    if best is None:
        raise PllError(f"no ECP5 PLL setting from {fin / 1e6:g} MHz reaches a clock at or "
                       f"below {target / 1e6:g} MHz" + (" beside USB's 48 and 12 MHz"
                                                         if usb else ""))
    return best


def _ecp5_loops(fin, usb):
    """Every (CLKI_DIV, CLKFB_DIV, CLKOP frequency, usable CLKOP_DIVs) of the CLKOP loop."""
    for clki in range(1, 129):
        pfd = Fraction(int(fin), clki)
        if pfd < Fraction(3_125_000):
            break
        for fb in range(1, 81):
            f = pfd * fb
            if f < 3_125_000:
                continue
            divs = [d for d in range(1, 129) if 400e6 <= f * d <= 800e6]
            if usb:
                divs = [d for d in divs if (f * d / USB_IO_HZ).denominator == 1
                        and f * d / USB_HZ <= 128]
            if divs:
                yield clki, fb, f, divs


def _ecp5_setting(clki, fb, f, divs, usb):
    op = min(divs, key=lambda d: abs(f * d - 600_000_000))
    extra = {"usb_io_div": int(f * op / USB_IO_HZ), "usb_div": int(f * op / USB_HZ)} \
        if usb else {}
    return Ecp5Setting(clki, fb, op, float(f), **extra)


class Ice40Pll(Elaboratable):
    """SB_PLL40_PAD (the clock on a PLL pad) or SB_PLL40_CORE (from the fabric)."""

    def __init__(self, setting, clkin, clk, lock, pad=True):
        self.s, self.clkin, self.clk, self.lock, self.pad = setting, clkin, clk, lock, pad

    def elaborate(self, platform):
        m = Module()
        s = self.s
        src = {"i_PACKAGEPIN": self.clkin} if self.pad else {"i_REFERENCECLK": self.clkin}
        m.submodules.pll = Instance(
            "SB_PLL40_PAD" if self.pad else "SB_PLL40_CORE", p_FEEDBACK_PATH="SIMPLE",
            p_DIVR=s.divr, p_DIVF=s.divf, p_DIVQ=s.divq, p_FILTER_RANGE=s.filter_range,
            **src, i_RESETB=1, i_BYPASS=0, o_PLLOUTGLOBAL=self.clk, o_LOCK=self.lock)
        return m


class Ecp5Pll(Elaboratable):
    """EHXPLLL: the design clock on CLKOP, the same clock 90 degrees later on CLKOS (a
    quarter of CLKOP_DIV in VCO steps of whole and eighth cycles); with a USB setting
    48 MHz on CLKOS2 (``usb_io``) and 12 MHz on CLKOS3 (``usb``). With the SDRAM on a clock
    of its own (``sdram_div``) CLKOS is that clock 90 degrees later (the SDRAM's pin), and
    the clock itself, ``sdram``, is CLKOP (the design on CLKOS2's 48 MHz) or CLKOS2; with
    ``sdram_pll`` a second EHXPLLL makes ``sdram`` (its CLKOP) and the pin's clock (its
    CLKOS), and ``lock`` is both PLLs'."""

    def __init__(self, setting, fin, clkin, clk, lock, clk90=None, usb_io=None, usb=None,
                 sdram=None):
        self.s, self.fin, self.clkin, self.clk, self.lock = setting, fin, clkin, clk, lock
        self.clk90 = clk90 if clk90 is not None else Signal()
        self.usb_io = usb_io if usb_io is not None else Signal()
        self.usb = usb if usb is not None else Signal()
        self.sdram = sdram if sdram is not None else Signal()

    def elaborate(self, platform):
        m = Module()
        s = self.s
        if s.sdram_pll is not None:   # the SDRAM's clock from a PLL of its own, this as without
            locks = Signal(2)
            m.submodules.main = Ecp5Pll(dataclasses.replace(s, sdram_pll=None), self.fin,
                                        self.clkin, self.clk, locks[0], usb_io=self.usb_io,
                                        usb=self.usb)
            m.submodules.sdram = Ecp5Pll(s.sdram_pll, self.fin, self.clkin, self.sdram,
                                         locks[1], clk90=self.clk90)
            m.d.comb += self.lock.eq(locks.all())
            return m
        # CLKOP feeds the loop back: the design clock, or (the design on CLKOS2's 48 MHz)
        # the SDRAM's clock or nothing else
        feedback = self.sdram if s.clk_on_usb_io and s.sdram_div else \
            Signal() if s.clk_on_usb_io else self.clk
        # CLKOS, 90 degrees after the clock the SDRAM's registers run on: its own
        # (CLKOP's or CLKOS2's divider) or the design's (CLKOS2's, or CLKOP's)
        if s.sdram_div:
            div = s.sdram_div
            cphase = (div - 1) // 2 if s.clk_on_usb_io else div - 1
        else:
            div = s.usb_io_div if s.clk_on_usb_io else s.clkop_div
            cphase = s.usb_io_div - 1 if s.clk_on_usb_io else (s.clkop_div - 1) // 2
        quarter = 2 * div                             # a quarter cycle in eighth VCO steps
        outs = {}
        if s.usb_div:
            outs = dict(p_CLKOS2_ENABLE="ENABLED", p_CLKOS2_DIV=s.usb_io_div,
                        p_CLKOS2_CPHASE=s.usb_io_div - 1, p_CLKOS2_FPHASE=0,
                        p_CLKOS3_ENABLE="ENABLED", p_CLKOS3_DIV=s.usb_div,
                        p_CLKOS3_CPHASE=s.usb_div - 1, p_CLKOS3_FPHASE=0,
                        o_CLKOS2=self.clk if s.clk_on_usb_io else self.usb_io,
                        o_CLKOS3=self.usb)
        elif s.sdram_div:                             # no USB: the SDRAM's clock on CLKOS2
            outs = dict(p_CLKOS2_ENABLE="ENABLED", p_CLKOS2_DIV=s.sdram_div,
                        p_CLKOS2_CPHASE=s.sdram_div - 1, p_CLKOS2_FPHASE=0,
                        o_CLKOS2=self.sdram)
        if s.clk_on_usb_io:
            m.d.comb += self.usb_io.eq(self.clk)
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI=f"{self.fin / 1e6:g}",
            a_FREQUENCY_PIN_CLKOP=f"{self.fin * s.clkfb_div / s.clki_div / 1e6:g}",
            a_ICP_CURRENT="12",
            a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD", p_CLKI_DIV=s.clki_div,
            p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=s.clkop_div,
            p_CLKOP_CPHASE=(s.clkop_div - 1) // 2,
            p_CLKOP_FPHASE=0, p_CLKOS_ENABLE="ENABLED", p_CLKOS_DIV=div,
            p_CLKOS_CPHASE=cphase + quarter // 8, p_CLKOS_FPHASE=quarter % 8,
            p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=s.clkfb_div,
            i_RST=0, i_STDBY=0, i_CLKI=self.clkin, i_CLKFB=feedback,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0, i_ENCLKOS=0, i_ENCLKOS2=0, i_ENCLKOS3=0,
            o_CLKOP=feedback, o_CLKOS=self.clk90, o_LOCK=self.lock, **outs)
        return m
