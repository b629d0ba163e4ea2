"""Initial synchronisation of a protected disk against a plain copy of the same image."""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cuju_libvirt import disk_server
from cuju_libvirt.cujud.disks import adopt_by_content, adopt_own_image, choose_replicas, take_over_replica
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk, prepare_replica
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes

DESCRIPTION = (
    "Initial sync of a disk (default 2 GiB, every other MiB random data) through the block server "
    "while fio writes 4 KiB random blocks to it over NBD (the guest's load): sparse-aware chunks read "
    "from the image while the writes go on, then the journal since the start, shipped as epochs to a "
    "receiver that applies them to a replica (TCP loopback). Baseline in the same run: a plain copy of "
    "the same image (every byte, sendfile) over the same kind of link into a file. Then a backup "
    "outage: the receiver goes, 64 KiB random writes change --outage-write-mib, a new standby keeps its "
    "replica and gets only the changed blocks (dirty bitmap), under the same load; its bytes and time "
    "against the full sync of the same run. Then a failover: the primary writes --outage-write-mib more "
    "with no backup and stops, the backup takes its replica over behind a block server of its own and "
    "writes --outage-write-mib elsewhere, and the re-protection onto the old primary's own image resends "
    "only the blocks either side's journal marked (failover_* keys, against the same full sync). Last, a "
    "primary-host crash: host b (now the primary) writes --outage-write-mib, its block server is "
    "SIGKILLed and its tmpfs journal lost; host a takes its copy over and writes --outage-write-mib; "
    "the re-protection onto b's image (its durable pairing record names it) compares content digests "
    "and resends only the units that differ (hostcrash_* keys, against the same full sync)."
)
TARGET_RATIO = 0.7
PAGE = 4096
MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mib", type=int, default=2048, help="disk size (default 2048)")
    parser.add_argument("--write-iops", type=int, default=2000, help="fio's write rate during the sync")
    parser.add_argument("--dir", default="/dev/shm", help="where images live (default /dev/shm)")
    parser.add_argument("--outage-write-mib", type=int, default=128,
                        help="MiB written (64 KiB random writes) while the backup is away (default 128)")


def _fill(path: Path, size: int) -> None:
    block = os.urandom(MIB)
    with path.open("wb") as f:
        f.truncate(size)
        for n, off in enumerate(range(0, size, 2 * MIB)):
            f.seek(off)
            f.write(block[n % 4096:] + block[:n % 4096])  # every MiB different


def _plain_copy(image: Path, dest: Path) -> float:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        out = socket.create_connection(listener.getsockname())
        inn, _ = listener.accept()
    size = image.stat().st_size

    def receive() -> None:
        buf = bytearray(4 * MIB)
        view = memoryview(buf)
        with dest.open("wb") as f:
            left = size
            while left:
                n = inn.recv_into(view, min(len(buf), left))
                if n == 0:
                    break
                f.write(view[:n])
                left -= n

    t = threading.Thread(target=receive)
    t0 = time.perf_counter()
    t.start()
    with image.open("rb") as f:
        sent = 0
        while sent < size:
            sent += os.sendfile(out.fileno(), f.fileno(), sent, size - sent)
    t.join()
    dt = time.perf_counter() - t0
    out.close()
    inn.close()
    return dt


def _fio(paths: disk_server.ServerPaths, size: int, *opts: str) -> list[str]:
    return ["fio", "--name", "load", "--size", str(size), "--ioengine=nbd", "--norandommap",
            f"--uri=nbd+unix:///vda?socket={paths.socket}", *opts]


