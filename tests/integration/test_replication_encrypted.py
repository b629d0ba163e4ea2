"""The encrypted FT link (c_ext/aead.h) over real loopback TCP, against an attacker on the path.

The same ground truth as test_replication.py: the backup's region and device-state file
equal the primary's snapshot of the epoch the backup claims, whatever the relay in the
middle did. Here the relay also reads everything (no guest page in a capture) and
tampers with records (flipped, replayed, injected bytes: refused, never applied).
"""

from __future__ import annotations

import mmap
import random
import socket
from pathlib import Path

import pytest

from cuju_libvirt.errors import LinkAuthError, ProtocolError, ReplicationError
from cuju_libvirt.ft_engine import linkkeys
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes
from tests import helpers

from .replication_support import PAGE, Workload, region_file
from .test_replication import _assert_replica, _fault_run

PAGES = 256
#: A page the attacker must never see: stands for a secret in guest memory.
MARKER = (b"guest-secret-page:" + bytes(range(256)))[:256] * (PAGE // 256)


def _session(shm_dir: Path, keys: LinkKeys | None, rx_keys: bytes | None = None, *, epochs: int = 30,
             fault: helpers.Fault | None = None
             ) -> tuple[helpers.Relay, EpochReceiver, EpochSender, Workload, mmap.mmap, int]:
    wl = Workload(seed=5, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    primary[7 * PAGE : 8 * PAGE] = MARKER
    standby = region_file(str(shm_dir / "ram"), PAGES)
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = helpers.Relay(listener.getsockname(), fault)
    client = socket.create_connection(proxy.address, timeout=5)
    server, _ = listener.accept()
    listener.close()
    rx = EpochReceiver(standby, str(shm_dir / "state"))
    rx.start(server, link_keys=rx_keys if rx_keys is not None else (keys.backup if keys else None))
    tx = EpochSender(client, primary, link_keys=keys.primary if keys else None)
    client.close()
    server.close()
    staged = 0
    try:
        assert tx.handshake(5) == 0
        for epoch in range(1, epochs + 1):
            dirty, dev = wl.full_epoch(primary) if epoch == 1 else wl.next_epoch(primary)
            if epoch % 5 == 0:
                dirty.append(7)  # the marker page travels again and again
            tx.stage(epoch, page_indexes(dirty), dev, timeout=10)
            tx.ship()
            staged = epoch
            if not tx.wait_ack(epoch, 10):
                pytest.fail(f"no ACK for epoch {epoch} and no error")
    except ReplicationError:
        pass
    return proxy, rx, tx, wl, standby, staged


def test_encrypted_replication_is_exact_and_a_capture_shows_no_guest_page(shm_dir: Path) -> None:
    proxy, rx, tx, wl, standby, staged = _session(shm_dir, LinkKeys.derive(linkkeys.new_secret()))
    try:
        assert staged == 30 and tx.counters()["last_acked_epoch"] == 30
        tx.close(orderly=True, timeout=10)
        assert rx.wait(10) is True
        _assert_replica(standby, shm_dir / "state", wl, 30)
        capture = bytes(proxy.captured)
        assert len(capture) > PAGES * PAGE  # the relay saw at least the initial sync
        assert MARKER[:64] not in capture
        assert b"CUJU-FT" not in capture and b"CUJU-END" not in capture  # no frame is readable
    finally:
        rx.close()
        proxy.close()


def test_the_same_capture_in_the_clear_shows_the_page(shm_dir: Path) -> None:
    """Without keys the marker page is on the wire (so the check above can fail)."""
    proxy, rx, tx, _wl, _standby, staged = _session(shm_dir, None, epochs=5)
    try:
        assert staged == 5
        tx.close(orderly=True, timeout=10)
        rx.wait(10)
        assert MARKER[:64] in bytes(proxy.captured)
    finally:
        rx.close()
        proxy.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_flipped_byte_on_the_encrypted_link_is_never_applied(shm_dir: Path, seed: int) -> None:
    flip_at = random.Random(3000 + seed).randrange(0, 2_500_000)
    _fault_run(shm_dir, seed, cut_at=None, flip_at=flip_at, link_keys=LinkKeys.derive(linkkeys.new_secret()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(2))
def test_cut_encrypted_link_leaves_an_acknowledged_epoch(shm_dir: Path, seed: int) -> None:
    cut_at = random.Random(4000 + seed).randrange(10, 2_500_000)
    _fault_run(shm_dir, seed, cut_at=cut_at, flip_at=None, link_keys=LinkKeys.derive(linkkeys.new_secret()))


FAULTS = {"replayed": lambda: helpers.ReplayAfter(200_000), "injected": lambda: helpers.InjectAfter(150_000),
          "reordered": lambda: helpers.SwapAfter(250_000)}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_replayed_injected_or_reordered_records_end_the_session_and_are_never_applied(
        shm_dir: Path, fault: str) -> None:
    keys = LinkKeys.derive(linkkeys.new_secret())
    proxy, rx, tx, wl, standby, staged = _session(shm_dir, keys, fault=FAULTS[fault]())
    try:
        with pytest.raises(ProtocolError) as info:  # LinkAuthError, or a record length out of bounds
            rx.wait(10)
        assert isinstance(info.value, LinkAuthError) or "malformed" in str(info.value), info.value
        acked = tx.counters()["last_acked_epoch"]
        assert acked < staged or staged < 30
        tx.close(orderly=False)
        rx.close()
        held = rx.last_applied
        assert acked <= held <= acked + 1
        if held:
            _assert_replica(standby, shm_dir / "state", wl, held)
    finally:
        rx.close()
        proxy.close()


def test_keys_of_another_connection_are_refused_at_the_handshake(shm_dir: Path) -> None:
    mine, theirs = LinkKeys.derive(linkkeys.new_secret()), LinkKeys.derive(linkkeys.new_secret())
    proxy, rx, tx, _wl, _standby, staged = _session(shm_dir, mine, rx_keys=theirs.backup, epochs=2)
    try:
        assert staged == 0
        with pytest.raises(LinkAuthError):
            rx.wait(10)
        assert rx.last_applied == 0
    finally:
        tx.close(orderly=False)
        rx.close()
        proxy.close()


def test_link_keys_are_distinct_per_direction_and_per_secret() -> None:
    a, b = LinkKeys.derive(linkkeys.new_secret()), LinkKeys.derive(linkkeys.new_secret())
    # each side's tx is the other's rx
    assert a.primary[:44] == a.backup[44:] and a.primary[44:] == a.backup[:44]
    assert a.primary[:32] != a.primary[44:76]  # the two directions never share a key
    assert len({a.primary, b.primary}) == 2
    with pytest.raises(ValueError, match="32 bytes"):
        LinkKeys.derive(b"short")
