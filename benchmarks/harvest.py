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
    "Harvest latency of the uffd and scan trackers on the memory-writer boot-sector guest (TCG) at "
    "several RAM sizes, for epochs of about 100, 1,000 and 10,000 dirty pages. Both trackers are "
    "harvested in the same epochs (same dirty pages); scan is the baseline."
)

TARGETS_MS = {"uffd": {"median_ms_1000_pages": 2.0, "ram_ratio_1g_256m": 1.5}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", choices=("uffd", "scan"), default="uffd",
                        help="tracker whose figures fill the top-level keys (default uffd)")
    parser.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB (default 256,1024)")
    parser.add_argument("--pages", default="100,1000,10000",
                        help="dirty-page counts per epoch to aim for (default 100,1000,10000)")
    parser.add_argument("--samples", type=int, default=15,
                        help="epochs per point with 0.5x-2x the aimed dirty pages (default 15)")


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p90 = s[max(0, -(-len(s) * 9 // 10) - 1)]
    return {"median_ms": round(statistics.median(s), 4), "p90_ms": round(p90, 4)}


def _measure_size(mib: int, targets: list[int], samples: int) -> dict[str, Any]:
    cfg = WriterConfig()
    stopped = {"v": False}

    def vm_stopped() -> bool:
        return stopped["v"]

    result: dict[str, Any] = {"uffd": {}, "scan": {}}
    with DirectGuest(name="trackers-bench", memory_mib=mib, disk=boot_image(cfg)) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        uffd = T.UffdTracker.attach(g.pid, g.ram_path, vm_stopped)
        scan = T.ScanTracker.open(g.ram_path, vm_stopped, nthreads=2)
        try:
            out_u, out_s = T.page_buffer(uffd.npages), T.page_buffer(scan.npages)
            g.stop()
            stopped["v"] = True
            for name, tr in (("uffd", uffd), ("scan", scan)):
                t0 = time.perf_counter()
                tr.arm()
                result[name]["arm_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
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
                    missed_vs_scan += len(set(out_s[:hs.count]) - set(out_u[:hu.count]))
                    if hs.count:
                        rate = 0.5 * rate + 0.5 * hs.count / elapsed
                    if 0.5 * target <= hs.count <= 2 * target and not hu.full_resync:
                        counts.append(hs.count)
                        got["uffd"].append((t1 - t0) * 1e3)
                        got["scan"].append((t2 - t1) * 1e3)
                for name in ("uffd", "scan"):
                    point: dict[str, Any] = {"samples": len(counts), "epochs_tried": tries}
                    if counts:
                        point.update(_stats(got[name]))
                        point["median_pages"] = int(statistics.median(counts))
                    result[name][str(target)] = point
            result["uffd_missed_vs_scan"] = missed_vs_scan
        finally:
            uffd.close()
            scan.close()
            if stopped["v"]:
                g.cont()
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = [int(p) for p in args.pages.split(",")]
    per_size = {str(mib): _measure_size(mib, targets, args.samples) for mib in sizes}
    per_tracker: dict[str, dict[str, Any]] = {
        name: {mib: dict(r[name]) for mib, r in per_size.items()}
        for name in ("uffd", "scan")
    }

    def median_1000(name: str, mib: str) -> float | None:
        point = per_tracker[name].get(mib, {}).get("1000", {})
        return point.get("median_ms")

    out: dict[str, object] = {
        "tracker": args.tracker,
        "per_tracker": per_tracker,
        "uffd_missed_vs_scan": sum(r["uffd_missed_vs_scan"] for r in per_size.values()),
        "sizes_mib": sizes,
        "pages": targets,
        "targets": TARGETS_MS,
    }
    for name in ("uffd", "scan"):
        small, big = median_1000(name, "256"), median_1000(name, "1024")
        prefix = "" if name == args.tracker else f"{name}_"
        out[f"{prefix}median_ms_1000_pages"] = small
        out[f"{prefix}ram_ratio_1g_256m"] = round(big / small, 3) if small and big else None
    primary, other = args.tracker, "scan" if args.tracker == "uffd" else "uffd"
    a, b = median_1000(primary, "256"), median_1000(other, "256")
    out[f"speedup_vs_{other}_1000_pages"] = round(b / a, 2) if a and b else None
    return out
