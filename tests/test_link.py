"""Host link framing: byte stuffing, CRC, and resynchronization after garbage."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nibble.gateware.protocol import CRC, ESC, FLAG, MAX_PAYLOAD, Op, max_encoded_size
from nibble.host.device.link import (
    Frame,
    FrameDecoder,
    LinkError,
    crc32,
    decode_body,
    encode_frame,
    stuff,
    unstuff,
)


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_stuffing_round_trip_has_no_flag(data):
    enc = stuff(data)
    assert FLAG not in enc
    assert unstuff(enc) == data
    assert len(enc) == len(data) + sum(b in (FLAG, ESC) for b in data)


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=MAX_PAYLOAD))
@settings(max_examples=200, deadline=None)
def test_frame_round_trip(seq, op, payload):
    wire = encode_frame(Frame(seq, op, payload))
    assert wire[0] == wire[-1] == FLAG and FLAG not in wire[1:-1]
    assert len(wire) <= max_encoded_size(len(payload))
    assert FrameDecoder().feed(wire) == [Frame(seq, op, payload)]


def test_every_single_bit_flip_is_caught():
    wire = encode_frame(Frame(7, Op.WRITE, bytes(range(1, 60))))
    for i in range(len(wire) - 1):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            dec = FrameDecoder()
            assert dec.feed(bytes(bad) + bytes([FLAG])) == [], (i, bit)
            assert dec.errors >= 1


def test_resynchronizes_after_garbage():
    rng = np.random.default_rng(0)
    dec = FrameDecoder()
    good = [Frame(i, Op.PING, bytes(rng.integers(0, 256, 30, dtype=np.uint8)))
            for i in range(50)]
    stream = bytearray()
    for f in good:
        stream += bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
        stream += bytes([FLAG]) + encode_frame(f)
    got = []
    for k in range(0, len(stream), 7):
        got += dec.feed(stream[k:k + 7])
    assert got == good


def test_oversized_and_short_frames_are_rejected():
    with pytest.raises(LinkError):
        encode_frame(Frame(0, 1, bytes(MAX_PAYLOAD + 1)))
    with pytest.raises(LinkError):
        decode_body(stuff(b"\x01\x02"))
    dec = FrameDecoder()
    assert dec.feed(b"\x05" * (3 * MAX_PAYLOAD) + bytes([FLAG])) == []
    assert dec.errors == 1
    assert dec.feed(encode_frame(Frame(1, 2, b"ok"))) == [Frame(1, 2, b"ok")]


@given(st.binary(max_size=300))
@settings(max_examples=100, deadline=None)
def test_fast_crc_is_the_protocol_crc(data):
    assert crc32(data) == CRC.compute(data)
