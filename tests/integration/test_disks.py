"""Replicated disks, data path: real block servers (nbdkit + our plugin), writes through
QEMU's NBD client, epochs over a real socket, replicas compared with a model disk.

Each epoch ends when every write of it is replied (qemu-io has exited), the cut QMP
``stop`` gives the engine (it drains and flushes every block request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuju_libvirt import FT_NAMESPACE, disk_server
from cuju_libvirt.cujud.disks import (
    adopt_by_content,
    adopt_own_image,
    choose_replicas,
    left_replicas,
    replica_identity,
    take_over_replica,
)
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CujuError, ReplicationError
from cuju_libvirt.ft_engine import linkkeys
from cuju_libvirt.ft_engine.disks import (
    CHANGED,
    COMPARE,
    FULL,
    DiskSet,
    ProtectedDisk,
    prepare_replica,
    read_record,
    record_takeover,
)
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.replicator import DiskPart, EpochReceiver, EpochSender, page_indexes

from .disk_support import PAGE, ModelDisk, disk_set, served_disks

pytestmark = pytest.mark.skipif(
    shutil.which("nbdkit") is None or shutil.which("qemu-io") is None or not disk_server.PLUGIN.is_file(),
    reason="needs nbdkit, qemu-io and the plugin (scripts/setup.sh)",
)

SIZES = {"vda": (12 << 20) + 4096 * 3, "sdb": 6 << 20}
NO_PAGES = page_indexes([])


def _replicas(directory: Path, disks: list[ModelDisk]) -> list[tuple[str, int]]:
    out = []
    for d in disks:
        path = str(directory / f"{d.target}.replica")
        prepare_replica(path, d.size)
        out.append((path, d.size))
    return out


def _wait_applied(rx: EpochReceiver, epoch: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while rx.last_applied < epoch:
        assert time.monotonic() < deadline, f"epoch {epoch} not applied (at {rx.last_applied})"
        time.sleep(0.002)


def _assert_replicas(disks: list[ModelDisk], replicas: list[tuple[str, int]], epoch: int) -> None:
    for d, (path, _) in zip(disks, replicas, strict=True):
        assert d.image.read_bytes() == d.model, f"{d.target}: the primary image differs from the model"
        got = Path(path).read_bytes()
        if got != d.model:
            first = next(i for i in range(d.size) if got[i] != d.model[i])
            pytest.fail(f"{d.target} epoch {epoch}: replica differs from the model at byte {first}")


@dataclass
class _Pair:
    """A sender and a receiver on one link; the receiver keeps ``replicas`` of ``disks``."""

    tx: EpochSender
    rx: EpochReceiver
    ds: DiskSet
    disks: list[ModelDisk]
    replicas: list[tuple[str, int]]

    def commit(self, epoch: int, dev: bytes = b"", parts: Sequence[DiskPart] | None = None) -> None:
        """Ship ``epoch`` (the journals sealed now, unless ``parts``), wait until it is
        acknowledged and applied, then judge every replica against its model."""
        self.tx.stage(epoch, NO_PAGES, dev, disks=self.ds.seal(epoch) if parts is None else parts)
        self.tx.ship()
        assert self.tx.wait_ack(epoch, 10)
        self.ds.acked(epoch)
        _wait_applied(self.rx, epoch)
        _assert_replicas(self.disks, self.replicas, epoch)


@contextlib.contextmanager
def _pair(shm_dir: Path, disks: list[ModelDisk], ds: DiskSet, *,
          replicas: list[tuple[str, int]] | None = None, keys: LinkKeys | None = None) -> Iterator[_Pair]:
    """A backup in this process over a socketpair (closed afterwards, also on failure)."""
    replicas = _replicas(shm_dir, disks) if replicas is None else replicas
    region, standby = mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE)
    a, b = socket.socketpair()
    rx = EpochReceiver(standby, str(shm_dir / "state"), disks=replicas)
    try:
        rx.start(b, link_keys=keys.backup if keys else None)
        tx = EpochSender(a, region, disk_sizes=ds.sizes, link_keys=keys.primary if keys else None)
        try:
            yield _Pair(tx, rx, ds, disks, replicas)
        finally:
            tx.close(orderly=False, timeout=0)
    finally:
        rx.close()
        a.close()
        b.close()


@pytest.mark.timeout(120)
def test_two_disks_replica_equals_model_at_every_epoch(shm_dir: Path) -> None:
    rng = random.Random(8)
    with served_disks(shm_dir, SIZES) as disks:
        ds = disk_set(disks)
        try:
            with _pair(shm_dir, disks, ds) as pair:
                assert pair.tx.handshake(5) == 0
                for epoch in range(1, 26):
                    for d in disks:
                        if rng.random() < 0.8:
                            d.run(d.ops(rng, rng.randrange(1, 25)))
                    pair.commit(epoch, b"dev%d" % epoch)
                assert pair.rx.counters()["disk_records"] > 100
                info = ds.info()
                assert all(i["trims"] > 0 and i["zeroes"] > 0 for i in info), info
                pair.tx.close()
                assert pair.rx.wait(10)
        finally:
            ds.close()


@pytest.mark.timeout(120)
def test_overflowing_epoch_is_sent_from_the_bitmap(shm_dir: Path) -> None:
    """An epoch writing more than its journal buffer holds ships the marked blocks instead."""
    rng = random.Random(3)
    with served_disks(shm_dir, {"vda": 8 << 20}, capacity=64 << 10) as disks:
        ds = disk_set(disks)
        try:
            with _pair(shm_dir, disks, ds) as pair:
                pair.tx.handshake(5)
                for epoch in range(1, 6):
                    disks[0].run(disks[0].ops(rng, 40))
                    pair.commit(epoch)
            assert ds.info()[0]["overflows"] >= 3
        finally:
            ds.close()


@pytest.mark.timeout(120)
def test_borrowed_and_copied_parts_in_one_epoch_over_an_encrypted_link(shm_dir: Path) -> None:
    """A sealed journal buffer is sent from the journal itself (borrowed: the pause copies
    nothing), an overflowed one from a copy built from its bitmap; both in the same epochs,
    between encrypted pages and device state: every replica equals its model."""
    rng = random.Random(13)
    with served_disks(shm_dir, {"vda": 6 << 20}) as big, \
            served_disks(shm_dir, {"vdb": 4 << 20}, capacity=64 << 10) as tiny:
        disks = big + tiny
        ds = disk_set(disks)
        try:
            with _pair(shm_dir, disks, ds, keys=LinkKeys.derive(linkkeys.new_secret())) as pair:
                pair.tx.handshake(5)
                kinds: set[tuple[int, bool]] = set()
                for epoch in range(1, 9):
                    big[0].run(big[0].ops(rng, 8))
                    tiny[0].run(tiny[0].ops(rng, 30))
                    parts = ds.seal(epoch)
                    kinds |= {(part[0], len(part) == 3 and bool(part[2])) for part in parts}
                    pair.commit(epoch, b"dev%d" % epoch, parts)
                assert kinds == {(0, True), (1, False)}, kinds
        finally:
            ds.close()


@pytest.mark.timeout(120)
def test_initial_sync_sparse_then_journal_then_incremental_resync(shm_dir: Path) -> None:
    """Full sync of a disk written before protection (only allocated blocks are sent), with
    writes going on meanwhile; then a backup outage: the resync sends only what changed."""
    rng = random.Random(5)
    with served_disks(shm_dir, {"vda": 32 << 20}) as disks:
        d = disks[0]
        d.run(d.ops(rng, 30))  # before protection
        ds = disk_set(disks)
        replicas = _replicas(shm_dir, disks)

        def session(epoch0: int, full: bool) -> tuple[int, int]:
            with _pair(shm_dir, disks, ds, replicas=replicas) as pair:
                tx = pair.tx
                held = tx.handshake(5)
                assert held == epoch0
                total = ds.begin_sync(full=full)
                epoch = held
                d.run(d.ops(rng, 10))  # the guest keeps writing during the sync
                while parts := ds.sync_chunk(256 << 10):
                    epoch += 1
                    tx.stage(epoch, NO_PAGES, b"", disks=parts)
                    tx.ship()
                    assert tx.wait_ack(epoch, 10)
                done, goal = ds.sync_progress()
                assert done == goal == total
                epoch += 1
                pair.commit(epoch)  # the journal since begin_sync
                # Then the backup goes away with an epoch in flight and unacknowledged.
                d.run(d.ops(rng, 5))
                epoch += 1
                tx.stage(epoch, NO_PAGES, b"", disks=ds.seal(epoch))
                return epoch - 1, total

        try:
            applied, full_bytes = session(0, full=True)
            allocated = os.stat(d.image).st_blocks * 512
            assert full_bytes <= allocated + (64 << 10) * 64, (full_bytes, allocated)
            assert full_bytes < d.size // 2, "the full sync must skip holes"
            d.run(d.ops(rng, 8))  # written while there is no backup
            _, resync_bytes = session(applied, full=False)
            assert 0 < resync_bytes < full_bytes
        finally:
            ds.close()


def _new_standby(shm_dir: Path, ds: DiskSet, replicas: list[tuple[str, int]]) -> list[dict[str, object]]:
    """What cujud does at ``standby-create``: the primary's claims, the backup's answers (it
    replays the last standby's receiver journal first), then a fresh receiver journal."""
    claims = ds.claims()
    answers = choose_replicas(replicas, claims, str(shm_dir / "state.journal"), [p for p, _ in replicas])
    ds.set_replicas(answers, claims)
    for leftover in ("state", "state.journal", "state.tmp"):  # as BackupEngine.start
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_dir / leftover)
    return answers


