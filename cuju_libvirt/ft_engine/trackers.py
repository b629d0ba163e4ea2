"""Dirty trackers: which guest pages changed since the last epoch (policy; mechanism in C).

Two trackers implement :class:`Tracker`:

``uffd`` (:class:`UffdTracker`)
    userfaultfd write-protect on the guest-RAM mapping *inside QEMU*, in one of two
    modes. ``async``: the kernel resolves write faults itself and the harvest walks
    every page-table entry with the ``PAGEMAP_SCAN`` ioctl, which reports written pages
    and re-protects them atomically: the pause grows with guest RAM. ``sync``: every
    first write to a protected page is a fault that a C thread of cujud records and
    resolves; the harvest reads bitmaps and re-protection runs while the VM runs: the
    pause follows the dirty set (see c_ext/uffd.h for the rules). The
    userfaultfd is obtained by attaching to the running QEMU from outside (one
    ``userfaultfd()`` injected with ptrace, taken with ``pidfd_getfd``): no change to
    the domain XML, works with libvirt's seccomp sandbox and with QEMU running as
    ``libvirt-qemu`` (then with ``UFFD_USER_MODE_ONLY``).
``scan`` (:class:`ScanTracker`)
    compares the RAM file with a shadow copy (threads, vector compares); works on any
    kernel, cost grows with RAM size.

:func:`select_tracker` turns the ``<cuju:ft tracker="auto|uffd|scan">`` setting into a
tracker and logs one line saying which is active and why. ``auto`` takes ``uffd`` when
the start-up :func:`self_test` passes and the domain fits (see :func:`uffd_unfit_reason`),
otherwise ``scan``; ``uffd`` is ``uffd`` or a :class:`TrackerUnavailableError`.

Rules correctness depends on (DESIGN.md, "Dirty tracking"), enforced here:

* arm and harvest only while the VM is stopped: every tracker is given a
  ``vm_stopped`` callable and refuses (:class:`StateError`) otherwise;
* a harvest that returns ``full_resync=True`` (lost event, overflow, error) means
  "copy all of guest RAM", never "nothing changed";
* ``uffd`` sees a page as written only while its page-table entry lives: a written
  page of a RAM file on a disk file system (or on tmpfs with swap active) could be
  written back and reclaimed before the harvest and then be missed. ``uffd`` is
  therefore only used when the RAM file is on tmpfs/hugetlbfs and no swap is active
  (or QEMU's memory is locked).
"""

from __future__ import annotations

import array
import functools
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from cuju_libvirt import _cuju
from cuju_libvirt._closing import Closing
from cuju_libvirt.errors import StateError, TrackerError, TrackerUnavailableError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

TrackerSetting = Literal["auto", "uffd", "scan"]
TRACKER_SETTINGS: tuple[TrackerSetting, ...] = ("auto", "uffd", "scan")
#: How the uffd tracker learns of writes (see the module docstring).
UffdMode = Literal["async", "sync"]
UFFD_MODES: tuple[UffdMode, ...] = ("async", "sync")
_CAP_SYS_PTRACE = 19
#: ``uffd`` picks sync mode (when allowed) only for guests at least this big. Measured here
#: (2 loaded cores): a first write costs ~1.3 us in async mode and 10-40 us in sync mode,
#: while async's harvest walks page tables at several ns per page of guest RAM: for small
#: guests the walk is cheaper than the faults, for big ones (4 GiB: 7-38 ms per pause) it is not.
SYNC_MIN_RAM_BYTES = 2 << 30

#: Called before every arm/harvest; must return True only while the VM is stopped.
VmStopped = Callable[[], bool]

_TMPFS_TYPES = frozenset({"tmpfs", "hugetlbfs"})


@dataclass(frozen=True, slots=True)
class Harvest:
    """One harvest: ``count`` page indexes were written to the caller's buffer.

    When ``full_resync`` is true the indexes are incomplete: copy the whole region.
    """

    count: int
    full_resync: bool


@runtime_checkable
class Tracker(Protocol):
    """What the epoch engine needs from a dirty tracker."""

    @property
    def name(self) -> str: ...

    @property
    def npages(self) -> int: ...

    @property
    def page_size(self) -> int: ...

    def arm(self) -> None:
        """Start tracking from now (VM stopped): the next harvest reports later writes."""

    def harvest(self, out: WriteableBuffer) -> Harvest:
        """Write the indexes of pages changed since the last arm/harvest into ``out``
        (uint64 each, ascending), VM stopped."""

    def close(self) -> None:
        """Release everything; idempotent."""


