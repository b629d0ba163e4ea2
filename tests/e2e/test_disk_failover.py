"""A protected VM with a writable, served disk fails over on the two-host rig (issue 8 item 3).

The Linux guest (mode ``fsrec``, :mod:`cuju_libvirt.rig.disk_records`) appends fsync'd
records to a file on ext4 on its virtio disk, which ``xml enable --prepare`` serves through
the journaling block server; cujud on host b keeps and serves the replica. SIGKILL of the
primary's QEMU at a random moment; after the failover the guest checks from inside that
the disk holds what its RAM says it wrote (records and checksummed O_DIRECT blocks: disk
and memory of the same epoch), then shuts down cleanly; the replica on host b is
``e2fsck -fn`` clean and holds every record the observer saw, as a clean prefix.
The same judge after a crash of the primary host, a partition of host b, and a backup loss
under writes.
Default suite: two SIGKILL runs and those two; ``CUJU_SLOW=1`` adds the 20-run soak.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from cuju_libvirt.rig.cujud import Cujud, cleanup_protected
from cuju_libvirt.rig.disk_records import DiskRun, data_image, run_with_sigkill
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest
from cuju_libvirt.rig.observer import Observer
from tests.e2e.test_failover import linux_guest, observer

__all__ = ["linux_guest", "observer"]  # fixtures shared with test_failover

MAC = "52:54:00:19:08:00"


def judged_run(rig: Rig, guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud],
               name: str, *, disk_format: str = "raw", **how: Callable[[], None]) -> DiskRun:
    """One judged run (``how``: ``before_kill`` / ``fail`` of :func:`run_with_sigkill`)."""
    try:
        result = run_with_sigkill(rig, guest, observer, cujuds, name, mac=MAC, disk_format=disk_format, **how)
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


@pytest.mark.timeout(600)
def test_sigkill_with_a_served_qcow2_disk_keeps_every_fsynced_record_and_a_clean_file_system(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """The same with a qcow2 image: the standby's QEMU opens its replica (qcow2 over NBD)
    before the initial sync has copied anything; after the failover the replica passes
    ``qemu-img check`` and its guest-visible disk the same judge."""
    judged_run(ft_rig, linux_guest, observer, cujuds, "disk-kill-qcow2", disk_format="qcow2")


@pytest.mark.timeout(600)
def test_backup_loss_with_a_served_disk_then_a_sigkill_keeps_every_record(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """The standby's QEMU dies while the guest writes: the primary runs on, pairs with a new
    standby (whose kept replica is resynchronised with only the changed blocks, under the
    writes), and a SIGKILL of the primary after that still keeps every record, with memory
    and disk in agreement."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-bloss"

    def lose_the_backup() -> None:
        standby = rig.b.qemu_pid(name)
        assert standby is not None
        os.kill(standby, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while rig.b.qemu_pid(name) in (None, standby) and time.monotonic() < deadline:
            time.sleep(0.1)
        ca.wait_domain(name, "protected", timeout=120)
        cb.wait_domain(name, "standby", timeout=60)
        log = ca.log_path.read_text(errors="replace")
        assert "backup lost" in log
        # The new standby kept its replica: only the changed blocks were resent (and the
        # judge below finds every record after the SIGKILL that follows).
        assert "disk vda: resync of the changed blocks only" in log

    judged_run(rig, linux_guest, observer, cujuds, name, before_kill=lose_the_backup)


@pytest.mark.timeout(600)
def test_a_backup_cujud_down_when_the_primary_dies_takes_over_from_its_replica_as_it_was(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Host b's cujud is SIGKILLed, then the primary's QEMU; started again, host b's cujud
    takes its standby back and takes over. Its replica holds the committed epochs: taken
    back as it is (it was first emptied as for a new standby), every record is on it, the
    file system clean, memory and disk in agreement."""
    rig, (_ca, cb) = ft_rig, cujuds
    name = "disk-bkdown"

    def kill_both() -> None:
        cb.kill()
        pid = rig.a.qemu_pid(name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        cb.start()

    judged_run(rig, linux_guest, observer, cujuds, name, fail=kill_both)
    assert "an earlier cujud left this standby" in cb.log_path.read_text(errors="replace")


@pytest.mark.timeout(600)
def test_primary_host_crash_with_a_served_disk_keeps_every_record(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Host a dies (its block servers and cujud with it): b takes over after the heartbeat
    timeout, from its replica; every reported record is there and the file system is clean."""
    rig, (ca, _cb) = ft_rig, cujuds
    try:
        judged_run(rig, linux_guest, observer, cujuds, "disk-acrash", fail=rig.a.crash)
    finally:
        if rig.a.daemon_pid("libvirtd") is None:  # crashed: boot it again for the next tests
            rig.a.reboot()
        ca.stop()
        ca.start()


@pytest.mark.timeout(600)
def test_partition_of_host_b_with_a_served_disk_keeps_every_record(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """docs/failover.md's full partition, with a disk: host b cut off on both paths while both
    hosts live takes over from its replica after the heartbeat timeout, host a fences its VM
    (stopped, its unacknowledged output held, its disk written past b's epoch); healed, host a
    gives its copy up. Every record the observer saw is on b's replica, fsck clean, memory and
    disk in agreement: what a wrote after b's epoch never reached anybody."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-split"

    def partition() -> None:
        rig.b.set_links(up=False)
        try:
            cb.wait_failed_over(name, timeout=60)
            ca.wait_domain(name, "failed", timeout=60)  # fenced: VM stopped, output held
            assert rig.a.virsh("domstate", name).strip() == "paused"
        finally:
            rig.b.set_links(up=True)
        deadline = time.monotonic() + 60
        while rig.a.qemu_pid(name) is not None:
            assert time.monotonic() < deadline, "host a did not give the VM up after the partition"
            time.sleep(0.1)

    try:
        judged_run(rig, linux_guest, observer, cujuds, name, fail=partition)
    finally:
        rig.b.set_links(up=True)


@pytest.mark.slow
@pytest.mark.timeout(20 * 240)
def test_twenty_sigkills_with_a_served_disk(
    ft_rig: Rig, linux_guest: LinuxGuest, cujuds: tuple[Cujud, Cujud]
) -> None:
    for run in range(20):
        with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
            judged_run(ft_rig, linux_guest, obs, cujuds, f"disk-soak{run}")
