"""A training step on a board, replayed from what the host did on the link.

The driver sends a paged device's commands without waiting for their replies where the step
does not need them yet (``Device.post``; :class:`~nibble.host.training.device.DeviceMLP`'s
``posting``): the host prepares and sends the next RUN while the device runs the last, and
waits only where the step needs a result (the logits, the SAWB sums before a REQUANT, the
replies at the step's end). So a step is not its device time plus its link time plus its
host time: they overlap, except where one waits for another. This replays the step with
three actors, each doing one thing at a time:

* **the host**, from a trace of a run on ``emu://`` (``Device.start_trace``): its own work
  between driver calls (measured), each request sent, each reply waited for, in order;
* **the link**, one frame at a time either way (full-speed USB is one half-duplex bus):
  a frame's wire bytes at the measured stream rate, a reply also the command's latency
  beyond its bytes (the measured round trip less its bytes' share; ``bench link``). A frame
  crosses once the device has started the request before it, into its receive FIFOs (64
  bytes, and LUNA's 64-byte packet buffer): they hold a waiting RUN, but of the kilobyte of
  a WRITE only its first bytes; the rest crosses once the request before has ended;
* **the device**, its requests in the order they arrive, each once its frame is in and
  the one before has ended: a RUN for the cycles the simulated device took for the same RUN
  (``PagedDevice.run_cycles``, in the same configuration), at the board's clock; any other
  request no time of its own (its bytes are the link's; a GATHER's or a WRITE's DMA
  transfers are in the next RUN's measured cycles, which start with waiting for them).

The result is the trace's length in seconds with each actor's busy time, so a projection
says which of them bounds the step and how long the device sits idle waiting for the host.
"""

import bisect

from nibble.gateware.protocol import Op

__all__ = ["RX_BUFFER_BYTES", "Link", "replay"]

#: Bytes a device's receive side holds while its decoder is busy (the USB link's 64-byte
#: clock-crossing FIFO and LUNA's OUT packet buffer; a UART's is smaller, so a UART board
#: is replayed with 0: a frame crosses once the request before has ended).
RX_BUFFER_BYTES = 128


class Link:
    """One bus: transfers placed at the earliest free time at or after they are ready
    (whatever is waiting goes next), never two at once."""

    def __init__(self, bytes_per_second, per_command_s):
        self.rate, self.per_command = bytes_per_second, per_command_s
        self.busy = []            # sorted, disjoint (start, end)
        self.seconds = 0.0

    def place(self, ready, seconds):
        """Place a transfer of ``seconds`` ready at ``ready``; its end."""
        t = ready
        i = bisect.bisect_left(self.busy, (t, t))
        if i and self.busy[i - 1][1] > t:
            i -= 1
        while i < len(self.busy):
            start, end = self.busy[i]
            if t + seconds <= start:
                break
            t = max(t, end)
            i += 1
        self.busy.insert(i, (t, t + seconds))
        self.seconds += seconds
        return t + seconds


def replay(trace, run_seconds, link, rx_buffer=RX_BUFFER_BYTES):
    """Replay ``trace`` (``Device.start_trace``'s events) with RUN ``k`` taking
    ``run_seconds[k]`` on the device and ``link`` (a :class:`Link`) carrying the frames.
    Returns ``{"seconds", "host_s", "device_s", "link_s", "device_idle_s"}``: the time
    from the first event to the host's last, each actor's busy time, and the device's
    time without a request between its first start and its last end."""
    runs = iter(run_seconds)
    host = host_busy = 0.0
    started = ended = 0.0            # the device: the last request's start and end
    first = None
    device_busy = 0.0
    reply_at = {}
    for kind, p, own in trace:
        host += own
        host_busy += own
        if kind == "wait":
            if id(p) not in reply_at:
                raise ValueError(f"the trace waits for a {Op(p.op).name} it never sent")
            host = max(host, reply_at[id(p)])
            continue
        # what the receive buffer cannot hold crosses once the request before has ended
        # (its decoder takes bytes faster than the link brings them)
        arrived = link.place(max(host, started), len(p.wire) / link.rate)
        if len(p.wire) > rx_buffer:
            arrived = max(arrived, ended + (len(p.wire) - rx_buffer) / link.rate)
        start = max(arrived, ended)
        took = 0.0
        if p.op == Op.RUN:
            took = next(runs, None)
            if took is None:
                raise ValueError("the trace has more RUNs than the device's measurements")
        started, ended = start, start + took
        first = start if first is None else first
        device_busy += took
        reply_at[id(p)] = link.place(ended, p.reply_wire / link.rate + link.per_command)
    return {"seconds": host, "host_s": host_busy, "device_s": device_busy,
            "link_s": link.seconds,
            "device_idle_s": (ended - first - device_busy) if first is not None else 0.0}
