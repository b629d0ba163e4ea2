"""Replica equality and link faults over real loopback TCP.

Ground truth is the primary's snapshot of every epoch (replication_support.Workload):
whatever happens on the link, the backup's region and device-state file must equal
the snapshot of the epoch the backup says it holds, and that epoch must be the last
one the primary saw acknowledged (or the next one, when only the ACK was lost).
"""

from __future__ import annotations

import array
import mmap
import random
import socket
import time
from pathlib import Path

import pytest

from cuju_libvirt.errors import LinkAuthError, LinkError, ProtocolError, ReplicationError
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes
from tests import helpers

from .replication_support import PAGE, Workload, receiving, region_file, resume

PAGES = 512


def _wait_applied(rx: EpochReceiver, epoch: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while rx.last_applied < epoch:
        assert time.monotonic() < deadline, f"epoch {epoch} not applied (at {rx.last_applied})"
        time.sleep(0.002)


def _assert_replica(standby: mmap.mmap, state_path: Path, wl: Workload, epoch: int) -> None:
    assert epoch in wl.snapshots, f"backup claims epoch {epoch}, never produced"
    snap = wl.snapshots[epoch]
    if standby[:] != snap:
        pages = range(PAGES)
        bad = [p for p in pages if standby[p * PAGE : (p + 1) * PAGE] != snap[p * PAGE : (p + 1) * PAGE]]
        pytest.fail(f"replica differs from the snapshot of epoch {epoch} in pages {bad[:10]}")
    assert state_path.read_bytes() == wl.device_states[epoch]


@pytest.mark.timeout(60)
def test_replica_equals_snapshot_of_last_acknowledged_epoch(shm_dir: Path) -> None:
    wl = Workload(seed=11, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    standby = region_file(str(shm_dir / "ram"), PAGES)
    state = shm_dir / "state"
    with receiving(standby, state) as (rx, client):
        tx = EpochSender(client, primary)
        assert tx.handshake(5) == 0
        dirty, dev = wl.full_epoch(primary)
        tx.stage(1, page_indexes(dirty), dev)
        tx.ship()
        for epoch in range(2, 81):
            dirty, dev = wl.next_epoch(primary)
            tx.stage(epoch, page_indexes(dirty), dev)  # pipelined: epoch - 1 may still be in flight
            tx.ship()
            assert tx.wait_ack(epoch - 1, 10)
            if epoch % 20 == 0:  # quiescent point: the replica is exactly this epoch
                assert tx.wait_ack(epoch, 10)
                _wait_applied(rx, epoch)
                _assert_replica(standby, state, wl, epoch)
        assert tx.wait_ack(80, 10)
        tx.close(orderly=True, timeout=10)
        assert rx.wait(10) is True
        assert rx.last_applied == 80
        _assert_replica(standby, state, wl, 80)
        tc, rc = tx.counters(), rx.counters()
        assert tc["epochs_acked"] == rc["epochs_applied"] == 80
        assert tc["wire_bytes"] == rc["wire_bytes"]
        assert tc["pages"] == rc["pages"] == sum(len(d) for d in wl.dirty_log.values())
        assert tc["zero_pages"] == rc["zero_pages"] > 0
        assert tc["saved_bytes"] == tc["zero_pages"] * PAGE
        assert rc["errors"] == tc["errors"] == 0


def _run_until_failure(tx: EpochSender, wl: Workload, primary: mmap.mmap, first: int, count: int) -> int:
    """Ship epochs first.. until the link fails; return the last epoch staged."""
    epoch = first - 1
    try:
        for epoch in range(first, first + count):
            dirty, dev = wl.next_epoch(primary) if epoch > 1 else wl.full_epoch(primary)
            tx.stage(epoch, page_indexes(dirty), dev, timeout=10)
            tx.ship()
            if epoch > first and not tx.wait_ack(epoch - 1, 10):
                pytest.fail(f"no ACK for epoch {epoch - 1} and no error")
        tx.wait_ack(first + count - 1, 10)
    except ReplicationError:
        pass
    return epoch


def _fault_run(shm_dir: Path, seed: int, cut_at: int | None, flip_at: int | None,
               link_keys: LinkKeys | None = None) -> None:
    rng = random.Random(seed)
    wl = Workload(seed=seed, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    standby = region_file(str(shm_dir / "ram"), PAGES)
    state = shm_dir / "state"
    listener = socket.create_server(("127.0.0.1", 0))
    fault = (helpers.CutAt(cut_at) if cut_at is not None
             else helpers.FlipAt(flip_at) if flip_at is not None else None)
    proxy = helpers.Relay(listener.getsockname(), fault)
    client = socket.create_connection(proxy.address, timeout=5)
    server, _ = listener.accept()
    rx = EpochReceiver(standby, str(state))
    tx = EpochSender(client, primary, link_keys=link_keys.primary if link_keys else None)
    try:
        rx.start(server, link_keys=link_keys.backup if link_keys else None)
        assert tx.handshake(5) == 0
        staged = _run_until_failure(tx, wl, primary, 1, 40)
        acked = tx.counters()["last_acked_epoch"]
        # The fault must have ended the session on the backup with the right class of error.
        with pytest.raises(ReplicationError) as info:
            rx.wait(10)
        if flip_at is not None and link_keys is not None:
            assert isinstance(info.value, LinkAuthError), info.value
        elif flip_at is not None:
            assert isinstance(info.value, ProtocolError), info.value
        else:
            assert isinstance(info.value, LinkError), info.value
        tx.close(orderly=False)
        rx.close()
    finally:
        proxy.close()
        listener.close()
        client.close()
        server.close()

    # A new backup process on the same region and journal: exactly one acknowledged epoch.
    rx2 = EpochReceiver(standby, str(state))
    try:
        held = rx2.last_applied
        assert acked <= held <= min(acked + 1, staged), (acked, held, staged)
        if held:
            _assert_replica(standby, state, wl, held)

        # Reconnect without the fault and resynchronise what changed since `held`.
        resume(rx2, primary, wl, more=rng.randint(1, 5))
        _assert_replica(standby, state, wl, wl.epoch)
    finally:
        rx2.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
def test_connection_cut_inside_an_epoch(shm_dir: Path, seed: int) -> None:
    # The initial full epoch is ~1.5 MiB and later ones up to ~260 KiB: cuts land in
    # headers, page tables, page data, device state and trailers alike.
    cut_at = random.Random(1000 + seed).randrange(57, 3_000_000)
    _fault_run(shm_dir, seed, cut_at=cut_at, flip_at=None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
def test_byte_corrupted_on_the_wire(shm_dir: Path, seed: int) -> None:
    flip_at = random.Random(2000 + seed).randrange(56, 2_500_000)
    _fault_run(shm_dir, seed, cut_at=None, flip_at=flip_at)


@pytest.mark.timeout(30)
def test_geometry_mismatch_is_refused_on_both_sides(shm_dir: Path) -> None:
    primary = mmap.mmap(-1, 64 * PAGE)
    standby = mmap.mmap(-1, 32 * PAGE)
    with receiving(standby, shm_dir / "state") as (rx, client):
        tx = EpochSender(client, primary)
        with pytest.raises(ReplicationError) as sent:
            tx.handshake(5)
        with pytest.raises(ProtocolError) as got:
            rx.wait(5)
        assert got.value.code == 6  # CUJU_E_GEOMETRY
        assert sent.value.peer_code == 6
        assert "region" in str(got.value)
        tx.close(orderly=False)


@pytest.mark.timeout(30)
def test_caller_mistakes_raise_value_errors_and_stage_nothing(shm_dir: Path) -> None:
    primary = mmap.mmap(-1, 16 * PAGE)
    primary[:] = b"\x05" * len(primary)
    standby = mmap.mmap(-1, 16 * PAGE)
    with receiving(standby, shm_dir / "state") as (rx, client):
        tx = EpochSender(client, primary)
        with pytest.raises(ValueError, match="no handshake"):
            tx.stage(1, page_indexes([0]), b"")
        assert tx.handshake(5) == 0
        with pytest.raises(ValueError, match="outside the region"):
            tx.stage(1, page_indexes([3, 16]), b"")
        with pytest.raises(ValueError, match="out of sequence"):
            tx.stage(0, page_indexes([3]), b"")
        with pytest.raises(TypeError, match="64-bit"):
            tx.stage(1, array.array("i", [1, 2]), b"")
        with pytest.raises(ValueError, match="without a staged epoch"):
            tx.ship()
        tx.stage(1, page_indexes([3]), b"x")
        with pytest.raises(ValueError, match="out of sequence"):
            tx.stage(2, page_indexes([4]), b"")  # staged twice without ship
        tx.ship()
        assert tx.wait_ack(1, 5)
        tx.close()
        assert rx.wait(5)
        assert standby[3 * PAGE : 4 * PAGE] == primary[3 * PAGE : 4 * PAGE]
        assert standby[: 3 * PAGE] == bytes(3 * PAGE)  # nothing from the refused stages
        assert tx.counters()["epochs_staged"] == 1
        with pytest.raises(LinkError):
            tx.stage(2, page_indexes([4]), b"")
        with pytest.raises(ValueError, match="does not exist"):
            EpochReceiver(standby, str(shm_dir / "missing" / "state"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
def test_close_mid_stream_leaves_every_acknowledged_epoch_applied(shm_dir: Path, seed: int) -> None:
    """What failover does: stop the backup while epochs stream; the replica is then final and exact."""
    wl = Workload(seed=100 + seed, pages=PAGES, per_epoch=200)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    standby = region_file(str(shm_dir / "ram"), PAGES)
    state = shm_dir / "state"
    stop_at = random.Random(seed).randint(3, 30)
    with receiving(standby, state) as (rx, client):
        tx = EpochSender(client, primary)
        tx.handshake(5)
        for epoch in range(1, stop_at + 1):
            dirty, dev = wl.full_epoch(primary) if epoch == 1 else wl.next_epoch(primary)
            tx.stage(epoch, page_indexes(dirty), dev)
            tx.ship()
        assert tx.wait_ack(stop_at - 2, 10)
        rx.close()  # mid-stream: epochs stop_at - 1 and stop_at may be in flight
        acked = tx.counters()["last_acked_epoch"]
        held = rx.last_applied
        assert acked <= held <= stop_at
        assert rx.counters()["epochs_applied"] == held
        _assert_replica(standby, state, wl, held)
        tx.close(orderly=False)


@pytest.mark.timeout(60)
def test_durable_mode_replicates_the_same(shm_dir: Path) -> None:
    """durable=True adds msync/fsync around commit and apply; the replica must not change."""
    wl = Workload(seed=3, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    standby = region_file(str(shm_dir / "ram"), PAGES)
    state = shm_dir / "state"
    with receiving(standby, state, durable=True) as (rx, client):
        tx = EpochSender(client, primary)
        tx.handshake(5)
        for epoch in range(1, 11):
            dirty, dev = wl.full_epoch(primary) if epoch == 1 else wl.next_epoch(primary)
            tx.stage(epoch, page_indexes(dirty), dev)
            tx.ship()
        assert tx.wait_ack(10, 10)
        tx.close()
        assert rx.wait(10)
        _assert_replica(standby, state, wl, 10)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(100, 300))
def test_soak_cut_or_corrupted_link(shm_dir: Path, seed: int) -> None:
    """Opt-in (CUJU_SLOW=1): 200 more random cuts and byte flips."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        _fault_run(shm_dir, seed, cut_at=rng.randrange(57, 3_000_000), flip_at=None)
    else:
        _fault_run(shm_dir, seed, cut_at=None, flip_at=rng.randrange(56, 2_500_000))


@pytest.mark.timeout(60)
def test_large_epochs_take_the_streaming_gather(shm_dir: Path) -> None:
    """Epochs over 16 MiB are gathered with streaming stores at unaligned offsets: still exact."""
    pages = 5000  # ~20 MiB: above the sender's streaming threshold
    wl = Workload(seed=9, pages=pages, per_epoch=3000)
    primary = mmap.mmap(-1, pages * PAGE)
    wl.fill(primary)
    standby = region_file(str(shm_dir / "ram"), pages)
    with receiving(standby, shm_dir / "state") as (rx, client):
        tx = EpochSender(client, primary)
        tx.handshake(5)
        for epoch in (1, 2, 3):
            dirty, dev = wl.full_epoch(primary) if epoch < 3 else wl.next_epoch(primary)
            tx.stage(epoch, page_indexes(dirty), dev)
            tx.ship()
        assert tx.wait_ack(3, 30)
        tx.close()
        assert rx.wait(30)
        assert standby[:] == wl.snapshots[3]
        assert tx.counters()["wire_bytes"] > 2 * (16 << 20)
