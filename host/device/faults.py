"""A transport wrapper that damages the byte stream both ways, for reliability tests.

Each byte, in each direction, is damaged with probability ``rate``: flipped (one random
bit), dropped or duplicated, one of the three at random. Wrap any transport:
``Device.open(url, wrap=lambda t: FaultyTransport(t, 1e-3))``.
"""

import numpy as np

__all__ = ["FaultyTransport"]


class FaultyTransport:
    def __init__(self, inner, rate, seed=0):
        self.inner = inner
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.faults = {"flip": 0, "drop": 0, "dup": 0}
        self.instant = getattr(inner, "instant", False)
        if hasattr(inner, "fileno"):              # the driver waits on it with select()
            self.fileno = inner.fileno

    def _damage(self, data):
        if not data or not self.rate:
            return data
        hit = np.flatnonzero(self.rng.random(len(data)) < self.rate)
        if not hit.size:
            return data
        out = bytearray()
        prev = 0
        for pos in hit:
            out += data[prev:pos]
            byte = data[pos]
            kind = ("flip", "drop", "dup")[int(self.rng.integers(3))]
            self.faults[kind] += 1
            if kind == "flip":
                out.append(byte ^ (1 << int(self.rng.integers(8))))
            elif kind == "dup":
                out += bytes((byte, byte))
            prev = pos + 1
        out += data[prev:]
        return bytes(out)

    def write(self, data):
        self.inner.write(self._damage(bytes(data)))
        return len(data)

    def read(self, size=1):
        return self._damage(self.inner.read(size))

    @property
    def in_waiting(self):
        return getattr(self.inner, "in_waiting", 0)

    def reset_input_buffer(self):
        self.inner.reset_input_buffer()

    def close(self):
        self.inner.close()