@runtime_checkable
class Settling(Protocol):
    """A tracker with work it can finish between the harvest and ``cont`` (``uffd`` sync)."""

    def settle(self) -> None:
        """VM still stopped after a harvest: account for what happened since; never waits."""


def page_buffer(npages: int) -> array.array[int]:
    """A buffer large enough for any harvest of a region of ``npages`` pages."""
    return array.array("Q", bytes(8 * max(npages, 1)))


class _Backend(Protocol):
    @property
    def npages(self) -> int: ...
    @property
    def page_size(self) -> int: ...

    def arm(self) -> None: ...
    def harvest(self, out: WriteableBuffer) -> tuple[int, bool]: ...
    def close(self) -> None: ...


class _GuardedTracker(Closing):
    """Shared policy: run-state guard, error mapping, idempotent close."""

    name = "?"

    def __init__(self, backend: _Backend, vm_stopped: VmStopped, what: str) -> None:
        self._backend = backend
        self._vm_stopped = vm_stopped
        self._what = what
        self._closed = False

    @property
    def npages(self) -> int:
        return self._backend.npages

    @property
    def page_size(self) -> int:
        return self._backend.page_size

    def _check(self, op: str) -> None:
        if self._closed:
            raise StateError(f"{self.name} tracker for {self._what}: {op} after close")
        if not self._vm_stopped():
            raise StateError(
                f"{self.name} tracker for {self._what}: {op} while the VM runs; stop it first "
                "(pages written during the harvest would be lost)"
            )

    def arm(self) -> None:
        self._check("arm")
        try:
            self._backend.arm()
        except OSError as err:
            raise TrackerError(f"{self.name} tracker for {self._what}: arming failed: {err}") from err

    def harvest(self, out: WriteableBuffer) -> Harvest:
        self._check("harvest")
        try:
            count, resync = self._backend.harvest(out)
        except OSError as err:
            raise TrackerError(
                f"{self.name} tracker for {self._what}: harvest failed ({err}); copy all of guest RAM"
            ) from err
        if resync:
            log.warning("%s tracker for %s: full resync needed (%d pages reported)", self.name,
                        self._what, count)
        return Harvest(count, resync)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()


class UffdTracker(_GuardedTracker):
    """userfaultfd write-protect on QEMU's guest-RAM mapping (``mode`` async or sync)."""

    name = "uffd"

    def __init__(self, backend: _cuju.UffdTracker, vm_stopped: VmStopped, what: str,
                 mode: UffdMode = "async") -> None:
        super().__init__(backend, vm_stopped, what)
        self._uffd = backend
        self.mode: UffdMode = mode

    @classmethod
    def attach(cls, pid: int, ram_path: str | os.PathLike[str], vm_stopped: VmStopped,
               *, user_mode_only: bool | None = None, walkers: int = 1,
               mode: UffdMode = "async") -> UffdTracker:
        """Attach to running process ``pid`` (QEMU) and track its mapping of ``ram_path``.

        ``user_mode_only`` defaults to "QEMU does not run as root". ``walkers`` threads
        split each harvest's page-table walk in ``async`` mode (worth it on hosts with
        idle cores; on the 2-core development machine it did not help). ``sync`` mode
        needs a userfaultfd that also waits on kernel-mode writes (O_DIRECT reads into
        guest RAM, KVM, vhost), i.e. QEMU allowed to create one without
        ``UFFD_USER_MODE_ONLY`` (see :func:`sync_unfit_reason`). Not armed yet.
        """
        if mode not in UFFD_MODES:
            raise ValueError(f"uffd mode {mode!r} is not one of {', '.join(UFFD_MODES)}")
        start, length = find_ram_mapping(pid, ram_path)
        if mode == "sync":
            reason = sync_unfit_reason(pid)
            if reason is not None:
                raise TrackerUnavailableError(f"uffd tracker (sync mode) for pid {pid}: {reason}")
            if user_mode_only:
                raise ValueError("sync mode cannot use UFFD_USER_MODE_ONLY: kernel-mode writes would fail")
            user_mode_only = False
        elif user_mode_only is None:
            user_mode_only = _effective_uid(pid) != 0
        fd = _attach_any_thread(pid, user_mode_only)
        try:
            backend = _cuju.UffdTracker(fd, pid, start, length, walkers, sync=mode == "sync")
        except OSError as err:
            raise TrackerUnavailableError(f"uffd tracker for pid {pid}: {err}") from err
        finally:
            os.close(fd)
        log.debug("uffd tracker (%s) attached to pid %d, mapping %#x+%#x of %s (user_mode_only=%s)",
                  mode, pid, start, length, ram_path, user_mode_only)
        return cls(backend, vm_stopped, f"pid {pid}", mode)

    def settle(self) -> None:
        """Sync mode: call after the harvest, VM still stopped (before ``cont``): the pages
        the tracker protected again meanwhile are not reported once more. Never waits."""
        self._check("settle")
        self._uffd.settle()

    def stats(self) -> _cuju.UffdStats:
        return self._uffd.stats()


