"""``nibble bench train``: 4-bit training on the accelerator, Fashion-MNIST MLP 784-128-10.

* fp32 on the host and ibm4 on ``emu://`` (the device's golden model), the full run;
* the simulated device (the RTL on Verilator) for as many steps as fit a time budget, then
  the same steps on ``emu://``: ``sim_matches_emu`` is true only when every loss, master
  weight, momentum and code is identical;
* per step: device cycles and array utilization (from the simulated device), link bytes
  (from ``emu://``, where every wait is one STATS poll) against the batch's own bytes, the
  host's share of the step time; the host-master mode's link cost;
* projections for the boards from those measured cycles and bytes: GEMM cycles rescaled to
  each board's array (its beats from the GEMM shapes, plus the fill and drain measured on
  the simulated device), element-wise cycles as measured, the link at the board's rate,
  plus the measured host time. A UART link carries 10 bits a byte at its baud rate; the
  ULX3S's native USB link its bytes at the rate ``nibble bench link`` measured on the
  RTL behind a packet-level USB host, plus a round trip for each command
  (:func:`nibble.host.bench.link.usb_link_seconds`). Each projection names its bound: the
  resource busy longest a step (array, element-wise unit, SDRAM at its peak, link, host).
  The ULX3S row is measured on its own configuration (:func:`board_run`), and its step is
  the host's trace replayed (:mod:`nibble.host.bench.timeline`): on a paged device the host
  sends commands without waiting for replies it does not need yet, so the device, the link
  and the host overlap except where one waits for another (``serial_step_s``: the three
  one after the other, as the other rows).

Writes ``train.json`` and ``train.md`` under the output folder and, with ``docs``, the
``bench-train`` section of that markdown file.
"""

import json
import math
import platform
import re
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from threadpoolctl import threadpool_limits

from nibble.gateware.protocol import Op
from nibble.host.bench.link import usb_link_seconds
from nibble.host.bench.system import SDRAM_PEAK_BYTES_PER_CYCLE
from nibble.host.bench.timeline import RX_BUFFER_BYTES, TX_BUFFER_BYTES, Link, replay
from nibble.host.device.driver import Device
from nibble.host.report import markdown_table, publish
from nibble.host.training import datasets
from nibble.host.training.device import (
    DeviceTrainConfig,
    masters_for,
    memory_words,
    plan_memory,
)
from nibble.host.training.session import Session, batch_bytes, train_on_device
from nibble.host.training.train import TrainConfig, train

__all__ = ["bench_train"]

SIZES = [784, 128, 10]
HYPER = {"batch_size": 64, "lr": 0.02, "momentum": 0.9, "seed": 0}


def _link(board, usb):
    """How a projection times a board's link: a UART at its baud rate, or native USB with
    the measured figures ``usb`` (:func:`nibble.host.bench.link.measure_usb`)."""
    if board.link == "usb":
        return {"kind": "usb", **{k: usb[k] for k in (
            "stream_wire_bytes_per_second", "ping_round_trip_s", "ping_wire_bytes")}}
    return {"kind": "uart", "baud": board.baud}


def link_seconds(link, link_bytes, commands):
    """A step's link time: ``link_bytes`` wire bytes and ``commands`` requests."""
    if link["kind"] == "usb":
        return usb_link_seconds(link, link_bytes, commands)
    return link_bytes * 10 / link["baud"]


def link_text(link):
    if link["kind"] == "usb":
        return f"USB, {link['stream_wire_bytes_per_second'] / 1e3:,.0f} KB/s measured"
    return f"UART, {link['baud']:,} baud"


