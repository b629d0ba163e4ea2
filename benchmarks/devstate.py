"""Per-epoch device-state save (xen-save-devices-state) and failover load, at two RAM sizes."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cuju_libvirt.ft_engine.devstate import (
    DeviceStateSaver,
    SavedState,
    load_device_state,
    resume_standby,
    standby_profile,
)
from cuju_libvirt.rig.guests import boot_image, read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Time the per-epoch device-state save (xen-save-devices-state into a tmpfs file, read back) "
    "of a stopped boot-sector guest (TCG, direct QMP socket) at several RAM sizes, against a bare "
    "stop+cont on the same socket (the baseline, interleaved); then the failover load into a "
    "standby started with -incoming defer."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epochs", type=int, default=100, help="save cycles per RAM size and mode (default 100)"
    )
    parser.add_argument("--failovers", type=int, default=3, help="standby loads per RAM size (default 3)")
    parser.add_argument(
        "--memory-mib",
        type=int,
        nargs="+",
        default=[256, 1024],
        help="guest RAM sizes in MiB (default 256 1024)",
    )


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
    }


def _copy_ram(src: Path, dst: Path) -> None:
    """Copy the data extents of a (sparse) RAM file in place, without truncating the mapped target."""
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY)
    try:
        size = os.fstat(fd_in).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd_in, offset, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            while start < end:
                start += os.copy_file_range(fd_in, fd_out, end - start, start, start)
            offset = end
    finally:
        os.close(fd_in)
        os.close(fd_out)


def _epochs(guest: DirectGuest, saver: DeviceStateSaver, epochs: int) -> dict[str, Any]:
    """Alternate bare stop+cont and stop+save+cont epochs; return the samples."""
    clock = time.perf_counter
    qmp = guest.qmp
    bare: list[float] = []
    with_save: list[float] = []
    cont_after_save: list[float] = []
    check_devices: list[float] = []
    saves: list[SavedState] = []
    for _ in range(epochs):
        t0 = clock()
        qmp.execute("stop")
        qmp.execute("cont")
        t1 = clock()
        bare.append(t1 - t0)
        time.sleep(0.003)
        t0 = clock()
        qmp.execute("stop")
        saves.append(saver.save())
        t1 = clock()
        qmp.execute("cont")
        t2 = clock()
        with_save.append(t2 - t0)
        cont_after_save.append(t2 - t1)
        saver.check_devices(saves[-1].blob)  # the engine does this after cont, off the pause
        check_devices.append(clock() - t2)
        qmp.events()
        time.sleep(0.003)
    return {"bare": bare, "with_save": with_save, "cont_after_save": cont_after_save, "saves": saves,
            "check_devices": check_devices}


def _phases(saves: list[SavedState]) -> dict[str, float]:
    names = ("check", "save", "read", "total")
    return {
        name: round(statistics.median(getattr(s.timings, name) for s in saves) * 1e3, 3) for name in names
    }


def _failovers(image: Path, standby_image: Path, memory: int, count: int) -> dict[str, Any]:
    """Fail over ``count`` times to a fresh standby. The primary stays alive (paused), and a
    save no longer releases its image lock, so the standby gets a disk copy of its own."""
    load: list[float] = []
    cont: list[float] = []
    total: list[float] = []
    continued = 0
    with DirectGuest(name="checkpoint-bsrc", memory_mib=memory, disk=image, disk_snapshot=False) as primary:
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=60)
        saver = DeviceStateSaver(primary.qmp)
        for _ in range(count):
            primary.stop()
            blob = saver.save().blob
            counter = read_counter(primary.ram_path)
            standby = DirectGuest(
                name="checkpoint-bsby", memory_mib=memory, disk=standby_image, disk_snapshot=False,
                incoming=True,
            )
            with standby as backup:
                _copy_ram(primary.ram_path, backup.ram_path)
                profile = standby_profile(backup.qmp)  # cujud takes it when it creates the standby
                t0 = time.perf_counter()
                loaded = load_device_state(backup.qmp, blob, qemu_log=backup.stderr_path, standby=profile)
                resumed = resume_standby(backup.qmp)
                total.append(time.perf_counter() - t0)
                load.append(loaded.total)
                cont.append(resumed.cont)
                deadline = time.monotonic() + 10
                while read_counter(backup.ram_path) <= counter and time.monotonic() < deadline:
                    time.sleep(0.01)
                continued += read_counter(backup.ram_path) > counter
            primary.cont()
    return {
        "load": _ms(load),
        "cont": _ms(cont),
        "failover_ms_median": _ms(total)["median_ms"],
        "failovers": count,
        "failovers_continued": continued,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp:
        # Private raw copies, used without snapshot=on: a qcow2 overlay makes every cont after a
        # save slower (block devices are re-activated), and the shared cache file may be locked.
        images = [Path(tmp) / "a.img", Path(tmp) / "b.img", Path(tmp) / "c.img"]
        for image in images:
            shutil.copyfile(boot_image(), image)
        return _run(args, images)


def _run(args: argparse.Namespace, images: list[Path]) -> dict[str, object]:
    sizes: dict[str, Any] = {}
    for memory in args.memory_mib:
        guest = DirectGuest(name="checkpoint-bench", memory_mib=memory, disk=images[0], disk_snapshot=False)
        with guest as vm:
            vm.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=60)
            with DeviceStateSaver(vm.qmp) as saver:
                samples = _epochs(vm, saver, args.epochs)
            running = vm.status() == "running"
        bare = _ms(samples["bare"])
        epoch = _ms(samples["with_save"])
        blob_sizes = sorted({len(s.blob) for s in samples["saves"]})
        sizes[str(memory)] = {
            "blob_bytes": blob_sizes[-1],
            "blob_bytes_min": blob_sizes[0],
            "save": _ms([s.timings.total for s in samples["saves"]]),
            "save_phases_median_ms": _phases(samples["saves"]),
            "check_devices": _ms(samples["check_devices"]),
            "stop_cont_baseline": bare,
            "epoch_stop_save_cont": epoch,
            "cont_after_save": _ms(samples["cont_after_save"]),
            "save_over_baseline_ms": round(epoch["median_ms"] - bare["median_ms"], 3),
            "epoch_over_baseline_ratio": round(epoch["median_ms"] / bare["median_ms"], 3),
            "guests_running_after": running,
            **_failovers(images[1], images[2], memory, args.failovers),
        }
    blobs = [entry["blob_bytes"] for entry in sizes.values()]
    return {
        "epochs": args.epochs,
        "sizes": sizes,
        "blob_bytes_independent_of_ram": max(blobs) == min(blobs),
    }
