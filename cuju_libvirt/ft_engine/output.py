"""Output commit for the network: hold a guest's packets until the backup acknowledged them.

The packets a protected guest sends during epoch N may leave the host only once the backup
has acknowledged epoch N; otherwise a failover could resume from an older state whose
replay the outside world has already seen. The host kernel's ``sch_plug`` is not
available everywhere, so this module uses QEMU's own netfilters on each protected NIC's
netdev (mechanism only; when to end an epoch is the engine's policy)::

    guest NIC --> [counter D] --> [F1: running epoch] --> [F2: shipped epoch] --> tap
                  filter-dump     filter-buffer           filter-buffer

* ``queue=rx`` on the *netdev* is the direction of the guest's outgoing packets (the
  netdev "receives" what its NIC peer sends). Both buffers have the longest ``interval``
  QEMU accepts, so their own timer never releases anything while epochs run.
* For ``queue=rx`` QEMU walks a netdev's filter list from tail to head, and a buffer that
  is switched off hands its packets to the filter *before* it in the list. F2 is therefore
  inserted before F1 (``position=id=F1,insert=before``); in the naive order (F1 then F2)
  the packets bypass F2 and leave early (:data:`Order.NAIVE`, kept for the test that shows
  the leak).
* :meth:`OutputCommit.boundary` (VM stopped, F2 empty): switch F1 off and on again: the
  closed epoch's packets move into F2. :meth:`OutputCommit.release` (the ack, VM
  running): switch F2 off and on: exactly that epoch's packets leave. A release while the
  VM is stopped goes out only at ``cont`` (QEMU queues it in the netdev).
* The ``qom-set`` commands of a switch are sent back to back and their answers collected
  afterwards (QEMU runs a monitor's commands in the order sent): one round trip, not two
  per netdev. :meth:`OutputCommit.begin_boundary` sends the boundary's right behind the
  engine's ``stop`` and device-state save; :meth:`OutputCommit.finish_boundary` collects them.
* :meth:`OutputCommit.release_all` and :meth:`OutputCommit.remove` let everything out,
  in order, and nothing is dropped: a buffer that is deleted while it holds packets would
  drop them, so it is always switched off (flushed) first.

**The 10,000-packet cap.** A ``filter-buffer`` queue silently drops every packet beyond
10,000 (:data:`QUEUE_LIMIT`; QEMU's ``NET_QUEUE_LEN``, not configurable, not reported).
QEMU exposes no packet counter for a netdev or a filter over QMP, so, optionally, a
third filter counts: a ``filter-dump`` with ``maxlen=1`` at the tail (it sees every
outgoing packet first) writes a 24-byte pcap header and then exactly 17 bytes per packet
into a file; the file's size is the packet count, read with one ``stat()`` and no QMP
round trip (:meth:`OutputCommit.pending_packets`). The engine ends an epoch early when
the running epoch nears the cap. Blocks already counted are punched out of the file
(it stays sparse; its size keeps counting). Without counting (``counter_dir=None``) the
engine can only bound epochs by time and the guest's packet rate.

Errors: :class:`OutputCommitError` (a :class:`~cuju_libvirt.errors.ReplicationError`);
:meth:`OutputCommit.install` is all or nothing. After an ``OutputCommitError`` from a
boundary or release (with several netdevs, some may have switched and others not), the
engine must treat output commit as broken: stop protecting and :meth:`OutputCommit.remove`.
Calling a method in the wrong state (a boundary while the previous epoch is still held, a
release with nothing held) raises :class:`~cuju_libvirt.errors.StateError` and changes
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import select
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuju_libvirt.errors import MonitorError, ReplicationError, StateError
from cuju_libvirt.qmp import QMPClient, QMPError

log = logging.getLogger(__name__)

#: Packets one filter-buffer queue holds before it silently drops (QEMU's NET_QUEUE_LEN).
QUEUE_LIMIT = 10_000
#: The largest ``interval`` (microseconds of guest-running time, ~71.6 minutes) QEMU takes.
#: The timer restarts whenever a buffer is switched on, i.e. at every boundary/release.
HOLD_INTERVAL_US = 2**32 - 1
#: pcap file header and per-packet record size of the counter (``maxlen=1``).
PCAP_HEADER = 24
PCAP_RECORD = 16 + 1
#: Where QEMU keeps the devices that were given an id, and those that were not.
_PERIPHERAL_PATHS = ("/machine/peripheral", "/machine/peripheral-anon")
_PUNCH_EVERY = 1 << 20
#: How the ids of a netdev's output-commit objects end (running and shipped buffer, counter).
_SUFFIXES = ("-f1", "-f2", "-count")
#: inotify(7): a file was written; inotify_init1's flags.
_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: How often :meth:`OutputCommit.wait_output` looks at the counters without inotify (s).
_POLL_S = 0.001
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class OutputCommitError(ReplicationError):
    """The output-commit filters could not be installed, switched or removed.

    ``netdev`` names the netdev concerned (None when it is not about one), ``qemu_message``
    carries QEMU's own words when QEMU refused a command.
    """

    def __init__(self, message: str, *, netdev: str | None = None, qemu_message: str = "") -> None:
        super().__init__(message)
        self.netdev = netdev
        self.qemu_message = qemu_message


class Order(enum.Enum):
    """How the two buffers stand in the netdev's filter list."""

    #: F2 before F1: what output commit needs.
    COMMIT = "commit"
    #: F1 then F2, as ``object-add`` appends them: packets leave F1 past F2 (a leak). For tests.
    NAIVE = "naive"


