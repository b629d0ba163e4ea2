"""A protected VM with a writable, served disk fails over on the two-host rig (issue 8 item 3).

The Linux guest (mode ``fsrec``, :mod:`cuju_libvirt.rig.disk_records`) appends fsync'd
records to a file on ext4 on its virtio disk, which ``xml enable --prepare`` serves through
the journaling block server; cujud on host b keeps and serves the replica. SIGKILL of the
primary's QEMU at a random moment; after the failover the guest checks from inside that
the disk holds what its RAM says it wrote (records and checksummed O_DIRECT blocks: disk
and memory of the same epoch), then shuts down cleanly; the replica on host b is
``e2fsck -fn`` clean and holds every record the observer saw, as a clean prefix.
Default suite: two runs; ``CUJU_SLOW=1`` adds the 20-run soak.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cuju_libvirt.rig.cujud import Cujud
from cuju_libvirt.rig.disk_records import DiskRun, data_image, run_with_sigkill
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer
from tests.e2e.conftest import cleanup_protected

MAC = "52:54:00:19:08:00"


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
        yield obs


def judged_run(rig: Rig, guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud],
               name: str) -> DiskRun:
    try:
        result = run_with_sigkill(rig, guest, observer, cujuds, name, mac=MAC)
    finally:
        cleanup_protected(rig, name)
        data_image(rig, name).unlink(missing_ok=True)
    answer, verdict = result.answer, result.verdict
    assert result.memory_and_disk_agree, answer  # the blocks match the checksums in the guest's RAM
    assert verdict.fsck_clean, verdict.fsck_output
    assert verdict.clean_prefix and verdict.records_lost == 0, verdict
    assert verdict.records_on_disk == int(answer["records"]), (verdict, answer)
    assert result.ok
    print(f"{name}: {verdict.records_on_disk} records on host b's replica, fsck clean, "
          f"failover {result.failover_ms:.0f} ms")
    return result


@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", range(2))
def test_sigkill_with_a_served_disk_keeps_every_fsynced_record_and_a_clean_file_system(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud], run: int
) -> None:
    judged_run(ft_rig, linux_guest, observer, cujuds, f"disk-kill{run}")


@pytest.mark.slow
@pytest.mark.timeout(20 * 240)
def test_twenty_sigkills_with_a_served_disk(
    ft_rig: Rig, linux_guest: LinuxGuest, cujuds: tuple[Cujud, Cujud]
) -> None:
    for run in range(20):
        with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
            judged_run(ft_rig, linux_guest, obs, cujuds, f"disk-soak{run}")
