"""PLL settings (gateware/pll.py) and the clocks of boards given as module:Class."""

import pytest

from nibble.gateware.boards import BOARDS, BoardError, BoardTop, pll_setting, resolve
from nibble.gateware.pll import PllError, _ecp5_loops, ecp5_pll, ice40_pll


def test_the_boards_settings_are_the_hand_derived_ones():
    s = ice40_pll(12e6, 36e6)
    assert (s.divr, s.divf, s.divq, s.filter_range, s.hz) == (0, 47, 4, 1, 36e6)
    s = ecp5_pll(25e6, 45e6)
    assert (s.clki_div, s.clkfb_div, s.clkop_div, s.hz) == (5, 9, 13, 45e6)


@pytest.mark.parametrize("fin", [10e6, 12e6, 25e6, 48e6, 100e6])
@pytest.mark.parametrize("target", [20e6, 33.3e6, 45e6, 60e6, 100e6])
def test_settings_are_in_range_and_the_best_below_the_target(fin, target):
    s = ice40_pll(fin, target)
    pfd = fin / (s.divr + 1)
    vco = pfd * (s.divf + 1)
    assert 10e6 <= pfd <= 133e6 and 533e6 <= vco <= 1066e6 and 1 <= s.divq <= 6
    assert s.hz == vco / 2 ** s.divq <= target and s.hz > 0.9 * target
    e = ecp5_pll(fin, target)
    assert fin / e.clki_div >= 3.125e6 and 400e6 <= e.hz * e.clkop_div <= 800e6
    assert e.hz == fin / e.clki_div * e.clkfb_div <= target and e.hz >= 0.9 * target


@pytest.mark.parametrize("target", [30e6, 45e6, 47e6, 48e6, 50e6, 60e6, 75e6])
def test_usb_settings_make_48_and_12_mhz_exactly(target):
    """With USB beside the design clock, one VCO divides to all three: LUNA's 48 and 12 MHz
    exactly (USB allows 0.25 %), the design clock the highest that allows at or below the
    target. From the ULX3S's 25 MHz the CLKOP loop gives 45 MHz, then 60; from 48 to below
    60 the design runs on the 48 MHz output itself and CLKOP only closes the loop."""
    s = ecp5_pll(25e6, target, usb=True)
    loop = 25e6 / s.clki_div * s.clkfb_div           # CLKOP
    vco = loop * s.clkop_div
    assert 400e6 <= vco <= 800e6 and s.hz <= target
    assert vco / s.usb_io_div == 48e6 and vco / s.usb_div == 12e6
    assert s.usb_div <= 128 and 25e6 / s.clki_div >= 3.125e6
    assert s.hz == {30e6: 30e6, 45e6: 45e6, 47e6: 45e6, 48e6: 48e6, 50e6: 48e6, 60e6: 60e6,
                    75e6: 60e6}[target]
    assert s.clk_on_usb_io == (s.hz == 48e6)
    assert s.clk_on_usb_io or loop == s.hz


@pytest.mark.parametrize("usb, sdram, got", [(True, 90e6, 90e6), (True, 100e6, 100e6),
                                             (True, 143e6, 1e9 / 7), (False, 90e6, 90e6),
                                             (False, 97.5e6, 97.5e6)])
def test_an_sdram_clock_of_its_own(usb, sdram, got):
    """The SDRAM's clock beside the design's (and USB's), the highest at or below the
    target of two ways: an output of the design's PLL (beside 48 MHz on CLKOS2 it is
    CLKOP, the loop chosen for the highest CLKOP whose VCO still divides to 48 and 12 MHz:
    the ULX3S's 90 MHz, 720 / 8; without USB CLKOS2, the VCO's highest division), or a
    second PLL's CLKOP where that is higher (100 MHz: 25 x 4)."""
    s = ecp5_pll(25e6, 48e6 if usb else 45e6, usb=usb, sdram=sdram)
    vco = s.vco_hz
    assert 400e6 <= vco <= 800e6 and 25e6 / s.clki_div >= 3.125e6
    assert s.sdram_hz == pytest.approx(got) and s.sdram_hz <= sdram
    if usb:
        assert s.hz == 48e6 and vco / s.usb_io_div == 48e6 and vco / s.usb_div == 12e6
    else:
        assert s.hz == 45e6 and vco == 45e6 * s.clkop_div
    two = s.sdram_pll
    if two is None:                                       # on the design's PLL
        assert s.sdram_hz == vco / s.sdram_div
        assert vco / (s.sdram_div - 1) > sdram or s.sdram_div == 1      # the highest
        if usb:
            assert s.clk_on_usb_io and s.sdram_div == s.clkop_div
            assert 25e6 / s.clki_div * s.clkfb_div == s.sdram_hz    # the loop is CLKOP
    else:                                                 # a second PLL, on its CLKOP
        assert s.sdram_div is None and two.sdram_pll is None and two.usb_div is None
        assert 25e6 / two.clki_div * two.clkfb_div == two.hz
        assert 400e6 <= two.vco_hz <= 800e6 and 25e6 / two.clki_div >= 3.125e6
        assert not any(two.hz < c[2] <= sdram for c in _ecp5_loops(25e6, False))
    # the design on CLKOP beside USB leaves no output: the SDRAM's clock is a second PLL's
    assert ecp5_pll(25e6, 45e6, usb=True, sdram=sdram).sdram_pll is not None