def _board_rows(usb):
    """(name, rows, cols, link, clock Hz, clock note, memory bytes) per board: the clock is
    the PLL's where ``build/<board>/report.json`` (``make bitstream``) says the design
    meets it, the measured fmax where it does not, the target without a report;
    ``link`` is :func:`_link`'s."""
    from nibble.gateware.boards import BOARDS
    from nibble.rtl.formats import word_nibbles
    from nibble.rtl.sdram import CHIPS
    out = []
    for name, b in BOARDS.items():
        rep = Path("build") / name / "report.json"
        hz, note = b.clk_hz, "target (no bitstream report)"
        if rep.exists():
            r = json.loads(rep.read_text())
            if r.get("fits", True) and r.get("fmax_mhz"):
                # the board runs at its PLL's clock: the target where the build meets it,
                # else the measured fmax (the clock it would need to be given)
                met = r.get("timing_met", r["fmax_mhz"] >= r["target_mhz"])
                hz, note = (r["target_mhz"] * 1e6, "PLL clock, met") if met else \
                    (r["fmax_mhz"] * 1e6, "measured fmax (misses the PLL's)")
            else:
                note = "target; the bitstream does not fit"
        nib = word_nibbles(b.rows, b.cols)
        # with an SDRAM the state may live there (paged through the scratchpad)
        room = b.mem_words + (CHIPS[b.sdram].bytes * 2 // nib if b.sdram else 0)
        fits = {m: memory_words(SIZES, HYPER["batch_size"], nib, max(b.rows, b.cols), m, 2)
                <= room for m in ("device", "host")}
        out.append((name, b.rows, b.cols, _link(b, usb), hz, note, room * nib // 2, fits))
    return out


def policy_costs(sim, data, sizes=SIZES, hyper=HYPER, steps=6):
    """What each way of keeping the output layer's gradient above 4 bits costs per step:
    device cycles on the simulated device ``sim``, link bytes on ``emu://`` (where every
    wait is one STATS poll), and the share of the step's MACs that are not 4-bit x 4-bit.

    ``fp4`` (one FP4 pair, the pure 4-bit scheme) and ``fp4x2`` (two FP4 terms, the
    default) run on the device. ``host-fp32`` (the output layer on the host in fp32) is
    measured from its parts: the ``fp4`` step's cycles without the output layer's (its GEMMs
    and VECTOR operations, counted per layer), and its link bytes with the transfers that
    change measured on ``emu://``: the hidden output (K x B codes) and its gradient (K x B
    FP4 pairs) cross the link instead of the logits and their gradient."""
    out = {}
    for og in ("fp4", "fp4x2"):
        cfg = DeviceTrainConfig(sizes=sizes, out_grad=og, **hyper)
        row = {}
        for dev, keys in ((sim, ("cycles", "layer", "macs")), (None, ("bytes",))):
            with (Device.open("emu://") if dev is None else nullcontext(sim)) as d:
                session = Session(d, head(data, 1024), cfg, 1)
                session.run(progress=False, max_steps=1)     # the first step measures
                before = _costs(session)
                session.run(progress=False, max_steps=steps)
                after = _costs(session)
            row.update({k: (after[k] - before[k]) / (after["steps"] - before["steps"])
                        for k in keys})
        out[og] = {"device_cycles_per_step": row["cycles"], "link_bytes_per_step": row["bytes"],
                   "top_layer_cycles_per_step": row["layer"], "macs_per_step": row["macs"],
                   "non_4bit_mac_share": 0.0}
    b, (k, n) = hyper["batch_size"], sizes[-2:]
    with Device.open("emu://") as emu:
        plan = plan_memory(sizes, b, emu.word_nibbles, max(emu.rows, emu.cols), "device")
        top, below = plan.layers[-1], plan.layers[-2]

        def wire(fn):
            w0 = emu.wire_sent + emu.wire_received
            fn()
            return emu.wire_sent + emu.wire_received - w0

        gone = (wire(lambda: emu.read(plan.logits.addr, plan.logits.words))
                + wire(lambda: emu.write(top.dc.addr, bytes(top.dc.words * emu.word_bytes))))
        new = (wire(lambda: emu.read(top.xc.addr, top.xc.words))
               + wire(lambda: emu.write(below.dc.addr, bytes(below.dc.words
                                                              * emu.word_bytes))))
    base = out["fp4"]
    out["host-fp32"] = {
        "device_cycles_per_step": base["device_cycles_per_step"]
        - base["top_layer_cycles_per_step"],
        "link_bytes_per_step": base["link_bytes_per_step"] - gone + new,
        "macs_per_step": base["macs_per_step"],
        "non_4bit_mac_share": 3 * b * k * n / base["macs_per_step"]}
    return out


def commands_per_step(data, cfg, steps=8):
    """The requests a training step sends (on ``emu://``, after the first step)."""
    with Device.open("emu://") as dev:
        session = Session(dev, head(data, 1024), cfg, 1)
        session.run(progress=False, max_steps=1)
        n0, s0 = dev.frames_sent, session.step
        session.run(progress=False, max_steps=steps)
        return (dev.frames_sent - n0) / (session.step - s0)


def _costs(session):
    """A session's totals so far: device cycles, the output layer's, MACs, link bytes."""
    c, dev = session.mlp.counters, session.dev
    return {"cycles": c["gemm_cycles"] + c["vec_cycles"], "layer": c["layer_cycles"][-1],
            "macs": sum(m * l * n for m, l, n, _, _ in c["gemms"]),
            "bytes": dev.wire_sent + dev.wire_received, "steps": session.step}


def project(gemms, vec_cycles_per_step, steps, link_bytes, commands, host_s, rows, cols,
            link, hz, batch):
    """Steps/s and images/s on an ``rows`` x ``cols`` array at ``hz`` with ``link``
    (:func:`_link`). ``gemms``: (m, l, n, cycles, beats) of every GEMM in ``steps`` steps
    (measured)."""
    array = 0
    for m, l, n, cyc, beats in gemms:
        array += math.ceil(m / rows) * math.ceil(n / cols) * l + (cyc - beats)
    return timed(array / steps, vec_cycles_per_step, link_bytes, commands, host_s, link, hz,
                 batch)


def timed(array, vec, link_bytes, commands, host_s, link, hz, batch):
    """A projected step at ``hz``: ``array`` and ``vec`` device cycles, ``link_bytes`` and
    ``commands`` over ``link``, ``host_s`` on the host (kept in the result, so a new clock
    or link can be applied to it again: :func:`retime`)."""
    cycles = array + vec
    link_s = link_seconds(link, link_bytes, commands)
    t = cycles / hz + link_s + host_s
    return {"device_cycles_per_step": cycles, "array_cycles_per_step": array,
            "vec_cycles_per_step": vec, "link_bytes_per_step": link_bytes,
            "link_commands_per_step": commands, "link": link, "link_text": link_text(link),
            "compute_s": cycles / hz, "link_s": link_s, "host_s": host_s,
            "step_s": t, "steps_per_second": 1 / t, "images_per_second": batch / t,
            "bound": bound({"array": array / hz, "element-wise": vec / hz,
                            "link": link_s, "host": host_s})}


def retime(p, hz, clock, link, commands):
    """Projection ``p`` (from :func:`timed`) at another clock ``hz`` (``clock`` says where
    it comes from) and ``link`` (``commands`` a step where ``p`` has none); None for a
    projection stored without its cycles (an older train.json)."""
    if "array_cycles_per_step" not in p:
        return None
    q = dict(p, **timed(p["array_cycles_per_step"], p["vec_cycles_per_step"],
                        p["link_bytes_per_step"], p.get("link_commands_per_step", commands),
                        p["host_s"], link, hz, HYPER["batch_size"]))
    q.update({"clock_mhz": hz / 1e6, "clock": clock})
    return q


def measured_row(p, ux):
    """A board's projection ``p`` replaced by its own configuration measured on the
    simulated device (``ux``, from :func:`board_run` with its timing): the 2x4 device's
    cycles scaled to the board's array would count the state in block RAM, which the
    ULX3S's does not hold. GEMM cycles are its array cycles, the rest (element-wise and
    transfers) its element-wise ones, so :func:`retime` keeps the total."""
    keep = ("device_cycles_per_step", "link_bytes_per_step", "link_commands_per_step", "link",
            "link_text", "clock_mhz", "clock", "compute_s", "link_s", "host_s", "step_s",
            "steps_per_second", "images_per_second", "bound", "array")
    return dict(p, **{k: ux[k] for k in keep},
                array_cycles_per_step=ux["gemm_cycles_per_step"],
                vec_cycles_per_step=ux["device_cycles_per_step"] - ux["gemm_cycles_per_step"],
                cycles_from="the board's configuration on the simulated device")


def replayed(trace, steps, run_cycles, link, hz):
    """A step on ``link`` at ``hz``: the host's ``trace`` of ``steps`` steps replayed
    (:func:`~nibble.host.bench.timeline.replay`) with each RUN taking its measured
    ``run_cycles`` (one step's, in order). Per step: ``seconds``, and the host's, the
    device's and the link's busy seconds and the device's idle ones."""
    runs = sum(1 for kind, p, _ in trace if kind == "send" and p.op == Op.RUN)
    if not run_cycles or runs % len(run_cycles):
        raise ValueError(f"the host's trace has {runs} RUNs, not a whole number of steps of "
                         f"{len(run_cycles)}")
    if link["kind"] == "usb":
        lk = Link(link["stream_wire_bytes_per_second"], max(
            link["ping_round_trip_s"] - link["ping_wire_bytes"]
            / link["stream_wire_bytes_per_second"], 0))
        rx, tx = RX_BUFFER_BYTES, TX_BUFFER_BYTES
    else:
        lk, rx, tx = Link(link["baud"] / 10, 0.0), 0, 0
    r = replay(trace, [run_cycles[k % len(run_cycles)] / hz for k in range(runs)], lk, rx, tx)
    return {k: v / steps for k, v in r.items()}


def bound(seconds):
    """What bounds a step: the resource (``seconds``: its busy time a step) that is busy
    longest. For the SDRAM that is its bytes at the peak rate, a lower bound."""
    return max(seconds, key=seconds.get)


def head(data, images):
    """``data`` with its first ``images`` training images: runs of a few steps upload (as a
    resident set) only what they could use; per-step figures do not depend on it."""
    return replace(data, x_train=data.x_train[:images], y_train=data.y_train[:images])


#: Steps a board's configuration runs before it is measured: the first measures the
#: activation scales; the second is the first to fetch its batch early, into the other X
#: rows, so it stores the programs of that buffer's commands.
WARM_STEPS = 2


def board_run(name, data, cfg, steps=4, images=4096, log=print):
    """The MLP with its whole state on the simulated device in board ``name``'s
    configuration (``ulx3s-85f``: 8 x 16 array, 16K-word scratchpad, the state in the
    SDRAM), the training set resident in the SDRAM beside it (its first ``images``
    images: the upload through the simulated link is slow), ``steps`` steps, against
    ``emu://`` in the same configuration. Per-step figures come from the steps after the
    first :data:`WARM_STEPS`: device cycles from each paged command's
    first load to its last store (transfers, GEMMs and element-wise operations; the sim's
    socket service adds at most 256 cycles a command), GEMM and element-wise cycles, SDRAM
    bytes moved, and link bytes on ``emu://`` (where every wait is one STATS poll, and
    nothing polls for cycle counts). The whole set's upload is projected from the bytes
    the subset's took."""
    from nibble.sim.system import board_config, build, emu_url, serve
    conf = board_config(name)
    build(**conf, quiet=False)
    runs = []
    for where in ("sim", emu_url(conf)):
        with (serve(**conf) if where == "sim" else nullcontext(where)) as url, \
                Device.open(url, timeout=30) as dev:
            session = Session(dev, head(data, images), cfg, 1, resident=True)
            session.run(progress=False, max_steps=WARM_STEPS)
            mlp = session.mlp
            mlp.dev.measure = where == "sim"
            del mlp.dev.run_cycles[:]
            before = _board_counters(session)
            t0 = time.perf_counter()
            session.run(progress=False, max_steps=steps - WARM_STEPS)
            seconds = time.perf_counter() - t0
            after = _board_counters(session)
            before = {k: before.get(k, 0) for k in after}
            measured = after["steps"] - before["steps"]
            w, v = mlp.masters()
            runs.append({"losses": list(session.losses), "state": [*w, *v, *mlp.weight_codes()],
                         "per_step": {k: (after[k] - before[k]) / measured for k in after},
                         "paged": mlp.paged, "seconds": seconds, "plan_words": mlp.plan.end,
                         "upload": session.uploaded, "resident": mlp.resident.describe(),
                         "row_bytes": mlp.resident.row_bursts * 16,
                         "run_cycles": list(mlp.dev.run_cycles)})
            if where != "sim":          # the host's own time a step in this configuration
                runs[-1]["host_s"], runs[-1]["trace"], runs[-1]["trace_steps"] = \
                    _host_seconds(session, HOST_STEPS)
    sim, emu = runs
    # the chip model's verdict on the simulated run (printed when the model stops): a
    # figure from a run that broke an SDRAM rule is no figure
    found = re.search(r"sdram flags \S+ violations \d+", serve.last_report)
    sdram_report = found.group(0) if found else ""
    if conf["sdram"] and not sdram_report.endswith(" violations 0"):
        raise RuntimeError(f"{name}: the SDRAM model flagged the simulated run: "
                           f"{serve.last_report!r}")
    measured = steps - WARM_STEPS
    per_step = len(sim["run_cycles"]) // measured
    # each RUN's cycles in a step, the mean over the measured steps (they are the same
    # commands each step)
    run_cycles = [sum(sim["run_cycles"][j * per_step + k] for j in range(measured)) / measured
                  for k in range(per_step)]
    same = sim["losses"] == emu["losses"] and all(
        (a == b).all() for a, b in zip(sim["state"], emu["state"], strict=True))
    b, k, n = cfg.batch_size, SIZES[0], SIZES[-1]
    batch = batch_bytes(b, k, n)
    up = emu["upload"]
    full_set = len(data.x_train) * emu["row_bytes"]
    return {"board": name, "array": f"{conf['rows']}x{conf['cols']}",
            "scratch_words": conf["words"], "sdram": conf["sdram"],
            "sdram_hz": conf["sdram_hz"],
            "state_words": sim["plan_words"], "state_in_sdram": sim["paged"],
            "sdram_model_report": sdram_report,
            "steps": steps, "sim_matches_emu": bool(same),
            "sim_seconds_per_step": sim["seconds"] / measured,
            "device_cycles_per_step": sim["per_step"]["cycles"],
            "gemm_cycles_per_step": sim["per_step"]["gemm"],
            "vec_cycles_per_step": sim["per_step"]["vec"],
            "sdram_bytes_per_step": sim["per_step"]["dma_bytes"],
            "link_bytes_per_step": emu["per_step"]["link"], "batch_bytes_per_step": batch,
            "link_commands_per_step": emu["per_step"]["commands"],
            "link_bytes_by_command": {k[5:]: v for k, v in sorted(
                emu["per_step"].items(), key=lambda kv: -kv[1]) if k.startswith("link_")},
            "sdram_bytes_by_command": {k[6:]: v for k, v in sorted(
                sim["per_step"].items(), key=lambda kv: -kv[1]) if k.startswith("sdram_")},
            "cycles_by_command": {k[7:]: v for k, v in sorted(
                sim["per_step"].items(), key=lambda kv: -kv[1]) if k.startswith("cycles_")},
            "link_bytes_ratio": emu["per_step"]["link"] / batch,
            "host_seconds_per_step": emu["host_s"],
            "run_cycles_per_step": run_cycles,
            "_trace": emu["trace"], "_trace_steps": emu["trace_steps"],
            "dataset_resident": True, "resident_images": emu["resident"]["images"],
            "resident_set_bytes": full_set,
            "upload_link_bytes": full_set * up["link_bytes"] / up["set_bytes"]}


def icebreaker_digits(epochs=10, log=print):
    """The digits MLP 64-32-10 trained in the iCEBreaker's configuration (its array, SPRAM
    tensor memory, no element-wise unit, so the master weights on the host) on
    the simulated device and on ``emu://``, with ``nibble train``'s defaults for digits,
    beside fp32 on the host: accuracies, whether the two devices agree bit for bit (every
    loss, master weight and code), and the simulated device's cycles and link bytes a
    step."""
    from nibble.sim.system import board_config, build, emu_url, serve
    data = datasets.load("digits")
    sizes, hyper = [64, 32, 10], {"batch_size": 64, "lr": 0.1, "momentum": 0.9, "seed": 0}
    cfg = DeviceTrainConfig(sizes=sizes, **hyper)
    conf = board_config("icebreaker")
    build(**conf)
    runs = []
    for where in ("sim", emu_url(conf)):
        log(f"digits {'-'.join(map(str, sizes))} on "
            f"{'the simulated iCEBreaker' if where == 'sim' else where}, {epochs} epochs ...")
        with (serve(**conf) if where == "sim" else nullcontext(where)) as url, \
                Device.open(url, timeout=30) as dev:
            t0 = time.perf_counter()
            r = train_on_device(dev, data, cfg, epochs, progress=False)
            r["seconds"] = time.perf_counter() - t0
            w, v = r["model"].masters()
            r["state"] = [*w, *v, *r["model"].weight_codes()]
            runs.append(r)
    sim, emu = runs
    log("digits: fp32 on the host ...")
    f = train(data, TrainConfig(scheme="fp32", epochs=epochs, sizes=sizes, **hyper),
              progress=False)
    same = sim["losses"] == emu["losses"] and all(
        (a == b).all() for a, b in zip(sim["state"], emu["state"], strict=True))
    last = sim["history"][-1]
    return {"model": "mlp-64-32-10", "dataset": "digits", "epochs": epochs, **hyper,
            "array": f"{conf['rows']}x{conf['cols']}", "words": conf["words"],
            "memory": conf["memory"], "vec_ops": conf["vec_ops"],
            "masters": sim["model"].cfg.masters, "steps": sim["steps"],
            "sim_matches_emu": bool(same), "sim_seconds": sim["seconds"],
            "test_accuracy": sim["test_accuracy"], "emu_test_accuracy": emu["test_accuracy"],
            "fp32_test_accuracy": f["test_accuracy"],
            "delta_points": 100 * (sim["test_accuracy"] - f["test_accuracy"]),
            "device_cycles_per_step": last["device_cycles_per_step"],
            "link_bytes_per_step": last["link_bytes_per_step"],
            "link_bytes_ratio": last["link_bytes_ratio"]}


def _by_command(ux):
    """Rows of the ULX3S configuration's cycles and SDRAM bytes by command, longest first."""
    moved = ux["sdram_bytes_by_command"]
    # the SDRAM's peak in bytes a design cycle (its clock may be its own)
    peak = SDRAM_PEAK_BYTES_PER_CYCLE * ux.get("sdram_mhz", ux["clock_mhz"]) / ux["clock_mhz"]
    rows = []
    for op, cycles in ux["cycles_by_command"].items():
        load, store = moved.get(f"{op} load", 0), moved.get(f"{op} store", 0)
        rows.append({"op": op, "cycles": cycles, "load": load, "store": store,
                     "share": (load + store) / peak / cycles if cycles else 0.0})
    return rows


#: Steps a board's configuration runs on ``emu://`` to time the host's share of a step.
HOST_STEPS = 20


def _host_seconds(session, steps):
    """The host's seconds a step over ``steps`` more steps of ``session`` (the step's time
    less the driver's wait for the device: on ``emu://`` that is the emulator's work), the
    trace of those steps on the link (``Device.start_trace``) and how many they were."""
    dev = session.dev
    # within the epoch: its end evaluates the test set, which is not a step's work
    steps = min(steps, (len(session.x_train) - session.pos) // session.cfg.batch_size - 1)
    if steps < 1:
        raise ValueError("no steps left in the epoch to time the host on")
    trace = dev.start_trace()
    io0, t0 = dev.io_seconds, time.perf_counter()
    try:
        session.run(progress=False, max_steps=steps)
    finally:
        dev.trace = None
    return (time.perf_counter() - t0 - (dev.io_seconds - io0)) / steps, trace, steps


def _board_counters(session):
    c, paged = session.mlp.counters, getattr(session.mlp.dev, "counters", {})
    return {"cycles": paged.get("cycles", 0), "gemm": c["gemm_cycles"], "vec": c["vec_cycles"],
            "dma_bytes": paged.get("dma_bytes", 0), "commands": session.dev.frames_sent,
            "link": session.dev.wire_sent + session.dev.wire_received, "steps": session.step,
            **{f"link_{op}": n for op, n in session.dev.wire_by_op.items()},
            **{f"sdram_{op}": n for op, n in getattr(session.mlp.dev, "by_op", {}).items()},
            **{f"cycles_{op}": n for op, n in
               getattr(session.mlp.dev, "cycles_by_op", {}).items()}}


def bench_train(out_dir="build/bench", epochs=10, sim_seconds=600, docs=None,
                progress=True, log=print, board_only=False):
    """The benchmark (see the module); ``board_only`` measures the boards' own rows again
    (the ULX3S and iCEBreaker configurations), projects the boards at the clocks their
    reports give now and with the memory they have now, and keeps the rest of an earlier
    run's ``train.json``."""
    from nibble.host.bench.link import load_or_measure
    usb = load_or_measure(out_dir, log=log)
    with threadpool_limits(limits=1, user_api="blas"):
        if board_only:
            path = Path(out_dir) / "train.json"
            if not path.exists():
                raise FileNotFoundError(f"--board-only needs an earlier run's {path}")
            res = json.loads(path.read_text())
            data, cfg = datasets.load("fashion-mnist"), DeviceTrainConfig(sizes=SIZES, **HYPER)
            res["link_commands_per_step"] = commands_per_step(data, cfg)
            for name, _, _, link, hz, clock, mem_bytes, fits in _board_rows(usb):  # now
                old = res["projections"].get(name, {})
                if old and "array_cycles_per_step" not in old:  # from before they were kept:
                    old = dict(old, vec_cycles_per_step=res["vec_cycles_per_step"],  # as
                               link_bytes_per_step=res["link_bytes_per_step"],      # project()
                               array_cycles_per_step=old["device_cycles_per_step"]  # had them
                               - res["vec_cycles_per_step"])
                new = retime(old, hz, clock, link, res["link_commands_per_step"])
                if new:
                    new.update({"memory_bytes": mem_bytes, "fits_device_masters":
                                fits["device"], "fits_host_masters": fits["host"]})
                    res["projections"][name] = new
            return _board_section(res, data, cfg, Path(out_dir), docs, log, usb)
        return _bench(out_dir, epochs, sim_seconds, docs, progress, log, usb)


def _bench(out_dir, epochs, sim_seconds, docs, progress, log, usb):
    from nibble.sim.system import DEFAULTS, build, serve

    data = datasets.load("fashion-mnist")
    out = Path(out_dir)
    cfg = DeviceTrainConfig(sizes=SIZES, **HYPER)
    res = {"model": "mlp-784-128-10", "dataset": "fashion-mnist", "epochs": epochs,
           **HYPER, "out_grad": cfg.out_grad, "act": cfg.act, "act_clip": cfg.act_clip,
           "host": platform.processor() or platform.machine()}

    log(f"fp32 on the host, {epochs} epochs ...")
    f = train(data, TrainConfig(scheme="fp32", epochs=epochs, sizes=SIZES, **HYPER),
              progress=progress)
    res["fp32_test_accuracy"] = f["test_accuracy"]
    res["fp32_history"] = f["history"]

    log(f"ibm4 ({cfg.out_grad}, {cfg.act}) on emu:// (the device's golden model), "
        f"{epochs} epochs ...")
    with Device.open("emu://") as dev:
        e = train_on_device(dev, data, cfg, epochs, progress=progress)
    res["ibm4_test_accuracy"] = e["test_accuracy"]
    res["link_commands_per_step"] = commands_per_step(data, cfg)
    res["ibm4_history"] = e["history"]
    log(f"the pure 4-bit scheme (one FP4 output gradient) on emu://, {epochs} epochs ...")
    pure = DeviceTrainConfig(sizes=SIZES, out_grad="fp4", **HYPER)
    with Device.open("emu://") as dev:
        res["pure4_test_accuracy"] = train_on_device(dev, data, pure, epochs,
                                                     progress=progress)["test_accuracy"]
    first = e["history"][0]
    for key in ("link_bytes_per_step", "batch_bytes_per_step", "link_bytes_ratio",
                "host_seconds_per_step"):
        res[key] = first[key]

    log("host-master mode on emu://, 20 steps ...")
    with Device.open("emu://") as dev:
        h = train_on_device(dev, data, DeviceTrainConfig(sizes=SIZES, masters="host", **HYPER),
                            1, progress=False, max_steps=20)
    res["host_masters"] = {"link_bytes_per_step": h["partial"]["link_bytes_per_step"],
                           "link_bytes_ratio": h["partial"]["link_bytes_ratio"],
                           "host_seconds_per_step": h["partial"]["host_seconds_per_step"]}

    log(f"the simulated device (built on first use), {sim_seconds} s of steps ...")
    build(**DEFAULTS, quiet=not progress)
    with serve(**DEFAULTS) as url, Device.open(url) as dev:
        t0 = time.perf_counter()
        s = train_on_device(dev, data, cfg, epochs, progress=progress,
                            time_budget=sim_seconds)
        sim_wall = time.perf_counter() - t0
        model = s["model"]
        sim_w, sim_v = model.masters()
        sim_codes = model.weight_codes()
        log("the output layer's gradient policies, a few steps each ...")
        res["policies"] = policy_costs(dev, data)
    steps = s["steps"]
    with Device.open("emu://") as dev:
        c = train_on_device(dev, data, cfg, epochs, progress=False, max_steps=steps)
        emu_w, emu_v = c["model"].masters()
        emu_codes = c["model"].weight_codes()
    same = (s["losses"] == c["losses"]
            and all((a == b).all() for a, b in zip(sim_w + sim_v + sim_codes,
                                                   emu_w + emu_v + emu_codes, strict=True)))
    sp = s["partial"]
    counters = model.counters
    macs = sum(m * l * n for m, l, n, _, _ in counters["gemms"])
    gemm_cycles = sum(cyc for *_, cyc, _ in counters["gemms"])
    rows, cols = dev.rows, dev.cols
    res.update({
        "sim_matches_emu": bool(same),
        "sim_steps": steps,
        "sim_seconds": sim_wall,
        "sim_array": f"{rows}x{cols}",
        "device_cycles_per_step": sp["device_cycles_per_step"],
        "gemm_cycles_per_step": gemm_cycles / steps,
        "vec_cycles_per_step": counters["vec_cycles"] / steps,
        "array_utilization": macs / (gemm_cycles * rows * cols),
        "sim_link_bytes_per_step": sp["link_bytes_per_step"],
        "sim_host_share": sp["host_seconds_per_step"]
        / (sp["host_seconds_per_step"] + sp["io_seconds_per_step"]),
        "sim_steps_per_second": steps / sim_wall,
    })
    from nibble.gateware.boards import BOARDS
    proj = {}
    for name, br, bc, link, hz, src, mem_bytes, fits in _board_rows(usb):
        # a board whose element-wise unit cannot update keeps the masters on the host
        # (masters="auto"): its link and host figures are that mode's, its element-wise
        # cycles the transposes'
        host = masters_for(BOARDS[name]) == "host"
        mode = res["host_masters"] if host else res
        vec = counters["transpose_cycles" if host else "vec_cycles"] / steps
        p = project(counters["gemms"], vec, steps, mode["link_bytes_per_step"],
                    res["link_commands_per_step"], mode["host_seconds_per_step"], br, bc,
                    link, hz, HYPER["batch_size"])
        p.update({"array": f"{br}x{bc}", "clock_mhz": hz / 1e6, "clock": src,
                  "masters": "host" if host else "device",
                  "memory_bytes": mem_bytes, "fits_device_masters": fits["device"],
                  "fits_host_masters": fits["host"]})
        proj[name] = p
    res["projections"] = proj

    return _board_section(res, data, cfg, out, docs, log, usb)


def _board_section(res, data, cfg, out, docs, log, usb):
    """The ULX3S row: measured on the simulated device, projected at the board's clock,
    the link and the host time of ``res`` (the rest of the benchmark); written with it."""
    log("the ULX3S configuration on the simulated device: the state in the SDRAM ...")
    ux = board_run("ulx3s-85f", data, cfg)
    _, _, _, link, hz, src, _, fits = next(r for r in _board_rows(usb)
                                           if r[0] == "ulx3s-85f")
    link_s = link_seconds(link, ux["link_bytes_per_step"], ux["link_commands_per_step"])
    sdram_hz = ux["sdram_hz"] or hz
    # the host's time a step is this configuration's (a paged state plans its parts and
    # programs every step), not the 2x4 device's; the step the host's trace replayed with
    # the link and the device (they overlap: the host posts commands), and as before with
    # the three one after the other
    serial = ux["device_cycles_per_step"] / hz + link_s + ux["host_seconds_per_step"]
    rep = replayed(ux.pop("_trace"), ux.pop("_trace_steps"), ux["run_cycles_per_step"],
                   link, hz)
    t = rep["seconds"]
    ux.update({"clock_mhz": hz / 1e6, "clock": src, "link": link, "link_text": link_text(link),
               "serial_step_s": serial, "serial_images_per_second": HYPER["batch_size"] / serial,
               "device_idle_s": rep["device_idle_s"], "replayed": rep,
               "upload_s": link_seconds(link, ux["upload_link_bytes"], 0),
               "compute_s": ux["device_cycles_per_step"] / hz, "link_s": link_s,
               "host_s": ux["host_seconds_per_step"], "step_s": t,
               "steps_per_second": 1 / t, "images_per_second": HYPER["batch_size"] / t,
               # the SDRAM's peak: 2 bytes a cycle of its own clock (the design's, or one
               # of its own: rtl.sdram_clock), which the simulated configuration runs at
               "sdram_mhz": sdram_hz / 1e6,
               "sdram_s": ux["sdram_bytes_per_step"] / SDRAM_PEAK_BYTES_PER_CYCLE / sdram_hz})
    ux["bound"] = bound({"array": ux["gemm_cycles_per_step"] / hz,
                         "element-wise": ux["vec_cycles_per_step"] / hz,
                         "SDRAM": ux["sdram_s"], "link": ux["link_s"], "host": ux["host_s"]})
    # the fastest the step could be with only the SDRAM's bytes at its peak (the link, the
    # host and the rest of the device hidden)
    ux["floor_images_per_second"] = HYPER["batch_size"] / ux["sdram_s"] \
        if ux["sdram_s"] else None
    res["ulx3s"] = ux
    res["ulx3s_images_per_second"] = ux["images_per_second"]
    res["projections"]["ulx3s-85f"] = measured_row(res["projections"].get("ulx3s-85f", {}), ux)
    res["ulx3s_state_fits"] = bool(fits["device"] and ux["state_in_sdram"])
    res["icebreaker_digits"] = icebreaker_digits(log=log)
    publish(out, "train", res, render(res), docs)
    return res


def render(r):
    acc = markdown_table([{
        "model": f"{r['dataset']} {r['model']}", "epochs": r["epochs"],
        "fp32": r["fp32_test_accuracy"], "ibm4": r["ibm4_test_accuracy"],
        "delta": 100 * (r["ibm4_test_accuracy"] - r["fp32_test_accuracy"]),
        "pure": r["pure4_test_accuracy"],
        "pure_delta": 100 * (r["pure4_test_accuracy"] - r["fp32_test_accuracy"]),
    }], [("model", "model", "{}"), ("epochs", "epochs", "{}"),
         ("fp32 (host) test acc.", "fp32", "{:.4f}"),
         (f"ibm4 (device, emu://: {r['out_grad']}, {r['act']}) test acc.", "ibm4", "{:.4f}"),
         ("Δ (points)", "delta", "{:+.2f}"),
         ("pure 4-bit (fp4 output gradient) test acc.", "pure", "{:.4f}"),
         ("Δ (points)", "pure_delta", "{:+.2f}")])
    names = {"fp4": "one FP4 pair (pure 4-bit)", "fp4x2": "two FP4 terms (default)",
             "host-fp32": "the output layer on the host, fp32"}
    pol = markdown_table([dict(v, policy=names[k], bytes_ratio=v["link_bytes_per_step"]
                               / r["batch_bytes_per_step"])
                          for k, v in r["policies"].items()],
                         [("output-layer gradient", "policy", "{}"),
                          ("device cycles / step", "device_cycles_per_step", "{:,.0f}"),
                          ("link bytes / step", "link_bytes_per_step", "{:,.0f}"),
                          ("link / batch bytes", "bytes_ratio", "{:.3f}"),
                          ("MACs / step", "macs_per_step", "{:,.0f}"),
                          ("MACs not 4-bit", "non_4bit_mac_share", "{:.2%}")])
    step = markdown_table([{
        "sim": f"{r['sim_steps']} steps, {r['sim_seconds']:.0f} s",
        "match": "yes" if r["sim_matches_emu"] else "**NO**",
        "cycles": r["device_cycles_per_step"], "gemm": r["gemm_cycles_per_step"],
        "vec": r["vec_cycles_per_step"], "util": r["array_utilization"],
        "bytes": r["link_bytes_per_step"], "batch": r["batch_bytes_per_step"],
        "ratio": r["link_bytes_ratio"], "host_ratio": r["host_masters"]["link_bytes_ratio"],
        "host_ms": 1e3 * r["host_seconds_per_step"], "share": r["sim_host_share"],
    }], [("simulated device", "sim", "{}"), ("bit-identical to emu://", "match", "{}"),
         (f"device cycles / step ({r['sim_array']})", "cycles", "{:,.0f}"),
         ("of which GEMM", "gemm", "{:,.0f}"), ("element-wise", "vec", "{:,.0f}"),
         ("array utilization in GEMMs", "util", "{:.3f}"),
         ("link bytes / step", "bytes", "{:,.0f}"), ("batch bytes", "batch", "{:,.0f}"),
         ("ratio", "ratio", "{:.3f}"), ("ratio, host masters", "host_ratio", "{:.2f}"),
         ("host ms / step", "host_ms", "{:.1f}"),
         ("host share of a simulated step", "share", "{:.3f}")])
    for p in r["projections"].values():
        p["host_share"] = p["host_s"] / p["step_s"]
    yes = {True: "yes", False: "no"}
    rows = [dict(p, board=name, compute_ms=1e3 * p["compute_s"], link_ms=1e3 * p["link_s"],
                 host_ms=1e3 * p["host_s"], masters=p.get("masters", "device"),
                 fits=f"{yes[p['fits_device_masters']]} / {yes[p['fits_host_masters']]}")
            for name, p in r["projections"].items()]
    proj = markdown_table(rows, [
        ("board", "board", "{}"), ("array", "array", "{}"), ("clock MHz", "clock_mhz", "{:g}"),
        ("clock", "clock", "{}"), ("masters", "masters", "{}"),
        ("link", "link_text", "{}"), ("cycles / step", "device_cycles_per_step", "{:,.0f}"),
        ("compute ms", "compute_ms", "{:.1f}"), ("link ms", "link_ms", "{:.1f}"),
        ("host ms", "host_ms", "{:.1f}"), ("host share", "host_share", "{:.2f}"),
        ("steps/s", "steps_per_second", "{:.2f}"),
        ("images/s", "images_per_second", "{:.0f}"), ("bound", "bound", "{}"),
        ("tensor memory bytes", "memory_bytes", "{:,}"),
        ("model state fits (device / host masters)", "fits", "{}")])
    ux = r.get("ulx3s")
    ulx = ""
    if ux:
        ulx = ("\nThe ULX3S configuration (simulated; its state and the training set in the "
               "SDRAM, each step gathering its batch by index)\n\n") + \
            markdown_table([dict(ux, match="yes" if ux["sim_matches_emu"] else "**NO**",
                                 compute_ms=1e3 * ux["compute_s"], link_ms=1e3 * ux["link_s"],
                                 host_ms=1e3 * ux["host_s"], sdram_ms=1e3 * ux["sdram_s"],
                                 step_ms=1e3 * ux["step_s"],
                                 idle_ms=1e3 * ux.get("device_idle_s", 0.0))], [
                ("array", "array", "{}"), ("scratchpad words", "scratch_words", "{:,}"),
                ("state words (in the SDRAM)", "state_words", "{:,}"),
                ("bit-identical to emu://", "match", "{}"), ("steps", "steps", "{}"),
                ("device cycles / step", "device_cycles_per_step", "{:,.0f}"),
                ("of which GEMM", "gemm_cycles_per_step", "{:,.0f}"),
                ("element-wise", "vec_cycles_per_step", "{:,.0f}"),
                ("SDRAM bytes / step", "sdram_bytes_per_step", "{:,.0f}"),
                ("link bytes / step", "link_bytes_per_step", "{:,.0f}"),
                ("link / batch bytes", "link_bytes_ratio", "{:.3f}"),
                ("training set upload (once) s", "upload_s", "{:.0f}"),
                ("clock MHz", "clock_mhz", "{:g}"), ("clock", "clock", "{}"),
                ("link", "link_text", "{}"), ("compute ms", "compute_ms", "{:.1f}"),
                ("SDRAM MHz", "sdram_mhz", "{:g}"),
                ("SDRAM ms at its peak", "sdram_ms", "{:.1f}"), ("link ms", "link_ms", "{:.1f}"),
                ("host ms", "host_ms", "{:.1f}"),
                ("step ms (replayed: the three overlapping)", "step_ms", "{:.1f}"),
                ("device idle ms", "idle_ms", "{:.1f}"),
                ("steps/s", "steps_per_second", "{:.2f}"),
                ("images/s", "images_per_second", "{:.0f}"),
                ("images/s, the three one after the other", "serial_images_per_second",
                 "{:.0f}"), ("bound", "bound", "{}"),
                ("images/s with only the SDRAM (its peak)", "floor_images_per_second",
                 "{:.0f}")])
        ulx += ("\nIts link bytes a step by command (emu://, wire bytes both ways): "
                + ", ".join(f"{op} {n:,.0f}" for op, n in ux["link_bytes_by_command"].items()
                            if n) + "\n")
        if ux.get("cycles_by_command"):
            ulx += ("\nIts device cycles a step by command (simulated: from a command's first "
                    "load to its last store) and the SDRAM bytes it moved; the SDRAM's "
                    "share is the cycles those bytes take at its peak over the command's "
                    "cycles\n\n") + markdown_table(_by_command(ux), [
                ("command", "op", "{}"), ("device cycles / step", "cycles", "{:,.0f}"),
                ("SDRAM bytes loaded", "load", "{:,.0f}"),
                ("SDRAM bytes stored", "store", "{:,.0f}"),
                ("SDRAM's share", "share", "{:.2f}")])
    ice = r.get("icebreaker_digits")
    if ice:
        ulx += ("\nThe iCEBreaker configuration (simulated: a {array} array, {words:,} words of "
                "SPRAM, the master weights on the {masters}): the {dataset} MLP 64-32-10, "
                "{epochs} epochs, batch {batch_size}\n\n").format(**ice) + markdown_table(
            [dict(ice, match="yes" if ice["sim_matches_emu"] else "**NO**")], [
                ("fp32 (host) test acc.", "fp32_test_accuracy", "{:.4f}"),
                ("ibm4 (simulated iCEBreaker) test acc.", "test_accuracy", "{:.4f}"),
                ("Δ (points)", "delta_points", "{:+.2f}"),
                ("bit-identical to emu://", "match", "{}"), ("steps", "steps", "{}"),
                ("device cycles / step", "device_cycles_per_step", "{:,.0f}"),
                ("link bytes / step", "link_bytes_per_step", "{:,.0f}"),
                ("link / batch bytes", "link_bytes_ratio", "{:.2f}")])
    return (f"Accuracy\n\n{acc}\nThe output layer's gradient, per step (device cycles on "
            f"the simulated {r['sim_array']} device, link bytes on emu://)\n\n{pol}\n"
            f"Per step (batch {r['batch_size']})\n\n{step}\n"
            f"Projected on the boards (batch {r['batch_size']}; a board's row measured on its own "
            f"configuration where one is below)\n\n{proj}{ulx}")


