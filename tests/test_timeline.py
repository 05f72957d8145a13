"""The step replay (host/bench/timeline.py): the host, the link and the device each one thing
at a time, overlapping only where the trace lets them."""

import numpy as np
import pytest

from nibble.gateware.protocol import Op
from nibble.host.bench.timeline import RX_BUFFER_BYTES, Link, replay


class _P:
    """A request as the trace holds it: its opcode, frame and reply's wire bytes."""

    def __init__(self, op, out, back):
        self.op, self.wire, self.reply_wire = op, bytes(out), back


def test_posted_runs_overlap_the_host_and_a_wait_does_not():
    """Two RUNs of 10 ms each: sent one after the other, the host's 4 ms of work between
    them hidden behind the first; waited for one by one, added to the step."""
    link = Link(10_000.0, 0.001)                 # 10 bytes a millisecond, 1 ms a command
    a, b = _P(Op.RUN, 20, 10), _P(Op.RUN, 20, 10)
    posted = [("send", a, 0.0), ("send", b, 0.004), ("wait", a, 0.0), ("wait", b, 0.0)]
    r = replay(posted, [0.010, 0.010], link)
    # a: 2 ms over the link, 10 ms on the device; b queued behind it (its frame crossed
    # while a ran), 10 ms; b's reply: 1 ms of bytes and 1 ms of latency
    assert r["seconds"] == pytest.approx(0.002 + 0.020 + 0.002)
    assert r["device_idle_s"] == pytest.approx(0.0)
    link = Link(10_000.0, 0.001)
    a, b = _P(Op.RUN, 20, 10), _P(Op.RUN, 20, 10)
    one_by_one = [("send", a, 0.0), ("wait", a, 0.0), ("send", b, 0.004), ("wait", b, 0.0)]
    r = replay(one_by_one, [0.010, 0.010], link)
    assert r["seconds"] == pytest.approx(2 * (0.002 + 0.010 + 0.002) + 0.004)
    assert r["device_idle_s"] == pytest.approx(0.002 + 0.004 + 0.002)
    assert r["host_s"] == pytest.approx(0.004)
    assert r["device_s"] == pytest.approx(0.020)
    # the device's log: each request once, in order, its span its measured time, the
    # gap between them the idle time
    link = Link(10_000.0, 0.001)
    a, b = _P(Op.RUN, 20, 10), _P(Op.RUN, 20, 10)
    log = []
    replay([("send", a, 0.0), ("wait", a, 0.0), ("send", b, 0.004), ("wait", b, 0.0)],
           [0.010, 0.010], link, device_log=log)
    assert [p for *_, p in log] == [a, b]
    assert [end - start for start, end, _ in log] == pytest.approx([0.010, 0.010])
    assert log[1][0] - log[0][1] == pytest.approx(0.002 + 0.004 + 0.002)


def test_a_large_frame_waits_for_the_device_a_small_one_for_its_fifo():
    """A RUN's frame waits in the device's receive buffer while the one before runs; of a
    WRITE's kilobyte only what that buffer holds."""
    for size, crosses_early in ((20, True), (1000, False)):
        link = Link(1e5, 0.0)
        run, nxt = _P(Op.RUN, 20, 0), _P(Op.WRITE if size > 100 else Op.RUN, size, 0)
        r = replay([("send", run, 0.0), ("send", nxt, 0.0), ("wait", nxt, 0.0)],
                   [0.050, 0.0], link)
        start = 20 / 1e5
        expect = start + 0.050 + (0 if crosses_early else (size - RX_BUFFER_BYTES) / 1e5)
        assert r["seconds"] == pytest.approx(expect)


def test_a_trace_must_match_the_measurements():
    link = Link(1e5, 0.0)
    a = _P(Op.RUN, 20, 10)
    with pytest.raises(ValueError, match="more RUNs"):
        replay([("send", a, 0.0)], [], link)
    with pytest.raises(ValueError, match="never sent"):
        replay([("wait", a, 0.0)], [0.01], link)


def test_replay_is_never_faster_than_any_one_actor():
    rng = np.random.default_rng(1)
    for _ in range(20):
        link = Link(1e5, 1e-4)
        trace, sent, runs = [], [], []
        for _ in range(30):
            p = _P(Op.RUN if rng.random() < 0.7 else Op.READ, int(rng.integers(10, 200)),
                   int(rng.integers(10, 200)))
            trace.append(("send", p, float(rng.random() * 1e-3)))
            sent.append(p)
            if p.op == Op.RUN:
                runs.append(float(rng.random() * 2e-3))
            if rng.random() < 0.3:
                trace.append(("wait", sent[-1], float(rng.random() * 1e-3)))
        trace.append(("wait", sent[-1], 0.0))
        r = replay(trace, runs, link)
        assert r["seconds"] >= max(r["host_s"], r["device_s"], r["link_s"]) - 1e-12
        assert r["seconds"] <= r["host_s"] + r["device_s"] + r["link_s"] + 1e-12


def test_a_long_reply_holds_the_device_until_its_buffer_takes_the_rest():
    """A READ's 3,000-byte reply: with a 4 KB transmit buffer the next RUN starts as soon
    as its frame is in (after the reply's first packet: the bus takes turns), with 1,000
    bytes once the bus has carried all but those, with none once it has carried all."""
    for buffer, seconds in ((4096, 5.094e-3), (1000, 7.078e-3), (0, 8.030e-3)):
        link = Link(1e6, 0.0)                          # a byte a microsecond
        read, run = _P(Op.READ, 10, 3000), _P(Op.RUN, 10, 10)
        r = replay([("send", read, 0.0), ("send", run, 0.0), ("wait", run, 0.0)], [0.005],
                   link, tx_buffer=buffer)
        assert r["seconds"] == pytest.approx(seconds)