@pytest.mark.timeout(240)
def test_a_new_standby_with_a_proven_replica_gets_only_the_changed_blocks(shm_dir: Path) -> None:
    """docs/disks.md, "Resync": a new standby (it holds no epoch of the new session) whose
    replica survived and is proven gets only the blocks changed since; a cujud killed in
    the middle of that resync loses no block (the bitmap persisted beside the journal);
    a server killed (the journal changes lineage) or a replica that is not the one paired
    means a full copy into an emptied replica. Every session ends with replica == model."""
    rng = random.Random(21)
    modes: list[str] = []

    def progress(_target: str, _done: int, _total: int, mode: str, _why: str) -> None:
        modes.append(mode)

    with served_disks(shm_dir, {"vda": 24 << 20}) as disks:
        d = disks[0]
        d.run(d.ops(rng, 40))  # before protection
        replicas = _replicas(shm_dir, disks)
        ds = disk_set(disks)
        ds.set_progress(progress)

        def session(*, finish: bool = True) -> int:
            with _pair(shm_dir, disks, ds, replicas=replicas) as pair:
                tx = pair.tx
                assert tx.handshake(5) == 0  # a new standby: it holds nothing of this session
                total = ds.begin_sync(full=True)
                epoch = 0
                d.run(d.ops(rng, 6))  # the guest keeps writing during the sync
                while parts := ds.sync_chunk(128 << 10):
                    epoch += 1
                    tx.stage(epoch, NO_PAGES, b"", disks=parts)
                    tx.ship()
                    assert tx.wait_ack(epoch, 10)
                    if not finish:
                        return total  # cujud killed in the middle of the resync
                epoch += 1
                pair.commit(epoch, b"dev")  # the journal since begin_sync: replica == model
                ds.sync_complete()
                # The backup goes away with an epoch in flight.
                d.run(d.ops(rng, 5))
                epoch += 1
                tx.stage(epoch, NO_PAGES, b"", disks=ds.seal(epoch))
                tx.ship()
                return total

        try:
            answers = _new_standby(shm_dir, ds, replicas)
            assert answers[0]["kept"] is False
            full_bytes = session()
            assert modes[-1] == FULL
            rid = answers[0]["replica"]
            assert replica_identity(replicas[0][0])["replica"] == rid

            d.run(d.ops(rng, 8))  # written while there is no backup
            answers = _new_standby(shm_dir, ds, replicas)
            assert answers == [{"replica": rid, "kept": True, "written": 0}]
            changed_bytes = session()
            assert modes[-1] == CHANGED
            assert 0 < changed_bytes < full_bytes // 2, (changed_bytes, full_bytes)

            # A resync cut short by a cujud killed after its first chunk; then another
            # cujud (a new DiskSet on the same journal) resyncs again.
            d.run(d.ops(rng, 8))
            _new_standby(shm_dir, ds, replicas)
            session(finish=False)
            ds.close()
            ds = disk_set(disks)
            ds.set_progress(progress)
            d.run(d.ops(rng, 3))
            assert _new_standby(shm_dir, ds, replicas)[0]["kept"] is True
            session()  # replica == model: the blocks the cut resync never sent were not lost
            assert modes[-1] == CHANGED

            # A killed server: the journal's lineage changes, the replica cannot be trusted.
            pid = disk_server.running_pid(d.paths)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while disk_server.running_pid(d.paths) is not None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            disk_server.start(d.paths, str(d.image), target="vda")
            d.run(d.ops(rng, 3))
            assert ds.claims()[0]["replica"] == ""
            answers = _new_standby(shm_dir, ds, replicas)
            assert answers[0]["kept"] is False and answers[0]["replica"] != rid
            assert os.stat(replicas[0][0]).st_blocks == 0, "a replica not kept must start empty"
            session()
            assert modes[-1] == FULL

            # A replica that is not the one the primary paired with (another id) is not kept.
            d.run(d.ops(rng, 3))
            ident = replicas[0][0] + ".id"
            Path(ident).write_text(Path(ident).read_text().replace(str(replica_identity(replicas[0][0])["replica"]),
                                                                   "0123456789abcdef"))
            assert _new_standby(shm_dir, ds, replicas)[0]["kept"] is False
            session()
            assert modes[-1] == FULL
        finally:
            ds.close()


