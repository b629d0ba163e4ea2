"""Guest throughput in FT mode over unprotected, like with like, for a cpu and a memory workload."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from benchmarks._engine import NETNS, SUBNET, add_epoch_ms_argument, config, linux_pair
from cuju_libvirt.ft_engine.devstate import DeviceStateSaver
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair, scratch_counter_dir
from cuju_libvirt.rig.linux_guest import kernel_cmdline, parse_serial
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Throughput of the Linux test guest under FT (the real engine, no output commit: the workloads "
    "send nothing) against unprotected, measured by the host's clock, for two workloads: cpu "
    "(compute-bound, a few dirty pages per epoch) and mem (one word per 4 KiB page over --stress-mb "
    "MiB: every epoch dirties all of it). A twin guest (same kernel, workload and size, never "
    "protected) runs alongside and is measured in the same seconds, so a load change on the host "
    "hits both alike; with 2+ cores each guest is pinned to a core of its own and the cores swap "
    "every second (ratio_by_placement: the ratio in each placement). Phases per workload: "
    "before anything, after bare stop/cont cycles, after one "
    "device-state save (calibration: both unprotected), FT, after FT. ratio_<workload> = "
    "(FT guest / twin during FT) / (guest / twin during calibration)."
)
TARGETS = {"ratio_cpu": {"20": 0.9, "5": 0.75}}


@dataclass(frozen=True)
class Workload:
    mode: str
    source: str  # serial report source
    key: str  # cumulative progress counter in its reports
    params: dict[str, int]
    ready: str  # serial line proving it runs


def _workloads(stress_mb: int) -> dict[str, Workload]:
    return {
        "cpu": Workload("cpu", "cpu", "iters", {"report_ms": 50}, r"cuju-cpu: iters="),
        "mem": Workload("stress", "stress", "pass", {"stress_mb": stress_mb, "report_ms": 50},
                        r"cuju-stress: pass="),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per phase (default 6)")
    add_epoch_ms_argument(parser)
    parser.add_argument("--stress-mb", type=int, default=32,
                        help="MiB the mem workload writes over (default 32)")
    parser.add_argument("--workloads", default="cpu,mem", help="workloads to run (default cpu,mem)")
    parser.add_argument("--epoch-policy", choices=("output", "fixed"), default="fixed",
                        help="the engine's epoch policy (default fixed: an epoch every --epoch-ms; "
                             "output: output commit on, and a guest that sends nothing pauses every "
                             "--max-epoch-ms)")
    parser.add_argument("--max-epoch-ms", type=int, default=100,
                        help="with --epoch-policy output: the longest epoch (default 100)")


def _progress(guest: DirectGuest, w: Workload) -> int:
    reports = [r for r in parse_serial(guest.serial_text(), w.source) if w.key in r]
    return int(reports[-1][w.key]) if reports else 0


def _pin(pid: int, cpu: int | None) -> None:
    """Put every thread of process ``pid`` on ``cpu`` (None: on all the host's cores)."""
    cpus = set(range(os.cpu_count() or 1)) if cpu is None else {cpu}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def rates(guests: list[DirectGuest], w: Workload, seconds: float) -> list[list[float]]:
    """Per guest, progress units per second of the *host's* clock, one sample per second, all
    guests over the same seconds: the guest's own clock stops while the VM is paused, so a rate
    it reported would overstate FT.

    With as many cores as guests, each guest has a core of its own during a sample and the
    cores rotate between samples: the guests never compete for one core (a vCPU thread that
    sleeps in every pause would otherwise win the scheduler's favour from its twin: sample
    ``i`` puts guest ``k`` on core ``(k + i) % cores``), and each sees every core's other load
    equally often. Even samples and odd ones are the two placements."""
    cores = os.cpu_count() or 1
    pinned = cores >= len(guests) > 1
    out: list[list[float]] = [[] for _ in guests]
    i = 0
    try:
        while True:
            if pinned:
                for k, g in enumerate(guests):
                    _pin(g.pid, (k + i) % cores)
                time.sleep(0.1)  # the threads move
            t0, p0 = time.monotonic(), [_progress(g, w) for g in guests]
            time.sleep(1.0)
            t1, p1 = time.monotonic(), [_progress(g, w) for g in guests]
            for k in range(len(guests)):
                out[k].append((p1[k] - p0[k]) / (t1 - t0))
            i += 1
            if i >= max(2, round(seconds)):
                return out
    finally:
        if pinned:
            for g in guests:
                with contextlib.suppress(OSError):
                    _pin(g.pid, None)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def _twin(guest: DirectGuest, w: Workload) -> DirectGuest:
    """An unprotected guest like ``guest`` (same kernel, workload and size; no NIC)."""
    return DirectGuest(name="eng-twin", memory_mib=guest.memory_mib, kernel=guest.kernel,
                       initrd=guest.initrd, append=kernel_cmdline(w.mode, **w.params))


def _one(args: argparse.Namespace, name: str, w: Workload) -> dict[str, Any]:
    with (
        contextlib.ExitStack() as stack,
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, w.mode, **w.params) as (p, s),
        _twin(p, w) as twin,
    ):
        assert s is not None
        p.wait_serial(w.ready, timeout=60)
        twin.wait_serial(w.ready, timeout=120)
        pair_rates: dict[str, list[list[float]]] = {"before_any_pause": rates([p, twin], w, args.seconds)}
        for _ in range(20):  # does a bare pause change the guest's speed?
            p.qmp.execute("stop")
            p.qmp.execute("cont")
        pair_rates["after_stop_cont"] = rates([p, twin], w, args.seconds)
        # One device-state save, as every FT epoch does: calibration then comes after one too.
        saver = DeviceStateSaver(p.qmp)
        p.qmp.execute("stop")
        try:
            saver.save()
        finally:
            p.qmp.execute("cont")
            saver.close()
        pair_rates["calibration"] = rates([p, twin], w, args.seconds)
        if args.epoch_policy == "output":  # ends on held output: needs output commit with a counter
            counters = stack.enter_context(scratch_counter_dir())
            cfg = config(p, args.epoch_ms, counters)
        else:
            cfg = config(p, args.epoch_ms, None, output=False)
        cfg.epoch_policy, cfg.max_epoch_ms = args.epoch_policy, args.max_epoch_ms
        with protected_pair(p, s, cfg) as pair:
            times = pair.engine.times
            n_before, g_before, t_ft = len(times.pause), len(times.guest), time.monotonic()
            pair_rates["ft"] = rates([p, twin], w, args.seconds)
            ft_wall_s = time.monotonic() - t_ft
            # what the guest saw stopped (QEMU's STOP..RESUME); None if the window was trimmed
            paused_s = sum(times.guest[g_before:]) if len(times.pause) >= n_before else None
            pause_ms = pair.engine.times.median_ms()
            dirty = pair.pstats.snapshot().dirty_pages
            epochs = pair.engine.epochs
        pair_rates["after_ft"] = rates([p, twin], w, args.seconds)
    med = {k: _median(v[0]) for k, v in pair_rates.items()}
    twin_med = {k: _median(v[1]) for k, v in pair_rates.items()}
    # Per second, guest over twin: both saw the same host load in that second.
    per_second = {k: [a / b if b else None for a, b in zip(v[0], v[1], strict=True)]
                  for k, v in pair_rates.items()}
    rel = {k: _median([x for x in v if x is not None]) for k, v in per_second.items()}
    calib, ft = rel["calibration"], rel["ft"]
    # The two core placements alternate by second: the ratio in each, and their spread.
    by_placement = [_ratio(_median([x for x in per_second["ft"][j::2] if x is not None]),
                           _median([x for x in per_second["calibration"][j::2] if x is not None]))
                    for j in (0, 1)]
    return {
        "ratio": round(ft / calib, 3) if ft is not None and calib else None,
        "ratio_by_placement": by_placement,
        # The most FT can give: the share of wall-clock time the VM ran (the pauses QEMU's
        # STOP/RESUME events stamp taken out). A ratio well above it is the scheduler's doing.
        "ratio_bound_from_pauses": None if paused_s is None else round(1 - paused_s / ft_wall_s, 3),
        "rate_median": med,
        "twin_rate_median": twin_med,
        "guest_over_twin": rel,
        "unit": f"{w.key} per second (host clock)",
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "dirty_pages_mean": round(dirty.total / dirty.count) if dirty.count else None,
        "tcg_effect": {  # guest/twin after that event over guest/twin before anything (1: none)
            "after_stop_cont_vs_before": _ratio(rel["after_stop_cont"], rel["before_any_pause"]),
            "after_save_vs_before": _ratio(rel["calibration"], rel["before_any_pause"]),
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(args: argparse.Namespace) -> dict[str, object]:
    loads = _workloads(args.stress_mb)
    names = [n for n in args.workloads.split(",") if n]
    for n in names:
        if n not in loads:
            raise SystemExit(f"--workloads: unknown workload {n!r}; choose from {', '.join(loads)}")
    per = {n: _one(args, n, loads[n]) for n in names}
    out: dict[str, object] = {f"ratio_{n}": r["ratio"] for n, r in per.items()}
    target = TARGETS["ratio_cpu"].get(str(args.epoch_ms))
    if "ratio_cpu" in out and target is not None and args.epoch_policy == "fixed":
        out["meets_ratio_cpu_target"] = out["ratio_cpu"] is not None and float(out["ratio_cpu"]) >= target
    out.update({"workloads": per, "epoch_ms": args.epoch_ms, "epoch_policy": args.epoch_policy,
                "max_epoch_ms": args.max_epoch_ms, "stress_mb": args.stress_mb, "targets": TARGETS})
    return out
