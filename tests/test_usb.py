"""The native USB link (``gateware/usb.py``, LUNA's CDC-ACM device) against a USB host at
the packet level (``sim/usb_host.py``): the CRCs, enumeration and the descriptors a host
reads, NAK flow control without a byte lost, and the driver running protocol commands end
to end through bulk OUT and IN (``pysim://?link=usb``)."""

import random
import warnings

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from nibble.gateware.protocol import Op
from nibble.gateware.usb import (
    DATA_ENDPOINT,
    PACKET_BYTES,
    STATUS_ENDPOINT,
    USB_PID,
    USB_VID,
    USBLink,
)
from nibble.host.device.driver import Device
from nibble.sim.usb_host import Pid, UsbHost, crc5, crc16, stuffed_bits
from tests.support import run_random_gemms

pytest.importorskip("luna")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from luna.gateware.interface.utmi import UTMIInterface
    from luna.gateware.usb.devices.acm import USBSerialDevice


def test_crcs_and_stuffing():
    """Known packets: IN to address 0 endpoint 0 is 69 00 10; a zero-length DATA0 is
    C3 00 00; the setup packet of GET_DESCRIPTOR(device, 64) ends in its CRC16 0x94DD
    (as USB analyzers show it: DD 94); seven ones need one stuffed bit."""
    assert crc5(0) == 0b00010
    assert crc16(b"") == b"\x00\x00"
    assert crc16(bytes.fromhex("8006000100004000")) == bytes.fromhex("dd94")
    assert Pid.byte(Pid.IN) == 0x69 and Pid.byte(Pid.DATA1) == 0x4B
    assert stuffed_bits(b"\x00") == 0 and stuffed_bits(b"\x7f") == 1
    assert stuffed_bits(b"\xff\xff") == 2     # the SYNC's last one starts the run


def test_data_endpoint_is_lunas():
    assert USBSerialDevice._DATA_ENDPOINT_NUMBER == DATA_ENDPOINT
    assert USBSerialDevice._STATUS_ENDPOINT_NUMBER == STATUS_ENDPOINT


def _loopback(consumer_gap):
    """A USBLink whose ``o`` feeds ``i`` through a consumer taking a byte every
    ``consumer_gap`` cycles; returns (simulator, host, the bytes taken)."""
    utmi = UTMIInterface()
    m = Module()
    m.submodules.link = link = USBLink(utmi)
    sim = Simulator(m)
    sim.add_clock(1 / 12e6, domain="usb")
    sim.add_clock(1 / 36e6, domain="sync")
    host, taken = UsbHost(utmi), bytearray()

    async def consumer(ctx):
        while True:
            ctx.set(link.o.ready, 0)
            for _ in range(consumer_gap):
                await ctx.tick("sync")
            ctx.set(link.o.ready, 1)
            _, _, valid, byte = await ctx.tick("sync").sample(link.o.valid, link.o.payload)
            ctx.set(link.o.ready, 0)
            if valid:
                taken.append(byte)
                ctx.set(link.i.valid, 1)          # and send it back, plus one
                ctx.set(link.i.payload, (byte + 1) & 0xFF)
                while not ctx.get(link.i.ready):
                    await ctx.tick("sync")
                await ctx.tick("sync")
                ctx.set(link.i.valid, 0)

    sim.add_testbench(consumer, background=True)
    return sim, host, taken


