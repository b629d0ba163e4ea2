"""After a backup outage or a failover the new standby gets only the disk blocks changed since
(issue 8 item 2); after a primary-host crash, only the units whose content differs.

The Linux guest (mode ``fsrec``) writes fsync'd records to ext4 on a served 256 MiB disk
that holds a 96 MiB file of random data from before protection (so a full sparse copy has
something to copy).
The standby's QEMU is killed; the guest writes on while host a runs unprotected and pairs
with a new standby on host b. Host b keeps its replica (the replay of the old standby's
receiver journal makes it a committed epoch, and its id matches the primary's claim), so
host a sends only the blocks its journal's dirty bitmaps marked since: the bytes cujud logs
for that resync are a small part of the disk and of the first, full sparse copy. Then, with
the VM paused by the user and the epochs after the pause applied on host b, ``qemu-img
compare`` finds host b's replica equal to host a's image (a committed epoch's disk).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, protected_linux_xml
from cuju_libvirt.rig.disk_records import PARAMS, command, data_image, make_ext4_image
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest
from cuju_libvirt.rig.observer import Observer
from cuju_libvirt.rig.sandbox import tool
from tests.e2e.test_failover import linux_guest, observer
from tests.e2e.test_lifecycle import suspend_until_paused_by_user

__all__ = ["linux_guest", "observer"]  # fixtures shared with test_failover

MAC = "52:54:00:19:08:10"
DISK_MIB = 256
FILLER_MIB = 96
#: What DiskSet logs when a synchronisation begins (ft_engine/disks.py).
SYNC_LINE = re.compile(r"disk vda: (resync of the changed blocks only|full sparse copy)[^\n]*?: "
                       r"(\d+) of (\d+) bytes to send")
#: What DiskSet logs when a content compare begins, and when it is done (the bytes it sent).
COMPARE_LINE = re.compile(r"disk vda: resync by content compare[^\n]*: comparing (\d+) bytes")
COMPARED_LINE = re.compile(r"disk vda: content compare done: (\d+) of (\d+) bytes differed and were sent")


def _filled_ext4_image(path: Path) -> Path:
    """An ext4 image with a file of random data on it (written with debugfs, offline)."""
    make_ext4_image(path, size_mib=DISK_MIB)
    filler = path.with_suffix(".filler")
    try:
        with open(filler, "wb") as f:
            for _ in range(FILLER_MIB):
                f.write(os.urandom(1 << 20))
        subprocess.run([tool("debugfs"), "-w", "-R", f"write {filler} filler", str(path)], check=True,
                       capture_output=True, timeout=120)
    finally:
        filler.unlink(missing_ok=True)
    return path


def _syncs(log: Path, offset: int) -> list[tuple[str, int, int]]:
    text = log.read_bytes()[offset:].decode(errors="replace")
    return [(m[1], int(m[2]), int(m[3])) for m in SYNC_LINE.finditer(text)]


@pytest.mark.timeout(600)
def test_a_backup_outage_resends_only_the_changed_blocks_and_the_replica_equals_the_image(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-resync"
    image = _filled_ext4_image(data_image(rig, name))
    try:
        start = ca.log_path.stat().st_size
        xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=1, mode="fsrec",
                                  data_disk=image, params=PARAMS)
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", name)
        ca.wait_domain(name, "protected", timeout=180)
        cb.wait_domain(name, "standby", timeout=60)
        observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
        first = _syncs(ca.log_path, start)
        assert [kind for kind, _, _ in first] == ["full sparse copy"], first
        full_bytes, disk_size = first[0][1], first[0][2]
        assert disk_size >= DISK_MIB << 20
        assert full_bytes >= FILLER_MIB << 20, "the full sparse copy must send every allocated block"

        # The backup goes away; the guest writes on while host a pairs with a new standby.
        outage = ca.log_path.stat().st_size
        recorded = len(observer.recording().udp)
        standby = rig.b.qemu_pid(name)
        assert standby is not None
        os.kill(standby, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while rig.b.qemu_pid(name) in (None, standby):
            assert time.monotonic() < deadline, "no new standby on host b"
            time.sleep(0.1)
        ca.wait_domain(name, "protected", timeout=120)
        cb.wait_domain(name, "standby", timeout=60)
        written = len(observer.recording().udp) - recorded
        assert written > 0, "the guest wrote nothing during the outage"

        again = _syncs(ca.log_path, outage)
        assert [kind for kind, _, _ in again] == ["resync of the changed blocks only"], again
        resync_bytes = again[0][1]
        assert "keeping replica" in cb.log_path.read_text(errors="replace")
        entry = ca.domain(name)
        assert entry is not None
        assert [(d["mode"], d["total_bytes"]) for d in entry["disk_sync"]] == [("changed", resync_bytes)]
        # The guest changed a few blocks (its records, 64 checksummed blocks, ext4's journal):
        # what a bitmap resync sends is a small part of the disk and of the full copy.
        assert 0 < resync_bytes <= disk_size // 16, (resync_bytes, disk_size)
        assert resync_bytes * 8 < full_bytes, (resync_bytes, full_bytes)
        print(f"{name}: full sparse copy {full_bytes} bytes, resync after the outage {resync_bytes} bytes "
              f"({written} records written meanwhile), disk {disk_size} bytes")

        # A committed epoch's disk: the VM paused by the user (nothing writes any more), and
        # two epochs after that applied on host b (the pause's cut is in one of them).
        suspend_until_paused_by_user(rig.a, name)
        acked = int(ca.domain(name)["last_acked_epoch"] or 0)  # type: ignore[index]
        cb.wait_for(name, lambda e: int(e["last_acked_epoch"] or 0) >= acked + 2,
                    f"epoch {acked + 2} applied", timeout=120)
        uuid = rig.b.virsh("domuuid", name).strip()
        replica = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
        argv = [tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(image), str(replica)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        rig.a.virsh("resume", name)
    finally:
        cleanup_protected(rig, name)
        image.unlink(missing_ok=True)


@pytest.mark.timeout(600)
def test_after_a_failover_the_new_backups_replica_equals_the_disk_the_vm_runs_on(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """SIGKILL of the primary's QEMU: host b runs the VM on its replica and re-protects it onto
    host a by itself. Host a's own image of the disk becomes the replica (its journal proves
    it is the disk as of the epoch b took over but for the blocks it marked), so host b
    sends only the blocks either side changed since: a small part of the first, full sparse
    copy of the same run. With the VM paused by the user and two later epochs applied on
    host a, host a's image equals the disk host b runs on (``qemu-img compare``): the sync
    read the image b's block server serves, not the path the disk had on host a."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-reprotect"
    image = _filled_ext4_image(data_image(rig, name))
    try:
        start = ca.log_path.stat().st_size
        xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=1, mode="fsrec",
                                  data_disk=image, params=PARAMS)
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", name)
        ca.wait_domain(name, "protected", timeout=180)
        cb.wait_domain(name, "standby", timeout=60)
        observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
        first = _syncs(ca.log_path, start)
        assert [kind for kind, _, _ in first] == ["full sparse copy"], first
        full_bytes, disk_size = first[0][1], first[0][2]
        assert full_bytes >= FILLER_MIB << 20
        pid = rig.a.qemu_pid(name)
        assert pid is not None
        failover = cb.log_path.stat().st_size
        os.kill(pid, signal.SIGKILL)
        cb.wait_failed_over(name, timeout=60)
        cb.wait_domain(name, "protected", timeout=180)  # re-protected onto host a
        ca.wait_domain(name, "standby", timeout=60)
        observer.wait_for(lambda r: len(r.udp) >= 300, timeout=90)  # the guest writes on host b
        again = _syncs(cb.log_path, failover)
        assert [kind for kind, _, _ in again] == ["resync of the changed blocks only"], \
            cb.log_path.read_bytes()[failover:].decode(errors="replace")[-3000:]
        resync_bytes = again[0][1]
        assert "this host's own image" in ca.log_path.read_text(errors="replace")
        assert 0 < resync_bytes * 8 < full_bytes, (resync_bytes, full_bytes)
        print(f"{name}: full sparse copy {full_bytes} bytes, resync after the failover {resync_bytes} bytes, "
              f"disk {disk_size} bytes")

        suspend_until_paused_by_user(rig.b, name)
        acked = int(cb.domain(name)["last_acked_epoch"] or 0)  # type: ignore[index]
        ca.wait_for(name, lambda e: int(e["last_acked_epoch"] or 0) >= acked + 2,
                    f"epoch {acked + 2} applied", timeout=120)
        uuid = rig.b.virsh("domuuid", name).strip()
        runs_on = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
        argv = [tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(runs_on), str(image)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        rig.b.virsh("resume", name)
    finally:
        cleanup_protected(rig, name)
        image.unlink(missing_ok=True)


@pytest.mark.timeout(900)
def test_after_a_primary_host_crash_the_old_primarys_image_is_compared_and_gets_only_what_differs(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Host a crashes (every process SIGKILLed; its reboot empties /run, with the block
    servers' journals): host b takes over its replica, and when host a's cujud is back it
    re-protects the VM onto it. Host a's journal is gone, so nothing says which blocks it
    wrote after its last acknowledged epoch; its durable pairing record says its image was
    paired with the replica b took over, so it sends the image's content digests and b
    resends only the units whose content differs: a small part of the first, full sparse copy
    of the same run. With the VM paused by the user and two later epochs applied on host a,
    host a's image equals the disk host b runs on (``qemu-img compare``)."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-crash-resync"
    image = _filled_ext4_image(data_image(rig, name))
    try:
        start = ca.log_path.stat().st_size
        xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=1, mode="fsrec",
                                  data_disk=image, params=PARAMS)
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", name)
        ca.wait_domain(name, "protected", timeout=180)
        cb.wait_domain(name, "standby", timeout=60)
        observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
        first = _syncs(ca.log_path, start)
        assert [kind for kind, _, _ in first] == ["full sparse copy"], first
        full_bytes, disk_size = first[0][1], first[0][2]
        assert full_bytes >= FILLER_MIB << 20
        failover = cb.log_path.stat().st_size
        rig.a.crash()
        cb.wait_failed_over(name, timeout=90)
        rig.a.reboot()
        assert not list(rig.a.outside("/run/cuju-libvirt").iterdir()), "the reboot left host a's journals"
        ca.stop()
        ca.start()
        cb.wait_domain(name, "protected", timeout=300)  # re-protected onto host a
        ca.wait_domain(name, "standby", timeout=60)
        recorded = len(observer.recording().udp)
        observer.wait_for(lambda r: len(r.udp) >= recorded + 50, timeout=120)  # the guest writes on host b
        text = cb.log_path.read_bytes()[failover:].decode(errors="replace")
        assert not _syncs(cb.log_path, failover), text[-3000:]  # no full copy, no bitmap resync
        begun, done = COMPARE_LINE.findall(text), COMPARED_LINE.findall(text)
        assert len(begun) == 1 and len(done) == 1, text[-3000:]
        sent, compared = int(done[0][0]), int(done[0][1])
        assert compared == disk_size
        a_log = ca.log_path.read_bytes()[ca.log_start:].decode(errors="replace")
        assert "trying a content compare" in a_log and "this host's own image" in a_log, a_log[-3000:]
        entry = cb.domain(name)
        assert entry is not None
        assert [d["mode"] for d in entry["disk_sync"]] == ["compare"], entry["disk_sync"]
        # Host a's last epoch and whatever it wrote after it, ext4's journal, b's writes since
        # the takeover: a small part of the disk, which the full copy sent in the main.
        assert 0 < sent * 8 < full_bytes, (sent, full_bytes)
        print(f"{name}: full sparse copy {full_bytes} bytes, resync by content compare after the host "
              f"crash {sent} bytes, disk {disk_size} bytes")

        suspend_until_paused_by_user(rig.b, name)
        acked = int(cb.domain(name)["last_acked_epoch"] or 0)  # type: ignore[index]
        ca.wait_for(name, lambda e: int(e["last_acked_epoch"] or 0) >= acked + 2,
                    f"epoch {acked + 2} applied", timeout=120)
        uuid = rig.b.virsh("domuuid", name).strip()
        runs_on = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
        argv = [tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(runs_on), str(image)]
        done_cmp = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done_cmp.returncode == 0, done_cmp.stdout + done_cmp.stderr
        rig.b.virsh("resume", name)
    finally:
        if rig.a.daemon_pid("libvirtd") is None:  # crashed and not booted yet: for the next tests
            rig.a.reboot()
            ca.stop()
            ca.start()
        cleanup_protected(rig, name)
        image.unlink(missing_ok=True)


@pytest.mark.timeout(600)
def test_a_guest_fstrim_replicates_and_the_replica_equals_the_image(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """The guest deletes a 96 MiB file and trims its file system (FITRIM, as ``fstrim``) while
    it appends its fsync'd records: ``xml enable --prepare`` gave the disk discard='unmap', so
    the trims reach the block server, which punches the holes and journals them. Host b's
    replica loses those blocks too and, with the VM paused by the user and two later epochs
    applied, equals host a's image (``qemu-img compare``)."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "disk-trim"
    image = _filled_ext4_image(data_image(rig, name))
    try:
        xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=1, mode="fsrec",
                                  data_disk=image, params=PARAMS)
        assert "discard=\"unmap\"" in xml.read_text() or "discard='unmap'" in xml.read_text()
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", name)
        ca.wait_domain(name, "protected", timeout=180)
        cb.wait_domain(name, "standby", timeout=60)
        observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
        uuid = rig.b.virsh("domuuid", name).strip()
        replica = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
        image_before, replica_before = image.stat().st_blocks * 512, replica.stat().st_blocks * 512
        assert replica_before >= FILLER_MIB << 20, "the sync must have copied the filler"

        answer = command(rig, "trim")
        print(f"{name}: the guest says {answer}")
        assert answer["what"] == "trimmed" and answer.get("unlinked") == "1", answer
        assert answer.get("fitrim") == "0", f"the guest cannot trim (no discard on its disk?): {answer}"
        assert int(answer["bytes"]) >= FILLER_MIB << 20, answer
        recorded = len(observer.recording().udp)
        observer.wait_for(lambda r: len(r.udp) >= recorded + 50, timeout=90)  # the records go on

        suspend_until_paused_by_user(rig.a, name)
        acked = int(ca.domain(name)["last_acked_epoch"] or 0)  # type: ignore[index]
        cb.wait_for(name, lambda e: int(e["last_acked_epoch"] or 0) >= acked + 2,
                    f"epoch {acked + 2} applied", timeout=120)
        freed = (FILLER_MIB << 20) * 9 // 10
        image_after, replica_after = image.stat().st_blocks * 512, replica.stat().st_blocks * 512
        print(f"{name}: allocated bytes, image {image_before} -> {image_after}, "
              f"replica {replica_before} -> {replica_after}")
        assert image_before - image_after >= freed, (image_before, image_after)
        assert replica_before - replica_after >= freed, (replica_before, replica_after)
        argv = [tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(image), str(replica)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        rig.a.virsh("resume", name)
    finally:
        cleanup_protected(rig, name)
        image.unlink(missing_ok=True)
