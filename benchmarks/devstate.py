"""Per-epoch device-state save (x-ignore-shared, migrate fd:) and failover load, at two RAM sizes."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cuju_libvirt.ft_engine.devstate import DeviceStateSaver, SavedState, load_device_state, resume_standby
from cuju_libvirt.rig.guests import boot_image, read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Time the per-epoch device-state save of a stopped boot-sector guest (TCG, direct QMP socket) "
    "at several RAM sizes, with x-ignore-shared toggled per save and kept on, against a bare "
    "stop+cont on the same socket (the baseline); then the failover load into a standby started "
    "with -incoming defer."
)


#: Epochs of one mode before switching to the next (modes interleave to share the same noise).
BLOCK = 10


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
        qmp.events()
        time.sleep(0.003)
    return {"bare": bare, "with_save": with_save, "cont_after_save": cont_after_save, "saves": saves}


def _phases(saves: list[SavedState]) -> dict[str, float]:
    names = ("check", "caps_on", "getfd", "migrate", "drain", "confirm", "caps_off", "total")
    return {
        name: round(statistics.median(getattr(s.timings, name) for s in saves) * 1e3, 3) for name in names
    }


def _failovers(image: Path, memory: int, count: int) -> dict[str, Any]:
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
                name="checkpoint-bsby", memory_mib=memory, disk=image, disk_snapshot=False, incoming=True
            )
            with standby as backup:
                _copy_ram(primary.ram_path, backup.ram_path)
                t0 = time.perf_counter()
                loaded = load_device_state(backup.qmp, blob, qemu_log=backup.stderr_path)
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
        images = [Path(tmp) / "a.img", Path(tmp) / "b.img"]
        for image in images:
            shutil.copyfile(boot_image(), image)
        return _run(args, images)


def _merge(into: dict[str, list[Any]], block: dict[str, list[Any]]) -> None:
    for key, values in block.items():
        into.setdefault(key, []).extend(values)


def _run(args: argparse.Namespace, images: list[Path]) -> dict[str, object]:
    sizes: dict[str, Any] = {}
    for memory in args.memory_mib:
        toggled: dict[str, list[Any]] = {}
        kept: dict[str, list[Any]] = {}
        plain: dict[str, list[Any]] = {}
        guest_a = DirectGuest(name="checkpoint-bench", memory_mib=memory, disk=images[0], disk_snapshot=False)
        guest_b = DirectGuest(
            name="checkpoint-bench-nv",
            memory_mib=memory,
            disk=images[1],
            disk_snapshot=False,
            extra_args=["-machine", "suppress-vmdesc=on"],
        )
        with guest_a as vm_a, guest_b as vm_b:
            for vm in (vm_a, vm_b):
                vm.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=60)
            saver_a = DeviceStateSaver(vm_a.qmp)
            saver_b = DeviceStateSaver(vm_b.qmp)
            # Blocks of each mode in turn, the idle guest paused: all modes see the same noise.
            for _ in range(-(-args.epochs // BLOCK)):
                vm_b.stop()
                _merge(toggled, _epochs(vm_a, saver_a, BLOCK))
                with DeviceStateSaver(vm_a.qmp, keep_ignore_shared=True) as keeper:
                    _merge(kept, _epochs(vm_a, keeper, BLOCK))
                vm_a.stop()
                vm_b.cont()
                _merge(plain, _epochs(vm_b, saver_b, BLOCK))
                vm_a.cont()
            running = vm_a.status() == "running" and vm_b.status() == "running"
        bare = _ms(toggled["bare"] + kept["bare"])
        epoch_toggle = _ms(toggled["with_save"])
        blob_sizes = sorted({len(s.blob) for s in toggled["saves"] + kept["saves"]})
        sizes[str(memory)] = {
            "blob_bytes": blob_sizes[-1],
            "blob_bytes_min": blob_sizes[0],
            "save": _ms([s.timings.total for s in toggled["saves"]]),
            "save_keep_on": _ms([s.timings.total for s in kept["saves"]]),
            "save_no_vmdesc": _ms([s.timings.total for s in plain["saves"]]),
            "blob_bytes_no_vmdesc": max(len(s.blob) for s in plain["saves"]),
            "save_phases_median_ms": _phases(toggled["saves"]),
            "save_phases_median_ms_no_vmdesc": _phases(plain["saves"]),
            "toggle_cost_ms": _ms([s.timings.caps_on + s.timings.caps_off for s in toggled["saves"]])[
                "median_ms"
            ],
            "stop_cont_baseline": bare,
            "epoch_stop_save_cont": epoch_toggle,
            "epoch_stop_save_cont_keep_on": _ms(kept["with_save"]),
            "epoch_stop_save_cont_no_vmdesc": _ms(plain["with_save"]),
            "cont_after_save": _ms(toggled["cont_after_save"] + kept["cont_after_save"]),
            "save_over_baseline_ms": round(epoch_toggle["median_ms"] - bare["median_ms"], 3),
            "guests_running_after": running,
            **_failovers(images[0], memory, args.failovers),
        }
    blobs = [entry["blob_bytes"] for entry in sizes.values()]
    return {
        "epochs": args.epochs,
        "sizes": sizes,
        "blob_bytes_independent_of_ram": max(blobs) == min(blobs),
    }
