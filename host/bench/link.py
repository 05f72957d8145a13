"""``nibble bench link``: what the host links carry, measured on the device's RTL.

The ULX3S talks to the host over native USB (``gateware.usb``: LUNA's full-speed CDC-ACM
device), the iCEBreaker over its FTDI UART. A UART's rate is arithmetic (10 bits a byte
at the baud rate, both ways at once). USB's is not: 12 Mbit/s is shared by both
directions, split into 1 ms frames, each packet of at most 64 bytes wrapped in a token,
a CRC and a handshake, with bit stuffing, turnarounds, and the NAKs with which the device
says it has nothing yet. So this measures it, on the simulated device behind its USB link
(``pysim://?link=usb``) driven by :class:`~nibble.sim.usb_host.UsbHost`, the
packet-level host whose clock is the bus's bit time:

* **stream rate**: a WRITE and a READ of ``stream_bytes`` each through the driver (the
  protocol's frames, several a transfer), wire bytes both ways over the bus time they
  took: what a step's transfers see;
* **command round trip**: a PING with no payload, from the first bit of its OUT to the
  last of the reply's IN: what each of a step's commands costs beyond its bytes.

The host here schedules the next transaction as soon as the bus is free (an IN poll
straight after each OUT): the best a host controller can do. Operating systems add
their own latency per transfer (on Linux a bulk transfer completes at the next frame or
microframe), which this does not model.

Writes ``link.json`` and ``link.md``; ``nibble bench train`` projects the ULX3S's link
time with these figures (:func:`usb_link_seconds`).
"""

import json
from pathlib import Path

import numpy as np

from nibble.gateware.pll import USB_HZ
from nibble.host.device.driver import Device
from nibble.host.report import markdown_table, publish

__all__ = ["bench_link", "load_or_measure", "usb_link_seconds"]

def _bus_seconds(dev):
    """Bus time so far: the host model's clock is the full-speed bit rate."""
    return dev.t.usb_stats["bits"] / USB_HZ


def measure_usb(stream_bytes=2048, pings=8, clk_hz=45_000_000, log=print):
    """The USB link's figures (see the module) on a 2x4 device at ``clk_hz``."""
    log(f"USB: the device behind LUNA's CDC-ACM device, {stream_bytes:,} bytes each way ...")
    with Device.open(f"pysim://?link=usb&words=4096&clk_hz={clk_hz}") as dev:
        enum_s = _bus_seconds(dev)
        wb = dev.word_bytes
        data = np.random.default_rng(0).integers(0, 256, stream_bytes // wb * wb,
                                                 dtype=np.uint8).tobytes()
        dev.ping()                              # settle the first request's polls
        t0, w0 = _bus_seconds(dev), dev.wire_sent + dev.wire_received
        for _ in range(pings):
            dev.ping()
        ping_s = (_bus_seconds(dev) - t0) / pings
        ping_bytes = (dev.wire_sent + dev.wire_received - w0) / pings
        res = {}
        for name, fn in (("write", lambda: dev.write(0, data)),
                         ("read", lambda: dev.read(0, len(data) // wb))):
            t0, w0 = _bus_seconds(dev), dev.wire_sent + dev.wire_received
            s0 = dict(dev.t.usb_stats)
            got = fn()
            seconds = _bus_seconds(dev) - t0
            wire = dev.wire_sent + dev.wire_received - w0
            if name == "read" and got != data:
                raise RuntimeError("the USB link returned other bytes than were written")
            res[name] = {"payload_bytes": len(data), "wire_bytes": wire, "seconds": seconds,
                         "wire_bytes_per_second": wire / seconds,
                         "naks": dev.t.usb_stats["naks"] - s0.get("naks", 0)}
        stats = dev.t.usb_stats
    wire = res["write"]["wire_bytes"] + res["read"]["wire_bytes"]
    seconds = res["write"]["seconds"] + res["read"]["seconds"]
    return {"bus_bits_per_second": USB_HZ, "device_clk_hz": clk_hz,
            "enumeration_s": enum_s, "ping_round_trip_s": ping_s,
            "ping_wire_bytes": ping_bytes, "stream_wire_bytes_per_second": wire / seconds,
            "transfers": res, "frames": stats["frames"],
            "transactions": stats["transactions"], "naks": stats["naks"],
            "max_response_bits": stats["max_response"]}


def usb_link_seconds(usb, link_bytes, commands):
    """A step's link time on USB: its wire bytes at the measured stream rate, plus each
    command's round trip less its own bytes' share of it."""
    per_command = max(usb["ping_round_trip_s"]
                      - usb["ping_wire_bytes"] / usb["stream_wire_bytes_per_second"], 0)
    return link_bytes / usb["stream_wire_bytes_per_second"] + commands * per_command


def bench_link(out_dir="build/bench", docs=None, log=print, **kw):
    """Measure, write ``link.json`` / ``link.md`` (and the docs section)."""
    usb = measure_usb(log=log, **kw)
    res = {"usb": usb, "uart_3mbaud_bytes_per_second": 3e6 / 10,
           "uart_12mbaud_bytes_per_second": 12e6 / 10}
    publish(out_dir, "link", res, render(res), docs)
    return res


def load_or_measure(out_dir="build/bench", log=print):
    """``link.json``'s USB figures, measured now if there are none."""
    path = Path(out_dir) / "link.json"
    if path.exists():
        return json.loads(path.read_text())["usb"]
    return bench_link(out_dir, log=log)["usb"]


def render(r):
    u = r["usb"]
    rows = [{"link": "native USB, full speed (measured)", "what": name,
             "bytes": t["payload_bytes"], "wire": t["wire_bytes"],
             "ms": 1e3 * t["seconds"], "rate": t["wire_bytes_per_second"] / 1e3,
             "naks": t["naks"]} for name, t in u["transfers"].items()]
    table = markdown_table(rows, [
        ("link", "link", "{}"), ("transfer", "what", "{}"), ("payload bytes", "bytes", "{:,}"),
        ("wire bytes (frames, both ways)", "wire", "{:,}"), ("bus ms", "ms", "{:.2f}"),
        ("KB/s", "rate", "{:,.0f}"), ("NAKs", "naks", "{}")])
    return (
        "Made by `make bench-link` (`nibble bench link`): the device's RTL behind LUNA's "
        "CDC-ACM device, driven by the packet-level USB host model (`sim/usb_host.py`), "
        "the bus's bit time as its clock.\n\n" + table + "\n"
        f"* Stream rate, both directions: **{u['stream_wire_bytes_per_second'] / 1e3:,.0f} "
        f"KB/s** of protocol bytes (a 3 Mbaud UART: "
        f"{r['uart_3mbaud_bytes_per_second'] / 1e3:,.0f} KB/s each way).\n"
        f"* A command's round trip (PING, {u['ping_wire_bytes']:.0f} wire bytes): "
        f"**{1e6 * u['ping_round_trip_s']:,.0f} µs** of bus time.\n"
        f"* Enumeration: {1e3 * u['enumeration_s']:.2f} ms of bus time; the device "
        f"answered every packet within {u['max_response_bits']} bit times.\n")
