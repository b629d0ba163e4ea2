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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from cuju_libvirt.cujud.exporter import CujuCollector, MetricsServer, ProtectedDomains
from cuju_libvirt.ft_engine.epoch import PrimaryConfig
from cuju_libvirt.rig.engine_pair import Pair, protected_pair
from cuju_libvirt.rig.guests import WriterConfig, boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest
from cuju_libvirt.rig.replication_load import ReplicationLoad

DESCRIPTION = (
    "Epoch pause median with and without 10 scrapes/s of the exporter, in alternating blocks of "
    "the same run. The exporter serves from the process that runs the epochs (as in cujud); the "
    "scraper is another process (as Prometheus is). Pause source: see 'measured' in the output."
)

TARGET_RATIO = 1.05
#: Device state per epoch of the replication_load source (KiB).
DEVSTATE_KIB = 32

#: What each pause source measures.
PAUSE_SOURCES = {
    "engine": (
        "The epoch engine's pause (PrimaryEngine.times.pause: QMP stop .. cont on a direct QMP "
        "socket, with harvest ({tracker} tracker), gather and device-state save) of the "
        "memory-writer boot-sector guest ({mib} MiB, TCG) protected by PrimaryEngine + "
        "BackupEngine over a loopback FT link (cuju_libvirt/rig/engine_pair.py), {epoch_ms} ms "
        "epochs, output commit off; its DomainStats and FT machine registered with the exporter."
    ),
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
    parser.add_argument("--pause-source", choices=sorted(PAUSE_SOURCES), default="engine",
                        help="what produces the epochs whose pause is measured: 'engine' (a TCG guest "
                             "protected by the epoch engine; default) or 'replication_load' (no VM)")
    parser.add_argument("--domains", type=int, default=2,
                        help="replicated domains registered with the exporter, replication_load only "
                             "(default 2; the engine source protects one guest)")
    parser.add_argument("--tracker", choices=("auto", "uffd", "scan"), default="uffd",
                        help="dirty tracker of the engine source (default uffd, the one production prefers)")
    parser.add_argument("--memory-mib", type=int, default=128, help="guest RAM, engine source (default 128)")
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


class _Source(Protocol):
    """Epochs running in this process; ``pauses()`` is the list of every epoch's pause so far."""

    def pauses(self) -> list[float]: ...
    def errors(self) -> list[str]: ...


class _LoadSource:
    def __init__(self, loads: list[ReplicationLoad]) -> None:
        self.loads = loads

    def pauses(self) -> list[float]:
        return [p for load in self.loads for p in load.pauses]

    def errors(self) -> list[str]:
        return [str(load.error) for load in self.loads if load.error is not None]


@contextlib.contextmanager
def _replication_load(args: argparse.Namespace, domains: ProtectedDomains, tmp: Path) -> Iterator[_Source]:
    with contextlib.ExitStack() as stack:
        loads = []
        for i in range(args.domains):
            load = ReplicationLoad(tmp, f"bench{i}", f"00000000-0000-4000-8000-{i:012d}",
                                   epoch_ms=args.epoch_ms, region_mib=args.region_mib,
                                   device_state_bytes=DEVSTATE_KIB << 10)
            stack.callback(load.close)
            loads.append(load)
            domains.add(load.stats, load.machine)
            load.start()
        yield _LoadSource(loads)


class _EngineSource:
    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def pauses(self) -> list[float]:
        return list(self.pair.engine.times.pause)

    def errors(self) -> list[str]:
        if self.pair.engine.running:
            return []
        return [f"engine stopped in state {self.pair.pmachine.state.value}"]


@contextlib.contextmanager
def _engine(args: argparse.Namespace, domains: ProtectedDomains, tmp: Path) -> Iterator[_Source]:
    cfg = WriterConfig()
    mib = max(args.memory_mib, cfg.min_memory_mib + 1)
    img = boot_image(cfg)
    with (
        DirectGuest(name="exporter-bp", memory_mib=mib, disk=img) as p,
        DirectGuest(name="exporter-bs", memory_mib=mib, disk=img, incoming=True) as s,
    ):
        p.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        pc = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker=args.tracker,
                           epoch_ms=args.epoch_ms, output_commit=False, tag="exporter-bench")
        with protected_pair(p, s, pc) as pair:
            pair.pstats.epoch_ms = args.epoch_ms
            domains.add(pair.pstats, pair.pmachine)
            yield _EngineSource(pair)


def run(args: argparse.Namespace) -> dict[str, Any]:
    source_of = {"replication_load": _replication_load, "engine": _engine}[args.pause_source]
    with tempfile.TemporaryDirectory(prefix="exporter-bench-") as tmp:
        domains = ProtectedDomains()
        server = MetricsServer("127.0.0.1", 0, CujuCollector(domains))
        try:
            with source_of(args, domains, Path(tmp)) as source:
                time.sleep(1.0)  # warm-up (the first epochs after the sync carry its tail), not measured
                with_scrapes: list[float] = []
                without: list[float] = []
                scrape_times: list[float] = []
                scrapes = 0
                size = 0
                for block in range(args.blocks):
                    scraping = block % 2 == 1
                    mark = len(source.pauses())
                    if scraping:
                        argv = [sys.executable, "-c", SCRAPER, server.url, str(args.scrape_hz),
                                str(args.block_seconds)]
                        out = subprocess.run(argv, capture_output=True, text=True, check=True,
                                             timeout=args.block_seconds + 30)
                        report = json.loads(out.stdout)
                        scrapes += report["scrapes"]
                        scrape_times += report["took"]
                        size = report["bytes"]
                    else:
                        time.sleep(args.block_seconds)
                    (with_scrapes if scraping else without).extend(source.pauses()[mark:])
                errors = source.errors()
                tracker = ",".join(sorted({s.tracker for s in domains.snapshots()}))
                registered = len(domains)
        finally:
            server.close()
    if errors:
        raise RuntimeError(f"replication failed during the benchmark: {errors}")
    w, wo = _ms(with_scrapes), _ms(without)
    ratio = w["median_ms"] / wo["median_ms"]
    mib = args.memory_mib if args.pause_source == "engine" else args.region_mib
    return {
        "measured": PAUSE_SOURCES[args.pause_source].format(
            mib=mib, devstate=DEVSTATE_KIB, epoch_ms=args.epoch_ms, tracker=tracker),
        "pause_source": args.pause_source,
        "tracker": tracker,
        "domains": registered,
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