@dataclass(frozen=True)
class NetdevFilters:
    """The QOM ids of the filters on one netdev; ``counter_file`` is None without counting."""

    netdev: str
    running: str
    shipped: str
    counter: str | None = None
    counter_file: Path | None = None


@dataclass
class OutputStats:
    """Counters of one :class:`OutputCommit` (milliseconds of wall time, all netdevs)."""

    boundaries: int = 0
    releases: int = 0
    boundary_ms_total: float = 0.0
    boundary_ms_max: float = 0.0
    release_ms_total: float = 0.0
    release_ms_max: float = 0.0
    #: Packets counted into closed epochs / released; None without counting.
    packets_closed: int | None = None
    packets_released: int | None = None
    #: The largest number of packets one epoch held (all netdevs); None without counting.
    epoch_packets_max: int | None = None
    last_boundary_ms: float = 0.0
    last_release_ms: float = 0.0
    recent_boundary_ms: list[float] = field(default_factory=list)
    recent_release_ms: list[float] = field(default_factory=list)


_RECENT = 1024

#: One filter switch: (filter id, its netdev, on).
_Step = tuple[str, str, bool]


@dataclass(frozen=True)
class _Sent:
    """Switches sent and not yet answered (QMP id, step), and a send that failed."""

    sent: list[tuple[int, _Step]]
    failure: OutputCommitError | None


def _qemu_words(err: MonitorError) -> str:
    return err.desc if isinstance(err, QMPError) else str(err)


def discover_netdevs(qmp: QMPClient) -> list[str]:
    """The ids of the netdevs that back the VM's NICs, in QOM order.

    Every device under ``/machine/peripheral`` (devices with an id, e.g. libvirt's
    ``net0``) and ``/machine/peripheral-anon`` is asked for its ``netdev`` property; NICs
    answer with their netdev's id (libvirt names them ``hostnet<N>``), other devices have
    no such property. Raises :class:`OutputCommitError` if the monitor fails.
    """
    found: list[str] = []
    try:
        for base in _PERIPHERAL_PATHS:
            try:
                children = qmp.execute("qom-list", {"path": base})
            except QMPError:
                continue  # no device of that kind
            for child in children:
                if not str(child.get("type", "")).startswith("child<"):
                    continue
                path = f"{base}/{child['name']}"
                props = qmp.execute("qom-list", {"path": path})
                if not any(p.get("name") == "netdev" for p in props):
                    continue
                netdev = qmp.execute("qom-get", {"path": path, "property": "netdev"})
                if isinstance(netdev, str) and netdev and netdev not in found:
                    found.append(netdev)
    except MonitorError as err:
        raise OutputCommitError(f"cannot list the VM's NICs over QMP: {_qemu_words(err)}") from err
    return found