class ScanTracker(_GuardedTracker):
    """Shadow-copy comparison of the RAM file, mapped read-only into this process."""

    name = "scan"

    def __init__(self, backend: _cuju.ScanTracker, ram: mmap.mmap, vm_stopped: VmStopped, what: str) -> None:
        super().__init__(backend, vm_stopped, what)
        self._ram = ram

    @classmethod
    def open(cls, ram_path: str | os.PathLike[str], vm_stopped: VmStopped,
             *, nthreads: int | None = None) -> ScanTracker:
        """Map ``ram_path`` (shared, read-only) and allocate the shadow. Not armed yet."""
        nthreads = nthreads or min(os.cpu_count() or 1, 4)
        try:
            with open(ram_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                ram = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError) as err:
            raise TrackerUnavailableError(f"scan tracker: cannot map the RAM file {ram_path}: {err}") from err
        try:
            backend = _cuju.ScanTracker(ram, nthreads)
        except OSError as err:
            ram.close()
            raise TrackerUnavailableError(f"scan tracker for {ram_path}: {err}") from err
        return cls(backend, ram, vm_stopped, str(ram_path))

    def close(self) -> None:
        if not self._closed:
            super().close()
            self._ram.close()


# -- finding things in /proc ---------------------------------------------------------------


def find_ram_mapping(pid: int, ram_path: str | os.PathLike[str]) -> tuple[int, int]:
    """(start address, length) of the mapping of the RAM file ``ram_path`` in ``pid``.

    Matched by device and inode (so a renamed or unlinked file is still found), the
    mapping must start at file offset 0 and be shared.
    """
    try:
        st = os.stat(ram_path)
    except OSError as err:
        raise TrackerUnavailableError(f"RAM file {ram_path}: {err}") from err
    found: list[tuple[int, int]] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 5:
                    continue
                rng, perms, offset, dev, inode = fields[:5]
                if int(inode) != st.st_ino or int(offset, 16) != 0 or perms[3] != "s":
                    continue
                major, minor = (int(x, 16) for x in dev.split(":"))
                if os.makedev(major, minor) != st.st_dev:
                    continue
                lo, hi = (int(x, 16) for x in rng.split("-"))
                found.append((lo, hi - lo))
    except OSError as err:
        raise TrackerUnavailableError(f"cannot read the mappings of pid {pid}: {err}") from err
    if not found:
        raise TrackerUnavailableError(f"pid {pid} has no shared mapping of {ram_path} at offset 0")
    # QEMU maps the RAM file once; several would mean we cannot tell which one the guest uses.
    if len(found) > 1:
        raise TrackerUnavailableError(
            f"pid {pid} maps {ram_path} {len(found)} times; cannot tell which mapping is guest RAM"
        )
    return found[0]


def sync_unfit_reason(pid: int) -> str | None:
    """Why QEMU ``pid`` cannot get a userfaultfd for ``sync`` mode, or None.

    Sync mode makes every writer of a protected page wait for cujud, kernel-mode
    writers too (``O_DIRECT`` reads into guest RAM, KVM's ``get_user_pages``, vhost);
    a ``UFFD_USER_MODE_ONLY`` userfaultfd would fail those writes with EFAULT instead.
    The kernel grants a full one to a creator with CAP_SYS_PTRACE, or to anyone while
    ``vm.unprivileged_userfaultfd`` is 1.
    """
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            if f.read().strip() == "1":
                return None
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1:
                        return None
                    break
    except OSError as err:
        return f"cannot read the capabilities of pid {pid}: {err}"
    return (f"QEMU (pid {pid}, uid {_effective_uid(pid)}) may only create a user-mode-only "
            "userfaultfd, with which kernel-mode writes into guest RAM would fail; use mode 'async' "
            "(or run QEMU with CAP_SYS_PTRACE)")