def test_enumeration_reads_a_cdc_acm_device():
    sim, host, _ = _loopback(1)
    found = {}

    async def bench(ctx):
        found.update(await host.enumerate(ctx, address=9))
        # the device answers at its new address, and only there
        found["status"] = await host.control_in(ctx, 9, 0x80, 0, 0, 0, 2)   # GET_STATUS

    sim.add_testbench(bench)
    sim.run()
    dev = found["device"]
    assert dev[:2] == bytes((18, 1))                           # a device descriptor
    assert dev[7] == 64                                        # control packets of 64
    assert int.from_bytes(dev[8:10], "little") == USB_VID
    assert int.from_bytes(dev[10:12], "little") == USB_PID
    config = found["configuration"]
    assert config[1] == 2 and config[4] == 2                   # two interfaces
    # walk the descriptors: a CDC ACM interface, a CDC data interface, its bulk pair
    descs, i = [], 0
    while i < len(config):
        descs.append(config[i:i + config[i]])
        i += config[i]
    interfaces = [(d[5], d[6], d[7]) for d in descs if d[1] == 4]
    assert interfaces == [(2, 2, 1), (0x0A, 0, 0)]
    endpoints = {d[2]: (d[3], int.from_bytes(d[4:6], "little")) for d in descs if d[1] == 5}
    assert endpoints[0x80 | DATA_ENDPOINT] == (2, PACKET_BYTES)      # bulk IN
    assert endpoints[DATA_ENDPOINT] == (2, PACKET_BYTES)             # bulk OUT
    assert found["status"] == b"\x00\x00"
    assert host.stats["max_response"] < 16                     # answers inside USB's window


def test_nak_flow_control_loses_nothing():
    """A consumer far slower than the bus: the OUT endpoint NAKs, the host sends again, and
    every byte arrives once and in order; IN brings each back (plus one), short packets
    where the device had less than 64 ready."""
    sim, host, taken = _loopback(200)
    payload = bytes(random.Random(3).randrange(256) for _ in range(700))
    back = bytearray()

    async def bench(ctx):
        await host.enumerate(ctx)
        data = payload
        while data or len(back) < len(payload):
            if data and await host.out(ctx, 5, DATA_ENDPOINT, data[:PACKET_BYTES]):
                data = data[PACKET_BYTES:]
            back.extend(await host.in_(ctx, 5, DATA_ENDPOINT) or b"")

    sim.add_testbench(bench)
    sim.run()
    assert bytes(taken) == payload
    assert bytes(back) == bytes((b + 1) & 0xFF for b in payload)
    assert host.stats["naks"] > 20                             # the flow control ran
    assert host.stats["out_bytes"] == host.stats["in_bytes"] == len(payload)


def test_driver_through_usb():
    """INFO, WRITE, READ and a GEMM through bulk OUT and IN: the driver's commands on the
    device's RTL behind LUNA's device, bit for bit the emulator's."""
    rng = np.random.default_rng(5)
    with Device.open("pysim://?link=usb&words=1024") as dev:
        assert (dev.rows, dev.cols, dev.mem_words) == (2, 4, 1024)
        data = rng.integers(0, 256, dev.word_bytes * 300, dtype=np.uint8).tobytes()
        dev.write(17, data)                  # 1.2 KB: two frames, 19 packets
        assert dev.read(17, 300) == data
        # sent without waiting: the frames queue behind each other (the OUT endpoint NAKs
        # what the receive FIFO cannot take), the replies come back in order
        pings = [dev.post(Op.PING, bytes([k]) * 100) for k in range(4)]
        reads = dev.read(17, 300, later=True)
        assert [p.result() for p in pings] == [bytes([k]) * 100 for k in range(4)]
        assert b"".join(r.result() for r in reads) == data
        run_random_gemms(dev, rng, 1, 1)
        stats = dev.t.usb_stats
        assert dev.resends == 0
        assert stats["out_bytes"] == dev.wire_sent
        assert stats["in_bytes"] == dev.wire_received
        assert stats["frames"] >= 3


def test_bench_link_measures_the_bus():
    """bench-link's figures on a short run: the stream rate under the bus's 1.5 MB/s (12
    Mbit/s carrying packets, tokens and handshakes both ways) and a command's round trip of
    a few transactions' bit times."""
    from nibble.host.bench.link import measure_usb
    u = measure_usb(stream_bytes=256, pings=2, log=lambda *a: None)
    assert 0.3e6 < u["stream_wire_bytes_per_second"] < 1.5e6
    assert 20e-6 < u["ping_round_trip_s"] < 1e-3
    assert u["transfers"]["read"]["payload_bytes"] == 256
    assert u["max_response_bits"] < 16
