"""Ground truth for the replication tests: a deterministic guest-memory workload.

A :class:`Workload` writes into a primary region the way a guest would between
two epochs (whole pages rewritten, a few bytes changed, pages zeroed, pages
reported dirty though unchanged, indexes listed twice) and keeps a snapshot of
the whole region and the device state at every epoch. The same seed gives the
same epochs in another process, so a test can check a replica against the
snapshot of whatever epoch it claims to hold.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes

PAGE = 4096


@dataclass
class Workload:
    seed: int
    pages: int
    #: dirty pages per epoch (upper bound; the actual count varies)
    per_epoch: int = 64
    snapshots: dict[int, bytes] = field(default_factory=dict)
    device_states: dict[int, bytes] = field(default_factory=dict)
    epoch: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.dirty_log: dict[int, list[int]] = {}

    def fill(self, region: mmap.mmap) -> None:
        """Initial guest RAM: random pages with every fourth page zero."""
        for p in range(self.pages):
            data = bytes(PAGE) if p % 4 == 0 else self.rng.randbytes(PAGE)
            region[p * PAGE : (p + 1) * PAGE] = data

    def full_epoch(self, region: mmap.mmap) -> tuple[list[int], bytes]:
        """The initial synchronisation: every page."""
        return self._record(region, list(range(self.pages)))

    def next_epoch(self, region: mmap.mmap) -> tuple[list[int], bytes]:
        """Mutate the region like a running guest; return (dirty indexes, device state)."""
        rng = self.rng
        dirty: list[int] = []
        for _ in range(rng.randint(1, self.per_epoch)):
            p = rng.randrange(self.pages)
            base = p * PAGE
            kind = rng.random()
            if kind < 0.35:  # sub-page change: a few bytes
                off = rng.randrange(PAGE - 16)
                region[base + off : base + off + 16] = rng.randbytes(16)
            elif kind < 0.55:  # page zeroed (balloon, freed memory)
                region[base : base + PAGE] = bytes(PAGE)
            elif kind < 0.85:  # whole page rewritten
                region[base : base + PAGE] = rng.randbytes(PAGE)
            # else: reported dirty but unchanged (tracker false positive)
            dirty.append(p)
            if rng.random() < 0.05:
                dirty.append(p)  # listed twice
        return self._record(region, dirty)

    def _record(self, region: mmap.mmap, dirty: list[int]) -> tuple[list[int], bytes]:
        self.epoch += 1
        self.dirty_log[self.epoch] = dirty
        size = self.rng.choice((0, 1, 100, 4096, 70_000))
        state = self.rng.randbytes(size)
        self.snapshots[self.epoch] = bytes(region)
        self.device_states[self.epoch] = state
        return dirty, state


def dirty_after(workload: Workload, held: int) -> list[int]:
    """Every page written in epochs after ``held`` (what a resync after reconnect must send)."""
    pages: set[int] = set()
    for e in range(held + 1, workload.epoch + 1):
        pages.update(workload.dirty_log[e])
    return sorted(pages)


def resume(rx: EpochReceiver, primary: mmap.mmap, wl: Workload, more: int = 3) -> None:
    """A fresh session on a reopened backup: handshake, resync what changed since, run on.

    Ends with an orderly close; the caller compares the replica with ``wl.snapshots[wl.epoch]``.
    """
    held = rx.last_applied
    client, server = loopback_pair()
    try:
        rx.start(server)
        tx = EpochSender(client, primary)
        assert tx.handshake(5) == held
        if held == 0:
            dirty, dev = wl.full_epoch(primary)
        else:
            since = dirty_after(wl, held)
            dirty, dev = wl.next_epoch(primary)
            dirty = sorted(set(dirty) | set(since))
        tx.stage(wl.epoch, page_indexes(dirty), dev)
        tx.ship()
        for _ in range(more):
            dirty, dev = wl.next_epoch(primary)
            tx.stage(wl.epoch, page_indexes(dirty), dev)
            tx.ship()
        assert tx.wait_ack(wl.epoch, 10)
        tx.close(orderly=True, timeout=10)
        assert rx.wait(10)
        assert rx.last_applied == wl.epoch
    finally:
        client.close()
        server.close()


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    return client, server


@contextlib.contextmanager
def receiving(
    standby: mmap.mmap, state_path: str | os.PathLike[str], durable: bool = False
) -> Iterator[tuple[EpochReceiver, socket.socket]]:
    """A backup started on one end of a loopback TCP pair: yields it and the primary's end.

    The receiver and both sockets are closed on leaving, whatever ended the block.
    """
    client, server = loopback_pair()
    rx = EpochReceiver(standby, str(state_path), durable=durable)
    try:
        rx.start(server)
        yield rx, client
    finally:
        rx.close()
        client.close()
        server.close()


def region_file(path: str, pages: int) -> mmap.mmap:
    """A file-backed region, as the standby's RAM file is."""
    with open(path, "a+b") as f:
        f.truncate(pages * PAGE)
        return mmap.mmap(f.fileno(), pages * PAGE)
