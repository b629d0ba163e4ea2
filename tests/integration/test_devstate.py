"""Device-state checkpoints and failover on real QEMU (TCG), judged against ground truth.

A primary runs the boot-sector guest; at each checkpoint it is stopped, its RAM file copied
(standing in for the data plane) and its device state saved, then it runs on. The primary
is SIGKILLed after a random checkpoint; the standby, started with ``-incoming defer``,
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
    DeviceStateError,
    DeviceStateSaver,
    StandbyMismatchError,
    check_standby,
    load_device_state,
    resume_standby,
)
from cuju_libvirt.ft_engine.vmstate import IGNORE_SHARED, parse_blob
from cuju_libvirt.qmp import QMPError
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
    assert guest.status() == "postmigrate"
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


def ignore_shared_on(guest: DirectGuest) -> bool:
    caps = guest.qmp.execute("query-migrate-capabilities")
    return any(c["capability"] == IGNORE_SHARED and c["state"] for c in caps)


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
            assert not ignore_shared_on(primary), "x-ignore-shared must be off between saves"
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
            info = parse_blob(blob, devices=True)
            assert {b.name: b.length for b in info.ram_blocks}["pc.ram"] == memory << 20
            sizes[memory] = len(blob)
    # Only the RAM block list differs (its length field); the stream is the same size.
    assert sizes[16] == sizes[256], sizes
    assert sizes[16] < 1 << 20


def test_save_refuses_a_running_vm_and_a_second_save_in_one_cycle(image: Path) -> None:
    with DirectGuest(name="checkpoint-state", memory_mib=MEMORY_MIB, disk=image) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(guest.qmp)
        with pytest.raises(StateError, match="stopped"):
            saver.save()
        assert guest.status() == "running"
        assert not ignore_shared_on(guest)
        guest.stop()
        saver.save()
        with pytest.raises(StateError, match="already saved"):
            saver.save()
        assert guest.status() == "postmigrate"
        guest.cont()
        before = read_counter(guest.ram_path)
        assert wait_counter_above(guest, before) > before
        assert saver.saves == 1


def test_keep_ignore_shared_mode_turns_it_off_at_close(image: Path) -> None:
    with DirectGuest(name="checkpoint-keep", memory_mib=MEMORY_MIB, disk=image) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        with DeviceStateSaver(guest.qmp, keep_ignore_shared=True) as saver:
            for _ in range(3):
                guest.stop()
                saved = saver.save()
                assert saved.timings.caps_on == saved.timings.caps_off == 0
                assert ignore_shared_on(guest)
                guest.cont()
            parse_blob(saved.blob)
        assert not ignore_shared_on(guest)


def test_qemu_refusing_the_save_leaves_the_vm_stopped_and_the_capability_off(image: Path) -> None:
    # ivshmem-plain without master=on is a migration blocker: QEMU refuses `migrate`.
    shm = "/dev/shm/checkpoint-ivshmem-" + str(os.getpid())
    extra = [
        "-object", f"memory-backend-file,id=checkpoint-shm,size=1M,mem-path={shm},share=on",
        "-device", "ivshmem-plain,memdev=checkpoint-shm",
    ]  # fmt: skip
    try:
        with DirectGuest(
            name="checkpoint-blocked", memory_mib=MEMORY_MIB, disk=image, extra_args=extra
        ) as guest:
            guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
            saver = DeviceStateSaver(guest.qmp)
            guest.stop()
            with pytest.raises(DeviceStateError, match="ivshmem") as caught:
                saver.save()
            assert caught.value.qemu_message
            assert guest.status() == "paused"
            assert not ignore_shared_on(guest)
            with pytest.raises(QMPError, match="not found"):
                guest.qmp.execute("closefd", {"fdname": saver.fdname})
            guest.cont()
            assert guest.status() == "running"
    finally:
        if os.path.exists(shm):
            os.unlink(shm)


@pytest.fixture(scope="module")
def good_checkpoint(image: Path) -> Checkpoint:
    with DirectGuest(name="checkpoint-src", memory_mib=MEMORY_MIB, disk=image) as primary:
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        return take_checkpoint(primary, DeviceStateSaver(primary.qmp), 0)


def test_truncated_blob_is_refused_and_the_standby_still_takes_a_good_one(
    good_checkpoint: Checkpoint, image: Path
) -> None:
    blob = good_checkpoint.blob
    for cut in (0, 8, 200, len(blob) // 2, len(blob) - 1):
        with pytest.raises(BlobFormatError):
            parse_blob(blob[:cut])
    with standby("checkpoint-trunc", image) as backup:
        write_ram(backup, good_checkpoint.ram)
        with pytest.raises(BlobFormatError, match="truncated"):
            load_device_state(backup.qmp, blob[: len(blob) - 1000])
        assert backup.status() == "inmigrate" and backup.alive()
        assert not ignore_shared_on(backup)
        load_device_state(backup.qmp, blob)
        resume_standby(backup.qmp)
        assert wait_counter_above(backup, good_checkpoint.counter) > good_checkpoint.counter


def test_unverified_truncated_blob_ends_the_standby_with_qemus_reason(
    good_checkpoint: Checkpoint, image: Path
) -> None:
    with standby("checkpoint-trunc2", image) as backup:
        blob = good_checkpoint.blob
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
def test_standby_of_another_machine_config_is_refused_before_loading(
    good_checkpoint: Checkpoint, image: Path, memory_mib: int, extra: list[str], problem: str
) -> None:
    missing = [arg for arg in extra if arg.startswith("/") and not os.path.exists(arg)]
    if missing:
        pytest.skip(f"{missing[0]} not installed (Debian package seabios)")
    backup_vm = DirectGuest(
        name="checkpoint-other", memory_mib=memory_mib, disk=image, incoming=True, extra_args=extra
    )
    with backup_vm as backup:
        write_ram(backup, good_checkpoint.ram[: backup.ram_size])
        with pytest.raises(StandbyMismatchError) as caught:
            load_device_state(backup.qmp, good_checkpoint.blob)
        assert any(problem in p for p in caught.value.problems), caught.value.problems
        assert backup.status() == "inmigrate" and backup.alive()
        assert read_counter(backup.ram_path) == good_checkpoint.counter, "the standby must not have run"


def test_standby_that_is_not_waiting_for_state_is_refused(good_checkpoint: Checkpoint, image: Path) -> None:
    with DirectGuest(name="checkpoint-paused", memory_mib=MEMORY_MIB, disk=image, paused=True) as other:
        before = other.status()
        with pytest.raises(StandbyMismatchError, match="-incoming defer"):
            check_standby(other.qmp, parse_blob(good_checkpoint.blob))
        assert other.status() == before


def test_blob_from_a_machine_with_another_device_is_refused_with_qemus_reason(image: Path) -> None:
    with DirectGuest(
        name="checkpoint-dev", memory_mib=MEMORY_MIB, disk=image, extra_args=["-device", "i6300esb"]
    ) as primary:
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        other = take_checkpoint(primary, DeviceStateSaver(primary.qmp), 0)
    assert ("0000:00:02.0/i6300esb_wdt", 0) in parse_blob(other.blob, devices=True).devices
    with standby("checkpoint-nodev", image) as backup:
        write_ram(backup, other.ram)
        # Same machine type and RAM blocks: only QEMU can tell, and it exits doing so.
        check_standby(backup.qmp, parse_blob(other.blob))
        with pytest.raises(DeviceStateError, match="exited while loading") as caught:
            load_device_state(backup.qmp, other.blob, qemu_log=backup.stderr_path)
        assert caught.value.qemu_message and "i6300esb" in caught.value.qemu_message
        time.sleep(0.2)
        assert not backup.alive()


def test_failover_without_vmdesc_and_its_weaker_truncation_check(image: Path) -> None:
    no_vmdesc = ["-machine", "suppress-vmdesc=on"]
    with (
        DirectGuest(
            name="checkpoint-nvpri", memory_mib=MEMORY_MIB, disk=image, extra_args=no_vmdesc
        ) as primary,
        DirectGuest(
            name="checkpoint-nvsby", memory_mib=MEMORY_MIB, disk=image, incoming=True, extra_args=no_vmdesc
        ) as backup,
    ):
        primary.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        saver = DeviceStateSaver(primary.qmp)
        assert not saver.vmdesc
        ckpt = take_checkpoint(primary, saver, 0)
        assert parse_blob(ckpt.blob, vmdesc=False).devices == ()
        with pytest.raises(BlobFormatError):
            parse_blob(ckpt.blob)  # a blob with vmdesc was expected
        write_ram(backup, ckpt.ram)
        kill_primary(primary)
        with pytest.raises(BlobFormatError, match="truncated"):
            load_device_state(backup.qmp, ckpt.blob[: len(ckpt.blob) // 2])
        assert backup.status() == "inmigrate"
        load_device_state(backup.qmp, ckpt.blob, qemu_log=backup.stderr_path)
        assert backup.read_ram(0, backup.ram_size) == ckpt.ram
        resume_standby(backup.qmp)
        assert wait_counter_above(backup, ckpt.counter + 20) > ckpt.counter + 20


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3, 23))
def test_counter_failover_soak(seed: int, image: Path) -> None:
    test_counter_continues_exactly_from_a_random_checkpoint(seed, image)
