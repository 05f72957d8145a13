"""Training on the accelerator: bit-identical across devices and master placements, across
a resume and through link faults; the command line's outputs and errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nibble.host.cli import main
from nibble.host.device.driver import Device
from nibble.host.device.faults import FaultyTransport
from nibble.host.training import datasets
from nibble.host.training.datasets import Dataset
from nibble.host.training.device import DeviceTrainConfig
from nibble.host.training.session import CHECKPOINT, train_on_device

ROOT = Path(__file__).resolve().parent.parent
SIZES = [64, 32, 10]


@pytest.fixture(scope="module")
def small():
    """256 digits images to train on (4 steps of 64), 128 to test on."""
    d = datasets.load("digits")
    return Dataset("digits", d.x_train[:256], d.y_train[:256], d.x_test[:128],
                   d.y_test[:128])


def run(url, data, epochs=1, masters="device", wrap=None, max_steps=None, out=None,
        resume=None):
    cfg = DeviceTrainConfig(sizes=SIZES, batch_size=64, lr=0.1, masters=masters)
    with Device.open(url, wrap=wrap) as dev:
        r = train_on_device(dev, data, cfg, epochs, out=out, resume=resume, progress=False,
                            max_steps=max_steps)
        w, v = r["model"].masters()
        r["masters"] = (w, v)
        r["codes"] = r["model"].weight_codes()
    return r


def same_weights(a, b):
    return all((x == y).all() for x, y in zip(a["masters"][0] + a["masters"][1],
                                               b["masters"][0] + b["masters"][1], strict=True))


def test_device_and_host_masters_train_identically(small):
    """The UPDATE unit and the host's fixed-point update are the same arithmetic."""
    dev = run("emu://", small, epochs=2)
    host = run("emu://", small, epochs=2, masters="host")
    assert [h["loss"] for h in dev["history"]] == [h["loss"] for h in host["history"]]
    assert same_weights(dev, host)
    # the masters moved, and training learned something in 8 steps
    assert dev["history"][-1]["loss"] < dev["history"][0]["loss"]


def test_logits_in_16_bits_train_identically(small, monkeypatch):
    """The logits cross the link as 16-bit integers (READ's low16) where the top layer's K
    bounds them: the same training as reading all 32 bits, in fewer link bytes; a top
    layer too wide for the bound reads all 32."""
    from nibble.host.device.layout import widen16
    from nibble.host.training.device import DeviceMLP

    low = run("emu://", small)
    assert DeviceMLP(Device.open("emu://"), DeviceTrainConfig(sizes=[64, 273, 10]))\
        ._logits_low16()
    assert not DeviceMLP(Device.open("emu://"), DeviceTrainConfig(sizes=[64, 274, 10]))\
        ._logits_low16()
    monkeypatch.setattr(DeviceMLP, "_logits_low16", lambda self: False)
    full = run("emu://", small)
    assert [h["loss"] for h in low["history"]] == [h["loss"] for h in full["history"]]
    assert same_weights(low, full)
    assert low["history"][-1]["link_bytes_per_step"] < full["history"][-1]["link_bytes_per_step"]
    assert widen16(bytes([0x34, 0x12, 0xFE, 0xFF])) == bytes([0x34, 0x12, 0, 0, 0xFE, 0xFF,
                                                             0xFF, 0xFF])


