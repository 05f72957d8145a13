"""Counts of the vectors each cocotb test checked, written next to its results."""

import json
import os
from pathlib import Path

__all__ = ["record", "totals"]


def _path(unit):
    return Path(os.environ.get("NIBBLE_SIM_OUT", "build/sim")) / unit / "vectors.json"


def record(unit, test, count):
    """Add ``count`` checked elements for ``test`` of ``unit``."""
    path = _path(unit)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[test] = count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def totals(units):
    """{unit: total elements checked} from the last run of each suite."""
    out = {}
    for unit in units:
        path = _path(unit)
        out[unit] = sum(json.loads(path.read_text()).values()) if path.exists() else 0
    return out
