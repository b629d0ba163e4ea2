"""The epoch engine with a replicated disk and a real TCG QEMU: QEMU reaches the disk over
NBD (our block server), writes go through QEMU's block layer (HMP ``qemu-io`` on a second
monitor, while the guest runs), the engine seals the journal in every pause.

Judged once the writer has stopped and two more epochs were acknowledged: the backup's
replica equals the primary's image byte for byte (data written before protection came
with the sparse initial sync, the rest with the epochs)."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cuju_libvirt import disk_server
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk, prepare_replica
from cuju_libvirt.ft_engine.epoch import BackupEngine, PrimaryConfig, PrimaryEngine
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPClient
from cuju_libvirt.rig.engine_pair import link_pair
from cuju_libvirt.rig.guests import boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace for the uffd tracker)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("nbdkit") is None
                       or not disk_server.PLUGIN.is_file(), reason="needs QEMU, nbdkit and the plugin"),
]

SIZE = 16 << 20


@pytest.mark.timeout(180)
def test_engine_replicates_a_disk_written_through_qemu() -> None:
    work = Path(tempfile.mkdtemp(prefix="eng-disk.", dir="/dev/shm"))
    paths = disk_server.ServerPaths.under(work, "vda")
    image, replica = work / "vda.img", work / "vda.replica"
    with image.open("wb") as f:
        f.truncate(SIZE)
        f.seek(5 << 20)
        f.write(os.urandom(300 << 10))  # data from before protection: the initial sync's job
    prepare_replica(str(replica), SIZE)
    hmp_path = work / "writer.qmp"
    rng = random.Random(4)
    try:
        disk_server.start(paths, str(image), target="vda")
        drive = (f"file=nbd+unix:///vda?socket={paths.socket},format=raw,if=none,id=vdisk,"
                 "werror=stop,rerror=stop")
        img = boot_image()
        with (
            DirectGuest(name="engd-p", memory_mib=32, disk=img,
                        extra_args=("-drive", drive, "-device", "virtio-blk-pci,drive=vdisk",
                                    "-qmp", f"unix:{hmp_path},server=on,wait=off")) as p,
            DirectGuest(name="engd-s", memory_mib=32, disk=img, incoming=True,
                        extra_args=("-drive", f"file={replica},format=raw,if=none,id=vdisk",
                                    "-device", "virtio-blk-pci,drive=vdisk")) as s,
        ):
            p.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
            a, b = link_pair()
            pstats, bstats = DomainStats("engd", "u", "primary"), DomainStats("engd", "u", "backup")
            pm, bm = FTMachine("engd", Role.PRIMARY), FTMachine("engd", Role.BACKUP)
            backup = BackupEngine(qmp=s.qmp, ram_path=str(s.ram_path), link=b,
                                  device_state_path=str(work / "state"), stats=bstats, machine=bm,
                                  disks=[(str(replica), SIZE)])
            disks = DiskSet([ProtectedDisk("vda", str(image), paths.journal)])
            cfg = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker="uffd", epoch_ms=20,
                                output_commit=False, tag="engd")
            engine = PrimaryEngine(cfg, qmp=p.qmp, pid=p.pid, link=a, stats=pstats, machine=pm, disks=disks)
            try:
                backup.start()
                engine.start()
                assert pm.state is FTState.PROTECTED
                with QMPClient(hmp_path) as writer:
                    for _ in range(120):
                        off = rng.randrange(0, SIZE // 4096 - 16) * 4096
                        length = rng.choice([4096, 8192, 65536])
                        op = rng.choice([f"write -P {rng.randrange(1, 256)} {off} {length}"] * 3
                                        + [f"write -z {off} {length}"])
                        writer.execute("human-monitor-command",
                                       {"command-line": f'qemu-io vdisk "{op}"'})
                        time.sleep(rng.random() * 0.01)
                done = engine.last_acked
                deadline = time.monotonic() + 20
                while engine.last_acked < done + 3:
                    assert time.monotonic() < deadline and engine.failure is None, engine.failure
                    time.sleep(0.02)
                while backup.last_applied < engine.last_acked:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert image.read_bytes() == replica.read_bytes()
                assert engine.epochs > 20
                assert engine.counters()["disk_bytes"] > 120 * 4096  # the writes went with the epochs
            finally:
                engine.stop(10)
                backup.close()
                a.close()
                b.close()
    finally:
        disk_server.stop(paths)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(240)
def test_two_disks_on_two_buses_are_consistent_at_every_committed_epoch() -> None:
    """A virtio-blk disk and a SATA (AHCI) disk of one running QEMU, written through QEMU's
    block layer by a thread that writes the same sequence number to one disk and then the
    other. Each epoch's cut is taken between two single-disk writes with the VM stopped (QMP
    ``stop``): the journals are sealed, the images read as they are at the cut, and the epoch
    is shipped; once it
    is applied, both replicas equal those images, so the two disks are at the same point
    of the sequence on the backup at every committed epoch (a cut may fall between the two
    writes of one number: then so does the replica)."""
    work = Path(tempfile.mkdtemp(prefix="eng-2bus.", dir="/dev/shm"))
    targets = ("vda", "sda")
    paths = {t: disk_server.ServerPaths.under(work, t) for t in targets}
    images = {t: work / f"{t}.img" for t in targets}
    replicas = [(str(work / f"{t}.replica"), SIZE) for t in targets]
    hmp_path = work / "writer.qmp"
    rng = random.Random(6)
    try:
        for t in targets:
            with images[t].open("wb") as f:
                f.truncate(SIZE)
            disk_server.start(paths[t], str(images[t]), target=t)
        for path, size in replicas:
            prepare_replica(path, size)
        args: list[str] = ["-device", "ahci,id=ahci", "-qmp", f"unix:{hmp_path},server=on,wait=off"]
        for t, dev in (("vda", "virtio-blk-pci,drive=d-vda"), ("sda", "ide-hd,drive=d-sda,bus=ahci.0")):
            args += ["-drive", f"file=nbd+unix:///{t}?socket={paths[t].socket},format=raw,if=none,id=d-{t},"
                               "werror=stop,rerror=stop", "-device", dev]
        with DirectGuest(name="eng2bus", memory_mib=32, disk=boot_image(), extra_args=tuple(args)) as p:
            p.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
            disks = DiskSet([ProtectedDisk(t, str(images[t]), paths[t].journal) for t in targets])
            region, standby = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
            a, b = socket.socketpair()
            rx = EpochReceiver(standby, str(work / "state"), disks=replicas)
            rx.start(b)
            tx = EpochSender(a, region, disk_sizes=disks.sizes)
            stop_writing, running = threading.Event(), threading.Lock()
            written: list[int] = []

            def writer() -> None:
                with QMPClient(hmp_path) as qmp:
                    seq = 0
                    while not stop_writing.is_set():
                        seq += 1
                        off = rng.randrange(0, SIZE // 4096) * 4096
                        for t in targets:  # the same record on both disks, vda first
                            op = f'qemu-io d-{t} "write -P {seq % 255 + 1} {off} 4096"'
                            # The monitor's qemu-io writes even while the VM is stopped (a
                            # guest's vCPUs would not): no write between the cut and `cont`.
                            with running:
                                qmp.execute("human-monitor-command", {"command-line": op})
                        written.append(seq)

            thread = threading.Thread(target=writer, daemon=True)
            try:
                tx.handshake(5)
                thread.start()
                for epoch in range(1, 16):
                    time.sleep(rng.random() * 0.05)
                    with running:
                        p.stop()
                        parts = disks.seal(epoch)
                        at_cut = [images[t].read_bytes() for t in targets]
                        tx.stage(epoch, page_indexes([]), b"", disks=parts)
                        tx.ship()
                        p.cont()
                    assert tx.wait_ack(epoch, 30)
                    disks.acked(epoch)
                    deadline = time.monotonic() + 30
                    while rx.last_applied < epoch:
                        assert time.monotonic() < deadline
                        time.sleep(0.005)
                    for t, want, (path, _) in zip(targets, at_cut, replicas, strict=True):
                        assert Path(path).read_bytes() == want, f"{t}: replica is not epoch {epoch}'s cut"
                assert len(written) > 15, "the writer hardly ran"
            finally:
                stop_writing.set()
                thread.join(30)
                tx.close(orderly=False, timeout=0)
                rx.close()
                disks.close()
                a.close()
                b.close()
    finally:
        for t in targets:
            disk_server.stop(paths[t])
        shutil.rmtree(work, ignore_errors=True)
