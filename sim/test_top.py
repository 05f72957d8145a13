"""cocotb: the device top through its UART pins, end to end.

The testbench is a serial port: it shifts each request byte onto ``rx`` as 8N1 bits at
``divisor`` clocks per bit and samples ``tx`` the same way; the bytes are the driver's own
frames (:mod:`nibble.host.device.link`). A few commands run: PING, INFO, WRITE, READ back, a
GEMM whose result is read and compared with the golden model, and an error reply.
"""

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge

from nibble.gateware.protocol import (
    GEMM_ARGS,
    INFO_LAYOUT,
    READ_ARGS,
    STATS_LAYOUT,
    WRITE_HEADER,
    Op,
    Status,
)
from nibble.host.device.commands import lane_cfg, plan_gemm
from nibble.host.device.layout import unpack
from nibble.host.device.link import Frame, FrameDecoder, encode_frame
from nibble.host.device.packing import pack_fields, unpack_fields
from nibble.host.golden.lanes import golden_acc
from nibble.rtl.formats import Operand, OutputPath
from nibble.sim.cocotb_util import params, rng_for, start
from nibble.sim.stimuli import random_gemm
from nibble.sim.vectors import record

P = params()
DIV = P["divisor"]


async def send_byte(dut, byte):
    bits = [0] + [(byte >> i) & 1 for i in range(8)] + [1]
    for bit in bits:
        dut.rx.value = bit
        await ClockCycles(dut.clk, DIV)


async def receive(dut, decoder, replies, limit):
    """Sample ``tx`` until ``replies`` frames arrived; returns them."""
    got = []
    cycles = 0
    while len(got) < replies:
        await FallingEdge(dut.clk)
        cycles += 1
        assert cycles < limit, f"no reply after {limit} cycles ({len(got)} of {replies})"
        if dut.tx.value == 0:                         # a start bit: sample mid-bit
            await ClockCycles(dut.clk, DIV // 2)
            byte = 0
            for i in range(8):
                await ClockCycles(dut.clk, DIV)
                byte |= int(dut.tx.value) << i
            await ClockCycles(dut.clk, DIV)
            assert dut.tx.value == 1, "stop bit"
            got += decoder.feed(bytes([byte]))
    return got


async def request(dut, decoder, seq, op, payload=b""):
    wire = encode_frame(Frame(seq, op, payload))
    rx = cocotb.start_soon(receive(dut, decoder, 1, limit=40 * DIV * (len(wire) + 1100)))
    for byte in wire:
        await send_byte(dut, byte)
    (reply,) = await rx
    assert reply.seq == seq
    return reply


@cocotb.test()
async def commands_through_the_uart_pins(dut):
    dut.rx.value = 1
    await start(dut)
    await RisingEdge(dut.clk)
    dec = FrameDecoder()
    rng = rng_for("top")
    nib = 8

    reply = await request(dut, dec, 1, Op.PING, b"nibble")
    assert (reply.op, reply.payload) == (Op.PING, b"nibble")

    info = unpack_fields(INFO_LAYOUT, (await request(dut, dec, 2, Op.INFO)).payload)
    assert (info["rows"], info["cols"], info["mem_words"]) == (P["rows"], P["cols"], P["words"])

    data = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
    reply = await request(dut, dec, 3, Op.WRITE, pack_fields(WRITE_HEADER, {"addr": 7}) + data)
    assert reply.op == Op.WRITE
    reply = await request(dut, dec, 4, Op.READ, pack_fields(READ_ARGS, {"addr": 7, "words": 10}))
    assert reply.payload == data

    gemm = random_gemm(rng, (Operand.UINT4, Operand.INT4), 5, 7, 6)
    plan = plan_gemm(gemm, lane_cfg(OutputPath.RAW), nib, P["rows"], P["cols"], base=20)
    seq = 5
    for buf, raw in plan.uploads:
        reply = await request(dut, dec, seq, Op.WRITE,
                              pack_fields(WRITE_HEADER, {"addr": buf.addr}) + raw)
        assert reply.op == Op.WRITE
        seq += 1
    reply = await request(dut, dec, seq, Op.GEMM, pack_fields(GEMM_ARGS, plan.cfg))
    assert reply.op == Op.GEMM
    stats = unpack_fields(STATS_LAYOUT, (await request(dut, dec, seq + 1, Op.STATS)).payload)
    assert stats["busy"] == 0            # a 5x7x6 GEMM is done before the reply is out
    out = plan.out
    reply = await request(dut, dec, seq + 2, Op.READ,
                          pack_fields(READ_ARGS, {"addr": out.addr, "words": out.words}))
    got = unpack(reply.payload, out.rows, out.elems, 8, nib, out.stride, 32).T
    np.testing.assert_array_equal(got, golden_acc(gemm, 0))

    reply = await request(dut, dec, seq + 3, 0x42)
    assert reply.op == Status.UNKNOWN_OP
    record("top", "commands_through_the_uart_pins", int(got.size))