@pytest.mark.timeout(60)
def test_server_restart_keeps_the_journal(shm_dir: Path) -> None:
    rng = random.Random(11)
    with served_disks(shm_dir, {"vda": 4 << 20}) as disks:
        d = disks[0]
        d.run(d.ops(rng, 10))
        first = disk_server.running_pid(d.paths)
        assert first is not None
        assert disk_server.served_image(d.paths) == str(d.image)  # what a sync reads (primary_disks)
        # The server is no child of its starter (nbdkit's own daemon): it outlives cujud.
        assert f"PPid:\t{os.getpid()}\n" not in Path(f"/proc/{first}/status").read_text()
        assert disk_server.stop(d.paths)
        disk_server.start(d.paths, str(d.image), target="vda")
        assert disk_server.running_pid(d.paths) not in (None, first)
        d.run(d.ops(rng, 10))
        ds = disk_set(disks)
        try:
            assert ds.info()[0]["generation"] == 2
            with _pair(shm_dir, disks, ds) as pair:
                pair.tx.handshake(5)
                pair.commit(1)  # both servers' writes, in order
        finally:
            ds.close()


@pytest.mark.timeout(60)
def test_backup_with_other_disks_refuses_the_session(shm_dir: Path) -> None:
    with served_disks(shm_dir, {"vda": 4 << 20}) as disks:
        ds = disk_set(disks)
        other = str(shm_dir / "other.replica")
        prepare_replica(other, 8 << 20)
        try:
            with _pair(shm_dir, disks, ds, replicas=[(other, 8 << 20)]) as pair, \
                    pytest.raises(ReplicationError, match="disk"):
                pair.tx.handshake(5)
        finally:
            ds.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("crash", "crash_record", "exit_code"), [
    ("CUJU_TEST_CRASH_IN_APPLY", 0, 86),        # between its ACK and the apply: nothing applied yet
    ("CUJU_TEST_CRASH_IN_DISK_APPLY", 1, 87),   # while applying: one disk record applied
    ("CUJU_TEST_CRASH_IN_DISK_APPLY", 7, 87),
])
def test_backup_killed_applying_disk_records_holds_a_committed_epoch(
    shm_dir: Path, crash: str, crash_record: int, exit_code: int
) -> None:
    """The backup dies after acknowledging epoch 4, before it applied anything of it or after
    one or seven of its disk records: reopened on the same journal it holds exactly epoch 4,
    on both disks."""
    rng = random.Random(crash_record)
    crash_epoch = 4
    # Each epoch carries one page: the page apply (first) is where the ACK-to-apply crash fires.
    one_page = page_indexes([0])
    with served_disks(shm_dir, SIZES) as disks:
        ds = disk_set(disks)
        replicas = _replicas(shm_dir, disks)
        state = str(shm_dir / "state")
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        env = {**os.environ, crash: f"{crash_epoch}:{crash_record}"}
        root = Path(__file__).resolve().parents[2]
        peer = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.disk_support", "receive", state, str(port),
             *(f"{p}:{s}" for p, s in replicas)],
            cwd=root, env=env, stdout=subprocess.PIPE, text=True,
        )
        snapshots: dict[int, list[bytes]] = {}
        try:
            conn, _ = listener.accept()
            region = mmap.mmap(-1, PAGE)
            tx = EpochSender(conn, region, disk_sizes=ds.sizes)
            conn.close()
            tx.handshake(10)
            for epoch in range(1, crash_epoch + 1):
                for d in disks:
                    d.run(d.ops(rng, 12))
                snapshots[epoch] = [bytes(d.model) for d in disks]
                tx.stage(epoch, one_page, b"state%d" % epoch, disks=ds.seal(epoch))
                tx.ship()
                if epoch < crash_epoch:
                    assert tx.wait_ack(epoch, 10)
                    ds.acked(epoch)
            assert peer.wait(20) == exit_code  # the fault-injection exit in the apply
            # The ACK left before the apply began: it may or may not have arrived.
            with contextlib.suppress(ReplicationError):
                tx.wait_ack(crash_epoch, 5)
            tx.close(orderly=False, timeout=0)
        finally:
            if peer.poll() is None:
                peer.send_signal(signal.SIGKILL)
                peer.wait(5)
            listener.close()
        # A new backup on the same journal replays the committed epoch before anything else.
        standby = mmap.mmap(-1, PAGE)
        rx = EpochReceiver(standby, state, disks=replicas)
        try:
            assert rx.last_applied == crash_epoch
            assert rx.counters()["epochs_replayed"] == 1
            assert Path(state).read_bytes() == b"state%d" % crash_epoch
            for d, (path, _), want in zip(disks, replicas, snapshots[crash_epoch], strict=True):
                assert Path(path).read_bytes() == want, f"{d.target}: replica is not epoch {crash_epoch}"
                # The same judgement by QEMU's own tool, against a copy of the expected disk.
                expect = shm_dir / f"{d.target}.expected"
                expect.write_bytes(want)
                cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expect), path],
                                     capture_output=True, text=True, timeout=60, check=False)
                assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        finally:
            rx.close()
            ds.close()