def test_the_ulx3s_runs_its_sdram_on_a_clock_of_its_own():
    """The ULX3S's SDRAM at 100 MHz beside the 48 MHz design and USB: the part's fastest
    at CAS latency 2, from a second PLL (the design's VCO makes 90 or 120 beside USB's
    clocks: docs/results.md); at a design clock beside USB's on CLKOP, on a second PLL
    too; 90 MHz (``--sdram-clk 90``) is the design PLL's CLKOP; above 100 MHz, one clear
    error. The netlist has both PLLs and the SDRAM's clock domain."""
    b = resolve("ulx3s-85f")
    assert (b.clk_hz, b.sdram_hz) == (48_000_000, 100_000_000)
    assert resolve("ulx3s-85f", link="uart").sdram_hz == 100_000_000
    assert resolve("ulx3s-85f", clk_hz=45_000_000).sdram_hz == 100_000_000
    assert resolve("ulx3s-85f", sdram_hz=85_000_000).sdram_hz == 85_000_000  # --sdram-clk
    one = resolve("ulx3s-85f", sdram_hz=90_000_000)
    assert pll_setting(one, 25e6).sdram_pll is None
    with pytest.raises(BoardError, match="SDRAM at 120 MHz, above the 100 MHz its CAS"):
        resolve("ulx3s-85f", sdram_hz=120_000_000)
    il = _netlist(b)
    assert il.count("EHXPLLL") == 2 and "sdram_clk" in il


def test_unreachable_clocks_are_one_clear_error():
    with pytest.raises(PllError, match="no iCE40 PLL setting from 1 MHz"):
        ice40_pll(1e6, 36e6)
    with pytest.raises(BoardError, match="icebreaker: no iCE40 PLL setting"):
        resolve("icebreaker", clk_hz=10_000_000)


def _netlist(board):
    plan = board.make_platform().build(BoardTop(board), name="top", do_build=False,
                                       do_program=False, synth_opts=board.synth_opts)
    return plan.files["top.il"]


def test_other_boards_get_a_pll_or_say_why_not():
    stick = resolve("amaranth_boards.icestick:ICEStickPlatform")
    assert (stick.pll, stick.pll_pad, stick.clk_hz) == ("ice40", False, 36_000_000)
    assert "SB_PLL40_CORE" in _netlist(stick)
    fast = resolve("amaranth_boards.icestick:ICEStickPlatform", clk_hz=50_000_000)
    assert 45e6 < fast.clk_hz <= 50e6 and not fast.clock_note
    ecp5 = resolve("amaranth_boards.versa_ecp5:VersaECP5Platform")
    assert ecp5.pll == "ecp5" and ecp5.clk_hz == 45_000_000 and "EHXPLLL" in _netlist(ecp5)
    arty = resolve("amaranth_boards.arty_a7:ArtyA7_35Platform")
    assert arty.pll is None and arty.clk_hz == 100_000_000
    assert "no PLL for its FPGA" in arty.clock_note and "\n" not in arty.clock_note
    with pytest.raises(BoardError, match="--clk cannot change"):
        resolve("amaranth_boards.arty_a7:ArtyA7_35Platform", clk_hz=50_000_000)


def test_a_known_board_at_another_clock():
    b = resolve("ulx3s-85f", clk_hz=40_000_000)
    assert b.clk_hz == 40_000_000 and b.sdram == BOARDS["ulx3s-85f"].sdram
