"""cocotb helpers: clock and reset, valid/ready stream sources and sinks, one cycle loop.

Every stream follows the Amaranth ``lib.stream`` rules: a source keeps ``valid`` and its
payload until the transfer, sinks may drop ``ready`` in any cycle. Sources insert random
bubbles and sinks random stalls. The loop drives all of them cycle by cycle: write inputs
after the clock edge, sample handshakes in the read-only phase before the next edge.
"""

import json
import os

import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

__all__ = ["Sink", "Source", "params", "rng_for", "run_streams", "start"]


def params():
    """The unit's elaboration parameters, passed by ``sim.runner``."""
    return json.loads(os.environ.get("NIBBLE_PARAMS", "{}"))


def rng_for(name):
    """A reproducible generator per test (``NIBBLE_SEED`` overrides the base seed)."""
    base = int(os.environ.get("NIBBLE_SEED", "2026"))
    return np.random.default_rng([base, *name.encode()])


def uint(handle):
    value = handle.value
    return value.to_unsigned() if hasattr(value, "to_unsigned") else int(value)


async def start(dut):
    """Start the clock and hold reset for two cycles."""
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0


class Source:
    """Offers ``items`` (ints, already packed) on a valid/ready stream."""

    def __init__(self, dut, prefix, items, rng, p_bubble=0.0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.items, self.rng, self.p_bubble = items, rng, p_bubble
        self.index = 0
        self.offering = False
        self.valid.value = 0

    @property
    def done(self):
        return self.index >= len(self.items)

    def drive(self):
        if self.offering or self.done:
            if self.done:
                self.valid.value = 0
            return
        if self.p_bubble and self.rng.random() < self.p_bubble:
            self.valid.value = 0
            return
        self.payload.value = self.items[self.index]
        self.valid.value = 1
        self.offering = True

    def sample(self):
        if self.offering and uint(self.ready):
            self.index += 1
            self.offering = False


class Sink:
    """Collects ``count`` payloads (ints) from a valid/ready stream."""

    def __init__(self, dut, prefix, count, rng, p_stall=0.0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.count, self.rng, self.p_stall = count, rng, p_stall
        self.items = []
        self.accepting = False
        self.ready.value = 0

    @property
    def done(self):
        return len(self.items) >= self.count

    def drive(self):
        self.accepting = not self.done and not (self.p_stall and self.rng.random() < self.p_stall)
        self.ready.value = int(self.accepting)

    def sample(self):
        if self.accepting and uint(self.valid):
            self.items.append(uint(self.payload))


async def run_streams(dut, sources, sinks, limit):
    """Drive every stream until all sources are drained and all sinks full; returns the
    number of cycles. Raises if ``limit`` cycles pass first (a hang)."""
    ports = [*sources, *sinks]
    cycles = 0
    while not all(p.done for p in ports):
        for p in ports:
            p.drive()
        await ReadOnly()
        for p in ports:
            p.sample()
        await RisingEdge(dut.clk)
        cycles += 1
        if cycles > limit:
            raise AssertionError(f"no progress after {limit} cycles: " + ", ".join(
                f"{type(p).__name__} {getattr(p, 'index', len(getattr(p, 'items', [])))}"
                for p in ports))
    for p in ports:
        p.drive()
    return cycles
