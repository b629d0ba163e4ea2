"""Does scraping cujud's exporter lengthen the VM's pause per epoch? With and without, same run."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cuju_libvirt.exporter import CujuCollector, MetricsServer, ProtectedDomains
from cuju_libvirt.rig.replication_load import ReplicationLoad

DESCRIPTION = (
    "Epoch pause median with and without 10 scrapes/s of the exporter, in alternating blocks of "
    "the same run. The exporter serves from the process that runs the epochs (as in cujud); the "
    "scraper is another process (as Prometheus is). Pause source: see 'measured' in the output."
)

TARGET_RATIO = 1.05

#: What each pause source measures; the engine's own pause joins here when it lands.
PAUSE_SOURCES = {
    "replication_load": (
        "ReplicationLoad (cuju_libvirt/rig/replication_load.py): a writer process dirtying a "
        "{mib} MiB shared RAM file is paused with SIGSTOP (waiting until the kernel reports it "
        "stopped), its dirty pages are harvested with the scan tracker and staged with "
        "{devstate} KiB of device state into EpochSender, then it is resumed with SIGCONT; the "
        "pause is SIGSTOP..SIGCONT of every epoch ({epoch_ms} ms epochs, shipped over loopback "
        "TCP to an EpochReceiver and acknowledged). No QEMU and no QMP: the VM's stop/cont and "
        "device-state save are not in it."
    ),
}

SCRAPER = r"""
import json, sys, time, urllib.request
url, hz, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
took = []
end = time.monotonic() + seconds
next_at = time.monotonic()
while time.monotonic() < end:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as r:
        size = len(r.read())
    took.append(time.monotonic() - t0)
    next_at += 1.0 / hz
    time.sleep(max(0.0, next_at - time.monotonic()))
print(json.dumps({"scrapes": len(took), "took": took, "bytes": size}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pause-source", choices=sorted(PAUSE_SOURCES), default="replication_load",
                        help="what produces the epochs whose pause is measured (default replication_load)")
    parser.add_argument("--domains", type=int, default=2,
                        help="replicated domains registered with the exporter (default 2)")
    parser.add_argument("--blocks", type=int, default=8,
                        help="alternating blocks, half with scrapes (default 8)")
    parser.add_argument("--block-seconds", type=float, default=4.0, help="length of one block (default 4)")
    parser.add_argument("--scrape-hz", type=float, default=10.0, help="scrapes per second (default 10)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")
    parser.add_argument("--region-mib", type=int, default=16, help="RAM per domain in MiB (default 16)")


def _ms(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median_ms": round(statistics.median(s) * 1e3, 4),
            "p99_ms": round(s[max(0, -(-len(s) * 99 // 100) - 1)] * 1e3, 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    devstate = 32
    with tempfile.TemporaryDirectory(prefix="exporter-bench-") as tmp:
        loads = [ReplicationLoad(Path(tmp), f"bench{i}", f"00000000-0000-4000-8000-{i:012d}",
                                 epoch_ms=args.epoch_ms, region_mib=args.region_mib,
                                 device_state_bytes=devstate << 10)
                 for i in range(args.domains)]
        domains = ProtectedDomains()
        server = MetricsServer("127.0.0.1", 0, CujuCollector(domains))
        try:
            for load in loads:
                domains.add(load.stats, load.machine)
                load.start()
            time.sleep(1.0)  # warm-up, not measured
            with_scrapes: list[float] = []
            without: list[float] = []
            scrape_times: list[float] = []
            scrapes = 0
            size = 0
            for block in range(args.blocks):
                scraping = block % 2 == 1
                marks = [len(load.pauses) for load in loads]
                if scraping:
                    argv = [sys.executable, "-c", SCRAPER, server.url, str(args.scrape_hz),
                            str(args.block_seconds)]
                    out = subprocess.run(
                        argv, capture_output=True, text=True, check=True, timeout=args.block_seconds + 30)
                    report = json.loads(out.stdout)
                    scrapes += report["scrapes"]
                    scrape_times += report["took"]
                    size = report["bytes"]
                else:
                    time.sleep(args.block_seconds)
                got = [p for load, m in zip(loads, marks, strict=True) for p in load.pauses[m:]]
                (with_scrapes if scraping else without).extend(got)
            errors = [str(load.error) for load in loads if load.error is not None]
        finally:
            with contextlib.ExitStack() as stack:
                stack.callback(server.close)
                for load in loads:
                    stack.callback(load.close)
    if errors:
        raise RuntimeError(f"replication failed during the benchmark: {errors}")
    w, wo = _ms(with_scrapes), _ms(without)
    ratio = w["median_ms"] / wo["median_ms"]
    return {
        "measured": PAUSE_SOURCES[args.pause_source].format(mib=args.region_mib, devstate=devstate,
                                                            epoch_ms=args.epoch_ms),
        "pause_source": args.pause_source,
        "domains": args.domains,
        "epochs_with_scrapes": len(with_scrapes),
        "epochs_without_scrapes": len(without),
        "pause_median_ms_without_scrapes": wo["median_ms"],
        "pause_p99_ms_without_scrapes": wo["p99_ms"],
        "pause_median_ms_with_scrapes": w["median_ms"],
        "pause_p99_ms_with_scrapes": w["p99_ms"],
        "ratio_with_scrapes": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "scrapes": scrapes,
        "scrape_hz": args.scrape_hz,
        "scrape_ms_median": round(statistics.median(scrape_times) * 1e3, 3) if scrape_times else None,
        "scrape_bytes": size,
    }
