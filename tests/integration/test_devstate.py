"""Device-state checkpoints and failover on real QEMU (TCG), judged against ground truth.

A primary runs the boot-sector guest; at each checkpoint it is stopped, its RAM file copied
(standing in for the data plane) and its device state saved, then it runs on. The primary
is SIGKILLed after a random checkpoint; the standby, started with ``-incoming defer``
(and ``-global migration.send-configuration=off``: the blob has no configuration section),
gets that checkpoint's RAM and blob and must continue exactly from there: the counter in
its RAM file and the text on its COM1 pick up where the checkpoint left them.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuju_libvirt.errors import StateError
from cuju_libvirt.ft_engine.devstate import (
    BlobFormatError,
    DevicesChangedError,
    DeviceStateError,
    DeviceStateSaver,
    MachineProfile,
    StandbyMismatchError,
    check_standby,
    compare_machines,
    describe_machine,
    load_device_state,
    resume_standby,
    standby_profile,
    unreplicated_ram,
)
from cuju_libvirt.ft_engine.vmstate import parse_blob
from cuju_libvirt.rig.guests import (
    COUNTER_GPA,
    PAGE_SIZE,
    WriterConfig,
    boot_image,
    read_counter,
    serial_counts,
)
from cuju_libvirt.rig.qemu_direct import DirectGuest
from tests.helpers import wait_counter_above

pytestmark = pytest.mark.timeout(60)

MEMORY_MIB = 16


@dataclass
class Checkpoint:
    epoch: int
    ram: bytes
    blob: bytes
    counter: int
    serial: str


def take_checkpoint(guest: DirectGuest, saver: DeviceStateSaver, epoch: int) -> Checkpoint:
    """Stop, copy RAM, save device state, cont: one epoch as the engine does it."""
    guest.stop()
    ram = guest.read_ram(0, guest.ram_size)
    saved = saver.save()
    assert guest.status() == "paused"
    serial = guest.serial_text()
    counter = struct.unpack_from("<I", ram, COUNTER_GPA)[0]
    guest.cont()
    return Checkpoint(epoch, ram, saved.blob, counter, serial)


def write_ram(guest: DirectGuest, ram: bytes) -> None:
    """Stand-in for the data plane: the committed pages go into the standby's RAM file."""
    fd = os.open(guest.ram_path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, ram, 0) == len(ram)
    finally:
        os.close(fd)


def migration_untouched(guest: DirectGuest) -> bool:
    """No capability on, no migration ever started: what libvirt expects of its QEMU."""
    caps = guest.qmp.execute("query-migrate-capabilities")
    return not any(c["state"] for c in caps) and guest.qmp.execute("query-migrate") == {}


