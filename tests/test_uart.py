"""The UART PHY in Amaranth's simulator: loopback, framing errors, overruns."""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from nibble.gateware.uart import UARTRx, UARTTx, divisor_for


def loopback(divisor, data):
    m = Module()
    m.submodules.tx = tx = UARTTx(divisor)
    m.submodules.rx = rx = UARTRx(divisor)
    m.d.comb += rx.rx.eq(tx.tx)
    got = []

    async def send(ctx):
        for byte in data:
            ctx.set(tx.i.payload, byte)
            ctx.set(tx.i.valid, 1)
            await ctx.tick().until(tx.i.ready)
        ctx.set(tx.i.valid, 0)

    async def recv(ctx):
        ctx.set(rx.o.ready, 1)
        while len(got) < len(data):
            (payload,) = await ctx.tick().sample(rx.o.payload).until(rx.o.valid)
            got.append(payload)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(send, background=True)
    sim.add_testbench(recv)
    sim.run()
    return got


@pytest.mark.parametrize("divisor", [3, 4, 5, 15, 16])
def test_loopback(divisor):
    rand = np.random.default_rng(divisor).integers(0, 256, 60)
    data = [0, 0xFF, 0x55, 0xAA, 1, 0x80, *(int(d) for d in rand)]
    assert loopback(divisor, data) == data


def receive(rx, line):
    """Drive ``rx.rx`` with ``line``'s values, one a cycle; the bytes it puts out and its
    framing errors at the end."""
    got, errors = [], []

    async def bench(ctx):
        ctx.set(rx.o.ready, 1)
        for value in line:
            ctx.set(rx.rx, value)
            await ctx.tick()
            if ctx.get(rx.o.valid):
                got.append(ctx.get(rx.o.payload))
        errors.append(ctx.get(rx.framing_errors))

    sim = Simulator(rx)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got, errors[0]


def test_framing_error_is_dropped_and_counted_then_recovers():
    div = 8

    def bits(byte, stop):
        return [0] + [(byte >> k) & 1 for k in range(8)] + [stop]

    line = bits(0x3C, 0) + [0] * 12 + [1] * 4 + bits(0xA5, 1) + [1] * 3
    got, errors = receive(UARTRx(div), [b for b in line for _ in range(div)])
    assert errors == 1
    assert sorted(set(got)) == [0xA5]


def test_divisor_for():
    assert divisor_for(48e6, 12e6) == 4
    assert divisor_for(36e6, 12e6) == 3
    assert divisor_for(45e6, 3e6) == 15
    assert divisor_for(48e6, 3e6) == 16
    with pytest.raises(ValueError):
        divisor_for(12e6, 12e6)
    with pytest.raises(ValueError):
        divisor_for(48e6, 11e6)


@pytest.mark.parametrize("divisor", [2, 3, 4, 8])
def test_ddr_receiver_at_every_phase(divisor):
    """Two samples a cycle (``2 * divisor`` a bit), bytes separated by idle gaps of a random
    number of samples (0 included), so a start bit's edge falls on either sample of a cycle
    and anywhere in it: every byte arrives. The samples just before and after each bit's
    middle (``divisor`` samples from its edge) are the wrong value, so a receiver that
    reads any other sample fails. At 2 cycles a bit this is 12 Mbaud from 24 MHz."""
    rng = np.random.default_rng(divisor)
    data = [0, 0xFF, 0x55, 0xAA, *(int(d) for d in rng.integers(0, 256, 80))]
    spb, mid = 2 * divisor, divisor
    samples = [1] * 5
    for byte in data:
        samples += [1] * int(rng.integers(0, 2 * spb))
        for k, b in enumerate([0, *((byte >> k) & 1 for k in range(8)), 1]):
            bit = [b] * spb
            if mid - 1 > 0:                  # (the start bit's first sample is its edge)
                bit[mid - 1] ^= 1
            if 0 < k < 9:                    # (the stop bit stays high after its middle)
                bit[mid + 1] ^= 1
            samples += bit
    samples += [1] * (4 * spb + 2)
    samples += [1] * (len(samples) % 2)
    got, errors = receive(UARTRx(divisor, ddr=True),
                          [samples[k] | samples[k + 1] << 1 for k in range(0, len(samples), 2)])
    assert errors == 0
    assert got == data


def test_ddr_divisor_for():
    assert divisor_for(24e6, 12e6, ddr=True) == 2
    with pytest.raises(ValueError, match="2 with a DDR receiver"):
        divisor_for(24e6, 12e6)
