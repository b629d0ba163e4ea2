"""Replicated disks on the primary: seal each disk's epoch journal, resynchronise what changed.

Mechanism only (policy stays in the engine). Each protected disk is served by its block
server (:mod:`cuju_libvirt.disk_server`), which applies every write to the image at
once and records it in the disk's journal (``c_ext/diskjournal.h``). This module maps
the journals and, at each epoch boundary, seals them::

    disks = DiskSet([ProtectedDisk("vda", image, journal), ...])
    sender = EpochSender(link, ram, disk_sizes=disks.sizes)
    # VM stopped (QMP `stop` drained and flushed every block request: an exact cut)
    parts = disks.seal(epoch)                 # [(disk index, records), ...]
    sender.stage(epoch, pages, devstate, disks=parts)
    # on the acknowledgement of epoch:
    disks.acked(epoch)                        # its journal buffers are free again

Synchronisation (initial, or after the backup was away)::

    total = disks.begin_sync(full=True)       # full: every allocated block (SEEK_DATA)
    while (parts := disks.sync_chunk()):      # while the VM runs, read from the images
        ship a disk-only epoch with parts
    ... then the journal since begin_sync is shipped like any epoch (seal)

``full=False`` sends only the blocks written since the last acknowledged epoch: the
dirty bitmaps of every journal buffer not yet acknowledged, including writes made
while there was no backup at all (a buffer that overflows keeps marking its bitmap).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cuju_libvirt import _cuju
from cuju_libvirt.errors import ReplicationError
from cuju_libvirt.ft_engine.replicator import MAX_DISK_SECTION, DiskPart

log = logging.getLogger(__name__)

#: Bytes of records one synchronisation epoch carries (all disks together).
SYNC_CHUNK_BYTES = 16 << 20
#: Scratch space per disk for records built from a bitmap (virtual; touched as used).
_SCRATCH = MAX_DISK_SECTION // 2


class DiskError(ReplicationError):
    """A protected disk's journal cannot be used (server gone, epoch too large)."""


@dataclass(frozen=True)
class ProtectedDisk:
    """One disk as the primary's engine sees it."""

    target: str
    #: The primary's image (read while synchronising; the server writes it).
    image: str
    #: The server's journal file (``disk_server.ServerPaths.journal``).
    journal: str


