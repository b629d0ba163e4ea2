"""A backup or primary process killed (SIGKILL, or dying mid-apply): the replica stays exact.

The backup runs in its own process (replication_peer) on a RAM file; after it dies, a
new backup opened on the same file and journal must hold exactly the snapshot of the
last acknowledged epoch (or of the next one, when only its ACK was lost).
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cuju_libvirt.errors import LinkError, PeerAbortError, ReplicationError
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes

from .replication_support import PAGE, Workload, region_file, resume

PAGES = 512
ROOT = Path(__file__).resolve().parents[2]


class Peer:
    """A replication_peer process in its own process group, killed on exit."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.integration.replication_peer", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()


def _check_reopened(shm_dir: Path, wl: Workload, acked: int, staged: int) -> EpochReceiver:
    standby = region_file(str(shm_dir / "ram"), PAGES)
    rx = EpochReceiver(standby, str(shm_dir / "state"))
    held = rx.last_applied
    assert acked <= held <= min(acked + 1, staged), (acked, held, staged)
    assert standby[:] == wl.snapshots[held], f"replica is not the snapshot of epoch {held}"
    assert (shm_dir / "state").read_bytes() == wl.device_states[held]
    return rx


def _ship(tx: EpochSender, wl: Workload, primary: mmap.mmap, until: float) -> int:
    """Ship epochs until the link fails or `until`; return the last epoch staged."""
    epoch = wl.epoch
    try:
        while time.monotonic() < until:
            dirty, dev = wl.full_epoch(primary) if wl.epoch == 0 else wl.next_epoch(primary)
            epoch = wl.epoch
            tx.stage(epoch, page_indexes(dirty), dev, timeout=10)
            tx.ship()
            if epoch > 1:
                tx.wait_ack(epoch - 1, 10)
    except ReplicationError:
        pass
    return epoch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_backup_killed_and_restarted(shm_dir: Path, seed: int) -> None:
    _backup_killed_and_restarted(shm_dir, seed)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", range(4, 104))
def test_soak_backup_killed_and_restarted(shm_dir: Path, seed: int) -> None:
    """Opt-in (CUJU_SLOW=1): 100 more kills at random moments."""
    _backup_killed_and_restarted(shm_dir, seed)


def _backup_killed_and_restarted(shm_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    wl = Workload(seed=seed, pages=PAGES, per_epoch=200)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        args = ["receive", str(shm_dir / "ram"), str(shm_dir / "state"), str(PAGES), str(port)]
        with Peer(args) as peer:
            listener.settimeout(20)
            conn, _ = listener.accept()
            tx = EpochSender(conn, primary)
            conn.close()
            assert tx.handshake(10) == 0
            # Kill the backup while epochs stream, at a random moment.
            kill_after = rng.uniform(0.02, 0.4)
            deadline = time.monotonic() + kill_after
            staged = _ship(tx, wl, primary, deadline)
            peer.kill()
            staged = max(staged, _ship(tx, wl, primary, time.monotonic() + 5))
            acked = tx.counters()["last_acked_epoch"]
            tx.close(orderly=False)
    assert acked >= 1, "the backup died before acknowledging anything: kill window too short"
    rx = _check_reopened(shm_dir, wl, acked, staged)
    try:
        # The restarted backup continues from there after a fresh handshake.
        resume(rx, primary, wl)
        with open(shm_dir / "ram", "rb") as f:
            assert f.read() == wl.snapshots[wl.epoch]
        assert (shm_dir / "state").read_bytes() == wl.device_states[wl.epoch]
    finally:
        rx.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("crash_epoch", "crash_record"), [(1, 200), (4, 3)])