def same_file(image: Path, replica: str) -> None:
    """The replica holds the primary's file, then zeros up to the export's end."""
    prim, rep = image.read_bytes(), Path(replica).read_bytes()
    assert rep[:len(prim)] == prim and rep[len(prim):].count(0) == len(rep) - len(prim)


@pytest.mark.timeout(120)
def test_qcow2_is_replicated_byte_for_byte_and_may_grow(shm_dir: Path) -> None:
    """QEMU decodes the qcow2 over NBD; the server journals the file's bytes; the file grows
    (allocations) inside the larger export; the replica is the same qcow2.

    The replica starts as the backup makes it for a new standby (``choose_replicas``): an
    empty qcow2 of the disk's virtual size that the standby's QEMU can open before the sync
    (all zeros would be 'not in qcow2 format'). Its tables here span more of the file than
    the primary's (64 KiB clusters, the primary has 4 KiB ones): the sync must overwrite
    them, holes too, or the replica would not equal the primary's file."""
    image = shm_dir / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "24M"],
                   check=True, timeout=30)
    before = image.stat().st_size
    size = disk_server.export_size_for(str(image), "qcow2")
    assert size is not None and size >= (24 << 20)
    paths = disk_server.ServerPaths.under(shm_dir, "vda")
    disk_server.start(paths, str(image), target="vda", export_size=size)
    ds = None
    try:
        ds = disk_set([ModelDisk("vda", image, paths, size)])
        assert ds.sizes == (size,)
        replica = str(shm_dir / "vda.replica.qcow2")
        fmt = {"format": "qcow2", "virtual_size": 24 << 20, "cluster_size": 65536}
        answers = choose_replicas([(replica, size)], [{}], None, ["vda"], formats=[fmt])
        assert answers[0]["kept"] is False and answers[0]["written"] > before
        assert os.stat(replica).st_size == size
        assert disk_server.image_info(replica, "qcow2")["virtual-size"] == 24 << 20  # QEMU can open it
        ds.set_replicas(answers, ds.claims())
        region, standby = mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE)
        a, b = socket.socketpair()
        rx = EpochReceiver(standby, str(shm_dir / "state"), disks=[(replica, size)])
        rx.start(b)
        tx = EpochSender(a, region, disk_sizes=ds.sizes)
        rng = random.Random(2)
        try:
            tx.handshake(5)
            epoch = 0
            ds.begin_sync(full=True)  # the header and tables written before protection
            while parts := ds.sync_chunk():
                epoch += 1
                tx.stage(epoch, NO_PAGES, b"", disks=parts)
                tx.ship()
            synced = epoch
            assert tx.wait_ack(synced, 10)
            _wait_applied(rx, synced)
            same_file(image, replica)  # nothing of the placeholder is left
            for epoch in range(synced + 1, synced + 6):
                cmds = [f"write -P {rng.randrange(1, 256)} {rng.randrange(0, 23 << 8) * 4096} 65536"
                        for _ in range(20)]
                io = subprocess.run(["qemu-io", "-f", "qcow2", *[x for c in cmds for x in ("-c", c)],
                                     f"nbd+unix:///vda?socket={paths.socket}"],
                                    capture_output=True, text=True, timeout=60, check=False)
                assert io.returncode == 0, io.stderr
                tx.stage(epoch, NO_PAGES, b"", disks=ds.seal(epoch))
                tx.ship()
                assert tx.wait_ack(epoch, 10)
                ds.acked(epoch)
                _wait_applied(rx, epoch)
                same_file(image, replica)
            assert image.stat().st_size > before  # it grew inside the export
            for argv in (["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image), replica],
                         ["qemu-img", "check", "-f", "qcow2", replica]):
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
                assert done.returncode == 0, done.stdout + done.stderr
        finally:
            tx.close(orderly=False, timeout=0)
            rx.close()
            a.close()
            b.close()
    finally:
        if ds is not None:
            ds.close()
        disk_server.stop(paths)


@pytest.mark.timeout(60)
def test_a_restarted_cujud_takes_back_the_replicas_of_a_left_standby_as_they_are(tmp_path: Path) -> None:
    """A standby an earlier cujud left holds its committed epochs in its replicas: taking it
    back keeps them byte for byte (the reopen first emptied them, as for a new standby that
    proves nothing) and takes the image its block server serves; it refuses when that server
    is gone (the standby's QEMU lost its disk)."""
    uuid = "7a3c0e52-13aa-4c55-8f00-00000000d15c"
    disk = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            "<source file='/var/lib/libvirt/images/vm.raw'/><target dev='vda' bus='virtio'/></disk>")
    xml = (f"<domain type='qemu'><name>vm</name><uuid>{uuid}</uuid><metadata>"
           f"<cuju:ft xmlns:cuju='{FT_NAMESPACE}' peer='b'><cuju:disk target='vda'>{disk}</cuju:disk>"
           "</cuju:ft></metadata></domain>")
    size = 1 << 20
    content = random.Random(13).randbytes(size)
    spec = parse_domain(xml)
    assert spec is not None
    replica = Path(spec.disks[0].replica_path(str(tmp_path), uuid))
    replica.parent.mkdir(parents=True)
    replica.write_bytes(content)
    paths = disk_server.ServerPaths.of(uuid, "vda")
    with pytest.raises(CujuError, match="block server of its replica no longer runs"):
        left_replicas(uuid, xml, [size])
    disk_server.start(paths, str(replica), target="vda")
    try:
        assert left_replicas(uuid, xml, [size]) == [(str(replica), size)]
        assert replica.read_bytes() == content
    finally:
        disk_server.stop(paths)
        disk_server.forget(paths)
        with contextlib.suppress(OSError):
            Path(paths.socket).parent.rmdir()
    assert replica.read_bytes() == content