class DiskSet:
    """The primary's protected disks, in the order the backup's replicas are listed."""

    def __init__(self, disks: Sequence[ProtectedDisk],
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        """``progress(target, synced_bytes, total_bytes)`` is called while synchronising."""
        self.disks = tuple(disks)
        self._progress = progress
        self._journals: list[_cuju.DiskJournal] = []
        self._views: list[memoryview] = []
        self._images: list[int] = []
        self._scratch: list[mmap.mmap | None] = []
        self._sync: list[bytearray | None] = []
        self._cursor: list[int] = []
        self._sync_total: list[int] = []
        self._sync_done: list[int] = []
        try:
            for d in self.disks:
                dj = _cuju.DiskJournal(d.journal)
                self._journals.append(dj)
                self._views.append(memoryview(dj))
                self._images.append(os.open(d.image, os.O_RDONLY | os.O_CLOEXEC))
                self._scratch.append(None)
                self._sync.append(None)
                self._cursor.append(0)
                self._sync_total.append(0)
                self._sync_done.append(0)
        except BaseException:
            self.close()
            raise
        infos = [dj.info() for dj in self._journals]
        self.sizes = tuple(i["disk_size"] for i in infos)
        self._block = [i["block_size"] for i in infos]

    def set_progress(self, progress: Callable[[str, int, int], None] | None) -> None:
        """Report synchronisation progress to ``progress(target, synced_bytes, total_bytes)``."""
        self._progress = progress

    def __len__(self) -> int:
        return len(self.disks)

    def info(self) -> list[_cuju.DiskJournalInfo]:
        return [dj.info() for dj in self._journals]

    # -- epochs ---------------------------------------------------------------------------

    def _scratch_of(self, i: int) -> mmap.mmap:
        buf = self._scratch[i]
        if buf is None:
            buf = mmap.mmap(-1, _SCRATCH, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._scratch[i] = buf
        return buf

    def seal(self, epoch: int) -> list[DiskPart]:
        """Seal every disk's journal for ``epoch``: the records since the last seal, in the
        order the server applied them (or, for a buffer that overflowed, the blocks its
        bitmap marks, read from the image: call this with the VM stopped)."""
        parts: list[DiskPart] = []
        for i, dj in enumerate(self._journals):
            try:
                idx = dj.seal(epoch)
            except ValueError as err:
                raise DiskError(f"disk {self.disks[i].target}: {err}") from err
            off, used, bm_off, bm_len, overflow = dj.spans(idx)
            if overflow:
                parts.append((i, self._from_bitmap(i, self._views[i][bm_off:bm_off + bm_len], epoch)))
            elif used:
                # Borrowed: the sender writes the sealed buffer from the journal itself (no
                # copy in the pause); the buffer stays as it is until acked() resets it.
                parts.append((i, self._views[i][off:off + used], True))
            else:
                dj.reset(idx)  # nothing written: nothing to wait for (the caller may not ship it)
        return parts

    def _from_bitmap(self, i: int, bitmap: memoryview, epoch: int) -> memoryview:
        out = self._scratch_of(i)
        n, cursor = _cuju.disk_build(bitmap, self._block[i], self.sizes[i], self._images[i], 0, out)
        if cursor * self._block[i] < self.sizes[i]:
            raise DiskError(f"disk {self.disks[i].target}: epoch {epoch} wrote more than one epoch can "
                            f"carry ({_SCRATCH} bytes); the disk needs a resync")
        log.info("disk %s: epoch %d overflowed its journal; sent %d bytes from the dirty bitmap",
                 self.disks[i].target, epoch, n)
        return memoryview(out)[:n]

    def acked(self, epoch: int) -> None:
        """Epoch ``epoch`` (and every earlier one) is committed on the backup: forget it."""
        for dj in self._journals:
            info = dj.info()
            for idx, (_, _, _, sealed) in enumerate(info["buffers"]):
                if sealed and sealed <= epoch and idx != info["active"]:
                    dj.reset(idx)

    # -- synchronisation ------------------------------------------------------------------

    def begin_sync(self, *, full: bool) -> int:
        """Decide what the next synchronisation sends; returns its bytes (all disks).

        From here on every write is in the journals again (shipped with the epochs);
        what was written before is read from the images by :meth:`sync_chunk`.
        """
        total = 0
        for i, dj in enumerate(self._journals):
            info = dj.info()
            nbytes = info["bitmap_bytes"]
            acc = 0
            other = info["active"] ^ 1
            # The buffer not receiving writes holds an unacknowledged epoch, or nothing.
            acc |= self._bitmap_int(i, other)
            dj.reset(other)
            idx = dj.seal(0)  # the other (empty) buffer takes the writes from now on
            acc |= self._bitmap_int(i, idx)
            dj.reset(idx)
            bitmap = bytearray(acc.to_bytes(nbytes, "little"))
            if full:
                _cuju.disk_mark_allocated(self._images[i], self.sizes[i], self._block[i], bitmap)
            self._sync[i] = bitmap
            self._cursor[i] = 0
            blocks = int.from_bytes(bitmap, "little").bit_count()
            self._sync_total[i] = min(blocks * self._block[i], self.sizes[i])
            self._sync_done[i] = 0
            total += self._sync_total[i]
            self._report(i)
        return total

    def _bitmap_int(self, i: int, idx: int) -> int:
        _, _, bm_off, bm_len, _ = self._journals[i].spans(idx)
        return int.from_bytes(self._views[i][bm_off:bm_off + bm_len], "little")

    def _report(self, i: int) -> None:
        if self._progress is not None:
            self._progress(self.disks[i].target, self._sync_done[i], self._sync_total[i])

    def sync_chunk(self, max_bytes: int = SYNC_CHUNK_BYTES) -> list[DiskPart]:
        """The next records of the synchronisation (empty when it is complete)."""
        for i, bitmap in enumerate(self._sync):
            if bitmap is None:
                continue
            out = self._scratch_of(i)
            start = self._cursor[i]
            n, cursor = _cuju.disk_build(bitmap, self._block[i], self.sizes[i], self._images[i], start,
                                         memoryview(out)[:max_bytes])
            first, last = start // 8, (cursor + 7) // 8
            covered = int.from_bytes(bitmap[first:last], "little").bit_count() * self._block[i]
            self._sync_done[i] = min(self._sync_total[i], self._sync_done[i] + covered)
            self._cursor[i] = cursor
            if cursor * self._block[i] >= self.sizes[i]:
                self._sync[i] = None
                self._sync_done[i] = self._sync_total[i]
            self._report(i)
            if n:
                return [(i, memoryview(out)[:n])]
        return []

    @property
    def syncing(self) -> bool:
        return any(b is not None for b in self._sync)

    def sync_progress(self) -> tuple[int, int]:
        """(synced bytes, total bytes) of the current synchronisation, all disks."""
        return sum(self._sync_done), sum(self._sync_total)

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views.clear()
        for dj in self._journals:
            with contextlib.suppress(BufferError):
                dj.close()
        self._journals.clear()
        for fd in self._images:
            os.close(fd)
        self._images.clear()
        for buf in self._scratch:
            if buf is not None:
                with contextlib.suppress(BufferError):
                    buf.close()
        self._scratch.clear()


def prepare_replica(path: str, size: int) -> None:
    """Make sure the backup's replica image exists with the primary's size (sparse)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
