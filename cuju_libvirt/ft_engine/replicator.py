"""Epoch replication over the FT link: a typed face on the C data plane.

Mechanism only: gather, send, verify, acknowledge, apply -- all in C threads of
``cuju_libvirt._cuju`` (wire format in ``c_ext/wire.h``). Policy -- when to open
an epoch, what to do after a broken link, when to fail over -- stays with the
engine that uses these classes.

Primary::

    sock = connect_link(("198.18.0.2", 7070), timeout=5)
    with EpochSender(sock, ram) as tx:          # ram: mmap of the guest RAM file
        held = tx.handshake(timeout=5)          # epoch the backup holds (0: none)
        tx.stage(held + 1, dirty, device_state) # VM paused: gather (memcpy)
        tx.ship()                               # VM running again: sent by a C thread
        tx.wait_ack(held + 1, timeout=1)        # then release that epoch's outputs

Backup::

    rx = EpochReceiver(standby_ram, "/run/cuju/vm.state")   # replays the journal
    rx.start(conn)                              # receive -> verify -> commit -> ack -> apply
    rx.wait()

Replicated disks (``c_ext/diskjournal.h``): the sender names their sizes
(``disk_sizes``), each epoch carries the disks' sealed journal records
(``stage(..., disks=[(index, records), ...])``), and the receiver applies them to
its replica images (``EpochReceiver(..., disks=[(path, size), ...])``) in the
same journaled step as the epoch's pages and device state.

The extension works on duplicates of the sockets' descriptors; the caller may
close its socket objects once handed over.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self, TypeAlias

from cuju_libvirt import _cuju
from cuju_libvirt._closing import Closing

log = logging.getLogger(__name__)

#: Buffers accepted for regions, indexes and device state (anything with the buffer protocol).
ReadBuffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap | array.array[int]"
WriteBuffer: TypeAlias = "bytearray | memoryview | mmap.mmap | array.array[int]"

PAGE_SIZE = 4096
#: Largest device-state blob one epoch may carry (bytes).
MAX_DEVICE_STATE: int = _cuju.MAX_DEVICE_STATE
#: Largest disk section (all disks' records) one epoch may carry (bytes).
MAX_DISK_SECTION: int = _cuju.MAX_DISK_SECTION
#: One disk's records for an epoch: (disk index, buffer of records as in diskjournal.h[, borrowed]).
DiskPart: TypeAlias = (
    "tuple[int, bytes | bytearray | memoryview] | tuple[int, bytes | bytearray | memoryview, bool]"
)
#: Socket buffer size asked for on FT-link sockets (the kernel may cap it).
LINK_SOCKET_BUFFER = 4 << 20


def page_indexes(pages: Iterable[int]) -> array.array[int]:
    """Page numbers as the unsigned 64-bit array the data plane reads (no copy later)."""
    return array.array("Q", pages)


def new_session_id() -> int:
    """A random 64-bit session id; it seeds every epoch checksum of the session."""
    return secrets.randbits(64)


def tune_link_socket(sock: socket.socket) -> None:
    """Large buffers and no Nagle: epochs go out in big writes, ACKs must not wait."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, LINK_SOCKET_BUFFER)


def connect_link(address: tuple[str, int], timeout: float) -> socket.socket:
    """Open the FT-link TCP connection from the primary to the backup's listener."""
    sock = socket.create_connection(address, timeout=timeout)
    tune_link_socket(sock)
    return sock


def accept_link(listener: socket.socket, timeout: float | None) -> socket.socket:
    """Accept the primary's FT-link connection on the backup."""
    listener.settimeout(timeout)
    conn, peer = listener.accept()
    tune_link_socket(conn)
    log.info("FT link from %s:%d", peer[0], peer[1])
    return conn