def _effective_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])
    raise TrackerUnavailableError(f"cannot read the user of pid {pid}")


def _tids(pid: int) -> Iterator[int]:
    yield pid  # QEMU's main thread idles in ppoll(): the usual choice
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return
    yield from (t for t in tids if t != pid)


#: Seconds to wait between rounds over QEMU's threads when none sits in a system call.
_ATTACH_RETRY_S = (0.002, 0.01, 0.05, 0.2)


def _attach_any_thread(pid: int, user_mode_only: bool) -> int:
    """A userfaultfd in ``pid``'s mm, injected into the first thread parked in a system call.

    A thread that was just detached from (an attach a moment ago) may not have run yet: it
    still stands *before* its restarted ``syscall`` instruction, and every thread can be
    between two calls for a moment under load; so a round that finds none is retried.
    """
    last: OSError | None = None
    for delay in (*_ATTACH_RETRY_S, None):
        for tid in _tids(pid):
            try:
                return _cuju.uffd_attach(pid, tid, user_mode_only)
            except OSError as err:
                last = err
                if err.errno == 11:  # EAGAIN: thread not parked in a syscall, try the next
                    continue
                break
        if last is None or last.errno != 11 or delay is None:
            break
        time.sleep(delay)
    assert last is not None
    stage = last.filename if isinstance(last.filename, str) else "attach"
    hint = " (cujud needs ptrace rights over QEMU: run it as root)" if last.errno == 1 else ""
    raise TrackerUnavailableError(
        f"cannot get a userfaultfd into pid {pid}: {stage}: {last.strerror}{hint}"
    ) from last