def test_the_rtl_trains_bit_identically_to_the_emulator(small):
    """Through the device's RTL in Amaranth's simulator (pysim://), a 16-8-4 MLP for two
    steps of 8: same losses, master weights and codes as on emu://."""
    d = Dataset("tiny", small.x_train[:16, :16], small.y_train[:16] % 4,
                small.x_test[:8, :16], small.y_test[:8] % 4, classes=4)
    cfg = DeviceTrainConfig(sizes=[16, 8, 4], batch_size=8, lr=0.1)
    runs = {}
    for url in ("pysim://", "emu://"):
        with Device.open(url) as dev:
            r = train_on_device(dev, d, cfg, 1, progress=False)
            runs[url] = (r["losses"], *r["model"].masters(), r["model"].weight_codes())
    (sim_loss, *sim), (emu_loss, *emu) = runs.values()
    assert sim_loss == emu_loss and len(sim_loss) == 2
    for a, b in zip(sim, emu, strict=True):
        assert all((x == y).all() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("vec_ops", [1, 0])
def test_a_unit_without_update_keeps_the_masters_on_the_host(small, vec_ops):
    """The iCEBreaker's configuration through the RTL (a 1x8 array with six DSP PEs, tensor
    memory in SPRAM banks, the element-wise unit with TRANSPOSE alone, INFO vec_ops 1, or
    none at all):
    masters='auto' keeps the master weights on the host, and two steps of a 16-8-4 MLP are
    bit-identical to emu:// running UPDATE and REQUANT on its element-wise unit."""
    d = Dataset("tiny", small.x_train[:16, :16], small.y_train[:16] % 4,
                small.x_test[:8, :16], small.y_test[:8] % 4, classes=4)
    cfg = DeviceTrainConfig(sizes=[16, 8, 4], batch_size=8, lr=0.1)
    runs, masters = [], []
    for url in (f"pysim://?rows=1&cols=8&dsp_pes=6&vec_ops={vec_ops}&memory=spram"
                "&words=32768", "emu://?rows=1&cols=8"):
        with Device.open(url) as dev:
            r = train_on_device(dev, d, cfg, 1, progress=False)
            masters.append(r["model"].cfg.masters)
            runs.append((r["losses"], *r["model"].masters(), r["model"].weight_codes()))
            if url.startswith("pysim"):     # only its transposes ran on the device, if any
                c = r["model"].counters
                assert c["vec_cycles"] == c["transpose_cycles"]
                assert (c["vec_cycles"] > 0) == bool(vec_ops)
                assert (dev.host_vectors > 0) == (not vec_ops)   # the transposes
    assert masters == ["host", "device"]
    (sim_loss, *sim), (emu_loss, *emu) = runs
    assert sim_loss == emu_loss and len(sim_loss) == 2
    for a, b in zip(sim, emu, strict=True):
        assert all((x == y).all() for x, y in zip(a, b, strict=True))


@pytest.mark.long
def test_simulated_device_trains_bit_identically_to_the_emulator(small, simdev):
    """Through the Verilator model of the RTL (socket://), several steps: same losses, same
    master weights, same codes as on emu://."""
    sim = run(simdev, small, epochs=1)
    emu = run("emu://", small, epochs=1)
    assert sim["history"][0]["loss"] == emu["history"][0]["loss"]
    assert same_weights(sim, emu)
    assert all((a == b).all() for a, b in zip(sim["codes"], emu["codes"], strict=True))
    assert sim["history"][0]["device_cycles_per_step"] > 0


def test_training_survives_link_faults(small):
    """Flipped, dropped and duplicated bytes at 1e-3 per byte both ways: the driver's
    retries give the same final weights as a clean run."""
    clean = run("emu://", small, epochs=1)
    faulty = run("emu://", small, epochs=1,
                 wrap=lambda t: FaultyTransport(t, rate=1e-3, seed=5))
    assert same_weights(clean, faulty)
    assert faulty["history"][0]["loss"] == clean["history"][0]["loss"]


def test_resume_is_bit_identical(small, tmp_path):
    """Stop mid-epoch (as Ctrl-C does), resume from the checkpoint: same result as one
    uninterrupted run."""
    whole = run("emu://", small, epochs=2)
    part = run("emu://", small, epochs=2, max_steps=3, out=tmp_path)
    assert part["interrupted"] and (tmp_path / CHECKPOINT).exists()
    rest = run("emu://", small, epochs=2, out=tmp_path, resume=tmp_path / CHECKPOINT)
    assert not rest["interrupted"]
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in whole["history"]]
    assert same_weights(rest, whole)