def test_backup_dies_between_ack_and_end_of_apply(shm_dir: Path, crash_epoch: int, crash_record: int) -> None:
    """The C fault hook stops the backup process mid-apply: a torn region on disk, replayed on open."""
    wl = Workload(seed=77, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        args = ["receive", str(shm_dir / "ram"), str(shm_dir / "state"), str(PAGES), str(port)]
        env = {"CUJU_TEST_CRASH_IN_APPLY": f"{crash_epoch}:{crash_record}"}
        with Peer(args, env) as peer:
            listener.settimeout(20)
            conn, _ = listener.accept()
            tx = EpochSender(conn, primary)
            conn.close()
            assert tx.handshake(10) == 0
            staged = _ship(tx, wl, primary, time.monotonic() + 10)
            assert peer.proc.wait(10) == 86, "the backup did not die in the fault hook"
            acked = tx.counters()["last_acked_epoch"]
            tx.close(orderly=False)
    assert acked >= crash_epoch, "ACK goes out before apply"
    # The region on disk is torn: it is neither the epoch before nor the crashed one.
    with open(shm_dir / "ram", "rb") as f:
        torn = f.read()
    assert torn != wl.snapshots[crash_epoch]
    if crash_epoch > 1:
        assert torn != wl.snapshots[crash_epoch - 1]

    # Dying again in the middle of the replay must not matter either (replay is idempotent).
    replay_args = ["receive", str(shm_dir / "ram"), str(shm_dir / "state"), str(PAGES), "1"]
    with Peer(replay_args, {"CUJU_TEST_CRASH_IN_APPLY": f"{crash_epoch}:{max(1, crash_record // 2)}"}) as p2:
        assert p2.proc.wait(20) == 86, "the replay did not reach the fault hook"

    rx = _check_reopened(shm_dir, wl, acked, staged)
    assert rx.counters()["epochs_replayed"] >= 1
    rx.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3))
def test_primary_killed(shm_dir: Path, seed: int) -> None:
    standby = region_file(str(shm_dir / "ram"), PAGES)
    rx = EpochReceiver(standby, str(shm_dir / "state"))
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            with Peer(["send", str(seed), str(PAGES), str(port)]) as peer:
                listener.settimeout(20)
                conn, _ = listener.accept()
                rx.start(conn)
                conn.close()
                time.sleep(random.Random(seed).uniform(0.1, 0.6))
                peer.kill()
            with pytest.raises(LinkError):
                rx.wait(10)
        held = rx.last_applied
        assert held >= 1
        # Regenerate the primary's epochs from the same seed: the ground truth.
        wl = Workload(seed=seed, pages=PAGES)
        primary = mmap.mmap(-1, PAGES * PAGE)
        wl.fill(primary)
        wl.full_epoch(primary)
        while wl.epoch < held:
            wl.next_epoch(primary)
        assert standby[:] == wl.snapshots[held]
        assert (shm_dir / "state").read_bytes() == wl.device_states[held]
    finally:
        rx.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_backup_journal_out_of_space_is_a_clean_refusal(shm_dir: Path) -> None:
    """A journal on a full file system: an error on both sides, no SIGBUS, nothing applied."""
    tiny = shm_dir / "tiny"
    tiny.mkdir()
    wl = Workload(seed=5, pages=PAGES)
    primary = mmap.mmap(-1, PAGES * PAGE)
    wl.fill(primary)
    # A 1 MiB tmpfs in a private mount namespace: it vanishes with the process.
    script = 'mount -t tmpfs -o size=1m dataplane-tiny "$0" && exec "$@"'
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        args = ["receive", str(shm_dir / "ram"), str(tiny / "state"), str(PAGES), str(port)]
        namespace = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, str(tiny))
        with Peer(args, prefix=namespace) as peer:
            listener.settimeout(20)
            conn, _ = listener.accept()
            tx = EpochSender(conn, primary)
            conn.close()
            assert tx.handshake(10) == 0
            dirty, dev = wl.full_epoch(primary)  # ~1.5 MiB: more than the file system holds
            tx.stage(1, page_indexes(dirty), dev)
            tx.ship()
            with pytest.raises(PeerAbortError) as info:
                tx.wait_ack(1, 10)
            assert info.value.peer_code == 13  # CUJU_E_JOURNAL
            assert "journal" in str(info.value)
            assert peer.proc.wait(10) == 1  # a Python exception, not a signal
            assert peer.proc.stderr is not None
            assert b"JournalError" in peer.proc.stderr.read()
            tx.close(orderly=False)
    with open(shm_dir / "ram", "rb") as f:
        assert f.read() == bytes(PAGES * PAGE)  # nothing applied
