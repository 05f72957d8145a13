"""Fuzzing the device's frame decoder: 100,000 random, mutated and garbage frames into the
Verilator system model, reply for reply equal to the emulator's, and a valid frame after each
batch still gets the right answer (no hang, no lost synchronization)."""

import socket
import time

import numpy as np
import pytest

from nibble.gateware.protocol import (
    ESC,
    FLAG,
    GEMM_ARGS,
    MAX_PAYLOAD,
    READ_ARGS,
    STATS_ARGS,
    STATS_LAYOUT,
    WRITE_HEADER,
    Op,
    layout_bytes,
)
from nibble.host.device.emu import Emulator
from nibble.host.device.link import Frame, FrameDecoder, encode_frame
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.sim.system import DEFAULTS, serve
from tests.support import CLOCKED, comparable

FRAMES = 100_000
BATCH = 25
#: the emulator has no clock, and a random GEMM it ran instantly may still be busy here
IGNORED = (*CLOCKED, "busy")


def valid_frame(rng, words, wb):
    """A well-formed request, in range or not."""
    seq = int(rng.integers(256))
    kind = int(rng.integers(9))
    if kind == 0:
        return encode_frame(Frame(seq, Op.PING, rng.bytes(int(rng.integers(0, 64)))))
    if kind == 1:
        n = int(rng.integers(1, 40))
        addr = int(rng.integers(0, words + 8))
        return encode_frame(Frame(seq, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": addr})
                                  + rng.bytes(n * wb + int(rng.integers(0, 2)))))
    if kind == 2:
        args = {"addr": int(rng.integers(0, words + 8)), "words": int(rng.integers(0, 300))}
        return encode_frame(Frame(seq, Op.READ, pack_fields(READ_ARGS, args)))
    if kind == 3:
        args = {"addr": int(rng.integers(0, words)), "count": int(rng.integers(0, 100))}
        return encode_frame(Frame(seq, Op.STATS, pack_fields(STATS_ARGS, args)))
    if kind == 4:
        return encode_frame(Frame(seq, Op.INFO, rng.bytes(int(rng.integers(0, 2)))))
    if kind == 5:       # random GEMM arguments: out of range but for a rare chance
        return encode_frame(Frame(seq, Op.GEMM, rng.bytes(layout_bytes(GEMM_ARGS)
                                                          + int(rng.integers(-1, 2)))))
    if kind == 6:
        return encode_frame(Frame(seq, int(rng.integers(256)),
                                  rng.bytes(int(rng.integers(0, 20)))))
    if kind == 7:       # a payload longer than the buffer
        return encode_frame(Frame(seq, Op.PING, b"")) [:-1] + rng.bytes(
            MAX_PAYLOAD + int(rng.integers(1, 40))).replace(bytes([FLAG]), b"") + bytes([FLAG])
    return bytes([FLAG, FLAG])


def mutate(rng, wire):
    wire = bytearray(wire)
    for _ in range(int(rng.integers(1, 4))):
        if not wire:
            wire = bytearray([FLAG])
        op = int(rng.integers(6))
        pos = int(rng.integers(len(wire)))
        if op == 0:
            wire[pos] ^= 1 << int(rng.integers(8))
        elif op == 1:
            del wire[pos]
        elif op == 2:
            wire.insert(pos, int(rng.integers(256)))
        elif op == 3:
            wire.insert(pos, int(rng.choice([FLAG, ESC])))
        elif op == 4:
            wire[pos:pos] = wire[pos:pos + int(rng.integers(1, 8))]
        else:
            del wire[pos:]
    return bytes(wire)


def fuzz_unit(rng, words, wb):
    pick = rng.random()
    if pick < 0.35:
        return valid_frame(rng, words, wb)
    if pick < 0.85:
        return mutate(rng, valid_frame(rng, words, wb))
    return rng.bytes(int(rng.integers(1, 60)))


class Wire:
    def __init__(self, url):
        host, port = url.removeprefix("socket://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.dec = FrameDecoder()

    def exchange(self, data, until_seq_payload, timeout=10.0):
        """Send ``data`` and collect replies until the sync PING's reply."""
        self.sock.sendall(data)
        got = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            got += self.dec.feed(chunk)
            if got and (got[-1].op, got[-1].payload) == (Op.PING, until_seq_payload):
                return got
        raise AssertionError("the device stopped answering (a hang)")


@pytest.mark.long
def test_fuzzing_the_frame_decoder():
    rng = np.random.default_rng(2026)
    with serve() as url:
        words = DEFAULTS["words"]
        emu = Emulator(DEFAULTS["rows"], DEFAULTS["cols"], words, clk_hz=DEFAULTS["clk_hz"],
                       sdram=DEFAULTS["sdram"])
        wb = emu.nib // 2
        wire = Wire(url)
        sent = replies = 0
        batch_no = 0
        while sent < FRAMES:
            batch_no += 1
            units = [fuzz_unit(rng, words, wb) for _ in range(BATCH)]
            sent += len(units)
            marker = batch_no.to_bytes(4, "little")
            # a FLAG first: whatever a mutated frame left open is closed before the sync
            sync = bytes([FLAG]) + encode_frame(Frame(0, Op.PING, marker))
            data = b"".join(units) + sync
            got = wire.exchange(data, marker)
            emu.feed(data)
            want = FrameDecoder().feed(bytes(emu.out))
            emu.out.clear()
            assert comparable(got, IGNORED) == comparable(want, IGNORED), f"batch {batch_no}"
            replies += len(got)
            if any(f.op in (Op.GEMM, Op.DMA) for f in got):   # a random GEMM or DMA ran: let it end
                while True:
                    poll = encode_frame(Frame(1, Op.STATS))
                    stats = wire.exchange(poll + sync, marker)
                    emu.feed(poll + sync)
                    emu.out.clear()
                    if not unpack_fields(STATS_LAYOUT, stats[0].payload)["busy"]:
                        break
        assert sent >= FRAMES and replies > FRAMES // 4
        # a valid frame after it all: the right answer
        final = encode_frame(Frame(9, Op.READ, pack_fields(READ_ARGS, {"addr": 0,
                                                                       "words": 64})))
        got = wire.exchange(final + encode_frame(Frame(0, Op.PING, b"end")), b"end")
        emu.feed(final)
        assert got[0] == Frame(9, Op.READ, bytes(emu.mem[:64 * wb]))
