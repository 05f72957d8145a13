"""The SDRAM controller on its own clock (rtl/sdram_clock.py): the same random traffic as
tests/test_sdram.py through the clock-crossing FIFOs, the design at 48 MHz and the SDRAM at
90 MHz (the fastest the ULX3S's PLL makes for it) or slower than the design: every read
returns what the shadow memory says, in order, and the chip model (on the SDRAM's clock)
flags nothing; and the crossing keeps the bus as busy as the controller alone on the
SDRAM's clock."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from tests.sdram_bench import TINY, Bench, flag_names, run, shadow_reads, traffic

DESIGN = 48_000_000


@pytest.mark.parametrize("sdram_hz", [90_000_000, 30_000_000])
def test_random_traffic_through_the_crossing(sdram_hz):
    rng = np.random.default_rng(sdram_hz // 10**6)
    requests = traffic(TINY, 400, rng)
    bench = Bench(sdram_hz=sdram_hz)
    reads, (flags, violations, refreshes) = run(bench, requests, rng, clk_hz=DESIGN,
                                                domains={"sdram": sdram_hz})
    assert reads == shadow_reads(requests)
    assert flag_names(flags) == [] and violations == 0
    assert refreshes > 0


def burst_period(bench, clocks, n=96):
    """Reads of ``n`` consecutive bursts, the consumer always ready: design (``sync``)
    cycles a burst from the first to the last."""
    times = []

    async def producer(ctx):
        await ctx.tick().until(bench.ready)
        for addr in range(n):
            ctx.set(bench.req.payload, {"addr": addr, "write": 0, "data": 0, "mask": 0})
            ctx.set(bench.req.valid, 1)
            await ctx.tick().until(bench.req.ready)
        ctx.set(bench.req.valid, 0)

    async def consumer(ctx):
        ctx.set(bench.rdata.ready, 1)
        cycle = 0
        while len(times) < n:
            _, _, valid = await ctx.tick().sample(bench.rdata.valid)
            cycle += 1
            if valid:
                times.append(cycle)

    sim = Simulator(bench)
    for domain, hz in clocks.items():
        sim.add_clock(1 / hz, domain=domain)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return (times[-1] - times[0]) / (n - 1)


def test_the_crossing_keeps_the_bus_as_busy_as_the_controller_alone():
    """Streamed reads at 90 MHz: the crossing delivers a burst as often, in SDRAM cycles,
    as the controller does on the SDRAM's own clock (8 cycles of data, and the tiny part's
    short rows and refreshes)."""
    hz = 90_000_000
    alone = burst_period(Bench(clk_hz=hz), {"sync": hz})
    crossed = burst_period(Bench(sdram_hz=hz), {"sync": DESIGN, "sdram": hz}) * hz / DESIGN
    assert alone >= 8 and crossed <= alone * 1.01, (alone, crossed)