def _mount_fstype(path: str | os.PathLike[str]) -> str:
    """File-system type of the mount holding ``path`` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, fstype = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


def _swap_active() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return False


def _locked_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


def host_unfit_reason(ram_path: str | os.PathLike[str]) -> str | None:
    """Why RAM files at ``ram_path`` (a file or the memory backing directory) cannot be
    tracked by ``uffd`` on this host whatever the domain, or None.

    A written page only shows as written while its page-table entry exists; pages the
    kernel may reclaim between two harvests (page cache on a disk file system; tmpfs
    with swap) would be missed.
    """
    fstype = _mount_fstype(ram_path)
    if fstype not in _TMPFS_TYPES:
        return (f"guest RAM at {ram_path} is on {fstype}, where written pages can be reclaimed unseen; "
                "put memory_backing_dir on tmpfs or hugetlbfs")
    if fstype == "tmpfs" and _swap_active():
        return ("swap is active and guest RAM is not locked: add <memoryBacking><locked/> "
                "or turn swap off")
    return None


def uffd_unfit_reason(pid: int, ram_path: str | os.PathLike[str]) -> str | None:
    """Why the RAM of QEMU ``pid`` (file ``ram_path``) cannot be tracked by ``uffd``, or None."""
    reason = host_unfit_reason(ram_path)
    if reason is not None and reason.startswith("swap is active"):
        size = os.stat(ram_path).st_size
        if _locked_bytes(pid) >= size:
            return None  # locked guest RAM is never reclaimed
    return reason


# -- self-test ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    reason: str  # why it failed, or what passed
    checks: tuple[str, ...]  # checks that ran and passed


class _SelfTestFailure(Exception):
    pass


_SELFTEST_PAGES = 64


def _selftest_round(t: _cuju.UffdTracker, out: array.array[int], want: set[int], label: str,
                    done: list[str], *, carried: set[int] | None = None) -> set[int]:
    """Harvest and check: ``want`` exactly, or (sync mode, ``carried`` given) ``want`` plus
    possibly pages of ``carried`` (written earlier and still writable). Returns the pages."""
    count, resync = t.harvest(out)
    t.settle()
    got = set(out[:count])
    if resync:
        raise _SelfTestFailure(f"{label}: harvest asked for a full resync")
    allowed = want | (carried or set())
    if not want <= got or not got <= allowed:
        missed, extra = sorted(want - got), sorted(got - allowed)
        raise _SelfTestFailure(f"{label}: missed pages {missed}, unexpected pages {extra}")
    done.append(label)
    return got


def _direct_read_into(m: mmap.mmap, offset: int, length: int, workdir: str) -> bool:
    """O_DIRECT read from a file into the mapping; False when O_DIRECT is unsupported here."""
    src = os.path.join(workdir, "odirect")
    with open(src, "wb") as f:
        f.write(os.urandom(length))
    try:
        fd = os.open(src, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        n = os.preadv(fd, [memoryview(m)[offset:offset + length]], 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return n == length


def _run_self_test(user_mode_only: bool, sync: bool = False) -> SelfTestResult:
    probe = _cuju.uffd_probe(user_mode_only)
    if probe["uffd_errno"]:
        return SelfTestResult(False, f"userfaultfd() unavailable ({os.strerror(probe['uffd_errno'])})", ())
    if probe["missing"]:
        return SelfTestResult(False, f"kernel lacks userfaultfd features {', '.join(probe['missing'])}", ())
    if not probe["pagemap_scan"] and not sync:
        return SelfTestResult(False, "kernel lacks the PAGEMAP_SCAN ioctl", ())
    ps = mmap.PAGESIZE
    size = _SELFTEST_PAGES * ps
    done: list[str] = []
    memfd = os.memfd_create("cuju-trackers-selftest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        m = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(m)
        import ctypes  # noqa: PLC0415 - only the self-test needs a raw address

        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        fd = _cuju.uffd_create(user_mode_only and not sync)
        try:
            t = _cuju.UffdTracker(fd, os.getpid(), start, size, sync=sync)
        finally:
            os.close(fd)
        # Sync mode reports a page once more while it is still writable after a fault.
        carry: Callable[[set[int]], set[int] | None] = (lambda got: got) if sync else (lambda got: None)
        try:
            out = page_buffer(_SELFTEST_PAGES)
            for p in range(0, _SELFTEST_PAGES, 2):  # half populated, half never touched
                m[p * ps] = 1
            t.arm()
            _selftest_round(t, out, set(), "no writes after arm", done)

            # CPU writes, this thread and another; reads must not count.
            mine, theirs, reads = {0, 1, 7, 30}, {3, 4, 40, 63}, {10, 11, 12}

            def write_pages() -> None:
                for p in theirs:
                    m[p * ps + 100] = 0x5A

            for p in mine:
                m[p * ps + 5] = 0xA5
            th = threading.Thread(target=write_pages, name="cuju-trackers-selftest")
            th.start()
            th.join()
            _ = sum(m[p * ps] for p in reads)
            last = _selftest_round(t, out, mine | theirs, "writes from two threads", done)

            # Kernel-mode writes into the mapping: read() and O_DIRECT.
            with tempfile.TemporaryDirectory(prefix="trackers-selftest-") as workdir:
                src = os.path.join(workdir, "src")
                with open(src, "wb") as f:
                    f.write(b"\x77" * ps)
                rfd = os.open(src, os.O_RDONLY)
                try:
                    os.preadv(rfd, [view[20 * ps:21 * ps]], 0)
                finally:
                    os.close(rfd)
                want = {20}
                label = "read() into the mapping"
                for dirpath in (workdir, "/var/tmp"):
                    with tempfile.TemporaryDirectory(prefix="trackers-selftest-", dir=dirpath) as d2:
                        if _direct_read_into(m, 50 * ps, 2 * ps, d2):
                            want |= {50, 51}
                            label += " and O_DIRECT read"
                            break
                last = _selftest_round(t, out, want, label, done, carried=carry(last))

            # Discards: MADV_REMOVE zeroes pages without a write; DONTNEED drops them.
            m[33 * ps] = 9
            m[34 * ps] = 9
            count, _ = t.harvest(out)
            t.settle()
            last = set(out[:count]) | (last if sync else set())
            m.madvise(mmap.MADV_REMOVE, 33 * ps, ps)
            m.madvise(mmap.MADV_DONTNEED, 34 * ps, ps)
            last = _selftest_round(t, out, {33, 34}, "madvise REMOVE/DONTNEED", done, carried=carry(last))
            _selftest_round(t, out, set(), "nothing after a harvest", done, carried=carry(last))
        finally:
            t.close()
            view.release()
            m.close()
    except _SelfTestFailure as err:
        return SelfTestResult(False, f"self-test mismatch: {err}", tuple(done))
    except OSError as err:
        return SelfTestResult(False, f"self-test failed: {err}", tuple(done))
    finally:
        os.close(memfd)
    return SelfTestResult(True, f"self-test passed ({len(done)} checks)", tuple(done))


@functools.cache
def self_test(user_mode_only: bool = True, sync: bool = False) -> SelfTestResult:
    """Check, on a scratch mapping of this process, that the kernel classifies pages the
    way the ``uffd`` tracker assumes (written, not written, removed). Cached per process."""
    result = _run_self_test(user_mode_only, sync)
    log.debug("uffd self-test: %s; passed: %s", result.reason, ", ".join(result.checks) or "none")
    return result


# -- selection ------------------------------------------------------------------------------


def select_tracker(setting: str, *, pid: int, ram_path: str | os.PathLike[str], vm_stopped: VmStopped,
                   logger: logging.Logger | None = None, scan_threads: int | None = None,
                   self_test_fn: Callable[[], SelfTestResult] = self_test,
                   uffd_mode: UffdMode | None = None) -> Tracker:
    """The tracker for QEMU ``pid`` whose guest RAM is the file ``ram_path``.

    ``uffd`` runs in ``sync`` mode (the pause follows the dirty set) when guest RAM is at
    least :data:`SYNC_MIN_RAM_BYTES`, QEMU may create a full userfaultfd
    (:func:`sync_unfit_reason`) and the sync self-test passes, else in ``async`` mode;
    ``uffd_mode`` forces one. Logs one line on ``logger`` naming
    the tracker that is active and why.
    """
    logger = logger or log
    if setting not in TRACKER_SETTINGS:
        raise TrackerUnavailableError(
            f"tracker={setting!r} is not one of {', '.join(TRACKER_SETTINGS)}; fix the tracker attribute "
            "of <cuju:ft>"
        )
    if setting == "scan":
        tracker: Tracker = ScanTracker.open(ram_path, vm_stopped, nthreads=scan_threads)
        logger.info("dirty tracker: scan (configured tracker='scan')")
        return tracker

    reason: str | None
    result = self_test_fn()
    reason = None if result.ok else result.reason
    if reason is None:
        reason = uffd_unfit_reason(pid, ram_path)
    if reason is None:
        mode, why = _uffd_mode(pid, uffd_mode, os.stat(ram_path).st_size)
        try:
            tracker = UffdTracker.attach(pid, ram_path, vm_stopped, mode=mode)
        except TrackerUnavailableError as err:
            reason = str(err)
        else:
            logger.info("dirty tracker: uffd (tracker=%r, %s mode%s, %s)", setting, mode, why, result.reason)
            return tracker
    if setting == "uffd":
        raise TrackerUnavailableError(
            f"tracker='uffd' cannot be used: {reason}; set tracker='auto' or 'scan' in <cuju:ft>"
        )
    tracker = ScanTracker.open(ram_path, vm_stopped, nthreads=scan_threads)
    logger.info("dirty tracker: scan (tracker='auto', uffd unavailable: %s)", reason)
    return tracker


def _uffd_mode(pid: int, forced: UffdMode | None, ram_bytes: int) -> tuple[UffdMode, str]:
    """(mode, why it is not sync, for the log line)."""
    if forced is not None:
        return forced, ""
    if ram_bytes < SYNC_MIN_RAM_BYTES:
        return "async", f": guest RAM below {SYNC_MIN_RAM_BYTES >> 20} MiB, the walk costs less than faults"
    reason = sync_unfit_reason(pid)
    if reason is None:
        sync = self_test(True, sync=True)
        if sync.ok:
            return "sync", ""
        reason = f"sync self-test: {sync.reason}"
    return "async", f": {reason}"


def ram_file_pages(ram_path: str | os.PathLike[str]) -> int:
    """Number of pages of the RAM file (helper for callers sizing buffers)."""
    return Path(ram_path).stat().st_size // mmap.PAGESIZE
