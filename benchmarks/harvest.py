"""Harvest latency of the dirty trackers against dirty pages and RAM size, on a real TCG guest."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from cuju_libvirt.ft_engine import trackers as T
from cuju_libvirt.rig.guests import WriterConfig, boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Harvest latency of the uffd tracker (sync and async mode) and of the scan tracker on the "
    "memory-writer boot-sector guest (TCG) at several RAM sizes, for epochs of about 100, 1,000 and "
    "10,000 dirty pages. scan is harvested in the same epochs as each uffd mode (same dirty pages): it "
    "is the baseline and the ground truth (every page it saw change must be in the uffd harvest)."
)

#: Names in per_tracker: the uffd tracker per mode, and scan.
TRACKERS = {"uffd_sync": "sync", "uffd_async": "async"}
TARGETS_MS = {name: {"median_ms_1000_pages": 2.0, "ram_ratio_4g_256m": 1.5} for name in TRACKERS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", choices=(*TRACKERS, "scan"), default="uffd_sync",
                        help="tracker whose figures fill the top-level keys (default uffd_sync)")
    parser.add_argument("--modes", default="sync,async", help="uffd modes to measure (default sync,async)")
    parser.add_argument("--sizes", default="256,1024,4096",
                        help="guest RAM sizes in MiB (default 256,1024,4096)")
    parser.add_argument("--pages", default="100,1000,10000",
                        help="dirty-page counts per epoch to aim for (default 100,1000,10000)")
    parser.add_argument("--samples", type=int, default=15,
                        help="epochs per point with 0.5x-2x the aimed dirty pages (default 15)")


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p90 = s[max(0, -(-len(s) * 9 // 10) - 1)]
    return {"median_ms": round(statistics.median(s), 4), "p90_ms": round(p90, 4)}


def _measure_size(mib: int, targets: list[int], samples: int, modes: list[str]) -> dict[str, Any]:
    cfg = WriterConfig()
    stopped = {"v": False}

    def vm_stopped() -> bool:
        return stopped["v"]

    result: dict[str, Any] = {"scan": {}}
    with DirectGuest(name="trackers-bench", memory_mib=mib, disk=boot_image(cfg)) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        scan = T.ScanTracker.open(g.ram_path, vm_stopped, nthreads=2)
        try:
            out_s = T.page_buffer(scan.npages)
            g.stop()
            stopped["v"] = True
            t0 = time.perf_counter()
            scan.arm()
            result["scan"]["arm_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            for mode in modes:
                name = f"uffd_{mode}"
                result[name] = _measure_mode(g, scan, out_s, mode, stopped=stopped, targets=targets,
                                             samples=samples, scan_result=result["scan"])
        finally:
            scan.close()
            if stopped["v"]:
                g.cont()
    return result


def _measure_mode(g: DirectGuest, scan: T.Tracker, out_s: Any, mode: str, *, stopped: dict[str, bool],
                  targets: list[int], samples: int, scan_result: dict[str, Any]) -> dict[str, Any]:
    """One uffd mode against scan on guest ``g`` (stopped on entry and on return)."""
    res: dict[str, Any] = {}
    uffd = T.UffdTracker.attach(g.pid, g.ram_path, lambda: stopped["v"], mode=mode)  # type: ignore[arg-type]
    try:
        out_u = T.page_buffer(uffd.npages)
        t0 = time.perf_counter()
        uffd.arm()
        res["arm_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        scan.harvest(out_s)  # both start from the same moment
        rate = 40_000.0  # pages/s; corrected after every epoch
        missed_vs_scan = 0
        for target in targets:
            got: dict[str, list[float]] = {"uffd": [], "scan": []}
            counts: list[int] = []
            tries = 0
            while len(counts) < samples and tries < samples * 6:
                tries += 1
                run_s = min(max(target / rate, 0.0005), 2.0)
                stopped["v"] = False
                g.cont()
                t_run = time.perf_counter()
                time.sleep(run_s)
                g.stop()
                elapsed = time.perf_counter() - t_run
                stopped["v"] = True
                t0 = time.perf_counter()
                hu = uffd.harvest(out_u)
                t1 = time.perf_counter()
                hs = scan.harvest(out_s)
                t2 = time.perf_counter()
                uffd.settle()
                if not hu.full_resync:
                    missed_vs_scan += len(set(out_s[:hs.count]) - set(out_u[:hu.count]))
                if hs.count:
                    rate = 0.5 * rate + 0.5 * hs.count / elapsed
                if 0.5 * target <= hs.count <= 2 * target and not hu.full_resync:
                    counts.append(hs.count)
                    got["uffd"].append((t1 - t0) * 1e3)
                    got["scan"].append((t2 - t1) * 1e3)
            for name, into in (("uffd", res), ("scan", scan_result.setdefault(f"with_{mode}", {}))):
                point: dict[str, Any] = {"samples": len(counts), "epochs_tried": tries}
                if counts:
                    point.update(_stats(got[name]))
                    point["median_pages"] = int(statistics.median(counts))
                into[str(target)] = point
        res["missed_vs_scan"] = missed_vs_scan
        stats = uffd.stats()
        res["faults"] = stats["faults"]
        res["reprotected"] = stats["reprotected"]
    finally:
        uffd.close()
    return res


def run(args: argparse.Namespace) -> dict[str, object]:
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = [int(p) for p in args.pages.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if f"uffd_{m}" not in TRACKERS:
            raise SystemExit(f"--modes: unknown uffd mode {m!r}; choose from {', '.join(TRACKERS.values())}")
    per_size = {str(mib): _measure_size(mib, targets, args.samples, modes) for mib in sizes}
    names = [f"uffd_{m}" for m in modes] + ["scan"]
    per_tracker: dict[str, dict[str, Any]] = {
        name: {mib: dict(r[name]) for mib, r in per_size.items() if name in r} for name in names
    }

    def median_1000(name: str, mib: str) -> float | None:
        point = per_tracker.get(name, {}).get(mib, {}).get("1000", {})
        value = point.get("median_ms")
        if value is None and name == "scan":  # scan's figures from the first uffd mode's epochs
            point = per_tracker["scan"].get(mib, {}).get(f"with_{modes[0]}", {}).get("1000", {})
            value = point.get("median_ms")
        return value

    out: dict[str, object] = {
        "tracker": args.tracker,
        "per_tracker": per_tracker,
        "missed_vs_scan": {name: sum(r[name]["missed_vs_scan"] for r in per_size.values())
                           for name in names if name != "scan"},
        "sizes_mib": sizes,
        "pages": targets,
        "targets": TARGETS_MS,
    }
    for name in names:
        small = median_1000(name, "256")
        prefix = "" if name == args.tracker else f"{name}_"
        out[f"{prefix}median_ms_1000_pages"] = small
        for key, mib in (("ram_ratio_1g_256m", "1024"), ("ram_ratio_4g_256m", "4096")):
            big = median_1000(name, mib)
            out[f"{prefix}{key}"] = round(big / small, 3) if small and big else None
    a, b = median_1000(args.tracker, "256"), median_1000("scan", "256")
    if args.tracker != "scan":
        out["speedup_vs_scan_1000_pages"] = round(b / a, 2) if a and b else None
    return out
