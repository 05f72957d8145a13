"""A training step on a board, replayed from what the host did on the link.

The driver sends a paged device's commands without waiting for their replies where the step
does not need them yet (``Device.post``; :class:`~nibble.host.training.device.DeviceMLP`'s
``posting``): the host prepares and sends the next RUN while the device runs the last, and
waits only where the step needs a result (the logits, the SAWB sums before a REQUANT). So a
step is not its device time plus its link time plus its host time: they overlap, except
where one waits for another. This replays the step, event by event, with three actors:

* **the host**, from a trace of a run on ``emu://`` (``Device.start_trace``): its own work
  between driver calls (measured), each request sent, each reply waited for, in order;
* **the bus**, full-speed USB: one packet at a time (half duplex), each at most
  ``PACKET_BYTES`` of a frame at the measured stream rate; when frames wait both ways the
  packets alternate (a host controller polls the IN endpoint between OUT transactions).
  A reply also takes the command's latency beyond its bytes (the measured round trip
  less its bytes' share; ``bench link``). A UART board: the same with its rate both ways;
* **the device**, its requests in the order they arrive, each once its frame is in and the
  one before has ended: a RUN for the cycles the simulated device took for the same RUN
  (``PagedDevice.run_cycles``, in the same configuration), at the board's clock; any other
  request no time of its own (a GATHER's or a WRITE's DMA transfers are in the next RUN's
  measured cycles, which start with waiting for them). Its receive FIFOs
  (:data:`RX_BUFFER_BYTES`) take a frame's bytes while the decoder is busy, the rest
  waits (USB NAKs it); its transmit FIFO (:data:`TX_BUFFER_BYTES`) takes a reply at the
  device's clock, and the device goes on once what is left of its replies fits it.

The result is the trace's length in seconds with each actor's busy time, so a projection
says how long the device sits idle waiting for the host or the link.
"""

from collections import deque

from nibble.gateware.protocol import Op
from nibble.gateware.usb import PACKET_BYTES, RX_DEPTH, TX_DEPTH

__all__ = ["RX_BUFFER_BYTES", "TX_BUFFER_BYTES", "Link", "replay"]

#: Bytes the USB link's receive side holds while the decoder is busy (its clock-crossing
#: FIFO and LUNA's OUT packet buffer; a UART board is replayed with 0).
RX_BUFFER_BYTES = RX_DEPTH + PACKET_BYTES
#: Bytes of replies the USB link's transmit side holds that USB has not carried yet.
TX_BUFFER_BYTES = TX_DEPTH + PACKET_BYTES


class Link:
    """A bus: ``bytes_per_second`` of frames, ``per_command_s`` more for each reply."""

    def __init__(self, bytes_per_second, per_command_s, packet=PACKET_BYTES):
        self.rate, self.per_command, self.packet = bytes_per_second, per_command_s, packet


class _Frame:
    """A frame on its way: its request, bytes left, and when it may start."""

    def __init__(self, p, size, ready):
        self.p, self.left, self.ready, self.sent = p, size, ready, 0


def replay(trace, run_seconds, link, rx_buffer=RX_BUFFER_BYTES, tx_buffer=TX_BUFFER_BYTES,
           device_log=None):
    """Replay ``trace`` (``Device.start_trace``'s events) with RUN ``k`` taking
    ``run_seconds[k]`` on the device and ``link`` (a :class:`Link`) carrying the frames
    (``rx_buffer`` and ``tx_buffer``: the device's receive and transmit buffers' bytes).
    Returns ``{"seconds", "host_s", "device_s", "link_s", "device_idle_s"}``: the time
    from the first event to the host's last, each actor's busy time, and the device's
    time without a request between its first start and its last end. ``device_log``, a
    list, gets ``(start, end, request)`` for each request the device takes."""
    runs = iter(run_seconds)
    trace = list(trace)
    pos, host, host_busy = 0, 0.0, 0.0
    out, back = deque(), deque()         # frames to the device, replies to the host
    arrived = deque()                    # requests whose frames are in, not started
    answered, sent = {}, set()           # request -> when its reply reached the host
    bus_free, last_in = 0.0, True
    dev_free, device_busy, first, last_end = 0.0, 0.0, None, 0.0
    waiting_replies = 0                  # reply bytes not carried yet (the TX FIFO)
    held = False                         # the device waits for its TX FIFO
    bus_busy = 0.0

    while True:
        # the host: its next event, if it can happen
        t_host = None
        if pos < len(trace):
            kind, p, own = trace[pos]
            if kind == "send":
                t_host = host + own
            elif id(p) in answered:
                t_host = max(host + own, answered[id(p)])
            elif id(p) not in sent:
                raise ValueError(f"the trace waits for a {Op(p.op).name} it never sent")
        # the device: the next request, once its frame is in and the device is free
        t_dev = max(dev_free, arrived[0][2]) if arrived and not held else None
        # the bus: the next packet; a frame's bytes wait while the receive buffer is full,
        # unless the decoder is idle and takes them as they come
        cands = []
        if out:
            f = out[0]
            at = max(bus_free, f.ready)
            buffered = f.sent + sum(size for _, size, _ in arrived)
            streams = not arrived and not held and dev_free <= at
            if streams or buffered + min(link.packet, f.left) <= rx_buffer:
                cands.append((at, "out", f))
        if back:
            cands.append((max(bus_free, back[0].ready), "in", back[0]))
        t_bus = direction = pick = None
        if cands:
            soonest = min(c[0] for c in cands)
            now = [c for c in cands if c[0] <= soonest]
            if len(now) == 2:            # both ways waiting: they take turns
                now = [c for c in now if c[1] == ("out" if last_in else "in")]
            t_bus, direction, pick = now[0]
        times = [t for t in (t_host, t_dev, t_bus) if t is not None]
        if not times:
            break
        t = min(times)
        if t_host is not None and t_host == t:
            kind, p, own = trace[pos]
            pos += 1
            host_busy += own
            host = t
            if kind == "send":
                out.append(_Frame(p, len(p.wire), t))
                sent.add(id(p))
        elif t_dev is not None and t_dev == t:
            p, _, _ = arrived.popleft()
            took = 0.0
            if p.op == Op.RUN:
                took = next(runs, None)
                if took is None:
                    raise ValueError("the trace has more RUNs than the device's measurements")
            first = t if first is None else first
            device_busy += took
            dev_free = last_end = t + took
            if device_log is not None:
                device_log.append((t, t + took, p))
            back.append(_Frame(p, p.reply_wire, t + took))
            waiting_replies += p.reply_wire
            held = waiting_replies > tx_buffer
        else:
            f = pick
            n = min(link.packet, f.left)
            took = n / link.rate + (link.per_command if direction == "in" and not f.sent
                                    else 0.0)
            bus_free = t + took
            bus_busy += took
            f.left -= n
            f.sent += n
            last_in = direction == "in"
            if direction == "out":
                if not f.left:
                    out.popleft()
                    arrived.append((f.p, f.sent, bus_free))
            else:
                waiting_replies -= n
                if held and waiting_replies <= tx_buffer:
                    held = False
                    dev_free = max(dev_free, bus_free)
                if not f.left:
                    back.popleft()
                    answered[id(f.p)] = bus_free
    return {"seconds": host, "host_s": host_busy, "device_s": device_busy,
            "link_s": bus_busy,
            "device_idle_s": (last_end - first - device_busy) if first is not None else 0.0}