def leftover_filters(qmp: QMPClient, tag: str) -> list[str]:
    """Ids of the output-commit objects of ``tag`` that are in QEMU now (``cuju-<tag>-...``).

    A cujud that died (SIGKILL, or SIGTERM without the peer's promise) leaves its filters in
    QEMU, still holding the output of unacknowledged epochs; :func:`remove_leftovers` lets
    that output go and deletes them, once the peer promised never to resume its standby.
    """
    try:
        objects = qmp.execute("qom-list", {"path": "/objects"})
    except MonitorError as err:
        raise OutputCommitError(f"cannot list QEMU's objects: {_qemu_words(err)}") from err
    prefix = f"cuju-{tag}-"
    return sorted(str(o["name"]) for o in objects
                  if str(o.get("name", "")).startswith(prefix) and str(o.get("name")).endswith(_SUFFIXES))


def remove_leftovers(qmp: QMPClient, ids: Sequence[str]) -> None:
    """Release what the filters ``ids`` hold, in order, and delete them (see :func:`leftover_filters`).

    Per netdev: the running buffer (F1) is switched off first, so that its packets queue
    behind the shipped buffer's (older) ones, then F2; then all of them are deleted.
    Raises :class:`OutputCommitError` naming the filters that are left.
    """
    def key(obj: str) -> tuple[str, int]:
        base, _, kind = obj.rpartition("-")
        return base, ("f1", "f2", "count").index(kind) if kind in ("f1", "f2", "count") else 3

    ordered = sorted(ids, key=key)
    failed: list[str] = []
    for obj in ordered:
        if obj.endswith("-count"):
            continue
        try:
            qmp.execute("qom-set", {"path": f"/objects/{obj}", "property": "status", "value": "off"})
        except MonitorError as err:
            log.warning("cannot switch leftover filter %s off: %s", obj, _qemu_words(err))
    for obj in ordered:
        try:
            qmp.execute("object-del", {"id": obj})
        except MonitorError as err:
            log.warning("cannot delete leftover filter %s: %s", obj, _qemu_words(err))
            failed.append(obj)
    if failed:
        raise OutputCommitError(f"could not delete the leftover output-commit filters {', '.join(failed)}")


