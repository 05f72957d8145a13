"""The distribution: one import name, every package listed, dependencies pointing one way."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rtl": "nibble.rtl", "gateware": "nibble.gateware", "sim": "nibble.sim",
           "host": "nibble.host"}


def test_every_package_is_listed():
    """pyproject lists exactly the folders with an __init__.py under the mapped ones."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert listed == found


def test_only_nibble_is_importable_from_elsewhere(tmp_path):
    """From a folder outside the repository the venv imports nibble.* and nothing called
    host, sim, rtl or gateware."""
    code = ("import importlib\n"
            "for bad in ('host', 'sim', 'rtl', 'gateware'):\n"
            "    try:\n"
            "        importlib.import_module(bad)\n"
            "        print('importable', bad)\n"
            "    except ImportError:\n"
            "        pass\n"
            "import nibble.rtl.formats, nibble.host.cli, nibble.gateware.device\n"
            "import nibble.host.training.session, nibble.sim.system\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module if node.level == 0 else "." * node.level + node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_dependencies_point_one_way():
    """rtl imports neither gateware, sim nor host; gateware imports no sim or host; library
    code in sim imports no training or benchmark code; no test module imports another."""
    rules = {"rtl": ("nibble.gateware", "nibble.sim", "nibble.host"),
             "gateware": ("nibble.sim", "nibble.host")}
    for folder, banned in rules.items():
        for path in (ROOT / folder).rglob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(banned)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "sim").glob("*.py"):
        if path.name.startswith("test_"):
            continue                          # testbenches may use the golden model
        bad = [m for m in _imports(path)
               if m.startswith(("nibble.host.training", "nibble.host.bench"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "tests").glob("test_*.py"):
        bad = [m for m in _imports(path) if m.startswith("tests.test_")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
