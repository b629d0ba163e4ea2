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

Resynchronising a *new* standby whose replica survived (docs/disks.md, "Resync")::

    claims = disks.claims()                   # per disk: this journal's lineage, the replica
                                              # its bitmaps are relative to ("" if none)
    ... the backup answers (replica id, kept) per disk (cujud/disks.py) ...
    disks.set_replicas(answers)               # a disk is trusted only if both sides agree
    disks.begin_sync(full=True)               # trusted disks: only the changed blocks
    ... on the acknowledgement of the sync's last epoch:
    disks.sync_complete()                     # the replicas equal the images: pair them

After a failover the new primary's journal marks every block it wrote since the takeover
(:func:`record_takeover` says which pairing its image came from), and the old primary's
journal every block it wrote after the last epoch it saw acknowledged
(:func:`changed_since_ack`): a re-protection onto the old primary's own image resends only
the union (docs/disks.md, "Resync after a failover"). When the old primary's journal cannot
say (its host crashed: the tmpfs journal is gone), its durable pairing record
(:func:`read_record`) still says which image was the disk, and the backup sends the content
digests of that image (:func:`content_digests`): the new primary compares its own image unit
by unit while the VM runs and resends only the units that differ (mode :data:`COMPARE`).

Beside each journal (same tmpfs directory, same lifetime) two files record what a later
resync may trust: ``<journal>.pair`` (JSON: the journal's lineage, the replica id, and
whether a sync to it completed) and ``<journal>.resync`` (the lineage, then the bitmap a
sync has not yet delivered: written before the journal's bitmaps are reset, so a cujud
killed in the middle of a resync loses no block).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import mmap
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cuju_libvirt import _cuju
from cuju_libvirt.errors import ReplicationError
from cuju_libvirt.ft_engine.replicator import MAX_DISK_SECTION, DiskPart, EpochReceiver

log = logging.getLogger(__name__)

#: Bytes of records one synchronisation epoch carries (all disks together).
SYNC_CHUNK_BYTES = 16 << 20
#: Scratch space per disk for records built from a bitmap (virtual; touched as used).
_SCRATCH = MAX_DISK_SECTION // 2


#: DiskSync.mode of a synchronisation that copies every allocated block / only what changed /
#: only the units whose content differs from the backup's (compared digest by digest).
FULL, CHANGED, COMPARE = "full", "changed", "compare"

#: Bytes of one content digest (BLAKE2b-128; an all-zero digest stands for a unit of zeros).
DIGEST_BYTES = 16
_ZERO_DIGEST = bytes(DIGEST_BYTES)
#: Bytes of the image one comparison step of :meth:`DiskSet.sync_chunk` reads.
COMPARE_STEP_BYTES = 32 << 20


class DiskError(ReplicationError):
    """A protected disk's journal cannot be used (server gone, epoch too large)."""


