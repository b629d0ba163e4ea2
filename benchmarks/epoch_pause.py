"""The VM's pause per epoch on a real TCG guest: stop, harvest, gather, device state, cont."""

from __future__ import annotations

import argparse
import mmap
import statistics
import time
from typing import Any

from benchmarks._engine_pause import run_engine
from cuju_libvirt.ft_engine import trackers as T
from cuju_libvirt.ft_engine.devstate import DeviceStateSaver
from cuju_libvirt.rig.guests import WriterConfig, boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Pause per epoch of the memory-writer boot-sector guest (TCG, direct QMP socket): QMP stop, "
    "harvest, gather of the dirty pages into a staging buffer, device-state save "
    "(xen-save-devices-state), QMP cont; per phase. Baseline in the same run: a bare stop+cont "
    "every few epochs."
)

TARGETS = {"uffd": {"median_ms": 8.0, "p99_ms": 20.0}}
PHASES = ("stop", "harvest", "gather", "devstate", "cont")
PAGE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", choices=("uffd", "scan"), default="uffd",
                        help="dirty tracker (default uffd)")
    parser.add_argument("--epochs", type=int, default=300, help="epochs to time (default 300)")
    parser.add_argument("--memory-mib", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--run-ms", type=float, default=20.0,
                        help="how long the guest runs between pauses, in ms (default 20)")
    parser.add_argument("--ratio-mib", type=int, default=4096,
                        help="with --engine: also measure at this RAM size in the same run and report the "
                             "ratio of the medians (default 4096 -> ram_ratio_4g_256m; 0: off)")
    parser.add_argument("--tls", action="store_true",
                        help="with --engine: also run the --memory-mib case over an encrypted FT link "
                             "(AES-256-GCM records) in the same run: median_ms_tls, tls_added_ms")
    parser.add_argument("--tls-rounds", type=int, default=3,
                        help="with --tls: rounds of one plain and one encrypted session, interleaved "
                             "(default 3); tls_added_ci95_ms is their bootstrap interval")
    parser.add_argument("--serial", action="store_true",
                        help="with --engine: also run the --memory-mib case with COM1 a held serial port "
                             "(chardev server cut in every pause) in the same run: median_ms_serial, "
                             "serial_added_ms")
    parser.add_argument("--serial-rounds", type=int, default=3,
                        help="with --serial: rounds of one plain and one held-serial session, interleaved "
                             "(default 3)")
    parser.add_argument("--engine", action="store_true",
                        help="measure the real epoch engine instead (PrimaryEngine + BackupEngine over "
                             "loopback, C gather, pipelined shipping; epoch length = --run-ms)")


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "median_ms": round(statistics.median(s) * 1e3, 3),
        "p99_ms": round(s[max(0, -(-len(s) * 99 // 100) - 1)] * 1e3, 3),
    }


def _gather(ram: memoryview, pages: Any, count: int, staging: memoryview) -> int:
    """Copy the dirty pages, coalescing runs of consecutive indexes, into ``staging``."""
    o = 0
    i = 0
    while i < count:
        start = pages[i]
        j = i + 1
        while j < count and pages[j] == pages[j - 1] + 1:
            j += 1
        n = (j - i) * PAGE
        staging[o:o + n] = ram[start * PAGE:start * PAGE + n]
        o += n
        i = j
    return o


def run(args: argparse.Namespace) -> dict[str, object]:
    if getattr(args, "engine", False):
        return run_engine(args, TARGETS)
    clock = time.perf_counter
    cfg = WriterConfig()
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    totals: list[float] = []
    baseline: list[float] = []
    dirty: list[int] = []
    blob_sizes: list[int] = []
    stopped = {"v": False}
    with DirectGuest(name="trackers-pause", memory_mib=max(args.memory_mib, cfg.min_memory_mib + 1),
                     disk=boot_image(cfg)) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        qmp = g.qmp
        tracker = T.select_tracker(args.tracker, pid=g.pid, ram_path=g.ram_path,
                                   vm_stopped=lambda: stopped["v"])
        saver = DeviceStateSaver(qmp)
        with open(g.ram_path, "rb") as f:
            ram_map = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        ram = memoryview(ram_map)
        staging = memoryview(bytearray(tracker.npages * PAGE))
        out = T.page_buffer(tracker.npages)
        try:
            qmp.execute("stop")
            stopped["v"] = True
            tracker.arm()
            qmp.execute("cont")
            stopped["v"] = False
            for epoch in range(args.epochs):
                time.sleep(args.run_ms / 1e3)
                if epoch % 10 == 9:  # baseline: the bare monitor pause
                    t0 = clock()
                    qmp.execute("stop")
                    qmp.execute("cont")
                    baseline.append(clock() - t0)
                    qmp.events()
                    time.sleep(args.run_ms / 1e3)
                t0 = clock()
                qmp.execute("stop")
                stopped["v"] = True
                t1 = clock()
                h = tracker.harvest(out)
                t2 = clock()
                count = tracker.npages if h.full_resync else h.count
                pages: Any = range(tracker.npages) if h.full_resync else out
                _gather(ram, pages, count, staging)
                t3 = clock()
                saved = saver.save()
                t4 = clock()
                qmp.execute("cont")
                stopped["v"] = False
                t5 = clock()
                qmp.events()
                for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    phases[name].append(dt)
                totals.append(t5 - t0)
                dirty.append(count)
                blob_sizes.append(len(saved.blob))
        finally:
            tracker.close()
            saver.close()
            ram.release()
            ram_map.close()
    total = _stats(totals)
    return {
        "tracker": tracker.name,
        "epochs": len(totals),
        "memory_mib": g.memory_mib,
        "run_ms": args.run_ms,
        "median_ms": total["median_ms"],
        "p99_ms": total["p99_ms"],
        "phases": {name: _stats(v) for name, v in phases.items()},
        "dirty_pages_median": int(statistics.median(dirty)),
        "devstate_bytes_median": int(statistics.median(blob_sizes)),
        "baseline_stop_cont": _stats(baseline),
        "ratio_vs_stop_cont": round(total["median_ms"] / _stats(baseline)["median_ms"], 2),
        "gather": "python (memoryview copies of coalesced runs)",
        "targets": TARGETS,
    }
