"""Type stub for the C extension cuju_libvirt._cuju (hand-written; keep in step with c_ext/)."""

import array
import mmap
from collections.abc import Sequence
from typing import TypedDict, final

from _typeshed import ReadableBuffer, WriteableBuffer

__version__: str
WIRE_VERSION: int
features: frozenset[str]

# --- replicate (c_ext/sender.c, receiver.c; wire format in c_ext/wire.h) ---
_ReadBuffer = bytes | bytearray | memoryview | mmap.mmap | array.array[int]
_WriteBuffer = bytearray | memoryview | mmap.mmap | array.array[int]

MAX_DEVICE_STATE: int
MAX_DISK_SECTION: int
DISK_RECORD_LEN: int
DISK_PART_LEN: int
MAX_DISKS: int
LINK_KEYS_LEN: int

def checksum(data: _ReadBuffer, seed: int = 0) -> int: ...
def raw_send(fd: int, buffer: _ReadBuffer, timeout: float | None = None) -> None: ...
def raw_recv(fd: int, buffer: _WriteBuffer, timeout: float | None = None) -> None: ...

@final
class Sender:
    def __init__(
        self,
        fd: int,
        region: _ReadBuffer,
        *,
        page_size: int = 4096,
        session_id: int = 0,
        io_timeout: float | None = None,
        disk_sizes: Sequence[int] | None = None,
        link_keys: _ReadBuffer | None = None,
    ) -> None: ...
    def handshake(self, timeout: float | None = None) -> int: ...
    def stage(
        self,
        epoch: int,
        dirty_indexes: _ReadBuffer,
        device_state: _ReadBuffer,
        timeout: float | None = None,
        disks: Sequence[tuple[int, ReadableBuffer] | tuple[int, ReadableBuffer, bool]] | None = None,
    ) -> None: ...
    def ship(self) -> None: ...
    def wait_ack(self, epoch: int, timeout: float | None = None) -> bool: ...
    def counters(self) -> dict[str, int]: ...
    def close(self, orderly: bool = True, timeout: float | None = None) -> None: ...

@final
class Receiver:
    def __init__(
        self,
        region: _WriteBuffer,
        device_state_path: str | bytes,
        journal_path: str | bytes,
        *,
        page_size: int = 4096,
        durable: bool = False,
        disks: Sequence[tuple[int, int]] | None = None,
    ) -> None: ...
    @property
    def last_applied(self) -> int: ...
    def start(
        self, fd: int, io_timeout: float | None = None, handshake_timeout: float | None = None, *,
        link_keys: _ReadBuffer | None = None,
    ) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def counters(self) -> dict[str, int]: ...
    def error(self) -> tuple[int, str, int, int] | None: ...
    def close(self) -> None: ...

# --- disk journal (c_ext/diskjournal.h) ---
class DiskJournalInfo(TypedDict):
    disk_size: int
    capacity: int
    block_size: int
    bitmap_bytes: int
    nblocks: int
    server_pid: int
    generation: int
    active: int
    buffers: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]
    writes: int
    zeroes: int
    trims: int
    flushes: int
    bytes_written: int
    overflows: int
    seals: int
    #: Random; a new one whenever the bitmaps may have missed a change of the image.
    lineage: int

@final
class DiskJournal:
    def __init__(self, path: str | bytes) -> None: ...
    def info(self) -> DiskJournalInfo: ...
    def seal(self, epoch: int) -> int: ...
    def reset(self, idx: int) -> None: ...
    def spans(self, idx: int) -> tuple[int, int, int, int, int]: ...
    def close(self) -> None: ...
    def __buffer__(self, flags: int) -> memoryview: ...

def disk_build(
    bitmap: ReadableBuffer, block_size: int, disk_size: int, image_fd: int, cursor: int, out: WriteableBuffer
) -> tuple[int, int]: ...
def disk_mark_allocated(image_fd: int, disk_size: int, block_size: int, bitmap: WriteableBuffer) -> int: ...
# --- trackers (helper `trackers`): dirty trackers, see c_ext/uffd.h, attach.h, scan.h ---
class UffdProbe(TypedDict):
    features: list[str]
    missing: list[str]
    pagemap_scan: bool
    uffd_errno: int

class UffdStats(TypedDict):
    events_remove: int
    events_other: int
    event_thread_errno: int
    mode: str
    faults: int
    reprotected: int
    hot_pages: int
    features: list[str]

def uffd_probe(user_mode_only: bool = True) -> UffdProbe: ...
def uffd_create(user_mode_only: bool = True) -> int: ...
def uffd_attach(pid: int, tid: int, user_mode_only: bool = True) -> int: ...

class UffdTracker:
    def __new__(cls, uffd: int, pid: int, start: int, length: int, walkers: int = 1,
                sync: bool = False) -> UffdTracker: ...
    def arm(self) -> None: ...
    def harvest(self, out: WriteableBuffer) -> tuple[int, bool]: ...
    def settle(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> UffdStats: ...
    @property
    def page_size(self) -> int: ...
    @property
    def npages(self) -> int: ...
    @property
    def closed(self) -> bool: ...

class ScanTracker:
    def __new__(cls, ram: ReadableBuffer, nthreads: int = 2) -> ScanTracker: ...
    def arm(self) -> None: ...
    def harvest(self, out: WriteableBuffer) -> tuple[int, bool]: ...
    def close(self) -> None: ...
    @property
    def page_size(self) -> int: ...
    @property
    def npages(self) -> int: ...
    @property
    def closed(self) -> bool: ...