def _punch(path: Path, upto: int) -> None:
    """Free the blocks of ``path`` below ``upto`` (keeps the size; best effort)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_WRONLY)
    try:
        length = upto - upto % 4096
        if length > 0 and libc.fallocate(
            fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(length)
        ):
            log.debug("cannot punch counter file %s: %s", path, os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


class _CounterWatch:
    """An inotify descriptor that becomes readable as soon as QEMU writes a counter file:
    the engine learns of a held packet at once, without polling."""

    def __init__(self, paths: Sequence[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        for path in paths:
            if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
                errno = ctypes.get_errno()
                self.close()
                raise OSError(errno, f"inotify_add_watch {path}: {os.strerror(errno)}")

    def wait(self, timeout: float) -> None:
        """Return once a counter file was written since the last call, or after ``timeout`` s."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 4096):
                    pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OutputCommit:
    """The output-commit filters of one VM, driven by its epoch engine.

    ``qmp`` is the VM's (direct) monitor; this object issues commands on it from the
    engine's thread only. ``tag`` makes the filter ids unique (``cuju-<tag>-<netdev>-f1``);
    ``counter_dir`` is a directory both QEMU and this process can reach (tmpfs
    preferred) for the packet counters, None to go without.
    """

    def __init__(
        self,
        qmp: QMPClient,
        *,
        tag: str = "oc",
        counter_dir: str | os.PathLike[str] | None = None,
        order: Order = Order.COMMIT,
    ) -> None:
        self.qmp = qmp
        self.tag = tag
        self.counter_dir = Path(counter_dir) if counter_dir is not None else None
        self.order = order
        self.filters: list[NetdevFilters] = []
        self.stats = OutputStats()
        #: Number of the running (collecting) epoch, from 0; the held one is ``epoch - 1``.
        self.epoch = 0
        self._held: int | None = None
        self._held_packets: int | None = None
        #: A boundary sent and not yet collected: its switches, the counts, its start.
        self._boundary: tuple[_Sent, dict[str, int] | None, float] | None = None
        self._counted_at_boundary: dict[str, int] = {}
        #: Wakes :meth:`wait_output` when a counter file is written (None: not yet, False: no inotify).
        self._watch: _CounterWatch | bool | None = None
        self._punched: dict[str, int] = {}
        self._log = log.getChild(tag)

    # -- life cycle ------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return bool(self.filters)

    @property
    def held_epoch(self) -> int | None:
        """The epoch whose packets wait for an acknowledgement (in F2), or None."""
        return self._held

    def install(self, netdevs: Sequence[str] | None = None) -> list[NetdevFilters]:
        """Put the filters on ``netdevs`` (default: :func:`discover_netdevs`); all or nothing.

        From here on the guest's packets are held until :meth:`boundary` and
        :meth:`release`. Raises :class:`OutputCommitError` naming the netdev and QEMU's
        reason (e.g. a vhost netdev: give the interface ``<driver name='qemu'/>``); filters
        already added are removed again.
        """
        if self.filters:
            raise StateError(f"output commit {self.tag} is already installed on {self._names()}")
        names = list(netdevs) if netdevs is not None else discover_netdevs(self.qmp)
        if not names:
            raise OutputCommitError("the VM has no NIC with a netdev: nothing to protect")
        if len(set(names)) != len(names):
            raise OutputCommitError(f"netdev listed twice: {', '.join(names)}")
        added: list[str] = []
        installed: list[NetdevFilters] = []
        try:
            for netdev in names:
                installed.append(self._install_one(netdev, added))
        except BaseException:
            self._delete(reversed(added))
            if self.counter_dir is not None:
                for obj in added:
                    if obj.endswith("-count"):
                        with contextlib.suppress(OSError):
                            (self.counter_dir / f"{obj}.pcap").unlink()
            raise
        self.filters = installed
        self.epoch = 0
        self._held = None
        self._held_packets = None
        self._boundary = None
        self._counted_at_boundary = {f.netdev: 0 for f in installed}
        self._punched = {}
        if self.counter_dir is not None:
            self.stats.packets_closed = self.stats.packets_released = self.stats.epoch_packets_max = 0
        self._log.info("output commit on %s (order %s)", self._names(), self.order.value)
        return list(installed)

    def _install_one(self, netdev: str, added: list[str]) -> NetdevFilters:
        base = f"cuju-{self.tag}-{netdev}"
        f1, f2 = f"{base}-f1", f"{base}-f2"
        counter: str | None = None
        counter_file: Path | None = None
        f1_position: dict[str, str] = {}
        if self.counter_dir is not None:
            # The counter stands first, so that every packet F1 will ever hold is counted
            # (a packet passing during the install is counted without being held: the
            # count errs on the safe side).
            counter = f"{base}-count"
            counter_file = self.counter_dir / f"{counter}.pcap"
            self._add(
                {"qom-type": "filter-dump", "id": counter, "netdev": netdev, "queue": "rx",
                 "file": str(counter_file), "maxlen": 1},
                netdev,
                added,
            )  # fmt: skip
            f1_position = {"position": f"id={counter}", "insert": "before"}
        buffer = {"qom-type": "filter-buffer", "netdev": netdev, "queue": "rx", "interval": HOLD_INTERVAL_US}
        self._add({**buffer, "id": f1, **f1_position}, netdev, added)
        if self.order is Order.COMMIT:
            self._add({**buffer, "id": f2, "position": f"id={f1}", "insert": "before"}, netdev, added)
        else:
            self._add({**buffer, "id": f2, "position": f"id={f1}", "insert": "behind"}, netdev, added)
        return NetdevFilters(netdev, f1, f2, counter, counter_file)

    def _add(self, spec: dict[str, Any], netdev: str, added: list[str]) -> None:
        try:
            self.qmp.execute("object-add", spec)
        except MonitorError as err:
            words = _qemu_words(err)
            hint = ""
            if "vhost" in words.lower():
                hint = " (filters need a userspace netdev: give the interface <driver name='qemu'/>)"
            raise OutputCommitError(
                f"cannot add {spec['qom-type']} {spec['id']} to netdev {netdev}: {words}{hint}",
                netdev=netdev,
                qemu_message=words,
            ) from err
        added.append(str(spec["id"]))

    def _delete(self, ids: Iterable[str]) -> list[str]:
        """object-del each id; the ids that could not be deleted (logged)."""
        failed: list[str] = []
        for obj in ids:
            try:
                self.qmp.execute("object-del", {"id": obj})
            except MonitorError as err:
                self._log.warning("cannot delete filter %s: %s", obj, _qemu_words(err))
                failed.append(obj)
        return failed

    # -- per epoch ---------------------------------------------------------------------------

    def boundary(self) -> int:
        """Close the running epoch (call while the VM is stopped); return its number.

        Its packets move from F1 into F2, where they wait for :meth:`release`. The previous
        epoch must have been released: F2 holds one epoch at a time. The same as
        :meth:`begin_boundary` followed by :meth:`finish_boundary`.
        """
        self.begin_boundary()
        return self.finish_boundary()

    def begin_boundary(self) -> None:
        """Send the boundary's commands (VM stopped) without waiting for their answers.

        QEMU runs a monitor's commands in the order sent, so a caller may send them right
        behind its ``stop`` (and its device-state save) and work while QEMU runs them;
        :meth:`finish_boundary` collects the answers. The packets of the closed epoch are
        counted here, while the VM is stopped.
        """
        self._require_installed("close an epoch")
        if self._held is not None:
            raise StateError(
                f"epoch {self._held} is still held (not acknowledged): release it before closing "
                f"epoch {self.epoch}"
            )
        if self._boundary is not None:
            raise StateError(f"the boundary of epoch {self.epoch} is already under way")
        counts = self._counts()
        started = time.perf_counter()
        steps = [(one.running, one.netdev, on) for one in self.filters for on in (False, True)]
        self._boundary = (self._send_steps(steps), counts, started)

    def finish_boundary(self) -> int:
        """Collect the answers of :meth:`begin_boundary`; return the number of the closed epoch.

        Raises :class:`OutputCommitError` for the first command QEMU refused (every answer
        is collected first); nothing is counted as held then.
        """
        if self._boundary is None:
            raise StateError("no epoch boundary was begun")
        pending, counts, started = self._boundary
        self._boundary = None
        self._collect(pending)
        elapsed = (time.perf_counter() - started) * 1e3
        closed = self.epoch
        self._held = closed
        self.epoch += 1
        st = self.stats
        st.boundaries += 1
        st.boundary_ms_total += elapsed
        st.boundary_ms_max = max(st.boundary_ms_max, elapsed)
        st.last_boundary_ms = elapsed
        _remember(st.recent_boundary_ms, elapsed)
        if counts is not None:
            packets = sum(counts[n] - self._counted_at_boundary[n] for n in counts)
            self._counted_at_boundary = counts
            self._held_packets = packets
            st.packets_closed = (st.packets_closed or 0) + packets
            st.epoch_packets_max = max(st.epoch_packets_max or 0, packets)
            self._punch_counters(counts)
        return closed

    def release(self, epoch: int | None = None) -> int:
        """Let the held epoch's packets out (call on its acknowledgement); return its number.

        ``epoch``, if given, must be the held one. While the VM is stopped the packets
        leave only at ``cont``.
        """
        self._require_installed("release an epoch")
        if self._held is None:
            raise StateError("no epoch is held: nothing to release")
        if epoch is not None and epoch != self._held:
            raise StateError(f"acknowledgement of epoch {epoch}, but epoch {self._held} is held")
        started = time.perf_counter()
        self._switch([(one.shipped, one.netdev, on) for one in self.filters for on in (False, True)])
        elapsed = (time.perf_counter() - started) * 1e3
        released, self._held = self._held, None
        st = self.stats
        st.releases += 1
        st.release_ms_total += elapsed
        st.release_ms_max = max(st.release_ms_max, elapsed)
        st.last_release_ms = elapsed
        _remember(st.recent_release_ms, elapsed)
        if self._held_packets is not None:
            st.packets_released = (st.packets_released or 0) + self._held_packets
            self._held_packets = None
        return released

    def pending_packets(self) -> int | None:
        """Packets the running epoch has collected so far (all netdevs), None without counting.

        One ``stat()`` per netdev, no QMP: cheap enough to poll while the VM runs. The engine
        should end the epoch before any netdev's share nears :data:`QUEUE_LIMIT`.
        """
        counts = self._counts()
        if counts is None:
            return None
        return max((counts[n] - self._counted_at_boundary.get(n, 0) for n in counts), default=0)

    def wait_output(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the running epoch to hold a packet; return
        :meth:`pending_packets` (None without counting: then it only sleeps).

        The counter files are watched with inotify, so a packet wakes the caller at once
        (the first written after the watch was set never goes unnoticed: its event waits in
        the descriptor). Without inotify (or past its limits) the counters are polled every
        millisecond, as before.
        """
        pending = self.pending_packets()
        if pending:
            return pending
        if pending is None:
            time.sleep(max(0.0, timeout))
            return None
        if self._watch is None:
            try:
                files = [f.counter_file for f in self.filters if f.counter_file is not None]
                self._watch = _CounterWatch(files)
            except OSError as err:
                self._log.info("cannot watch the packet counters (%s): polling them every %.0f ms instead",
                               err, _POLL_S * 1e3)
                self._watch = False
            pending = self.pending_packets()  # a packet written before the watch was set
            if pending:
                return pending
        if isinstance(self._watch, _CounterWatch):
            self._watch.wait(timeout)
            return self.pending_packets()
        deadline = time.monotonic() + timeout
        while not pending and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(_POLL_S, left))
            pending = self.pending_packets()
        return pending

    def _unwatch(self) -> None:
        if isinstance(self._watch, _CounterWatch):
            self._watch.close()
        self._watch = None

    def release_all(self) -> None:
        """Let everything out in order (held and running epoch) and stop holding.

        Afterwards both buffers are off: the guest's packets pass straight through until
        :meth:`resume_holding` (or :meth:`remove`). Used when FT stops.
        """
        self._require_installed("release everything")
        # F1 first: its packets queue behind F2's (older) ones; then F2 lets all out.
        self._switch([(obj, one.netdev, False) for one in self.filters for obj in (one.running, one.shipped)])
        if self._held_packets is not None:
            self.stats.packets_released = (self.stats.packets_released or 0) + self._held_packets
        self._held = None
        self._held_packets = None

    def resume_holding(self) -> None:
        """Switch both buffers on again after :meth:`release_all`; a new epoch starts."""
        self._require_installed("hold again")
        if self._held is not None:
            raise StateError(f"epoch {self._held} is still held")
        self._switch([(obj, one.netdev, True) for one in self.filters for obj in (one.shipped, one.running)])
        counts = self._counts()
        if counts is not None:
            self._counted_at_boundary = counts

    def remove(self) -> None:
        """Release everything and delete the filters (and counter files); idempotent.

        Tries every filter even if one fails, then raises :class:`OutputCommitError` for
        what is left (still listed in :attr:`filters`).
        """
        if not self.filters:
            return
        self.release_all()
        remaining: list[NetdevFilters] = []
        for one in self.filters:
            ids = [x for x in (one.counter, one.shipped, one.running) if x is not None]
            if self._delete(ids):
                remaining.append(one)
            elif one.counter_file is not None:
                with contextlib.suppress(OSError):
                    one.counter_file.unlink()
        self.filters = remaining
        self._unwatch()
        if remaining:
            raise OutputCommitError(
                f"could not delete every output-commit filter of {', '.join(f.netdev for f in remaining)}"
            )
        self._log.info("output commit removed")

    # -- internals ---------------------------------------------------------------------------

    def _names(self) -> str:
        return ", ".join(f.netdev for f in self.filters)

    def _require_installed(self, what: str) -> None:
        if not self.filters:
            raise StateError(f"output commit {self.tag} is not installed: cannot {what}")

    def _switch(self, steps: Sequence[_Step]) -> None:
        """Switch filters (``(id, netdev, on)`` each) in this order, pipelined: one round trip."""
        self._collect(self._send_steps(steps))

    def _send_steps(self, steps: Sequence[_Step]) -> _Sent:
        """Send a ``qom-set`` of ``status`` per step without waiting (QEMU runs them in order)."""
        sent: list[tuple[int, _Step]] = []
        for step in steps:
            obj, _netdev, on = step
            try:
                args = {"path": f"/objects/{obj}", "property": "status", "value": "on" if on else "off"}
                req = self.qmp.send("qom-set", args)
            except MonitorError as err:
                return _Sent(sent, _switch_error(step, err))
            sent.append((req, step))
        return _Sent(sent, None)

    def _collect(self, pending: _Sent) -> None:
        """Every answer of ``pending``; then raise the first failure (in the order sent)."""
        failure: OutputCommitError | None = None
        for req, step in pending.sent:
            try:
                self.qmp.reply(req)
            except MonitorError as err:
                failure = failure or _switch_error(step, err)
        failure = failure or pending.failure
        if failure is not None:
            raise failure

    def _counts(self) -> dict[str, int] | None:
        """Packets counted so far per netdev (since install), None without counting."""
        if self.counter_dir is None:
            return None
        counts: dict[str, int] = {}
        for one in self.filters:
            assert one.counter_file is not None
            try:
                size = one.counter_file.stat().st_size
            except OSError as err:
                raise OutputCommitError(
                    f"packet counter {one.counter_file} of netdev {one.netdev} is gone: {err.strerror}",
                    netdev=one.netdev,
                ) from err
            counts[one.netdev] = max(size - PCAP_HEADER, 0) // PCAP_RECORD
        return counts

    def _punch_counters(self, counts: dict[str, int]) -> None:
        for one in self.filters:
            assert one.counter_file is not None
            used = PCAP_HEADER + counts[one.netdev] * PCAP_RECORD
            if used - self._punched.get(one.netdev, 0) >= _PUNCH_EVERY:
                _punch(one.counter_file, used)
                self._punched[one.netdev] = used


def _switch_error(step: _Step, err: MonitorError) -> OutputCommitError:
    """The error of a failed switch, raised later (after every answer is collected): it keeps
    the monitor's error as its cause, as ``raise ... from err`` would. cujud reads a lost
    monitor from the cause: QEMU closes it a moment before it exits (``virsh destroy``),
    and a switch is often the first command to meet that."""
    obj, netdev, on = step
    words = _qemu_words(err)
    failure = OutputCommitError(f"cannot switch filter {obj} of netdev {netdev} {'on' if on else 'off'}: "
                                f"{words}", netdev=netdev, qemu_message=words)
    failure.__cause__ = err
    return failure


def _remember(recent: list[float], value: float) -> None:
    recent.append(value)
    if len(recent) > _RECENT:
        del recent[: len(recent) - _RECENT]