def _background(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class _Standby:
    """A new standby: what cujud does at ``standby-create`` (the primary's claims, the backup's
    answers after replaying the last receiver journal), then a receiver over TCP loopback."""

    def __init__(self, work: Path, ds: DiskSet, replica: Path, size: int,
                 adopted: dict[int, dict[str, Any]] | None = None) -> None:
        claims = ds.claims()
        self.answers = choose_replicas([(str(replica), size)], claims, str(work / "state.journal"), ["vda"],
                                       adopted=adopted)
        ds.set_replicas(self.answers, claims)
        for leftover in ("state", "state.journal", "state.tmp"):  # as BackupEngine.start
            (work / leftover).unlink(missing_ok=True)
        a, b = _tcp_pair()
        self.rx = EpochReceiver(mmap.mmap(-1, PAGE), str(work / "state"), disks=[(str(replica), size)])
        self.rx.start(b)
        self.tx = EpochSender(a, mmap.mmap(-1, PAGE), disk_sizes=ds.sizes)
        a.close()
        b.close()
        self.tx.handshake(5)
        self.epoch = 0

    def ship(self, parts: Any) -> int:
        self.epoch += 1
        self.tx.stage(self.epoch, page_indexes([]), b"", disks=parts)
        self.tx.ship()
        return self.epoch

    def sync(self, ds: DiskSet) -> tuple[float, int]:
        """The disk part of the engine's initial sync; (seconds to the last ACK, bytes sent from
        the images: planned, or found to differ by a content compare)."""
        t0 = time.perf_counter()
        ds.begin_sync(full=True)
        while parts := ds.sync_chunk():
            epoch = self.ship(parts)
            if epoch > 1:
                self.tx.wait_ack(epoch - 1, 60)
        epoch = self.ship(ds.seal(self.epoch + 1))  # what the load wrote meanwhile
        if not self.tx.wait_ack(epoch, 60):
            raise RuntimeError("the last sync epoch was not acknowledged")
        seconds = time.perf_counter() - t0
        ds.acked(epoch)
        ds.sync_complete()
        return seconds, ds.sync_sent()[0]

    def settle(self, ds: DiskSet) -> None:
        """The load stopped: ship its last writes and wait until the replica holds them."""
        epoch = self.ship(ds.seal(self.epoch + 1))
        self.tx.wait_ack(epoch, 60)
        ds.acked(epoch)
        deadline = time.monotonic() + 60
        while self.rx.last_applied < epoch and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.tx.close(orderly=False, timeout=0)
        self.rx.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="cuju-bench-disksync-", dir=args.dir))
    paths = disk_server.ServerPaths.under(work, "vda")
    out: dict[str, Any] = {"size_mib": args.size_mib, "write_iops": args.write_iops,
                           "outage_write_mib": args.outage_write_mib, "target": TARGET_RATIO}
    fio: subprocess.Popen[bytes] | None = None
    load = ("--rw", "randwrite", "--bs", "4k", "--iodepth", "1", "--runtime", "600", "--time_based",
            f"--rate_iops={args.write_iops}")
    try:
        image = work / "vda.img"
        _fill(image, size)
        out["allocated_mib"] = round(image.stat().st_blocks * 512 / MIB, 1)
        out["copy_s"] = round(_plain_copy(image, work / "copy.img"), 3)
        (work / "copy.img").unlink()

        disk_server.start(paths, str(image), target="vda")
        ds = DiskSet([ProtectedDisk("vda", str(image), paths.journal)])
        replica = work / "vda.replica"
        prepare_replica(str(replica), size)
        standby: _Standby | None = None
        try:
            standby = _Standby(work, ds, replica, size)
            fio = _background(_fio(paths, size, *load))
            time.sleep(0.5)  # the load is on before the sync starts
            sync_s, total = standby.sync(ds)
            counters = standby.tx.counters()
            # Check the result: the load stops, its last writes follow, replica == image.
            fio.terminate()
            fio.wait(10)
            standby.settle(ds)
            out["replica_equal"] = _same(image, replica)
            epochs = standby.epoch

            # A backup outage: the standby goes away, the guest writes, a new standby comes.
            standby.close()
            standby = None
            subprocess.run(_fio(paths, size, "--rw", "randwrite", "--bs", "64k", "--iodepth", "4",
                                f"--io_size={args.outage_write_mib}M"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=600)
            standby = _Standby(work, ds, replica, size)
            out["resync_replica_kept"] = standby.answers[0]["kept"]
            fio = _background(_fio(paths, size, *load))
            time.sleep(0.5)
            resync_s, resync_total = standby.sync(ds)
            fio.terminate()
            fio.wait(10)
            standby.settle(ds)
            out["resync_replica_equal"] = _same(image, replica)

            # A failover: the link goes, the primary writes on alone and stops; the backup
            # takes its replica over and writes; then it re-protects onto the old image.
            standby.close()
            standby = None
            fio = None
            failover = _failover(work, ds, paths=paths, image=image, replica=replica, size=size,
                                 write_mib=args.outage_write_mib, load=load)
            ds = failover.pop("ds")
            out.update(failover)
            crash = _host_crash(work, ds, paths=paths, image=image, replica=replica, size=size,
                                write_mib=args.outage_write_mib, load=load)
            ds = crash.pop("ds")
            out.update(crash)
        finally:
            if fio is not None:
                fio.terminate()
                fio.wait(10)
            if standby is not None:
                standby.close()
            ds.close()
            disk_server.stop(disk_server.ServerPaths.under(work / "b", "vda"))
            disk_server.stop(disk_server.ServerPaths.under(work / "a2", "vda"))
        out["sync_s"] = round(sync_s, 3)
        out["sync_bytes_planned"] = total
        out["sync_epochs"] = epochs
        out["wire_bytes"] = counters["wire_bytes"]
        out["ratio_vs_copy"] = round(out["copy_s"] / sync_s, 3)
        out["resync_s"] = round(resync_s, 3)
        out["resync_bytes_planned"] = resync_total
        out["resync_bytes_ratio"] = round(resync_total / total, 4)
        out["resync_s_vs_full"] = round(resync_s / sync_s, 4)
        out["failover_resync_bytes_ratio"] = round(out["failover_resync_bytes_planned"] / total, 4)
        out["failover_resync_s_vs_full"] = round(out["failover_resync_s"] / sync_s, 4)
        out["hostcrash_resync_bytes_ratio"] = round(out["hostcrash_resync_bytes"] / total, 4)
        out["hostcrash_resync_s_vs_full"] = round(out["hostcrash_resync_s"] / sync_s, 4)
        out["meets_target"] = out["ratio_vs_copy"] >= TARGET_RATIO
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
        disk_server.stop(paths)
        shutil.rmtree(work, ignore_errors=True)
    return out


def _failover(work: Path, ds: DiskSet, *, paths: disk_server.ServerPaths, image: Path, replica: Path,
              size: int, write_mib: int, load: tuple[str, ...]) -> dict[str, Any]:
    """Host a (``paths``, ``image``) writes ``write_mib`` with no backup and stops; host b takes
    ``replica`` over and writes ``write_mib``; re-protected onto a's own image under ``load``.
    Returns the failover_* keys and ``ds``, host b's DiskSet (the caller closes it)."""
    write = _writer(size, write_mib)
    write(paths, 11)
    ds.close()
    disk_server.stop(paths)  # the old primary's QEMU is gone: its server stops (the hook)
    (work / "b").mkdir()
    b_paths = disk_server.ServerPaths.under(work / "b", "vda")
    disk_server.start(b_paths, str(replica), target="vda")
    take_over_replica(str(replica), b_paths.journal)
    # Host b's durable pairing record (cujud keeps it in its state_dir): for the host crash below.
    ds_b = DiskSet([ProtectedDisk("vda", str(replica), b_paths.journal, str(work / "b-state" / "vda.pair"))])
    out: dict[str, Any] = {"ds": ds_b}
    write(b_paths, 12)
    got = adopt_own_image(paths, size, ds_b.claims()[0], target="vda")
    if isinstance(got, str):
        raise RuntimeError(f"the old primary's image was not adopted: {got}")
    (work / "a").mkdir()
    standby = _Standby(work / "a", ds_b, image, size, adopted={0: got[1]})
    fio = _background(_fio(b_paths, size, *load))
    try:
        out["failover_image_adopted"] = standby.answers[0]["kept"]
        time.sleep(0.5)
        seconds, total = standby.sync(ds_b)
        fio.terminate()
        fio.wait(10)
        standby.settle(ds_b)
        out["failover_resync_s"] = round(seconds, 3)
        out["failover_resync_bytes_planned"] = total
        out["failover_replica_equal"] = _same(replica, image)
    finally:
        if fio.poll() is None:
            fio.terminate()
            fio.wait(10)
        standby.close()
    return out


def _writer(size: int, write_mib: int) -> Any:
    def write(on: disk_server.ServerPaths, seed: int) -> None:
        # Other offsets than the outage's and than the other side's: with fio's default
        # randrepeat=1 every run writes the same offsets, whatever --randseed says.
        subprocess.run(_fio(on, size, "--rw", "randwrite", "--bs", "64k", "--iodepth", "4",
                            f"--io_size={write_mib}M", "--randrepeat=0", f"--randseed={seed}"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=600)
    return write


def _host_crash(work: Path, ds_b: DiskSet, *, paths: disk_server.ServerPaths, image: Path, replica: Path,
                size: int, write_mib: int, load: tuple[str, ...]) -> dict[str, Any]:
    """Host b, the primary since the failover (``ds_b`` on ``replica``), writes ``write_mib`` and
    crashes: its server SIGKILLed, its tmpfs journal gone. Host a takes ``image`` over behind a
    server of its own and writes ``write_mib``; re-protected onto b's image, which b's durable
    pairing record names, by content compare under ``load``. Returns the hostcrash_* keys and
    ``ds``, host a's DiskSet (the caller closes it)."""
    write = _writer(size, write_mib)
    b_paths = disk_server.ServerPaths.under(work / "b", "vda")
    record = ds_b.disks[0].record
    write(b_paths, 13)
    ds_b.close()
    pid = disk_server.running_pid(b_paths)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        while disk_server.running_pid(b_paths) is not None:
            time.sleep(0.01)
    for left in (work / "b").iterdir():  # the tmpfs of host b
        left.unlink()
    (work / "a2").mkdir()
    a_paths = disk_server.ServerPaths.under(work / "a2", "vda")
    disk_server.start(a_paths, str(image), target="vda")
    take_over_replica(str(image), a_paths.journal)
    ds_a = DiskSet([ProtectedDisk("vda", str(image), a_paths.journal)])
    out: dict[str, Any] = {"ds": ds_a}
    write(a_paths, 14)
    got = adopt_by_content(record, size, ds_a.claims()[0])
    if isinstance(got, str):
        raise RuntimeError(f"host b's image was not adopted for a content compare: {got}")
    (work / "b2").mkdir()
    standby = _Standby(work / "b2", ds_a, replica, size, adopted={0: got[1]})
    fio = _background(_fio(a_paths, size, *load))
    try:
        out["hostcrash_image_adopted"] = standby.answers[0]["kept"]
        out["hostcrash_digest_unit"] = got[1]["unit"]
        time.sleep(0.5)
        seconds, sent = standby.sync(ds_a)
        fio.terminate()
        fio.wait(10)
        standby.settle(ds_a)
        out["hostcrash_resync_s"] = round(seconds, 3)
        out["hostcrash_resync_bytes"] = sent
        out["hostcrash_replica_equal"] = _same(image, replica)
    finally:
        if fio.poll() is None:
            fio.terminate()
            fio.wait(10)
        standby.close()
    return out


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(8 * MIB), fb.read(8 * MIB)
            if x != y:
                return False
            if not x:
                return True