def kill_primary(guest: DirectGuest) -> None:
    os.killpg(guest.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while guest.alive():
        assert time.monotonic() < deadline, "primary survived SIGKILL"
        time.sleep(0.01)


def private_copy(source: Path, directory: Path) -> Path:
    """The cached image, copied: another process opening the shared cache file writable locks us out."""
    target = directory / source.name
    if not target.exists():
        shutil.copyfile(source, target)
    return target


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return private_copy(boot_image(), tmp_path_factory.mktemp("checkpoint-images"))


def standby(name: str, image: Path, memory_mib: int = MEMORY_MIB) -> DirectGuest:
    return DirectGuest(name=name, memory_mib=memory_mib, disk=image, incoming=True)


@pytest.mark.parametrize("seed", [1, 2])
def test_counter_continues_exactly_from_a_random_checkpoint(seed: int, image: Path) -> None:
    rng = random.Random(seed)
    epochs = rng.randint(10, 16)
    with (
        DirectGuest(name="checkpoint-pri", memory_mib=MEMORY_MIB, disk=image) as primary,
        standby("checkpoint-sby", image) as backup,
    ):
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(primary.qmp)
        sizes = set()
        last: Checkpoint | None = None
        for epoch in range(epochs):
            last = take_checkpoint(primary, saver, epoch)
            sizes.add(len(last.blob))
            assert migration_untouched(primary), "a device-state save must not drive migration"
            write_ram(backup, last.ram)
            time.sleep(rng.uniform(0.01, 0.05))
        assert last is not None and last.counter > 0
        # The state moves on past the checkpoint before the primary dies.
        moved_on = wait_counter_above(primary, last.counter + 20)
        kill_primary(primary)
        assert backup.status() == "inmigrate"

        load_device_state(backup.qmp, last.blob, qemu_log=backup.stderr_path)
        assert backup.status() == "paused"
        assert backup.read_ram(0, backup.ram_size) == last.ram
        assert read_counter(backup.ram_path) == last.counter
        resume_standby(backup.qmp)
        assert backup.status() == "running"
        resumed = wait_counter_above(backup, last.counter + 50)
        text = backup.serial_text()
        while len(serial_counts(last.serial + text)) < 30:
            time.sleep(0.02)
            text = backup.serial_text()

    # Blob sizes stay in the ~100s of KB: RAM (16 MiB) is never in the stream.
    assert max(sizes) < 1 << 20
    # Not continued from the later primary value: the standby passed through every value after
    # the checkpoint, which COM1 shows. The checkpoint's COM1 text followed by the standby's is
    # one gapless count: nothing printed twice, nothing lost, continued from the checkpoint.
    counts = serial_counts(last.serial + text)
    assert counts == list(range(1, len(counts) + 1))
    assert counts[-1] > last.counter + 20
    standby_counts = serial_counts("cuju-boot counter\n" + text.split("\n", 1)[1])
    assert standby_counts[0] in (last.counter + 1, last.counter + 2)
    assert standby_counts[0] < moved_on
    assert resumed > last.counter


def test_writer_guest_standby_ram_equals_checkpoint_and_keeps_writing(tmp_path: Path) -> None:
    cfg = WriterConfig(span_pages=2048)  # 8 MiB from 1 MiB
    memory = cfg.min_memory_mib + 1
    image = private_copy(boot_image(cfg), tmp_path)
    with (
        DirectGuest(name="checkpoint-wpri", memory_mib=memory, disk=image) as primary,
        DirectGuest(name="checkpoint-wsby", memory_mib=memory, disk=image, incoming=True) as backup,
    ):
        primary.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(primary.qmp)
        checkpoints = []
        for epoch in range(5):
            checkpoints.append(take_checkpoint(primary, saver, epoch))
            time.sleep(0.05)
        last = checkpoints[-1]
        assert checkpoints[0].ram != last.ram, "the writer must change RAM between checkpoints"
        write_ram(backup, last.ram)
        wait_counter_above(primary, last.counter + 10)
        kill_primary(primary)

        load_device_state(backup.qmp, last.blob, qemu_log=backup.stderr_path)
        at_resume = backup.read_ram(0, backup.ram_size)
        assert at_resume == last.ram
        resume_standby(backup.qmp)
        wait_counter_above(backup, last.counter + 4 * cfg.run_every)
        backup.stop()
        later = backup.read_ram(0, backup.ram_size)
    changed = [
        pfn
        for pfn in cfg.span_pfns()
        if at_resume[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
        != later[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
    ]
    assert len(changed) > cfg.run_pages, "the resumed writer must keep writing its span"
    new_counter = struct.unpack_from("<I", later, COUNTER_GPA)[0]
    for pfn in changed[:200]:
        words = struct.unpack_from(f"<{PAGE_SIZE // 4}I", later, pfn * PAGE_SIZE)
        assert any(last.counter < w <= new_counter for w in words)


def test_blob_size_does_not_grow_with_ram(image: Path) -> None:
    sizes = {}
    for memory in (16, 256):
        with DirectGuest(name="checkpoint-size", memory_mib=memory, disk=image) as guest:
            guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
            guest.stop()
            with DeviceStateSaver(guest.qmp) as saver:
                blob = saver.save().blob
                path = saver.path
            assert not os.path.exists(path), "close() removes the device-state file"
            info = parse_blob(blob)
            assert "globalstate" in [s.name for s in info.sections]
            assert not [s for s in info.sections if s.name == "ram"], "no RAM section at all"
            sizes[memory] = len(blob)
    assert sizes[16] == sizes[256], sizes
    assert sizes[16] < 1 << 17


def test_save_refuses_a_running_vm_and_leaves_no_migration_state(image: Path) -> None:
    with DirectGuest(name="checkpoint-state", memory_mib=MEMORY_MIB, disk=image) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(guest.qmp)
        with pytest.raises(StateError, match="stopped"):
            saver.save()
        assert guest.status() == "running"
        guest.stop()
        first = saver.save()
        second = saver.save()  # no postmigrate: any number of saves per stop/cont cycle
        assert guest.status() == "paused"
        assert first.blob[:8] == second.blob[:8]
        assert migration_untouched(guest)
        guest.cont()
        before = read_counter(guest.ram_path)
        assert wait_counter_above(guest, before) > before
        assert saver.saves == 2
        saver.close()


def test_qemu_refusing_the_save_leaves_the_vm_stopped(image: Path, tmp_path: Path) -> None:
    with DirectGuest(name="checkpoint-blocked", memory_mib=MEMORY_MIB, disk=image) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(guest.qmp, path=tmp_path / "missing-dir" / "state")
        guest.stop()
        with pytest.raises(DeviceStateError, match="missing-dir") as caught:
            saver.save()
        assert caught.value.qemu_message
        assert guest.status() == "paused"
        guest.cont()
        assert guest.status() == "running"


@pytest.mark.parametrize(
    ("args", "block"),
    [
        (["-vga", "std"], "vga.vram"),
        (["-device", "qxl-vga"], "qxl.vram"),
        (["-device", "virtio-vga"], "vga.vram"),
    ],
    ids=["std-vga", "qxl", "virtio-vga"],
)
def test_video_memory_outside_guest_ram_is_refused(image: Path, args: list[str], block: str) -> None:
    with DirectGuest(name="checkpoint-vga", memory_mib=MEMORY_MIB, disk=image, extra_args=args) as guest:
        with pytest.raises(DeviceStateError, match="model type='none'") as caught:
            DeviceStateSaver(guest.qmp)
        assert block in str(caught.value) and "video memory" in str(caught.value)


def test_read_only_blocks_and_ramfb_are_accepted(image: Path) -> None:
    args = ["-device", "ramfb", "-device", "virtio-net-pci,netdev=n0", "-netdev", "user,id=n0"]
    with DirectGuest(name="checkpoint-roms", memory_mib=MEMORY_MIB, disk=image, extra_args=args) as guest:
        profile = describe_machine(guest.qmp)
        names = {name for name, _used, _max in profile.ram_blocks}
        assert {"pc.bios", "pc.rom", "0000:00:02.0/virtio-net-pci.rom"} <= names
        assert unreplicated_ram(profile) == []


def test_a_hot_plugged_device_is_caught_in_the_next_blob(image: Path) -> None:
    with DirectGuest(name="checkpoint-plug", memory_mib=MEMORY_MIB, disk=image) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(guest.qmp)
        guest.stop()
        saver.check_devices(saver.save().blob)
        guest.cont()
        guest.qmp.execute("device_add", {"driver": "i6300esb", "id": "plugged"})
        guest.stop()
        blob = saver.save().blob
        with pytest.raises(DevicesChangedError, match=r"added .*i6300esb") as caught:
            saver.check_devices(blob)
        assert [s.name for s in caught.value.added] == ["0000:00:02.0/i6300esb_wdt"]
        guest.cont()
        saver.close()


@pytest.fixture(scope="module")
def good_checkpoint(image: Path) -> tuple[Checkpoint, MachineProfile]:
    with DirectGuest(name="checkpoint-src", memory_mib=MEMORY_MIB, disk=image) as primary:
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(primary.qmp)
        return take_checkpoint(primary, saver, 0), saver.profile


def test_truncated_blob_is_refused_and_the_standby_still_takes_a_good_one(
    good_checkpoint: tuple[Checkpoint, MachineProfile], image: Path
) -> None:
    ckpt = good_checkpoint[0]
    blob = ckpt.blob
    for cut in (0, 8, 200, len(blob) // 2, len(blob) - 1, *range(9, len(blob) - 1, 37)):
        with pytest.raises(BlobFormatError):
            parse_blob(blob[:cut])
    with standby("checkpoint-trunc", image) as backup:
        write_ram(backup, ckpt.ram)
        with pytest.raises(BlobFormatError, match="truncated"):
            load_device_state(backup.qmp, blob[: len(blob) - 1000])
        assert backup.status() == "inmigrate" and backup.alive()
        load_device_state(backup.qmp, blob)
        resume_standby(backup.qmp)
        assert wait_counter_above(backup, ckpt.counter) > ckpt.counter
        assert "vmdescription" not in backup.stderr_path.read_text(), "the load must not warn"


def test_unverified_truncated_blob_ends_the_standby_with_qemus_reason(
    good_checkpoint: tuple[Checkpoint, MachineProfile], image: Path
) -> None:
    with standby("checkpoint-trunc2", image) as backup:
        blob = good_checkpoint[0].blob
        with pytest.raises(DeviceStateError, match="exited while loading") as caught:
            load_device_state(backup.qmp, blob[: len(blob) // 2], qemu_log=backup.stderr_path, verify=False)
        assert caught.value.qemu_message and "migration" in caught.value.qemu_message
        time.sleep(0.2)
        assert not backup.alive(), "QEMU 7.2 exits on a failed incoming migration"
        assert read_counter(backup.ram_path) == 0, "the standby never ran"


@pytest.mark.parametrize(
    ("memory_mib", "extra", "problem"),
    [
        (2 * MEMORY_MIB, [], "memory backend pc.ram: primary"),
        (
            MEMORY_MIB,
            ["-machine", "pc-i440fx-7.1"],
            "machine type: primary pc-i440fx-7.2, standby pc-i440fx-7.1",
        ),
        (MEMORY_MIB, ["-bios", "/usr/share/seabios/bios.bin"], "RAM block pc.bios"),
    ],
    ids=["ram-size", "machine-type", "firmware"],
)
def test_standby_of_another_machine_config_is_refused_when_pairing(
    good_checkpoint: tuple[Checkpoint, MachineProfile], image: Path, memory_mib: int, extra: list[str],
    problem: str,
) -> None:
    missing = [arg for arg in extra if arg.startswith("/") and not os.path.exists(arg)]
    if missing:
        pytest.skip(f"{missing[0]} not installed (Debian package seabios)")
    ckpt, primary = good_checkpoint
    backup_vm = DirectGuest(
        name="checkpoint-other", memory_mib=memory_mib, disk=image, incoming=True, extra_args=extra
    )
    with backup_vm as backup:
        write_ram(backup, ckpt.ram[: backup.ram_size])
        problems = compare_machines(primary, standby_profile(backup.qmp))
        assert any(problem in p for p in problems), problems
        assert backup.status() == "inmigrate" and backup.alive()
        assert read_counter(backup.ram_path) == ckpt.counter, "the standby must not have run"


def test_standby_that_is_not_waiting_for_state_is_refused(
    good_checkpoint: tuple[Checkpoint, MachineProfile], image: Path
) -> None:
    with DirectGuest(name="checkpoint-paused", memory_mib=MEMORY_MIB, disk=image, paused=True) as other:
        before = other.status()
        with pytest.raises(StandbyMismatchError, match="-incoming defer"):
            check_standby(other.qmp, parse_blob(good_checkpoint[0].blob))
        assert other.status() == before


def test_blob_from_a_machine_with_another_device_is_refused_before_qemu_sees_it(image: Path) -> None:
    with DirectGuest(
        name="checkpoint-dev", memory_mib=MEMORY_MIB, disk=image, extra_args=["-device", "i6300esb"]
    ) as primary:
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        other = take_checkpoint(primary, DeviceStateSaver(primary.qmp), 0)
    assert "0000:00:02.0/i6300esb_wdt" in [s.name for s in parse_blob(other.blob).sections]
    with standby("checkpoint-nodev", image) as backup:
        write_ram(backup, other.ram)
        profile = standby_profile(backup.qmp)
        with pytest.raises(StandbyMismatchError, match=r"i6300esb_wdt.* only on the primary"):
            load_device_state(backup.qmp, other.blob, qemu_log=backup.stderr_path, standby=profile)
        assert backup.alive() and backup.status() == "inmigrate"
        # Unverified, QEMU itself refuses the unknown section, and exits doing so.
        with pytest.raises(DeviceStateError, match="exited while loading") as caught:
            load_device_state(backup.qmp, other.blob, qemu_log=backup.stderr_path, verify=False)
        assert caught.value.qemu_message and "i6300esb" in caught.value.qemu_message
        time.sleep(0.2)
        assert not backup.alive()


def test_the_first_save_is_checked_against_the_standby_sections(image: Path) -> None:
    with (
        DirectGuest(name="checkpoint-fpri", memory_mib=MEMORY_MIB, disk=image,
                    extra_args=["-device", "i6300esb"]) as primary,
        standby("checkpoint-fsby", image) as backup,
    ):
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(primary.qmp, expect_sections=standby_profile(backup.qmp).sections)
        primary.stop()
        with pytest.raises(StandbyMismatchError, match="i6300esb"):
            saver.save()
        primary.cont()
        saver.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3, 23))
def test_counter_failover_soak(seed: int, image: Path) -> None:
    test_counter_continues_exactly_from_a_random_checkpoint(seed, image)