def test_masters_that_do_not_fit_say_so(capsys):
    assert main(["train", "--device", "emu://?words=131072&sdram=", "--dataset", "digits",
                 "--model", "64-512-10", "--quiet", "--no-fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masters host" in err[0] and "131,072" in err[0]


def test_cli_train_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--device", "emu://", "--epochs", "2", "--quiet",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["fp32"]["test_accuracy"] > 0.5
    row = m["history"][-1]
    for key in ("loss", "train_accuracy", "test_accuracy", "images_per_second",
                "device_cycles_per_step", "link_bytes_per_step", "link_bytes_ratio"):
        assert key in row
    assert row["test_accuracy"] > 0.5
    assert (out / "curves.png").stat().st_size > 1000 and (out / CHECKPOINT).exists()
    text = capsys.readouterr().out
    assert "ibm4 on the device" in text and "fp32 on the host" in text


def test_unanswering_port_is_one_clear_line(capsys):
    assert main(["train", "--device", "socket://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "socket://127.0.0.1:9" in err[0]


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path):
    """SIGINT while training: the step finishes, a checkpoint is written, the command says
    how to resume, and resuming finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nibble.host.cli", "train", "--device", "emu://", "--epochs",
           "400", "--quiet", "--no-fp32", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 60
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"]
    done = len(m["history"])
    assert main(["train", "--device", "emu://", "--resume", str(out), "--epochs",
                 str(done + 1), "--quiet", "--no-fp32"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert not m["interrupted"] and len(m["history"]) == done + 1


def test_output_gradient_policies_are_costed(small):
    """bench-train's policy table on a small model: the two-term gradient doubles the output
    layer's backward MACs and sends twice its gradient bytes; the host-fp32 option moves the
    output layer's MACs off the 4-bit datapath and the hidden layer's tensors onto the link."""
    from nibble.host.bench.train import policy_costs
    with Device.open("pysim://") as sim:
        d = Dataset("tiny", small.x_train[:16, :16], small.y_train[:16] % 4,
                    small.x_test[:8, :16], small.y_test[:8] % 4, classes=4)
        p = policy_costs(sim, d, sizes=[16, 8, 4], steps=1,
                         hyper={"batch_size": 8, "lr": 0.1, "momentum": 0.9, "seed": 0})
    one, two, host = p["fp4"], p["fp4x2"], p["host-fp32"]
    assert two["macs_per_step"] - one["macs_per_step"] == 2 * 8 * 8 * 4
    assert two["link_bytes_per_step"] > one["link_bytes_per_step"]
    assert two["device_cycles_per_step"] > one["device_cycles_per_step"] > 0
    assert host["device_cycles_per_step"] < one["device_cycles_per_step"]
    assert host["non_4bit_mac_share"] == 3 * 8 * 8 * 4 / one["macs_per_step"]
    assert one["non_4bit_mac_share"] == two["non_4bit_mac_share"] == 0.0


def test_projection_rescales_gemms_and_names_the_bound():
    """bench-train's projection: a GEMM's beats rescaled to the board's array (its fill and
    drain kept), the element-wise cycles as measured, and the bound is the resource that is
    busy longest."""
    from nibble.host.bench.train import project
    uart = {"kind": "uart", "baud": 3_000_000}
    gemms = [(64, 784, 128, 1_000_050, 1_000_000)]     # 50 cycles of fill and drain
    p = project(gemms, 10_000, 1, 1_000, 5, 0.001, 8, 16, uart, 50e6, 64)
    assert p["device_cycles_per_step"] == 8 * 8 * 784 + 50 + 10_000
    assert p["link_s"] == 1_000 * 10 / 3_000_000 and p["bound"] == "link"
    assert project(gemms, 10_000, 1, 10, 5, 0.0, 8, 16, uart, 50e6, 64)["bound"] == "array"
    assert project(gemms, 10**6, 1, 10, 5, 0.0, 8, 16, uart, 50e6, 64)["bound"] \
        == "element-wise"
    assert project(gemms, 0, 1, 10, 5, 1.0, 8, 16, uart, 50e6, 64)["bound"] == "host"
    # a projection carries its cycles: --board-only applies a new clock and link to it
    from nibble.host.bench.train import retime
    slow = project(gemms, 10_000, 1, 1_000, 5, 0.001, 8, 16, uart, 5e6, 64)
    again = retime(p, 5e6, "measured fmax", uart, 0)
    assert {k: again[k] for k in slow} == slow and again["clock_mhz"] == 5.0
    assert slow["bound"] == "array" and retime({"baud": 1}, 5e6, "x", uart, 0) is None


def test_a_measured_board_row_replaces_its_projection():
    """The ULX3S's row in bench-train's projections is its own configuration's measurement
    (the state in the SDRAM), not the 2x4 device's cycles scaled as if the state were in
    block RAM; retimed, it keeps the measured cycles."""
    from nibble.host.bench.train import measured_row, project, retime
    uart = {"kind": "uart", "baud": 3_000_000}
    p = project([(64, 784, 128, 1_000_050, 1_000_000)], 10_000, 1, 1_000, 5, 0.001, 8, 16,
                uart, 50e6, 64)
    ux = {"array": "8x32", "device_cycles_per_step": 1_500_000, "gemm_cycles_per_step": 100_000,
          "link_bytes_per_step": 900, "link_commands_per_step": 4, "link": uart,
          "link_text": "UART", "clock_mhz": 50.0, "clock": "PLL clock, met", "compute_s": 0.03,
          "link_s": 0.004, "host_s": 0.001, "step_s": 0.035, "steps_per_second": 1 / 0.035,
          "images_per_second": 64 / 0.035, "bound": "SDRAM"}
    row = measured_row(p, ux)
    kept = {k: v for k, v in ux.items() if k != "gemm_cycles_per_step"}
    assert {k: row[k] for k in kept} == kept
    assert (row["array_cycles_per_step"], row["vec_cycles_per_step"]) == (100_000, 1_400_000)
    assert retime(row, 25e6, "x", uart, 4)["compute_s"] == 1_500_000 / 25e6


def test_usb_link_time_is_bytes_at_the_measured_rate_and_a_round_trip_a_command():
    """The ULX3S's USB link in a projection: wire bytes at the stream rate bench-link
    measured, plus each command's round trip less its own bytes' time."""
    from nibble.host.bench.train import link_seconds, link_text, project
    usb = {"kind": "usb", "stream_wire_bytes_per_second": 1e6, "ping_round_trip_s": 50e-6,
           "ping_wire_bytes": 16}
    assert link_seconds(usb, 10_000, 0) == 0.01
    assert abs(link_seconds(usb, 10_000, 20) - (0.01 + 20 * 34e-6)) < 1e-12
    assert link_text(usb) == "USB, 1,000 KB/s measured"
    gemms = [(64, 784, 128, 1_000_050, 1_000_000)]
    p = project(gemms, 0, 1, 100_000, 40, 0.0, 8, 16, usb, 50e6, 64)
    assert p["link_s"] == link_seconds(usb, 100_000, 40) and p["bound"] == "link"


def test_a_model_the_device_cannot_hold_says_what_it_needs():
    """A 1x4 device with 1,024 words (the iCEBreaker's block RAM alone) and TRANSPOSE alone:
    the digits MLP does not fit even with its master weights on the host, and the error
    says so with the numbers."""
    from nibble.host.training.device import DeviceMemoryError, DeviceMLP
    with Device.open("emu://?rows=1&cols=4&words=1024&vec_ops=1&sdram=") as dev, \
            pytest.raises(DeviceMemoryError, match=r"needs 3,352 words of tensor memory with "
                          r"its master weights on the host; .* has 1,024"):
        DeviceMLP(dev, DeviceTrainConfig(sizes=SIZES, batch_size=8))


@pytest.mark.long
def test_the_simulated_icebreaker_trains_digits_within_a_point_of_fp32():
    """The digits MLP 64-32-10 for 10 epochs on the Verilator model in the iCEBreaker's
    configuration (1x8 array, SPRAM tensor memory, the master weights on the host, since it
    has no element-wise unit): bit-identical to emu:// in that configuration, and
    within a point of fp32 on the host (``make bench-train`` reports the same run)."""
    from nibble.host.bench.train import icebreaker_digits
    r = icebreaker_digits(log=lambda *_: None)
    assert (r["memory"], r["masters"], r["words"]) == ("spram", "host", 32768)
    assert r["sim_matches_emu"] and r["steps"] > 200
    assert r["delta_points"] >= -1.0, r


def test_a_device_without_an_element_wise_unit_refuses_vector():
    """Built with no operations (vec_ops 0) the device has no element-wise unit: INFO says
    so, a VECTOR that reaches it anyway is refused as out of range (nothing written), and the
    driver's own vector() runs the operation on the host, as the unit would."""
    from nibble.host.device.commands import vector_args
    from nibble.host.device.driver import OutOfRangeError
    from nibble.rtl.formats import VEC_OPS_ALL, VecOp
    cfg = vector_args(VecOp.TRANSPOSE, 3, 4, (40, 1), (60, 1))
    with Device.open("pysim://?rows=1&cols=4&vec_ops=0") as dev:
        assert dev.info["vec_ops"] == 0
        dev.write(40, bytes(range(1, 17)))
        dev.vector(cfg)                                   # on the host
        assert dev.host_vectors == 1
        want = dev.read(60, 4)
        dev.write(60, bytes(16))
        dev.vec_ops = VEC_OPS_ALL                         # as if the unit were there
        with pytest.raises(OutOfRangeError):
            dev.vector(cfg)
        assert dev.read(60, 4) == bytes(16)
    with Device.open("emu://?rows=1&cols=4") as emu:      # the unit's own transpose
        emu.write(40, bytes(range(1, 17)))
        emu.vector(cfg)
        assert emu.read(60, 4) == want != bytes(16)