def _write_atomic(path: str, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` at once; ``durable``: on the disk before this returns
    (the file and the directory entry), so that a host crash leaves the old or the new."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _pair_file(journal: str) -> str:
    return journal + ".pair"


def _resync_file(journal: str) -> str:
    return journal + ".resync"


def _takeover_file(journal: str) -> str:
    return journal + ".takeover"


def _saved_resync(journal: str, lineage: int, nbytes: int) -> int:
    """The bitmap an earlier, unfinished sync had not delivered (0 if none or stale)."""
    try:
        with open(_resync_file(journal), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    if len(data) != 8 + nbytes or int.from_bytes(data[:8], "little") != lineage:
        return 0
    return int.from_bytes(data[8:], "little")


def _bitmaps(dj: _cuju.DiskJournal, view: memoryview) -> int:
    """The union of both buffers' dirty bitmaps, as an integer (bit b: block b)."""
    acc = 0
    for idx in (0, 1):
        _, _, bm_off, bm_len, _ = dj.spans(idx)
        acc |= int.from_bytes(view[bm_off:bm_off + bm_len], "little")
    return acc


def read_pair(journal: str) -> dict[str, Any]:
    """``<journal>.pair``: the lineage, the replica id a sync paired with it, whether that
    sync completed, and the image the journal's server served ({} when there is none)."""
    return _read_json(_pair_file(journal))


#: A bitmap sent in a peer message (zlib, base64) may take at most this many characters.
MAX_PACKED_BITMAP = 256 << 10


def pack_bytes(raw: bytes) -> str:
    """Bytes for a peer message (zlib, base64): a bitmap, or content digests."""
    return base64.b64encode(zlib.compress(raw, 6)).decode()


def unpack_bytes(text: str, nbytes: int) -> bytes | None:
    """What :func:`pack_bytes` packed, or None if it is not ``nbytes`` bytes."""
    try:
        raw = zlib.decompressobj().decompress(base64.b64decode(text, validate=True), nbytes + 1)
    except (ValueError, zlib.error):
        return None
    return raw if len(raw) == nbytes else None


def pack_bitmap(bitmap: int, nbytes: int) -> str:
    """A dirty bitmap (bit b: block b) of ``nbytes`` bytes for a peer message (zlib, base64)."""
    return pack_bytes(bitmap.to_bytes(nbytes, "little"))


def unpack_bitmap(text: str, nbytes: int) -> int | None:
    """The bitmap :func:`pack_bitmap` packed, or None if it is not one of ``nbytes`` bytes."""
    raw = unpack_bytes(text, nbytes)
    return None if raw is None else int.from_bytes(raw, "little")


def content_digests(fd: int, size: int, unit: int, first: int = 0, count: int | None = None) -> bytes:
    """The content digests of units ``first`` .. ``first + count`` of a disk of ``size`` bytes
    whose image is ``fd`` (read as the disk: zeros past the file's end): per unit of ``unit``
    bytes, BLAKE2b-128 of its bytes, or :data:`DIGEST_BYTES` zero bytes when it reads as zeros
    (a hole is not read). Both sides of a content compare call this (docs/disks.md, "Resync
    after a primary-host crash"), so a digest means the same on both."""
    nunits = -(-size // unit)
    last = nunits if count is None else min(nunits, first + count)
    zeros = bytes(unit)
    out = bytearray()
    for u in range(first, last):
        off = u * unit
        n = min(unit, size - off)
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data from off to the file's end
            data_at = size
        if data_at >= off + n:
            out += _ZERO_DIGEST
            continue
        buf = os.pread(fd, n, off)
        if len(buf) < n:
            buf += bytes(n - len(buf))
        out += _ZERO_DIGEST if buf == zeros[:n] else hashlib.blake2b(buf, digest_size=DIGEST_BYTES).digest()
    return bytes(out)


def digest_unit(fd: int, size: int, block_size: int, budget: int) -> int:
    """The smallest unit (``block_size`` times a power of two) whose digests of the disk's
    allocated units fit in ``budget`` bytes once packed (zero units cost next to nothing)."""
    nblocks = -(-size // block_size)
    bitmap = bytearray(-(-nblocks // 8))
    _cuju.disk_mark_allocated(fd, size, block_size, bitmap)
    unit, span = block_size, 1
    while True:
        nunits = -(-nblocks // span)
        if span >= 8:
            step = span // 8
            allocated = sum(1 for k in range(0, len(bitmap), step) if any(bitmap[k:k + step]))
        else:
            mask = (1 << span) - 1
            allocated = sum(1 for byte in bitmap if byte for j in range(0, 8, span) if (byte >> j) & mask)
        # base64 (4/3), a margin for zlib, and the zero units' share of the compressed text
        if (allocated * DIGEST_BYTES * 4) // 3 + nunits // 16 + 4096 <= budget or unit >= size:
            return unit
        unit, span = unit * 2, span * 2


def read_record(record: str) -> dict[str, Any]:
    """The durable pairing record of a disk this host served as the primary ({} if none):
    ``replica`` (the id a completed sync paired its image with), ``image``, ``size``.
    Unlike ``<journal>.pair`` (tmpfs) it survives a host crash; it says which image was
    this disk and which replica it was paired with, not which blocks changed since."""
    return _read_json(record)


def forget_pair(journal: str) -> None:
    """No later resync may trust this journal's pairing (``<journal>.pair`` goes)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_pair_file(journal))


def changed_since_ack(journal: str) -> tuple[int, _cuju.DiskJournalInfo, int]:
    """(lineage, the journal's info, bitmap) of the journal of a disk this host served as
    the primary: every block written since the last epoch it saw acknowledged (both
    buffers' bitmaps; a buffer's bitmap is reset only when its epoch is acknowledged) and
    what an unfinished resync had not delivered. Open it only while its server runs (the
    server's start renews the lineage if the image changed while none ran)."""
    dj = _cuju.DiskJournal(journal)
    view = memoryview(dj)
    try:
        info = dj.info()
        acc = _bitmaps(dj, view) | _saved_resync(journal, info["lineage"], info["bitmap_bytes"])
        return info["lineage"], info, acc
    finally:
        view.release()
        dj.close()


def record_takeover(journal: str, identity: Mapping[str, Any]) -> None:
    """At a takeover: the replica this host's server journals becomes the VM's live disk. Its
    ``identity`` (the replica's ``.id``: id and the primary lineage it was paired with) and
    this journal's lineage now go to ``<journal>.takeover``: from here on the journal marks
    every block the new primary writes, so a re-protection onto the old primary's own image
    may resend only what either side changed (:meth:`DiskSet.claims`)."""
    dj = _cuju.DiskJournal(journal)
    try:
        lineage = dj.info()["lineage"]
    finally:
        dj.close()
    _write_atomic(_takeover_file(journal), json.dumps({
        "lineage": f"{lineage:016x}", "from_lineage": str(identity.get("lineage", "")),
        "from_replica": str(identity.get("replica", "")),
    }).encode())


@dataclass(frozen=True)
class ProtectedDisk:
    """One disk as the primary's engine sees it."""

    target: str
    #: The primary's image (read while synchronising; the server writes it).
    image: str
    #: The server's journal file (``disk_server.ServerPaths.journal``).
    journal: str
    #: Where the durable pairing record goes (:func:`read_record`; "" for none).
    record: str = ""


class DiskSet:
    """The primary's protected disks, in the order the backup's replicas are listed."""

    def __init__(self, disks: Sequence[ProtectedDisk],
                 progress: Callable[[str, int, int, str, str], None] | None = None, *, tag: str = "") -> None:
        """``progress(target, synced_bytes, total_bytes, mode, why)`` is called while
        synchronising (``mode``: :data:`FULL`, :data:`CHANGED` or :data:`COMPARE`; ``why``: the
        reason, as logged); ``tag`` (the VM's name) names the logger of every line about these
        disks, as the engine's."""
        self.disks = tuple(disks)
        self.log = log.getChild(tag.replace(".", "_")) if tag else log
        self._progress = progress
        self._journals: list[_cuju.DiskJournal] = []
        self._views: list[memoryview] = []
        self._images: list[int] = []
        self._scratch: list[mmap.mmap | None] = []
        self._sync: list[bytearray | None] = []
        self._cursor: list[int] = []
        self._sync_total: list[int] = []
        self._sync_done: list[int] = []
        self._mode: list[str] = []
        #: Per disk: the backup's replica id (set_replicas) and whether it was proven to be
        #: the replica this journal's bitmaps are relative to.
        self._replica: list[str] = []
        self._trusted: list[bool] = []
        #: Per disk: the backup kept an earlier replica (False: it starts from an empty file).
        self._kept: list[bool] = []
        #: Per disk: bytes at the start of an emptied replica the backup wrote (a qcow2 header
        #: its standby's QEMU can open): a full copy sends those blocks even where they are holes.
        self._written: list[int] = []
        #: Per disk: the blocks the backup's own image (the old primary's, after a failover)
        #: changed since the epoch this image came from (its journal's bitmaps), or None.
        self._remote: list[int | None] = []
        #: Per disk: the backup's content digests of its own image (after a failover whose
        #: journal cannot say what it changed) and their unit, or None: a content compare.
        self._digests: list[bytes | None] = []
        self._unit: list[int] = []
        #: Per disk, in a content compare: bytes compared so far, bytes found to differ.
        self._frontier: list[int] = []
        self._differing: list[int] = []
        #: Per disk: why the backup could not offer its own image ("" if it did not try).
        self._refused: list[str] = []
        #: Per disk: why the current synchronisation sends what it sends (log and status).
        self._reason: list[str] = []
        #: Per disk: the journal's lineage when the current synchronisation began.
        self._sync_lineage: list[int] = []
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
                self._mode.append(FULL)
                self._replica.append("")
                self._trusted.append(False)
                self._kept.append(False)
                self._written.append(0)
                self._remote.append(None)
                self._digests.append(None)
                self._unit.append(0)
                self._frontier.append(0)
                self._differing.append(0)
                self._refused.append("")
                self._reason.append("")
                self._sync_lineage.append(0)
        except BaseException:
            self.close()
            raise
        infos = [dj.info() for dj in self._journals]
        self.sizes = tuple(i["disk_size"] for i in infos)
        self._block = [i["block_size"] for i in infos]

    def set_progress(self, progress: Callable[[str, int, int, str, str], None] | None) -> None:
        """Report synchronisation progress to ``progress(target, synced_bytes, total_bytes, mode, why)``."""
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
        self.log.info("disk %s: epoch %d overflowed its journal; sent %d bytes from the dirty bitmap",
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

    # -- which replica the bitmaps are relative to ---------------------------------------

    def _pair_path(self, i: int) -> str:
        return _pair_file(self.disks[i].journal)

    def _resync_path(self, i: int) -> str:
        return _resync_file(self.disks[i].journal)

    def _takeover(self, i: int, lineage: int) -> dict[str, Any]:
        """The takeover record of disk ``i`` if it still holds (same lineage), else {}."""
        took = _read_json(_takeover_file(self.disks[i].journal))
        ok = (took.get("lineage") == f"{lineage:016x}" and bool(took.get("from_replica"))
              and bool(took.get("from_lineage")))
        return took if ok else {}

    def _lineage(self, i: int) -> int:
        return self._journals[i].info()["lineage"]

    def claims(self) -> list[dict[str, str]]:
        """Per disk, what the backup is asked to prove (``standby-create``): ``lineage``, this
        journal's, and ``replica``, the id of the replica a completed sync paired with it in
        that lineage ("" when there is none: the backup then starts its replica afresh).
        Without such a replica, a disk this host took over says ``takeover``: the pairing its
        image came from (``from_replica``, ``from_lineage``); the old primary may then offer
        its own image and the blocks it changed since (cujud/disks.py)."""
        out: list[dict[str, Any]] = []
        for i in range(len(self.disks)):
            raw = self._lineage(i)
            lineage = f"{raw:016x}"
            pair = _read_json(self._pair_path(i))
            ok = pair.get("lineage") == lineage and pair.get("synced") is True
            claim: dict[str, Any] = {"lineage": lineage,
                                     "replica": str(pair.get("replica", "")) if ok else ""}
            took = self._takeover(i, raw)
            if not claim["replica"] and took:
                claim["takeover"] = {"from_replica": took["from_replica"],
                                     "from_lineage": took["from_lineage"], "block_size": self._block[i]}
            out.append(claim)
        return out

    def set_replicas(self, answers: Sequence[Mapping[str, Any]], claims: Sequence[Mapping[str, Any]]) -> None:
        """The backup's answer per disk (``replica`` id, ``kept``) to ``claims``: a disk is
        resynchronised incrementally only if the backup kept the very replica claimed, in
        the same lineage, or (``takeover`` claimed) kept its own image and sent the blocks it
        changed since (``changed``, :func:`pack_bitmap`, in ``block_size`` blocks); the journal's lineage is
        checked again at :meth:`begin_sync`."""
        if len(answers) != len(self.disks) or len(claims) != len(self.disks):
            raise DiskError(f"the backup answered for {len(answers)} replica(s), {len(self.disks)} disk(s) "
                            "are protected")
        for i, (answer, claim) in enumerate(zip(answers, claims, strict=True)):
            rid = str(answer.get("replica", ""))
            self._replica[i] = rid
            self._kept[i] = answer.get("kept") is True
            self._written[i] = max(0, min(int(answer.get("written") or 0), self.sizes[i]))
            self._trusted[i] = bool(claim["replica"]) and self._kept[i] and rid == claim["replica"]
            self._remote[i] = None
            self._digests[i] = None
            self._refused[i] = str(answer.get("refused") or "")
            if not claim["replica"] and claim.get("takeover") and self._kept[i]:
                if "digests" in answer:
                    self._digests[i], self._unit[i] = self._remote_digests(i, answer)
                    self._trusted[i] = self._digests[i] is not None
                else:
                    self._remote[i] = self._remote_bitmap(i, answer)
                    self._trusted[i] = self._remote[i] is not None

    def _remote_digests(self, i: int, answer: Mapping[str, Any]) -> tuple[bytes | None, int]:
        """The backup's content digests of its own image, if they are of this disk's units."""
        unit = answer.get("unit")
        if (answer.get("block_size") == self._block[i] and isinstance(unit, int) and unit >= self._block[i]
                and unit % self._block[i] == 0):
            digests = unpack_bytes(str(answer.get("digests", "")), -(-self.sizes[i] // unit) * DIGEST_BYTES)
            if digests is not None:
                return digests, unit
        self.log.info("disk %s: the backup's content digests are not of this disk's blocks: a full copy",
                      self.disks[i].target)
        self._refused[i] = "its content digests were not of this disk's blocks"
        return None, 0

    def _remote_bitmap(self, i: int, answer: Mapping[str, Any]) -> int | None:
        """The backup's ``changed`` blocks, if they are in this journal's geometry."""
        nbytes = self._journals[i].info()["bitmap_bytes"]
        bitmap = unpack_bitmap(str(answer.get("changed", "")), nbytes)
        if answer.get("block_size") != self._block[i] or bitmap is None:
            self.log.info("disk %s: the backup's bitmap is not in this journal's geometry: a full copy",
                     self.disks[i].target)
            return None
        return bitmap

    def begin_sync(self, *, full: bool) -> int:
        """Decide what the next synchronisation sends; returns its bytes (all disks).

        ``full``: the backup holds no epoch of this session (a new standby). Each disk is
        then copied in full (every allocated block), unless :meth:`set_replicas` proved its
        replica: then only the blocks changed since the epoch that replica holds. With
        ``full=False`` (the backup holds an epoch of this session) every disk sends only
        what changed. From here on every write is in the journals again (shipped with the
        epochs); what was written before is read from the images by :meth:`sync_chunk`.
        """
        total = 0
        for i, dj in enumerate(self._journals):
            info = dj.info()
            nbytes = info["bitmap_bytes"]
            lineage = info["lineage"]
            disk_full = full and not (self._trusted[i] and self._claim_matches(i, lineage))
            compare = full and not disk_full and self._digests[i] is not None
            other = info["active"] ^ 1
            # The buffer not receiving writes holds an unacknowledged epoch, or nothing.
            acc = self._bitmap_int(i, other) | self._bitmap_int(i, info["active"])
            if disk_full:
                # Nothing about the replica can be trusted until this sync completes.
                self._write_pair(i, lineage, synced=False)
                stale = [self._resync_path(i), _takeover_file(self.disks[i].journal), self.disks[i].record]
                for path in filter(None, stale):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            else:
                acc |= _saved_resync(self.disks[i].journal, lineage, nbytes) | (self._remote[i] or 0)
                # Persisted before the journal forgets it: a cujud killed from here on
                # until sync_complete() loses no block of this resync.
                saved = lineage.to_bytes(8, "little") + acc.to_bytes(nbytes, "little")
                _write_atomic(self._resync_path(i), saved)
            dj.reset(other)
            idx = dj.seal(0)  # the other (empty) buffer takes the writes from now on
            dj.reset(idx)
            # A content compare marks the units that differ as it reads them (sync_chunk); what
            # the bitmaps hold stays in <journal>.resync all the same, for a later resync.
            bitmap = bytearray(nbytes) if compare else bytearray(acc.to_bytes(nbytes, "little"))
            if disk_full and self._kept[i]:
                # A kept replica that is not trusted after all (the journal changed lineage
                # since): every block, holes too (sent as zeros), or stale data would stay.
                nblocks = info["nblocks"]
                bitmap[:] = ((1 << nblocks) - 1).to_bytes(nbytes, "little")
            elif disk_full:
                # The backup's replica is an empty file: only the allocated blocks, and those
                # the backup wrote itself (a qcow2 header), which a hole here must clear.
                _cuju.disk_mark_allocated(self._images[i], self.sizes[i], self._block[i], bitmap)
                for b in range(-(-self._written[i] // self._block[i])):
                    bitmap[b >> 3] |= 1 << (b & 7)
            self._sync[i] = bitmap
            self._cursor[i] = 0
            self._mode[i] = FULL if disk_full else COMPARE if compare else CHANGED
            self._sync_lineage[i] = lineage
            self._reason[i] = self._why(i, full, disk_full)
            self._sync_done[i] = 0
            if compare:
                # What differs is known once it is read: the progress is the bytes compared.
                self._sync_total[i] = self.sizes[i]
                self._frontier[i] = self._differing[i] = 0
                self.log.info("disk %s: %s: comparing %d bytes in units of %d bytes", self.disks[i].target,
                              self._reason[i], self.sizes[i], self._unit[i])
            else:
                blocks = int.from_bytes(bitmap, "little").bit_count()
                self._sync_total[i] = min(blocks * self._block[i], self.sizes[i])
                total += self._sync_total[i]
                self.log.info("disk %s: %s: %d of %d bytes to send", self.disks[i].target,
                              self._reason[i], self._sync_total[i], self.sizes[i])
            self._report(i)
        return total

    def _write_pair(self, i: int, lineage: int, *, synced: bool) -> None:
        _write_atomic(self._pair_path(i), json.dumps({
            "lineage": f"{lineage:016x}", "replica": self._replica[i], "synced": synced,
            "image": os.path.abspath(self.disks[i].image)}).encode())

    def _write_record(self, i: int) -> None:
        """The durable pairing record (:func:`read_record`): after a crash of this host, which
        image was this disk and which replica it was paired with (a content compare may then
        resync the image with only what differs)."""
        record = self.disks[i].record
        if not record:
            return
        try:
            os.makedirs(os.path.dirname(record), mode=0o700, exist_ok=True)
            _write_atomic(record, json.dumps({
                "replica": self._replica[i], "image": os.path.abspath(self.disks[i].image),
                "size": self.sizes[i]}).encode(), durable=True)
        except OSError as err:
            self.log.warning("disk %s: no durable pairing record (%s): after a crash of this host its "
                             "image is copied in full", self.disks[i].target, err)

    def _claim_matches(self, i: int, lineage: int) -> bool:
        if self._digests[i] is not None:  # a content compare proves itself, whatever the lineage
            return True
        if self._remote[i] is not None:  # the backup's own image, after a failover
            return bool(self._takeover(i, lineage))
        pair = _read_json(self._pair_path(i))
        return (pair.get("lineage") == f"{lineage:016x}" and pair.get("synced") is True
                and pair.get("replica") == self._replica[i] != "")

    def _why(self, i: int, full: bool, disk_full: bool) -> str:
        if not disk_full:
            if full and self._digests[i] is not None:
                return ("resync by content compare (the backup's own image, this disk before the failover, "
                        "whose journal cannot say which blocks it changed: only the units whose digests "
                        "differ are sent)")
            if full and self._remote[i] is not None:
                return ("resync of the changed blocks only (the backup's own image, this disk before the "
                        "failover: the blocks either side changed since)")
            if full:
                return f"resync of the changed blocks only (replica {self._replica[i]} proven)"
            return "resync of the changed blocks only (the backup holds an epoch of this session)"
        if self._trusted[i]:
            return "full sparse copy (the journal changed lineage since the backup proved its replica)"
        if self._refused[i]:
            return f"full sparse copy (the backup's own image cannot be the replica: {self._refused[i]})"
        return "full sparse copy (no replica this journal's bitmaps are proven relative to)"

    def sync_complete(self) -> None:
        """The synchronisation's last epoch is acknowledged: every replica equals its image at
        a committed epoch. Pair them (a later resync may trust the bitmaps from here), unless
        the journal changed lineage during the sync (a server restart: stay untrusted)."""
        for i, dj in enumerate(self._journals):
            lineage = dj.info()["lineage"]
            if lineage == self._sync_lineage[i] and self._replica[i]:
                self._write_pair(i, lineage, synced=True)
                self._write_record(i)
                with contextlib.suppress(FileNotFoundError):  # the pair says it all from here
                    os.unlink(_takeover_file(self.disks[i].journal))
            else:
                self.log.info("disk %s: not paired for a later resync (%s)", self.disks[i].target,
                         "no replica id" if not self._replica[i] else "its server restarted during the sync")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._resync_path(i))

    def _bitmap_int(self, i: int, idx: int) -> int:
        _, _, bm_off, bm_len, _ = self._journals[i].spans(idx)
        return int.from_bytes(self._views[i][bm_off:bm_off + bm_len], "little")

    def _report(self, i: int) -> None:
        if self._progress is not None:
            self._progress(self.disks[i].target, self._sync_done[i], self._sync_total[i], self._mode[i],
                           self._reason[i])

    def sync_chunk(self, max_bytes: int = SYNC_CHUNK_BYTES) -> list[DiskPart]:
        """The next records of the synchronisation (empty when it is complete). A content
        compare reads its image :data:`COMPARE_STEP_BYTES` at a time, marks the units whose
        digests differ from the backup's, and builds records only up to where it compared."""
        for i, bitmap in enumerate(self._sync):
            if bitmap is None:
                continue
            out = self._scratch_of(i)
            compare = self._mode[i] == COMPARE
            while True:
                limit = self._frontier[i] if compare else self.sizes[i]
                start = self._cursor[i]
                n, cursor = _cuju.disk_build(bitmap, self._block[i], limit, self._images[i], start,
                                             memoryview(out)[:max_bytes])
                self._cursor[i] = cursor
                if not compare:
                    first, last = start // 8, (cursor + 7) // 8
                    covered = int.from_bytes(bitmap[first:last], "little").bit_count() * self._block[i]
                    self._sync_done[i] = min(self._sync_total[i], self._sync_done[i] + covered)
                elif not n and cursor * self._block[i] >= limit and limit < self.sizes[i]:
                    self._compare_step(i)  # everything compared so far is built: compare on
                    self._sync_done[i] = self._frontier[i]
                    self._report(i)
                    continue
                break
            if cursor * self._block[i] >= self.sizes[i]:
                self._sync[i] = None
                self._sync_done[i] = self._sync_total[i]
                if compare:
                    self.log.info("disk %s: content compare done: %d of %d bytes differed and were sent",
                                  self.disks[i].target, self._differing[i], self.sizes[i])
            self._report(i)
            if n:
                return [(i, memoryview(out)[:n])]
        return []

    def _compare_step(self, i: int) -> None:
        """Compare the next units of disk ``i`` with the backup's digests; mark those that differ."""
        digests, unit, size, block = self._digests[i], self._unit[i], self.sizes[i], self._block[i]
        bitmap = self._sync[i]
        assert digests is not None and bitmap is not None
        first = self._frontier[i] // unit
        mine = content_digests(self._images[i], size, unit, first, max(1, COMPARE_STEP_BYTES // unit))
        count = len(mine) // DIGEST_BYTES
        per, nblocks = unit // block, -(-size // block)
        for j in range(count):
            at, theirs = j * DIGEST_BYTES, (first + j) * DIGEST_BYTES
            if mine[at:at + DIGEST_BYTES] != digests[theirs:theirs + DIGEST_BYTES]:
                u = first + j
                for b in range(u * per, min((u + 1) * per, nblocks)):
                    bitmap[b >> 3] |= 1 << (b & 7)
                self._differing[i] += min(unit, size - u * unit)
        self._frontier[i] = min(size, (first + count) * unit)

    def sync_sent(self) -> list[int]:
        """Per disk, the bytes the current (or last) synchronisation sends: for a content
        compare, what it found to differ so far."""
        return [self._differing[i] if self._mode[i] == COMPARE else self._sync_total[i]
                for i in range(len(self.disks))]

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


def prepare_replica(path: str, size: int, *, empty: bool = False) -> None:
    """Make sure the backup's replica image exists with the primary's size (sparse);
    ``empty``: drop whatever it held (a full sync then sends only the allocated blocks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if empty:
            os.ftruncate(fd, 0)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def replay_receiver_journal(journal: str, replicas: Sequence[tuple[str, int]]) -> int | None:
    """Bring the replicas to the last epoch a backup's receiver journal committed (the epoch
    an earlier standby may have been killed applying, or between its ACK and the apply:
    :class:`~.replicator.EpochReceiver` replays it); returns that epoch, or None if the
    journal is missing or cannot be replayed (the replicas' state is then unknown).

    The pages and device state the journal holds go to a scratch region and file: only
    the disks matter here (a new standby's memory is copied in full)."""
    try:
        with open(journal, "rb") as f:
            meta = f.read(24)
    except FileNotFoundError:
        return None
    if len(meta) < 24:
        return None
    page_size = int.from_bytes(meta[12:16], "little")
    region_size = int.from_bytes(meta[16:24], "little")
    if not page_size or not region_size or region_size % page_size:
        return None
    scratch = journal + ".replay"
    try:
        region = mmap.mmap(-1, region_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, OverflowError):
        return None
    try:
        rx = EpochReceiver(region, scratch, journal, page_size=page_size, disks=replicas)
    except (ReplicationError, ValueError, OSError) as err:
        log.warning("cannot replay %s into the replicas (%s): they will be copied in full", journal, err)
        return None
    finally:
        for leftover in (scratch, scratch + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    applied = rx.last_applied
    rx.close()
    del rx  # it holds the region until it is freed
    with contextlib.suppress(BufferError):
        region.close()
    return applied