class EpochSender:
    """Primary side: stage epochs while the VM is paused, ship them pipelined, wait for ACKs.

    Two staging buffers alternate: ``stage`` of epoch N+1 may run while epoch N
    is on the wire; it waits only when both are busy. Epoch numbers run
    consecutively from above the backup's last applied epoch (``handshake``).
    Failures of the C threads surface as :class:`~cuju_libvirt.errors.ReplicationError`
    subclasses from the next call.
    """

    def __init__(
        self,
        sock: socket.socket,
        region: ReadBuffer,
        *,
        page_size: int = PAGE_SIZE,
        session_id: int | None = None,
        io_timeout: float | None = 30.0,
        disk_sizes: Sequence[int] = (),
        link_keys: bytes | None = None,
    ) -> None:
        self.session_id = new_session_id() if session_id is None else session_id
        self.disk_sizes = tuple(disk_sizes)
        #: The link runs in AES-256-GCM records (``link_keys``: :class:`.linkkeys.LinkKeys`).
        self.encrypted = link_keys is not None
        self._tx = _cuju.Sender(
            sock.fileno(), region, page_size=page_size, session_id=self.session_id, io_timeout=io_timeout,
            disk_sizes=self.disk_sizes, link_keys=link_keys,
        )

    def handshake(self, timeout: float | None = 10.0) -> int:
        """Exchange HELLO with the backup; return the epoch it holds (0: none)."""
        held = self._tx.handshake(timeout)
        log.info("FT link up (session %016x, %s); backup holds epoch %d", self.session_id,
                 "AES-256-GCM" if self.encrypted else "NOT encrypted", held)
        return held

    def stage(
        self,
        epoch: int,
        dirty_indexes: ReadBuffer,
        device_state: ReadBuffer = b"",
        timeout: float | None = None,
        disks: Sequence[DiskPart] = (),
    ) -> None:
        """Gather the dirty pages, the device state and the disk records of ``epoch`` (call
        while the VM is paused).

        ``dirty_indexes`` is a buffer of unsigned 64-bit page numbers (see
        :func:`page_indexes`); ``disks`` the sealed journal records per disk, ``(disk, records)``
        (copied) or ``(disk, records, True)``: borrowed, sent from where they lie by the send
        thread, so the pause does not copy them; such records must stay unchanged until the
        epoch is acknowledged (a sealed journal buffer is), and the sender holds them until
        its staging buffer is reused or it is closed.
        Raises ``ValueError`` for an index outside the region, an epoch out of sequence
        or a disk the sender was not created with; nothing is staged then.
        """
        self._tx.stage(epoch, dirty_indexes, device_state, timeout, disks or None)

    def ship(self) -> None:
        """Queue the staged epoch; a C thread checksums and sends it."""
        self._tx.ship()

    def wait_ack(self, epoch: int, timeout: float | None) -> bool:
        """True once the backup has acknowledged ``epoch`` (committed it), False on timeout."""
        return self._tx.wait_ack(epoch, timeout)

    def counters(self) -> dict[str, int]:
        """Operator counters (one lock, no I/O): epochs, pages, bytes, per-phase nanoseconds."""
        return self._tx.counters()

    def close(self, orderly: bool = True, timeout: float | None = 10.0) -> None:
        """Orderly: send what is queued and CLOSE, wait for the backup's last ACKs. Else cut the link."""
        self._tx.close(orderly, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._tx.close(False, 0)


class EpochReceiver(Closing):
    """Backup side: receive, verify, commit (journal), acknowledge, apply -- in C threads.

    Opening replays epochs the journal holds as committed but not applied (a
    backup killed between ACK and the end of apply), so :attr:`last_applied`
    is exact before any connection. One object serves one connection; after a
    broken link open a new one on the same region and journal.
    """

    def __init__(
        self,
        region: WriteBuffer,
        device_state_path: str,
        journal_path: str | None = None,
        *,
        page_size: int = PAGE_SIZE,
        durable: bool = False,
        disks: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``disks``: the replica images, (path, size in bytes) in the primary's disk order;
        each must exist with exactly that size (see :func:`~.disks.prepare_replica`)."""
        self.device_state_path = device_state_path
        self.journal_path = journal_path or device_state_path + ".journal"
        for what, path in (("device_state_path", device_state_path), ("journal_path", self.journal_path)):
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ValueError(f"{what} {path!r}: directory {parent!r} does not exist; create it first")
        fds: list[int] = []
        try:
            for path, size in disks:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                fds.append(fd)
                actual = os.fstat(fd).st_size
                if actual != size:
                    raise ValueError(f"replica {path!r} has {actual} bytes, the primary's disk {size}; "
                                     "resize it or remove it for a full resync")
            self._rx = _cuju.Receiver(
                region, device_state_path, self.journal_path, page_size=page_size, durable=durable,
                disks=[(fd, size) for fd, (_, size) in zip(fds, disks, strict=True)],
            )
        finally:
            for fd in fds:  # the receiver holds duplicates
                os.close(fd)
        replayed = self._rx.counters()["epochs_replayed"]
        if replayed:
            log.warning("replayed %d committed epoch(s) from %s; replica at epoch %d",
                        replayed, self.journal_path, self.last_applied)

    @property
    def last_applied(self) -> int:
        """The epoch the region and the device-state file hold (0: none yet)."""
        return self._rx.last_applied

    def start(
        self, sock: socket.socket, io_timeout: float | None = 30.0, handshake_timeout: float | None = 10.0,
        *, link_keys: bytes | None = None,
    ) -> None:
        """Serve the session on ``sock`` in C threads; returns at once.

        ``link_keys`` (:class:`.linkkeys.LinkKeys`, the backup's side) encrypts the link.
        """
        self._rx.start(sock.fileno(), io_timeout, handshake_timeout, link_keys=link_keys)

    def wait(self, timeout: float | None = None) -> bool:
        """True when the primary ended the session with CLOSE, False if still running after ``timeout``.

        Raises the session's failure (a ReplicationError subclass).
        """
        return self._rx.wait(timeout)

    def run(self, sock: socket.socket, io_timeout: float | None = 30.0) -> None:
        """``start`` then wait for the end of the session."""
        self.start(sock, io_timeout)
        self.wait(None)

    def counters(self) -> dict[str, int]:
        """Operator counters (one lock, no I/O)."""
        return self._rx.counters()

    def close(self) -> None:
        """Stop receiving; epochs already committed are still applied."""
        self._rx.close()
