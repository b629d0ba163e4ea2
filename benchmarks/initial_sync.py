"""A running 1 GiB guest whose RAM is full of non-zero data into FT mode, next to QEMU's live migration."""

from __future__ import annotations

import argparse
import os
import socket
import time

from cuju_libvirt.ft_engine.epoch import PrimaryConfig
from cuju_libvirt.rig.engine_pair import protected_pair
from cuju_libvirt.rig.guests import boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Initial synchronisation of a running guest: the boot-sector counter guest (TCG) with --memory-mib "
    "of RAM that was filled with non-zero data before it booted (every page travels, none is a zero "
    "page), brought into FT mode by PrimaryEngine.start() (all RAM while it runs, tracked rounds, one "
    "stopped round with device state) to a BackupEngine over loopback TCP. Not counted: the backup engine "
    "populating the standby's RAM mapping when it starts (pairing, before the sync; "
    "`standby_populate_seconds_excluded`). Baseline in the same run: "
    "QEMU's own live migration (`migrate tcp:` over loopback, max-bandwidth raised so the default "
    "limit does not decide) of the same running guest into a third QEMU."
)
CHUNK = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mib", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument("--tracker", choices=("uffd", "scan", "auto"), default="uffd")


def fill(path: str, size: int) -> None:
    """Non-zero, page-distinct content in every page of the RAM file."""
    block = bytearray(os.urandom(CHUNK))
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, CHUNK):
            block[0:8] = (off | 1).to_bytes(8, "little")
            os.pwrite(fd, block, off)
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_migration(src: DirectGuest, dst: DirectGuest) -> tuple[float, dict[str, object]]:
    port = free_port()
    dst.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30})
    t0 = time.monotonic()
    src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    while True:
        info = src.qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    if info.get("status") != "completed":
        raise RuntimeError(f"QEMU migration ended {info.get('status')}: {info}")
    ram = info.get("ram", {})
    return seconds, {"downtime_ms": info.get("downtime"), "transferred": ram.get("transferred"),
                     "dirty_sync_count": ram.get("dirty-sync-count")}


def run(args: argparse.Namespace) -> dict[str, object]:
    img = boot_image()
    mib = args.memory_mib
    with (
        DirectGuest(name="eng-ip", memory_mib=mib, disk=img, paused=True) as p,
        DirectGuest(name="eng-is", memory_mib=mib, disk=img, incoming=True) as s,
    ):
        fill(str(p.ram_path), p.ram_size)
        p.cont()
        p.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
        cfg = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker=args.tracker,
                            epoch_ms=20, output_commit=False, tag="eng-sync")
        with protected_pair(p, s, cfg) as pair:
            rep = pair.engine.sync
            zero_pages = pair.engine.counters().get("zero_pages")
            tracker = pair.pstats.snapshot().tracker
            populate_s = pair.backup.populate_s
        assert p.status() == "running"
        with DirectGuest(name="eng-im", memory_mib=mib, disk=img, incoming=True, full_migration=True) as m:
            qemu_s, qemu_info = qemu_migration(p, m)
    return {
        "seconds": round(rep.seconds, 3),
        "qemu_migration_seconds": round(qemu_s, 3),
        "ratio_vs_qemu": round(rep.seconds / qemu_s, 3),
        "memory_mib": mib,
        "tracker": tracker,
        "rounds": rep.rounds,
        "round_pages": rep.round_pages,
        "pages_sent": rep.pages_sent,
        "zero_pages_sent": zero_pages,
        "final_pause_ms": round(rep.final_pause_s * 1e3, 2),
        "standby_populate_seconds_excluded": round(populate_s, 3),
        "qemu": qemu_info,
        "target": {"seconds": 1.5},
    }
