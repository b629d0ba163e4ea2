"""Guest throughput in FT mode over unprotected, like with like, for a cpu and a memory workload."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

from benchmarks._engine import NETNS, SUBNET, add_epoch_ms_argument, config, linux_pair
from cuju_libvirt.ft_engine.devstate import DeviceStateSaver
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair
from cuju_libvirt.rig.linux_guest import parse_serial
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Throughput of the Linux test guest under FT (the real engine, no output commit: the workloads "
    "send nothing) against the same guest unprotected, measured by the host's clock, for two "
    "workloads: cpu (compute-bound, a few dirty pages per epoch) and mem (one word per 4 KiB page over "
    "--stress-mb MiB: every epoch dirties all of it). Phases per workload: before anything, after "
    "bare stop/cont cycles, after one device-state save (the baseline: both it and FT come after a "
    "save), FT, and unprotected again after FT. ratio_<workload> = FT / mean(baseline, after)."
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


def _progress(guest: DirectGuest, w: Workload) -> int:
    reports = [r for r in parse_serial(guest.serial_text(), w.source) if w.key in r]
    return int(reports[-1][w.key]) if reports else 0


def rates(guest: DirectGuest, w: Workload, seconds: float) -> list[float]:
    """Progress units per second of the *host's* clock, one sample per second: the guest's own
    clock stops while the VM is paused, so a rate it reported would overstate FT."""
    out = []
    t0, p0 = time.monotonic(), _progress(guest, w)
    end = t0 + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        t1, p1 = time.monotonic(), _progress(guest, w)
        out.append((p1 - p0) / (t1 - t0))
        t0, p0 = t1, p1
    return out


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def _one(args: argparse.Namespace, name: str, w: Workload) -> dict[str, Any]:
    with (
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, w.mode, **w.params) as (p, s),
    ):
        assert s is not None
        p.wait_serial(w.ready, timeout=60)
        phases: dict[str, list[float]] = {"before_any_pause": rates(p, w, args.seconds)}
        for _ in range(20):  # does a bare pause change the guest's speed?
            p.qmp.execute("stop")
            p.qmp.execute("cont")
        phases["after_stop_cont"] = rates(p, w, args.seconds)
        # One device-state save, as every FT epoch does: the baseline then comes after one too.
        saver = DeviceStateSaver(p.qmp)
        p.qmp.execute("stop")
        try:
            saver.save()
        finally:
            p.qmp.execute("cont")
            saver.close()
        phases["baseline"] = rates(p, w, args.seconds)
        with protected_pair(p, s, config(p, args.epoch_ms, None, output=False)) as pair:
            phases["ft"] = rates(p, w, args.seconds)
            pause_ms = pair.engine.times.median_ms()
            dirty = pair.pstats.snapshot().dirty_pages
            epochs = pair.engine.epochs
        phases["after_ft"] = rates(p, w, args.seconds)
    med = {k: _median(v) for k, v in phases.items()}
    unprotected = [m for m in (med["baseline"], med["after_ft"]) if m]
    base = statistics.mean(unprotected) if unprotected else None
    return {
        "ratio": round(med["ft"] / base, 3) if base and med["ft"] is not None else None,
        "rate_median": med,
        "unit": f"{w.key} per second (host clock)",
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "dirty_pages_mean": round(dirty.total / dirty.count) if dirty.count else None,
        "tcg_effect": {  # >1: the guest ran faster after that event than before anything
            "after_stop_cont_vs_before": _ratio(med["after_stop_cont"], med["before_any_pause"]),
            "after_save_vs_before": _ratio(med["baseline"], med["before_any_pause"]),
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
    if "ratio_cpu" in out and target is not None:
        out["meets_ratio_cpu_target"] = out["ratio_cpu"] is not None and float(out["ratio_cpu"]) >= target
    out.update({"workloads": per, "epoch_ms": args.epoch_ms, "stress_mb": args.stress_mb, "targets": TARGETS})
    return out