@pytest.mark.timeout(240)
@pytest.mark.parametrize("last_epoch", ["applied, its ACK lost", "not applied", "image changed after",
                                        "host crashed"])
def test_after_a_failover_the_old_primarys_own_image_gets_only_what_either_side_changed(
    shm_dir: Path, last_epoch: str
) -> None:
    """docs/disks.md, "Resync after a failover": host a protects the disk onto host b's
    replica; a's last epoch reaches b (its ACK is lost) or not, a writes on and dies (its
    server stops cleanly, as the release hook stops it); b takes over its replica (its own
    server journals every write from then on) and writes on. Re-protected onto a, a offers
    its own image and the blocks its journal marked since its last acknowledged epoch; b
    sends only the union with its own marks, and a's image then equals b's disk (its model)
    at every epoch.

    When a's journal cannot say what a changed (the image changed while no server ran, or
    host a crashed: its server killed after its last writes, its tmpfs journal gone), a's
    durable pairing record still names the image and the replica it was paired with: a
    sends the image's content digests, b compares its own disk with them while it writes on
    and sends only the units that differ (docs/disks.md, "Resync after a primary-host
    crash"); without a record of that replica a's lineage is unknown and it is refused."""
    rng = random.Random(33)
    modes: list[str] = []
    record = str(shm_dir / "state-a" / "disks" / "vda.pair")
    host_b = shm_dir / "b"
    host_b.mkdir()
    b_paths = disk_server.ServerPaths.under(host_b, "vda")
    with served_disks(shm_dir, {"vda": 24 << 20}) as disks:
        a = disks[0]
        a.run(a.ops(rng, 40))  # before protection
        replicas = _replicas(host_b, disks)
        ds = DiskSet([ProtectedDisk(a.target, str(a.image), a.paths.journal, record)])
        ds_b = None
        try:
            first = _new_standby(shm_dir, ds, replicas)
            with _pair(shm_dir, disks, ds, replicas=replicas) as pair:
                tx = pair.tx
                assert tx.handshake(5) == 0
                full_bytes = ds.begin_sync(full=True)
                epoch = 0
                while parts := ds.sync_chunk(256 << 10):
                    epoch += 1
                    tx.stage(epoch, NO_PAGES, b"", disks=parts)
                    tx.ship()
                    assert tx.wait_ack(epoch, 10)
                epoch += 1
                pair.commit(epoch, b"dev")
                ds.sync_complete()
                assert read_record(record) == {"replica": first[0]["replica"], "image": str(a.image),
                                               "size": a.size}
                for _ in range(3):
                    a.run(a.ops(rng, 5))
                    epoch += 1
                    pair.commit(epoch)
                a.run(a.ops(rng, 5))
                epoch += 1
                tx.stage(epoch, NO_PAGES, b"", disks=ds.seal(epoch))
                if last_epoch != "not applied":
                    tx.ship()  # committed and applied on b; a never handles the ACK
                    _wait_applied(pair.rx, epoch)
                taken = bytearray(Path(replicas[0][0]).read_bytes())  # b's disk at the takeover
                a.run(a.ops(rng, 6))  # a writes on after its last seal, then dies
            ds.close()
            if last_epoch == "host crashed":  # its server dies at once, its tmpfs with the journal
                pid = disk_server.running_pid(a.paths)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                while disk_server.running_pid(a.paths) is not None:
                    time.sleep(0.01)
                for left in Path(a.paths.journal).parent.glob(Path(a.paths.journal).name + "*"):
                    left.unlink()
            else:
                disk_server.stop(a.paths)  # the release hook: a clean stop
            if last_epoch == "image changed after":
                with open(a.image, "r+b") as f:  # e.g. an operator's qemu-img on host a
                    f.write(b"x")

            # b takes over: its server journals the replica, the VM writes on.
            disk_server.start(b_paths, replicas[0][0], target="vda")
            take_over_replica(replicas[0][0], b_paths.journal)
            assert not Path(replicas[0][0] + ".id").exists()
            b = ModelDisk("vda", Path(replicas[0][0]), b_paths, a.size, taken)
            b.run(b.ops(rng, 8))
            ds_b = disk_set([b])
            ds_b.set_progress(lambda _t, _d, _n, mode, _why: modes.append(mode))
            claims = ds_b.claims()
            assert claims[0]["replica"] == ""
            assert claims[0]["takeover"]["from_replica"] == first[0]["replica"]

            got = adopt_own_image(a.paths, a.size, claims[0], target="vda")
            mode = CHANGED
            if last_epoch in ("image changed after", "host crashed"):
                assert isinstance(got, str), got
                assert ("changed" if last_epoch == "image changed after" else "never completed a sync") in got
                assert disk_server.running_pid(a.paths) is None
                other = shm_dir / "other.pair"  # a record of another pairing: unknown lineage too
                other.write_text(json.dumps({"replica": "0" * 16, "image": str(a.image), "size": a.size}))
                for unknown in ("", str(shm_dir / "none.pair"), str(other)):
                    assert "unknown lineage" in str(adopt_by_content(unknown, a.size, claims[0]))
                got = adopt_by_content(record, a.size, claims[0])
                mode = COMPARE
            assert not isinstance(got, str), got
            image, extra = got
            assert image == str(a.image)
            if mode == CHANGED:
                # Once only: a second attempt (this resync cut short) needs the durable record.
                again = adopt_own_image(a.paths, a.size, claims[0], target="vda")
                assert "never completed a sync" in str(again)
            answers = choose_replicas([(image, a.size)], claims, None, ["vda"], adopted={0: extra})
            assert answers[0]["kept"] is True
            ds_b.set_replicas(answers, claims)
            standby_a = shm_dir / "a-standby"  # the new standby's receiver journal: a fresh one
            standby_a.mkdir()
            with _pair(standby_a, [b], ds_b, replicas=[(image, a.size)]) as pair:
                tx = pair.tx
                assert tx.handshake(5) == 0  # a new standby on a
                total = ds_b.begin_sync(full=True)
                assert modes[-1] == mode
                b.run(b.ops(rng, 4))  # b writes on during the resync
                epoch = 0
                while parts := ds_b.sync_chunk(128 << 10):
                    epoch += 1
                    tx.stage(epoch, NO_PAGES, b"", disks=parts)
                    tx.ship()
                    assert tx.wait_ack(epoch, 10)
                sent = ds_b.sync_sent()[0]
                if mode == CHANGED:
                    assert sent == total
                assert 0 < sent < full_bytes // 2, (sent, full_bytes)
                epoch += 1
                pair.commit(epoch, b"dev")  # a's image == b's disk == its model
                ds_b.sync_complete()
                b.run(b.ops(rng, 4))
                pair.commit(epoch + 1)
            assert ds_b.claims()[0]["replica"] == answers[0]["replica"]  # paired as usual from here
            assert "takeover" not in ds_b.claims()[0]
        finally:
            ds.close()
            if ds_b is not None:
                ds_b.close()
            disk_server.stop(b_paths)


