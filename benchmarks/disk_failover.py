"""Failover of a VM with a writable, served disk, judged by its fsync'd records (issue 8).

Per run (:func:`cuju_libvirt.rig.disk_records.run_with_sigkill`): the Linux test guest appends
fsync'd records to a file on ext4 on its virtio disk (served by the journaling block server,
replicated to host b), reporting each to the observer only after its fsync; SIGKILL of the
primary QEMU at a random moment; after the failover the guest verifies its disk against the
checksums in its RAM, unmounts and halts on host b; host b's replica must be ``e2fsck -fn``
clean and hold every record the observer saw, as a clean prefix. Interleaved with each disk
run, the same rig runs one diskless ``failover_product`` run: the baseline failover time."""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._engine import failover_report
from benchmarks.failover_product import one_run as diskless_run
from cuju_libvirt.rig.cujud import HOOK_NAME, Cujud, cleanup_protected, cujud_pair, write_hook_shim
from cuju_libvirt.rig.disk_records import data_image, run_with_sigkill
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer

DESCRIPTION = __doc__.splitlines()[0]
MAC = "52:54:00:19:08:10"
EPOCH_MS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=20,
                        help="disk runs, each followed by a diskless run (default 20)")


def disk_run(rig: Rig, cujuds: tuple[Cujud, Cujud], guest: LinuxGuest, index: int,
             rng: random.Random) -> dict[str, Any]:
    name = f"bench-dfo{index}"
    try:
        with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs:
            result = run_with_sigkill(rig, guest, obs, cujuds, name, mac=MAC, rng=rng)
        v = result.verdict
        problems = [] if result.ok else [f"verify {result.answer}; fsck_clean {v.fsck_clean}; "
                                         f"clean_prefix {v.clean_prefix}; records_lost {v.records_lost}"]
        return {"ok": result.ok, "failover_ms": result.failover_ms, "problems": problems,
                "fsck_clean": v.fsck_clean, "records_lost": v.records_lost, "records": v.records_on_disk}
    except Exception as err:  # a broken run is a failed run, reported, not the end of the benchmark
        return {"ok": False, "failover_ms": None, "problems": [f"{type(err).__name__}: {err}"],
                "fsck_clean": False, "records_lost": None}
    finally:
        with contextlib.suppress(Exception):
            cleanup_protected(rig, name)
            data_image(rig, name).unlink(missing_ok=True)


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random()
    guest = build_linux_guest()
    disk: list[dict[str, Any]] = []
    diskless: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="disk-failover-bench.") as tmp, \
            Rig(hooks={HOOK_NAME: write_hook_shim(Path(tmp))}) as rig, cujud_pair(rig) as cujuds:
        for i in range(args.runs):
            disk.append(disk_run(rig, cujuds, guest, i, rng))
            diskless.append(diskless_run(rig, cujuds, guest, i, epoch_ms=EPOCH_MS, rng=rng))
    report, baseline = failover_report(disk, EPOCH_MS), failover_report(diskless, EPOCH_MS)
    med, base = report["failover_ms_median"], baseline["failover_ms_median"]
    lost = [r["records_lost"] for r in disk]
    return {
        **report,
        "fsck_clean": sum(1 for r in disk if r["fsck_clean"]),
        "records_lost": None if any(n is None for n in lost) else sum(lost),
        "records_median": sorted(int(r.get("records", 0)) for r in disk)[len(disk) // 2] if disk else None,
        "diskless": baseline,
        "diskless_failover_ms_median": base,
        "added_ms_vs_diskless": None if med is None or base is None else round(float(med) - float(base), 1),
        "target": {"passed": "all", "records_lost": 0,
                   "failover_ms_median": "<= diskless_failover_ms_median + 100"},
    }
