"""A USB full-speed host at the packet level, for Amaranth's simulator.

:class:`UsbHost` drives a device's UTMI bus the way a host controller and its PHY would:
tokens, data and handshake packets with their CRCs, one byte every 8 bit times (plus the
bits that bit stuffing inserts), a 1 ms frame opened by an SOF, a bounded wait for the
device's answer, and the transaction rules (DATA0/DATA1 toggles, ACK, NAK, STALL). On top:
control transfers (what enumeration is), and bulk OUT and IN transactions, which is what a
CDC-ACM device's data is. It talks to LUNA's device (``gateware.usb``) through the same
UTMI bus LUNA's gateware PHY would drive on a board.

Time is the bus's: at full speed a bit is one cycle of the 12 MHz ``usb`` domain, so the
cycles a transfer takes here are its time on the wire, and ``stats`` counts them with the
payload bytes, transactions, NAKs and frames: what ``nibble bench link`` reports as the
link's rate. A transaction is started only when it can end before the next SOF (its
largest length, every bit stuffed): so a frame holds about 19 transactions of 64 bytes,
the most USB 2.0 allows a full-speed frame's bulk transfers (table 5-10). That is the
best a host controller's schedule can do, not what a particular one does; the polls
between (an IN that the device NAKs) take about 50 bit times each.
"""

from collections import Counter

__all__ = ["FRAME_BITS", "Pid", "Stall", "UsbHost", "crc5", "crc16",
           "stuffed_bits"]

#: Bit times in a full-speed frame (1 ms at 12 Mbit/s).
FRAME_BITS = 12_000
#: How long the host waits for a device's packet, in bit times: USB 2.0 allows 16 to 18
#: between the end of one packet and the start of the answer; this includes the PHY's
#: pipeline on both sides (LUNA's device answers in 10 to 20 cycles of its UTMI bus).
RESPONSE_TIMEOUT = 48
#: Bit times between packets the host sends (USB 2.0's inter-packet delay, at least 2).
GAP = 4


class Pid:
    """Packet identifiers (the 4-bit code; the byte carries its complement too)."""
    OUT, IN, SOF, SETUP = 0x1, 0x9, 0x5, 0xD
    DATA0, DATA1 = 0x3, 0xB
    ACK, NAK, STALL = 0x2, 0xA, 0xE

    @staticmethod
    def byte(pid):
        return pid | ((~pid & 0xF) << 4)


class Stall(RuntimeError):
    """The device answered STALL."""


def crc5(value, bits=11):
    """USB's token CRC (x^5 + x^2 + 1) of ``bits`` bits of ``value``, sent LSB first."""
    crc = 0x1F
    for i in range(bits):
        if (crc ^ (value >> i)) & 1:
            crc = (crc >> 1) ^ 0x14
        else:
            crc >>= 1
    return crc ^ 0x1F


def crc16(data):
    """USB's data CRC (x^16 + x^15 + x^2 + 1), as sent: two bytes, low first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    crc ^= 0xFFFF
    return bytes((crc & 0xFF, crc >> 8))


def stuffed_bits(data):
    """The bits bit stuffing adds to a packet of ``data`` bytes (after its SYNC): a zero
    after every six ones in a row, counted from the SYNC's final one."""
    run, extra = 1, 0
    for byte in data:
        for i in range(8):
            if (byte >> i) & 1:
                run += 1
                if run == 6:
                    extra, run = extra + 1, 0
            else:
                run = 0
    return extra


# line states (D+, D-) at full speed
_SE0, _J, _K = 0b00, 0b01, 0b10


