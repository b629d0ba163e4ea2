"""A primary or backup in its own process, for tests that kill one side.

    python -m tests.integration.replication_peer receive REGION STATE PAGES PORT
    python -m tests.integration.replication_peer send SEED PAGES PORT

``receive`` connects to 127.0.0.1:PORT and serves one session into the file REGION;
``send`` connects to PORT and ships the deterministic Workload(SEED) epoch after epoch
until killed.
"""

from __future__ import annotations

import mmap
import socket
import sys

from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes

from .replication_support import PAGE, Workload, region_file


def receive(region_path: str, state: str, pages: int, port: int) -> int:
    region = region_file(region_path, pages)
    rx = EpochReceiver(region, state)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        rx.start(sock)
    print("ready", flush=True)
    rx.wait(None)
    return 0


def send(seed: int, pages: int, port: int) -> int:
    wl = Workload(seed=seed, pages=pages)
    primary = mmap.mmap(-1, pages * PAGE)
    wl.fill(primary)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        tx = EpochSender(sock, primary)
    tx.handshake(5)
    print("ready", flush=True)
    epoch = 0
    while True:
        dirty, dev = wl.full_epoch(primary) if epoch == 0 else wl.next_epoch(primary)
        epoch += 1
        tx.stage(epoch, page_indexes(dirty), dev)
        tx.ship()
        if epoch > 1:
            tx.wait_ack(epoch - 1, 10)


def main(argv: list[str]) -> int:
    if argv[0] == "receive":
        return receive(argv[1], argv[2], int(argv[3]), int(argv[4]))
    return send(int(argv[1]), int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