@pytest.mark.timeout(60)
def test_a_full_copy_after_a_failover_says_why_the_backups_own_image_was_refused(shm_dir: Path) -> None:
    """The backup's reason (``refused``: e.g. no durable record of that replica, unknown
    lineage) reaches the primary's log and status (the progress' ``why``), with the full copy."""
    whys: list[tuple[str, str]] = []
    with served_disks(shm_dir, {"vda": 4 << 20}) as disks:
        ds = disk_set(disks)
        try:
            record_takeover(disks[0].paths.journal, {"replica": "ab" * 8, "lineage": "cd" * 8})
            claims = ds.claims()
            assert claims[0]["takeover"]["block_size"] == ds.info()[0]["block_size"]
            ds.set_replicas([{"replica": "ef" * 8, "kept": False, "refused": "unknown lineage, say"}], claims)
            ds.set_progress(lambda _t, _d, _n, mode, why: whys.append((mode, why)))
            ds.begin_sync(full=True)
        finally:
            ds.close()
    assert whys[-1] == (FULL, "full sparse copy (the backup's own image cannot be the replica: "
                              "unknown lineage, say)")


@pytest.mark.timeout(60)
def test_every_log_line_about_the_disks_names_the_vm(shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two protected VMs' disks are both 'vda': cujud's lines say whose (the logger, as the engine's)."""
    caplog.set_level(logging.INFO, logger="cuju_libvirt.ft_engine.disks")
    with served_disks(shm_dir, {"vda": 4 << 20}) as disks:
        ds = DiskSet([ProtectedDisk(d.target, str(d.image), d.paths.journal) for d in disks], tag="web.1")
        try:
            ds.begin_sync(full=True)
            ds.sync_complete()
        finally:
            ds.close()
    lines = [r for r in caplog.records if r.name.startswith("cuju_libvirt.ft_engine.disks")]
    assert lines, caplog.text
    assert all(r.name == "cuju_libvirt.ft_engine.disks.web_1" for r in lines), [r.name for r in lines]
    assert any("disk vda: full sparse copy" in r.getMessage() for r in lines), caplog.text