class UsbHost:
    """A host on one device's UTMI bus (``utmi``: LUNA's ``UTMIInterface``), in ``domain``.

    Every method is a coroutine of an Amaranth testbench (``ctx``). ``stats`` counts:
    ``bits`` (cycles of the bus), ``frames``, ``transactions``, ``naks``, ``out_bytes`` and
    ``in_bytes`` (bulk payload), ``max_response`` (the longest wait for a device's answer).
    """

    def __init__(self, utmi, domain="usb"):
        self.utmi, self.domain = utmi, domain
        self.stats = Counter()
        self.next_sof = FRAME_BITS
        self.frame = 0
        self.toggles = {}              # (endpoint, "in"/"out") -> the next DATA PID

    # -- the wire ---------------------------------------------------------------------

    async def idle(self, ctx, bits=1):
        for _ in range(bits):
            await ctx.tick(self.domain)
        self.stats["bits"] += bits

    async def reset(self, ctx):
        """A bus reset (SE0 for 10 us), then the idle J state and the first SOF."""
        ctx.set(self.utmi.session_end, 0)
        ctx.set(self.utmi.line_state, _SE0)
        await self.idle(ctx, 120)
        ctx.set(self.utmi.line_state, _J)
        await self.idle(ctx, 120)
        self.next_sof = self.stats["bits"]
        await self._sof(ctx)

    async def _send(self, ctx, packet):
        """One packet onto the bus: SYNC, the bytes (with their stuffed bits), EOP."""
        u = self.utmi
        ctx.set(u.line_state, _K)
        await self.idle(ctx, 8)                          # SYNC
        ctx.set(u.rx_active, 1)
        extra = stuffed_bits(packet)
        for byte in packet:
            await self.idle(ctx, 7)
            ctx.set(u.rx_data, byte)
            ctx.set(u.rx_valid, 1)
            await self.idle(ctx)
            ctx.set(u.rx_valid, 0)
        await self.idle(ctx, extra)
        ctx.set(u.rx_active, 0)
        ctx.set(u.line_state, _SE0)
        await self.idle(ctx, 2)                          # EOP: SE0, SE0, J
        ctx.set(u.line_state, _J)
        await self.idle(ctx)

    async def _receive(self, ctx):
        """The device's answer, or None after :data:`RESPONSE_TIMEOUT` bit times."""
        u = self.utmi
        wait = 0
        while not ctx.get(u.tx_valid):
            if wait == RESPONSE_TIMEOUT:
                return None
            await self.idle(ctx)
            wait += 1
        self.stats["max_response"] = max(self.stats["max_response"], wait)
        await self.idle(ctx, 8)                          # SYNC
        packet = bytearray()
        while True:
            await self.idle(ctx, 7)
            ctx.set(u.tx_ready, 1)
            _, _, valid, byte = await ctx.tick(self.domain).sample(u.tx_valid, u.tx_data)
            self.stats["bits"] += 1
            ctx.set(u.tx_ready, 0)
            if not valid:
                break
            packet.append(byte)
        await self.idle(ctx, stuffed_bits(packet) + 3)   # its stuffed bits, EOP
        return bytes(packet)

    # -- packets and frames -----------------------------------------------------------

    async def _sof(self, ctx):
        while self.stats["bits"] < self.next_sof:
            await self.idle(ctx)
        self.frame = (self.frame + 1) & 0x7FF
        await self._send(ctx, self._token(Pid.SOF, self.frame))
        self.next_sof += FRAME_BITS
        self.stats["frames"] += 1

    @staticmethod
    def _token(pid, value):
        value |= crc5(value) << 11
        return bytes((Pid.byte(pid), value & 0xFF, value >> 8))

    async def _slot(self, ctx, data_bytes):
        """Wait for the next frame unless a transaction carrying ``data_bytes`` ends in this
        one (at its longest: every bit stuffed, the device answering at the timeout)."""
        worst = (3 + 3 + data_bytes + 1) * 8 * 7 // 6 + 3 * (8 + 3) + 2 * RESPONSE_TIMEOUT
        if self.stats["bits"] + worst > self.next_sof:
            await self._sof(ctx)
        self.stats["transactions"] += 1

    async def _data_out(self, ctx, pid, addr, ep, data):
        """Token, data packet, the device's handshake PID (or None)."""
        await self._slot(ctx, len(data))
        await self._send(ctx, self._token(pid, addr | (ep << 7)))
        await self.idle(ctx, GAP)
        await self._send(ctx, bytes((Pid.byte(self._toggle(ep, "out")),)) + data
                         + crc16(data))
        answer = await self._receive(ctx)
        if answer is None or len(answer) != 1:
            raise RuntimeError(f"no handshake from the device (got {answer!r})")
        return answer[0] & 0xF

    def _toggle(self, ep, direction):
        return self.toggles.setdefault((ep, direction), Pid.DATA0)

    def _flip(self, ep, direction):
        self.toggles[(ep, direction)] = Pid.DATA1 ^ Pid.DATA0 ^ self._toggle(ep, direction)

    # -- transactions -----------------------------------------------------------------

    async def out(self, ctx, addr, ep, data):
        """A bulk (or control data) OUT transaction: True when ACKed, False on NAK."""
        pid = await self._data_out(ctx, Pid.OUT, addr, ep, data)
        if pid == Pid.STALL:
            raise Stall(f"OUT to endpoint {ep}")
        if pid == Pid.NAK:
            self.stats["naks"] += 1
            return False
        assert pid == Pid.ACK, f"handshake PID {pid:#x}"
        self._flip(ep, "out")
        self.stats["out_bytes"] += len(data) if ep else 0
        return True

    async def in_(self, ctx, addr, ep):
        """An IN transaction: the packet's data (ACKed), or None on NAK."""
        await self._slot(ctx, 64)
        await self._send(ctx, self._token(Pid.IN, addr | (ep << 7)))
        answer = await self._receive(ctx)
        if answer is None:
            raise RuntimeError(f"no answer to IN on endpoint {ep}")
        pid = answer[0] & 0xF
        if pid == Pid.NAK:
            self.stats["naks"] += 1
            return None
        if pid == Pid.STALL:
            raise Stall(f"IN from endpoint {ep}")
        if answer[0] != Pid.byte(pid) or pid not in (Pid.DATA0, Pid.DATA1):
            raise RuntimeError(f"bad packet from the device: {answer.hex()}")
        data = answer[1:-2]
        if crc16(data) != answer[-2:]:
            raise RuntimeError(f"bad CRC16 from the device: {answer.hex()}")
        await self.idle(ctx, GAP)
        await self._send(ctx, bytes((Pid.byte(Pid.ACK),)))
        if pid != self._toggle(ep, "in"):      # a repeat of a packet whose ACK was lost
            return b""
        self._flip(ep, "in")
        self.stats["in_bytes"] += len(data) if ep else 0
        return data

    # -- control transfers ------------------------------------------------------------

    async def _setup(self, ctx, addr, request_type, request, value, index, length):
        setup = bytes((request_type, request, value & 0xFF, value >> 8, index & 0xFF,
                       index >> 8, length & 0xFF, length >> 8))
        self.toggles[(0, "out")] = Pid.DATA0
        pid = await self._data_out(ctx, Pid.SETUP, addr, 0, setup)
        if pid != Pid.ACK:
            raise RuntimeError(f"SETUP not acknowledged (PID {pid:#x})")
        self.toggles[(0, "in")] = self.toggles[(0, "out")] = Pid.DATA1

    async def _retry(self, ctx, transaction, tries=64):
        for _ in range(tries):
            result = await transaction()
            if result is not None and result is not False:
                return result
        raise RuntimeError("the device NAKed a control transfer's stage every time")

    async def control_in(self, ctx, addr, request_type, request, value, index, length):
        """A control read: the data stage's bytes (up to ``length``)."""
        await self._setup(ctx, addr, request_type, request, value, index, length)
        data = bytearray()
        while len(data) < length:
            packet = await self._retry(ctx, lambda: self.in_(ctx, addr, 0))
            data += packet
            if len(packet) < 64:
                break
        await self._retry(ctx, lambda: self.out(ctx, addr, 0, b""))     # status
        return bytes(data)

    async def control_out(self, ctx, addr, request_type, request, value, index, data=b""):
        """A control write (with a data stage when ``data``)."""
        await self._setup(ctx, addr, request_type, request, value, index, len(data))
        for i in range(0, len(data), 64):
            chunk = data[i:i + 64]
            await self._retry(ctx, lambda chunk=chunk: self.out(ctx, addr, 0, chunk))
        zlp = await self._retry(ctx, lambda: self.in_(ctx, addr, 0))    # status
        if zlp != b"":
            raise RuntimeError(f"status stage carried data: {zlp!r}")

    async def enumerate(self, ctx, address=5):
        """What a host does with a new device: reset, its descriptors, an address, its
        configuration. Returns ``{"device": bytes, "configuration": bytes}``."""
        await self.reset(ctx)
        device = await self.control_in(ctx, 0, 0x80, 6, 0x0100, 0, 64)        # GET_DESCRIPTOR
        await self.control_out(ctx, 0, 0x00, 5, address, 0)                     # SET_ADDRESS
        head = await self.control_in(ctx, address, 0x80, 6, 0x0200, 0, 9)
        total = head[2] | head[3] << 8
        config = await self.control_in(ctx, address, 0x80, 6, 0x0200, 0, total)
        await self.control_out(ctx, address, 0x00, 9, config[5], 0)             # SET_CONFIG
        return {"device": device, "configuration": config}
