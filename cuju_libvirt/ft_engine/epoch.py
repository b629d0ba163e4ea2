"""The epoch engine: policy over the trackers, the replicator, device state and output commit.

Accelerator-agnostic and libvirt-free: cujud creates the QEMUs and hands over direct QMP
clients, pids, RAM files and FT-link sockets.

Primary (:class:`PrimaryEngine`)::

    eng = PrimaryEngine(PrimaryConfig(...), qmp=qmp, pid=pid, link=sock, stats=st, machine=m)
    eng.start()          # initial sync of the RUNNING guest, then the epoch loop on a thread
    eng.epoch_ms = 10    # changeable at run time
    eng.stop()           # VM keeps running, filters removed, tracker closed

One epoch N (the VM ran since the end of epoch N-1's pause)::

    wait for ack N-1 --> release outputs of N-1          (VM running)
    stop --> harvest --> output boundary (N's packets into F2)
         --> stage N (gather dirty pages) + device state --> cont     (the pause)
    ship N (a C thread sends it while epoch N+1 runs)

When an epoch ends is :attr:`PrimaryConfig.epoch_policy`: ``"fixed"``, when its time
(``epoch_ms``) is up; ``"output"`` (the default), as soon as output commit holds a packet
for it, at the latest after ``max_epoch_ms`` (which bounds the lag and the replay).
Either way an epoch also waits for epoch N-1's acknowledgement, and ends earlier when
the packets it holds approach :attr:`PrimaryConfig.max_packets`. Pipelining is one epoch deep:
N is on the wire while N+1 runs; N+1 cannot close before N is acknowledged (F2 of the
output commit holds one epoch).

Backup (:class:`BackupEngine`): runs the receiver; :meth:`BackupEngine.failover` closes it
(every committed epoch applied), loads that epoch's device state into the standby QEMU,
resumes it and announces it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuju_libvirt.errors import CujuError, ReplicationError, StateError, caused_by
from cuju_libvirt.ft_engine import trackers as T
from cuju_libvirt.ft_engine.chardevs import ChardevHold
from cuju_libvirt.ft_engine.devstate import (
    DevicesChangedError,
    DeviceStateSaver,
    LoadTimings,
    MachineProfile,
    ResumeTimings,
    Section,
    StandbyMismatchError,
    load_device_state,
    mark_user_pause,
    split_user_pause,
    standby_profile,
)
from cuju_libvirt.ft_engine.devstate import resume_standby as _resume_standby
from cuju_libvirt.ft_engine.disks import DiskSet
from cuju_libvirt.ft_engine.output import QUEUE_LIMIT, OutputCommit
from cuju_libvirt.ft_engine.replicator import PAGE_SIZE, DiskPart, EpochReceiver, EpochSender
from cuju_libvirt.ft_engine.state import FTMachine, FTState
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPClient, QMPError

log = logging.getLogger(__name__)

S = FTState

#: Epoch length bounds (ms), as in the <cuju:ft> schema's sane range.
MIN_EPOCH_MS = 1
MAX_EPOCH_MS = 10_000
#: How often the running epoch's packet count is polled (s): well below 10,000 packets at any rate.
PACKET_POLL_S = 0.001
#: The longest the loop waits for output without looking at a stop request (s).
STOP_POLL_S = 0.05
#: Pages per epoch while the initial synchronisation copies a running VM (16 MiB).
SYNC_CHUNK_PAGES = 4096
#: How much earlier than the ``stop`` command's send time a STOP event may be stamped and
#: still count as caused by it (QEMU stamps events in whole microseconds).
_CLOCK_SLACK = 2e-6
#: When QEMU refuses to resume a VM the engine paused (e.g. it cannot reopen a disk image),
#: ``cont`` is tried again after these delays (s) before the VM is reported left paused.
RESUME_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0)
#: When an epoch ends (PrimaryConfig.epoch_policy, <cuju:ft epoch-policy>).
EPOCH_POLICIES = ("output", "fixed")


class EngineError(ReplicationError):
    """The epoch engine could not establish or keep protection (the cause is chained)."""


class ResumedElsewhereError(EngineError):
    """Somebody else resumed the VM while an epoch captured it (``virsh resume``, or the end
    of a libvirt job such as a live snapshot's ``cont``): pages and device state may be from
    different moments, so that epoch is discarded and protection starts afresh."""


class ReconfiguredError(EngineError):
    """The VM's configuration changed under protection (libvirt reported a hot-plug, a block
    job that changed a disk, ...: :meth:`PrimaryEngine.reconfigure`): the standby no longer
    matches it, so the epoch that would have shipped next is dropped and protection ends."""


class SuspendedToRAMError(EngineError):
    """The guest suspended itself to RAM (ACPI S3: ``virsh dompmsuspend``, or the guest's
    own choice). QEMU's ``stop`` leaves a suspended VM as it is (no STOP event), the
    device state is saved only from a stopped VM, and QEMU has no command that puts a
    standby to sleep: a failover could not give back a sleeping guest. So the epoch that
    found the VM suspended is dropped and protection ends; cujud pairs the VM again when it
    wakes (``virsh dompmwakeup``)."""


#: The words of :class:`SuspendedToRAMError` (and of cujud's refusal to pair meanwhile).
SUSPENDED_TO_RAM = ("the guest is suspended to RAM (ACPI S3: virsh dompmsuspend or the guest itself), a "
                    "state QEMU can neither save as it is nor give a standby: it is not protected while it "
                    "sleeps, and cujud protects it again when it wakes (virsh dompmwakeup)")


@dataclass
class PrimaryConfig:
    """What the primary engine needs besides its live handles."""

    ram_path: str
    ram_size: int
    tracker: str = "auto"
    epoch_ms: int = 20
    #: "output": end an epoch as soon as it holds output (at the latest after max_epoch_ms);
    #: "fixed": every epoch_ms. "output" needs output commit and counter_dir, else acts as "fixed".
    epoch_policy: str = "output"
    max_epoch_ms: int = 100
    output_commit: bool = True
    #: Netdev ids to hold (None: every NIC's netdev, discovered over QMP).
    netdevs: list[str] | None = None
    #: End an epoch early once it holds this many packets (< QEMU's 10,000 cap).
    max_packets: int = 8_000
    #: Directory (tmpfs) for the output-commit packet counters; None: epochs bounded by time only.
    counter_dir: str | None = None
    #: Seconds to wait for an acknowledgement beyond the epoch before the backup counts as lost.
    ack_timeout: float = 2.0
    handshake_timeout: float = 10.0
    #: Initial sync: stop converging when a round dirties at most this many pages ...
    converge_pages: int = 4_096
    #: ... or after this many tracked rounds.
    max_sync_rounds: int = 8
    tag: str = "vm"
    #: The file QEMU writes each epoch's device state to (None: next to the QMP socket).
    devstate_path: str | None = None
    #: The standby's device sections (:func:`~cuju_libvirt.ft_engine.devstate.standby_profile`):
    #: the first device-state save is checked against them. None: not checked.
    standby_sections: tuple[Section, ...] | None = None

    def __post_init__(self) -> None:
        if not MIN_EPOCH_MS <= self.epoch_ms <= MAX_EPOCH_MS:
            raise ValueError(f"epoch_ms {self.epoch_ms} must be in {MIN_EPOCH_MS}..{MAX_EPOCH_MS}")
        if not MIN_EPOCH_MS <= self.max_epoch_ms <= MAX_EPOCH_MS:
            raise ValueError(f"max_epoch_ms {self.max_epoch_ms} must be in {MIN_EPOCH_MS}..{MAX_EPOCH_MS}")
        if self.epoch_policy not in EPOCH_POLICIES:
            raise ValueError(f"epoch_policy {self.epoch_policy!r} must be one of {', '.join(EPOCH_POLICIES)}")
        if not 1 <= self.max_packets < QUEUE_LIMIT:
            raise ValueError(f"max_packets {self.max_packets} must be in 1..{QUEUE_LIMIT - 1}")
        if self.ram_size <= 0 or self.ram_size % PAGE_SIZE:
            raise ValueError(f"ram_size {self.ram_size} must be a positive multiple of {PAGE_SIZE}")


@dataclass
class SyncReport:
    """How the initial synchronisation went."""

    seconds: float = 0.0
    rounds: int = 0
    pages_sent: int = 0
    #: Dirty pages per tracked round (the last one is the stopped round).
    round_pages: list[int] = field(default_factory=list)
    final_pause_s: float = 0.0
    first_epoch: int = 0


@dataclass
class EpochTimes:
    """Per-phase pauses of recent epochs, seconds (a bounded window for benchmarks and logs)."""

    keep: int = 10_000
    pause: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    #: What the guest saw: QEMU's STOP to its RESUME event (their stamps), for the pauses the
    #: engine resumed. Shorter than ``pause``: the vCPUs still run while ``stop`` reaches
    #: them and run again before ``cont``'s answer reaches the engine.
    guest: list[float] = field(default_factory=list)

    def add(self, total: float, guest: float | None = None, **phases: float) -> None:
        if len(self.pause) >= self.keep:
            for values in (self.pause, self.guest, *self.phases.values()):
                del values[: self.keep // 2]
        self.pause.append(total)
        if guest is not None:
            self.guest.append(guest)
        for name, value in phases.items():
            self.phases.setdefault(name, []).append(value)

    def median_ms(self) -> float | None:
        return statistics.median(self.pause) * 1e3 if self.pause else None


class PrimaryEngine:
    """Protect one running VM: initial sync, then epochs on a thread of their own.

    The engine uses ``qmp`` (the primary's direct monitor) from one thread at a time: the
    caller's during :meth:`start`, the epoch thread afterwards. ``link`` is a connected
    FT-link socket (the engine duplicates its descriptor). ``machine`` must be in
    ``UNPROTECTED``, ``DEGRADED`` or ``PAIRING``; the engine moves it to ``SYNCING``,
    ``PROTECTED`` and, on failure, ``DEGRADED``.
    """

    def __init__(
        self,
        config: PrimaryConfig,
        *,
        qmp: QMPClient,
        pid: int,
        link: socket.socket,
        stats: DomainStats,
        machine: FTMachine,
        clock: Callable[[], float] = time.monotonic,
        on_stopped: Callable[[int], None] | None = None,
        tracker_factory: Callable[[T.VmStopped], T.Tracker] | None = None,
        may_release: Callable[[BaseException], bool] | None = None,
        disks: DiskSet | None = None,
        link_keys: bytes | None = None,
        chardevs: ChardevHold | None = None,
    ) -> None:
        """``on_stopped(epoch)`` (tests, benchmarks) runs in every pause after staging ``epoch``;
        ``tracker_factory`` replaces :func:`~.trackers.select_tracker` (tests).

        ``link_keys`` (the primary's side of :class:`.linkkeys.LinkKeys`) encrypts the FT link.

        ``may_release(err)`` (cujud) is asked, on the epoch thread, when protection fails:
        True lets the held output go and the VM run on unprotected (the default); False
        *fences* the VM: it is stopped with its unacknowledged output still held in the
        filters (:attr:`fenced` is True, the machine ``FAILED``) until :meth:`unfence`.
        """
        self.config = config
        #: The domain's chardev server (held serial output): cut in every pause, committed on
        #: every ack. The engine lets it all out when protection ends with the VM running here;
        #: when QEMU is gone it is cujud's to settle (the backup's epoch decides), not the engine's.
        self.chardevs = chardevs
        #: The protected disks (their journals are sealed in every pause); the engine closes it.
        self._disks = disks
        if disks is not None:
            disks.set_progress(stats.set_disk_sync)  # `cuju-libvirt status` shows it per disk
        #: The primary's side of :class:`.linkkeys.LinkKeys`: the FT link runs encrypted.
        self._link_keys = link_keys
        self._on_stopped = on_stopped
        self._tracker_factory = tracker_factory
        self._may_release = may_release
        #: True while the VM is held stopped with its output held after a failure (see may_release).
        self.fenced = False
        self._fenced_output: OutputCommit | None = None
        self.qmp = qmp
        self.pid = pid
        self.link = link
        self.stats = stats
        self.machine = machine
        self.log = log.getChild(config.tag.replace(".", "_"))
        self._clock = clock
        self._epoch_ms = config.epoch_ms
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped_flag = False  # the tracker's guard: True only while we hold the VM stopped
        #: The VM was already paused by someone else at the engine's last ``stop``.
        self._foreign_pause = False
        #: The stamp of QEMU's STOP event of the engine's last ``stop`` (None: not ours).
        self._stop_stamp: float | None = None
        #: While paused by someone else: the device state of the last epoch that captured the
        #: pause (idle epochs send it again); None otherwise.
        self._last_blob: bytes | None = None
        self._tracker: T.Tracker | None = None
        self._saver: DeviceStateSaver | None = None
        self._output: OutputCommit | None = None
        self._sender: EpochSender | None = None
        self._ram: mmap.mmap | None = None
        self._pages: Any = None
        self._all_pages: Any = None
        #: The epoch number of the next stage, and the last shipped one not yet acked (or 0).
        self._next = 0
        self._held_at_start = 0  # the epoch the backup held at the handshake (0: nothing)
        self._unacked = 0
        self._unacked_end = 0.0
        self._unacked_pages = 0
        self._held_output = False
        self._resync_epoch = 0  # a full-resync epoch of the loop: PROTECTED again on its ack
        self._last_counters: dict[str, int] = {}
        self.sync = SyncReport()
        self.times = EpochTimes()
        self.epochs = 0
        self.last_acked = 0
        #: The exception that ended protection, if any.
        self.failure: BaseException | None = None
        #: Set by :meth:`expect_end` (to the reason) when the end of protection is expected
        #: (cujud stops after the peer's promise): the failure that ends the loop is then logged at INFO.
        self.ending: str | None = None
        #: Set (to the cause) by :meth:`reconfigure`: no epoch ships any more.
        self._reconfigured: str | None = None
        #: Set (to the reason) by ``may_release`` when the VM's QEMU is gone on purpose
        #: (``virsh destroy``, shutdown): the loop's failure is then the VM's end, not a fault.
        self.vm_ended: str | None = None
        #: QEMU's SHUTDOWN and MIGRATION events, kept when the engine drops the others: they
        #: say why QEMU ends (:meth:`qemu_ending`), sooner than libvirt's events under load.
        self._last_words: deque[dict[str, Any]] = deque(maxlen=8)
        stats.epoch_ms = config.epoch_ms

    # -- run-time settings -----------------------------------------------------------------

    @property
    def epoch_ms(self) -> int:
        return self._epoch_ms

    @epoch_ms.setter
    def epoch_ms(self, value: int) -> None:
        if not MIN_EPOCH_MS <= value <= MAX_EPOCH_MS:
            raise ValueError(f"epoch_ms {value} must be in {MIN_EPOCH_MS}..{MAX_EPOCH_MS}")
        self._epoch_ms = value
        self.stats.epoch_ms = value
        self.log.info("epoch length now %d ms", value)

    @property
    def output(self) -> OutputCommit | None:
        """The output-commit filters while installed (their ``stats`` count held packets)."""
        return self._output

    def counters(self) -> dict[str, int]:
        """The data plane's counters (epochs, pages, bytes, per-phase ns); empty once closed."""
        return self._sender.counters() if self._sender is not None else {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- start -----------------------------------------------------------------------------

    def start(self) -> SyncReport:
        """Synchronise the running guest to the backup, then run epochs on a thread.

        Returns when the VM is protected (the first consistent epoch is shipped; the loop
        waits for its acknowledgement). On failure the VM is left running, unprotected,
        the engine's resources are released, the machine is ``DEGRADED`` and
        :class:`EngineError` is raised.
        """
        if self._thread is not None:
            raise StateError("the engine was already started")
        state = self.machine.state
        if state in (S.UNPROTECTED, S.DEGRADED, S.PRIMARY_AFTER_FAILOVER):
            self._move(S.PAIRING)
        self._move(S.SYNCING, expect=S.PAIRING)
        try:
            self._open()
            self._initial_sync()
        except BaseException as err:
            self._fail(err, "initial synchronisation failed")
            raise EngineError(f"initial synchronisation failed: {err}") from err
        self._thread = threading.Thread(target=self._loop, name=f"cuju-epochs-{self.config.tag}", daemon=True)
        self._thread.start()
        return self.sync

    def _open(self) -> None:
        cfg = self.config
        fd = os.open(cfg.ram_path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != cfg.ram_size:
                raise EngineError(f"RAM file {cfg.ram_path}: {size} bytes, not ram_size {cfg.ram_size}")
            # Not populated here: the initial sync reads every page through this mapping while
            # the VM runs, so no gather inside a pause takes a page fault anyway; populating
            # first delayed the HELLO past the backup's handshake timeout for multi-GiB guests
            # (18 s for 4 GiB on the loaded development machine).
            self._ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        npages = cfg.ram_size // PAGE_SIZE
        if self._tracker_factory is not None:
            self._tracker = self._tracker_factory(lambda: self._stopped_flag)
        else:
            self._tracker = T.select_tracker(
                cfg.tracker, pid=self.pid, ram_path=cfg.ram_path, vm_stopped=lambda: self._stopped_flag,
                logger=self.log,
            )
        self.stats.tracker = self._tracker.name
        self._pages = T.page_buffer(npages)
        self._all_pages = T.page_buffer(npages)
        for i in range(npages):
            self._all_pages[i] = i
        self._saver = DeviceStateSaver(self.qmp, path=cfg.devstate_path, expect_sections=cfg.standby_sections,
                                       logger=self.log)
        self._sender = EpochSender(self.link, self._ram, io_timeout=max(10.0, cfg.ack_timeout * 4),
                                   disk_sizes=self._disks.sizes if self._disks is not None else (),
                                   link_keys=self._link_keys)
        held = self._sender.handshake(cfg.handshake_timeout)
        self._next = held + 1
        self._held_at_start = held
        self._last_counters = self._sender.counters()

    # -- initial synchronisation -------------------------------------------------------------

    def _vm_stop(self, then: Callable[[], None] | None = None) -> None:
        """Stop the VM; note whether it was this ``stop`` that stopped it.

        ``then`` runs right after ``stop`` is sent, before its answer: it may send the
        commands that follow it (QEMU runs them in order, without a round trip between).

        QEMU emits a STOP event only when a ``stop`` really stops a running VM, before its
        reply and stamped with the host's wall clock. No STOP stamped at or after the moment
        the command was sent means somebody else had paused the VM (``virsh suspend``, a
        libvirt job, an I/O error with ``werror=stop``): the engine then never resumes it.
        Or the guest is suspended to RAM (``stop`` does nothing to that run state either):
        :class:`SuspendedToRAMError`.
        """
        sent = time.time() - _CLOCK_SLACK
        request = self.qmp.send("stop")
        if then is not None:
            then()
        self.qmp.reply(request)
        self._stopped_flag = True
        stops = [stamp for ev in self.qmp.events("STOP") if (stamp := _event_time(ev)) >= sent]
        ours = bool(stops)
        self._stop_stamp = stops[-1] if stops else None
        if not ours and self.qmp.execute("query-status").get("status") == "suspended":
            # before anything of this epoch is staged (a pipelined save's answer is left
            # unread: the engine's monitor is closed when protection ends)
            self._foreign_pause = True
            raise SuspendedToRAMError(SUSPENDED_TO_RAM)
        if not ours and not self._foreign_pause:
            self.log.info("the VM was paused by someone else (virsh suspend or a libvirt job): it stays "
                          "paused and protected; epochs go on without resuming it")
        elif ours and self._foreign_pause:
            self.log.info("the VM was resumed: epochs resume it again after each pause")
        self._foreign_pause = not ours
        # Every event buffered now came before this stop completed (QEMU answers a command
        # only after its own events); a RESUME seen later came after it: _check_not_resumed.
        self.qmp.events("RESUME")

    def _vm_cont(self) -> None:
        """Resume the VM unless somebody else had paused it (see :meth:`_vm_stop`)."""
        self._stopped_flag = False
        if not self._foreign_pause:
            self.qmp.execute("cont")

    def _stage(self, pages: Any, count: int, blob: bytes = b"", first: int = 0,
               disks: list[DiskPart] | None = None) -> int:
        assert self._sender is not None
        epoch = self._next
        if blob and self._foreign_pause:
            blob = mark_user_pause(blob)  # the pause travels with the epoch: a failover keeps it
        view = memoryview(pages).cast("B")[8 * first: 8 * (first + count)]
        self._sender.stage(epoch, view, blob, timeout=self.config.ack_timeout + 30.0, disks=disks or ())
        self._next += 1
        return epoch

    def _cut_chardevs(self) -> None:
        """VM stopped: the serial output so far belongs to the epoch staged in this pause."""
        if self.chardevs is not None:
            self.chardevs.cut(self._next)

    def _seal_disks(self) -> list[DiskPart] | None:
        """The disks' records since the last seal, for the epoch staged next."""
        return self._disks.seal(self._next) if self._disks is not None else None

    def _ship_disks_running(self, epoch: int) -> int:
        """Synchronisation while the VM runs: what the images hold (chunks), then what the
        journals recorded since the last seal. Returns the last epoch shipped."""
        assert self._sender is not None
        if self._disks is None:
            return epoch
        while parts := self._disks.sync_chunk():
            epoch = self._stage(self._pages, 0, disks=parts)
            self._sender.ship()
        parts = self._disks.seal(self._next)
        if parts:
            epoch = self._stage(self._pages, 0, disks=parts)
            self._sender.ship()
        return epoch

    def _ship_running(self, pages: Any, count: int) -> int:
        """Ship ``count`` pages of a running VM in chunks (pipelined: gather, send, receive and
        apply overlap; the backup's journal stays small). Returns the last epoch."""
        assert self._sender is not None
        epoch = 0
        for first in range(0, count, SYNC_CHUNK_PAGES):
            epoch = self._stage(pages, min(SYNC_CHUNK_PAGES, count - first), first=first)
            self._sender.ship()
        return epoch

    def _initial_sync(self) -> None:
        """All of RAM while the VM runs, tracked rounds until they converge, one stopped round."""
        cfg = self.config
        tracker, sender = self._tracker, self._sender
        assert tracker is not None and sender is not None
        npages = cfg.ram_size // PAGE_SIZE
        t_start = self._clock()
        rep = self.sync
        self.stats.set_initial_sync(0.0)
        # Arm first: every write from here on is in a later round.
        self._vm_stop()
        try:
            tracker.arm()
            if self._disks is not None:
                # Each disk: every allocated block of a backup that holds nothing (unless cujud
                # proved its replica, DiskSet.set_replicas), else only what changed since its
                # last acknowledged epoch. DiskSet logs which, per disk.
                disk_bytes = self._disks.begin_sync(full=self._held_at_start == 0)
                self.log.info("disks: synchronising %d bytes", disk_bytes)
        finally:
            self._vm_cont()
        rep.first_epoch = self._next
        epoch = self._ship_running(self._all_pages, npages)
        epoch = self._ship_disks_running(epoch)
        self._shipped(epoch, self._clock(), npages)
        rep.pages_sent += npages
        rep.rounds = 1
        total_goal = npages
        while True:
            # Wait for the previous round before harvesting: the wire is the bottleneck,
            # and a round harvested later catches more of the same pages at once.
            self._await_ack(epoch, cfg.handshake_timeout + 60.0)
            self.stats.set_initial_sync(min(0.95, rep.pages_sent / max(1, total_goal)))
            self._vm_stop()
            try:
                h = tracker.harvest(self._pages)
            except BaseException:
                self._vm_cont()
                raise
            count = npages if h.full_resync else h.count
            rep.round_pages.append(count)
            last = count <= cfg.converge_pages or rep.rounds >= cfg.max_sync_rounds
            if last:
                break  # the VM stays stopped: the final round below
            self._vm_cont()
            epoch = self._ship_running(self._all_pages if h.full_resync else self._pages, count)
            epoch = self._ship_disks_running(epoch)
            self._shipped(epoch, self._clock(), count)
            rep.pages_sent += count
            total_goal += count
            rep.rounds += 1
        # Final round, VM stopped: the harvested pages, the device state, outputs held from now.
        t0 = self._clock()
        try:
            if cfg.output_commit:
                self._output = OutputCommit(self.qmp, tag=cfg.tag, counter_dir=cfg.counter_dir)
                self._output.install(cfg.netdevs)
                if cfg.counter_dir is None:
                    self.log.warning("no counter_dir: epochs are bounded by time only, not by packets "
                                     "(QEMU drops held packets beyond %d per epoch)", QUEUE_LIMIT)
            pages = self._all_pages if h.full_resync else self._pages
            assert self._saver is not None
            saved = self._saver.save()
            if self._output is not None:
                self._output.boundary()
                self._held_output = True
            self._cut_chardevs()
            epoch = self._stage(pages, count, saved.blob, disks=self._seal_disks())
            if self._on_stopped is not None:
                self._on_stopped(epoch)
        finally:
            self._vm_cont()
        end = self._clock()
        self._check_reconfigured()
        sender.ship()
        rep.pages_sent += count
        rep.rounds += 1
        rep.final_pause_s = end - t0
        self._shipped(epoch, end, count)
        self.stats.record_epoch(pause_s=end - t0, dirty_pages=count, device_state_bytes=len(saved.blob))
        self._await_ack(epoch, cfg.ack_timeout + 30.0)
        if self._disks is not None:
            self._disks.sync_complete()  # the replicas equal the images: a later resync may trust them
        rep.seconds = self._clock() - t_start
        self.stats.set_initial_sync(1.0)
        self._move(S.PROTECTED, expect=S.SYNCING)
        self.log.info(
            "in FT mode after %.3f s: %d rounds, %d pages (%s), final pause %.1f ms",
            rep.seconds, rep.rounds, rep.pages_sent, rep.round_pages, rep.final_pause_s * 1e3,
        )

    # -- the epoch loop ----------------------------------------------------------------------

    def _shipped(self, epoch: int, end: float, pages: int) -> None:
        self._unacked = epoch
        self._unacked_end = end
        self._unacked_pages = pages

    def _await_ack(self, epoch: int, timeout: float) -> None:
        assert self._sender is not None
        if not self._sender.wait_ack(epoch, timeout):
            raise EngineError(f"epoch {epoch} not acknowledged within {timeout:.1f} s: backup lost")
        self._acked(epoch)

    def _acked(self, epoch: int) -> None:
        """Epoch ``epoch`` is committed on the backup: its outputs may leave."""
        assert self._sender is not None
        if self._held_output and self._output is not None:
            self._output.release()
            self._held_output = False
            self.stats.set_packets_held(0)
        counters = self._sender.counters()
        last = self._last_counters
        self._last_counters = counters
        self.stats.record_ack(
            epoch=epoch, epoch_end=self._unacked_end, pages=self._unacked_pages,
            wire_bytes=counters["wire_bytes"] - last.get("wire_bytes", 0),
            saved_bytes=counters["saved_bytes"] - last.get("saved_bytes", 0),
        )
        self.last_acked = epoch
        if self._disks is not None:
            self._disks.acked(epoch)
        if self.chardevs is not None:
            self.chardevs.acked(epoch)
        if epoch == self._unacked:
            self._unacked = 0
        if epoch == self._resync_epoch and self.machine.state is S.SYNCING:
            self._resync_epoch = 0
            with contextlib.suppress(StateError):
                self._move(S.PROTECTED, expect=S.SYNCING)

    def _loop(self) -> None:
        try:
            self._run_epochs()
        except BaseException as err:  # any failure ends protection, never the VM
            self._fail(err, "epoch loop failed")
            return
        self._shutdown()

    def _run_epochs(self) -> None:
        cfg = self.config
        started = self._clock()
        counting = self._output is not None and cfg.counter_dir is not None
        # "output": a held packet ends the epoch (once N-1 is acknowledged): a reply waits for
        # one pause and one ack, not for the rest of the epoch. Needs the packet counter.
        end_on_output = counting and cfg.epoch_policy == "output"
        if cfg.epoch_policy == "output" and not counting:
            self.log.info("epoch policy 'output' without a packet counter (output commit %s): epochs end "
                          "every epoch_ms (%d ms)", "off" if self._output is None else "without counter_dir",
                          self._epoch_ms)
        sender = self._sender
        assert sender is not None
        while not self._stopping.is_set():
            length_ms = cfg.max_epoch_ms if end_on_output else self._epoch_ms
            deadline = started + length_ms / 1e3
            ack_deadline = deadline + cfg.ack_timeout
            while True:
                now = self._clock()
                if self._unacked:
                    if now > ack_deadline:
                        raise EngineError(
                            f"epoch {self._unacked} not acknowledged within {cfg.ack_timeout:.1f} s "
                            "after its successor's end: backup lost"
                        )
                    wait = PACKET_POLL_S if counting else max(deadline - now, PACKET_POLL_S)
                    if sender.wait_ack(self._unacked, wait):
                        self._acked(self._unacked)
                    continue
                if self._stopping.is_set() or now >= deadline:
                    break
                if counting:
                    assert self._output is not None
                    pending = self._output.pending_packets() or 0
                    if pending >= cfg.max_packets:
                        self.log.debug("epoch ends early: %d packets held", pending)
                        break
                    if end_on_output:
                        if pending > 0:
                            break
                        # woken by the first packet (inotify on the counter), not by polling
                        self._output.wait_output(min(deadline - now, STOP_POLL_S))
                        continue
                    time.sleep(min(PACKET_POLL_S, deadline - now))
                else:
                    time.sleep(deadline - now)
            if self._stopping.is_set():
                break
            started = self._one_epoch()

    def _one_epoch(self) -> float:
        """Close the running epoch: the pause, then ship it. Returns when the next one started."""
        tracker, saver = self._tracker, self._saver
        assert tracker is not None and saver is not None and self._sender is not None
        clock = self._clock
        t0 = clock()
        # Our own stop last time: the save goes right behind this stop and QEMU writes the
        # device state while the harvest runs. (A VM somebody else paused gets no pipelined
        # save: its idle epochs reuse the last blob, see _idle_epoch.)
        pipelined = not self._foreign_pause
        self._vm_stop(then=saver.begin if pipelined else None)
        if self._foreign_pause and self._last_blob is not None:
            return self._idle_epoch(t0)
        output = self._output
        packets = None
        try:
            t1 = clock()
            # The boundary's switches go right behind the save (QEMU runs them in order):
            # no round trip of theirs waits inside the pause.
            before = output.stats.packets_closed if output is not None else None
            if output is not None:
                output.begin_boundary()
            h = tracker.harvest(self._pages)
            t2 = clock()
            self._cut_chardevs()  # VM stopped: the serial output so far is this epoch's
            try:
                saved = saver.finish() if pipelined else saver.save()
            except StateError as err:  # running again: only somebody else can have resumed it
                raise ResumedElsewhereError(
                    f"the VM was resumed by someone else while an epoch captured it ({err}): that epoch is "
                    "discarded and protection is established anew") from err
            finally:
                t3 = clock()
                if output is not None:
                    output.finish_boundary()
                    self._held_output = True
                    after = output.stats.packets_closed
                    if after is not None:
                        packets = after - (before or 0)
            t4 = clock()
            parts = self._seal_disks()
            if h.full_resync:
                self.log.warning("tracker asks for a full resync: sending all %d pages", tracker.npages)
                if self.machine.state is S.PROTECTED:
                    self._move(S.SYNCING, expect=S.PROTECTED)
                count = tracker.npages
                epoch = self._stage(self._all_pages, count, saved.blob, disks=parts)
                self._resync_epoch = epoch
            else:
                count = h.count
                epoch = self._stage(self._pages, count, saved.blob, disks=parts)
            if isinstance(tracker, T.Settling):
                tracker.settle()  # pages it protected again meanwhile need not go next epoch
            t5 = clock()
            if self._on_stopped is not None:
                self._on_stopped(epoch)
            self._check_not_resumed()
        finally:
            self._vm_cont()
        end = clock()
        saver.check_devices(saved.blob)  # a hot-plugged device: never ship a blob the standby cannot load
        self._check_reconfigured()
        self._last_blob = saved.blob if self._foreign_pause else None
        self._sender.ship()
        self._shipped(epoch, end, count)
        self.epochs += 1
        self.stats.record_epoch(pause_s=end - t0, dirty_pages=count, device_state_bytes=len(saved.blob))
        if packets is not None:
            self.stats.set_packets_held(packets)
        self.times.add(end - t0, self._guest_pause(), stop=t1 - t0, harvest=t2 - t1, devstate=t3 - t2,
                       boundary=t4 - t3, stage=t5 - t4, cont=end - t5)
        self._drop_events()  # drop the STOP/RESUME/MIGRATION events of this pause
        return end

    def _drop_events(self) -> None:
        """Drop the buffered events of a pause (STOP/RESUME), keeping QEMU's last words."""
        self._last_words.extend(ev for ev in self.qmp.events() if ev["event"] in ("SHUTDOWN", "MIGRATION"))

    def qemu_ending(self) -> str | None:
        """Why QEMU ended, in an operator's words, from the events it sent this engine's
        monitor before it went (call it once QEMU is gone); None if it said nothing (SIGKILL,
        a crash). libvirt's ``virsh save`` migrates the state to a file, then sends SIGTERM."""
        for _ in range(2):  # a lost monitor raises once; the second read returns what came before
            try:
                self._drop_events()
                break
            except (CujuError, OSError):
                continue
        return qemu_exit_cause(self._last_words)

    def _guest_pause(self) -> float | None:
        """The pause the guest saw, from QEMU's STOP and RESUME stamps (None if not resumed)."""
        resumed = self.qmp.events("RESUME", clear=False)
        if self._stop_stamp is None or not resumed:
            return None
        return _event_time(resumed[-1]) - self._stop_stamp

    def _check_not_resumed(self) -> None:
        """Raise if somebody resumed the VM while the engine held it stopped (``virsh resume``
        of a domain libvirt saw paused by the epoch): its pages and device state may then be
        from different moments, so this epoch must never ship; protection starts afresh."""
        if self.qmp.events("RESUME"):
            raise ResumedElsewhereError("the VM was resumed by someone else during an epoch's pause (virsh "
                                        "resume, or the end of a libvirt job): that epoch is discarded and "
                                        "protection is established anew")

    def _idle_epoch(self, t0: float) -> float:
        """An epoch of a VM that somebody else keeps paused: nothing in it changes, so the
        last device state goes out again with no pages (the backup's heartbeat). The VM is not
        touched; a resume meanwhile is caught by the next epoch's own ``stop``."""
        assert self._sender is not None and self._last_blob is not None
        self._stopped_flag = False
        parts = self._seal_disks()
        epoch = self._stage(self._pages, 0, self._last_blob, disks=parts)
        end = self._clock()
        self._check_reconfigured()
        self._sender.ship()
        self._shipped(epoch, end, 0)
        self.epochs += 1
        self.stats.record_epoch(pause_s=0.0, dirty_pages=0, device_state_bytes=len(self._last_blob))
        self._drop_events()
        return end

    def reconfigure(self, cause: str) -> None:
        """The VM's configuration changed (``cause`` names the operation; any thread): the
        standby no longer matches it. The next epoch is never shipped: protection ends with
        :class:`ReconfiguredError` (one WARNING line) and cujud pairs again with a standby of
        the new configuration. Epochs shipped before this call are not recalled; the device
        sections of every blob (:meth:`DeviceStateSaver.check_devices`) catch the changes
        that show there without waiting for the call."""
        if self._reconfigured is None:
            self._reconfigured = cause

    def _check_reconfigured(self) -> None:
        if self._reconfigured is not None:
            raise ReconfiguredError(f"{self._reconfigured}: the standby no longer matches the VM; protection "
                                    "ends here and is re-established with a standby of the new configuration")

    # -- stopping and failing ------------------------------------------------------------------

    def expect_end(self, reason: str) -> None:
        """The end of protection is expected (the backup is being dropped on purpose): a
        failure of the loop from now on (the link closing) is no fault, and says so at INFO."""
        self.ending = reason

    def stop(self, timeout: float = 30.0) -> None:
        """End protection cleanly: the last shipped epoch is acknowledged, held outputs leave,
        filters go, the tracker is closed; the VM keeps running."""
        thread = self._thread
        self._stopping.set()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise EngineError(f"the epoch thread did not stop within {timeout} s")
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        state = self.machine.state
        if state in (S.PROTECTED, S.SYNCING, S.DEGRADED, S.PAIRING, S.UNPROTECTED):
            with contextlib.suppress(StateError):
                self._move(S.STOPPING)
        problems: list[str] = []
        if self._unacked and self._sender is not None:
            try:
                self._await_ack(self._unacked, self.config.ack_timeout)
            except CujuError as err:
                problems.append(str(err))
        self._release_resources(problems, orderly=True)
        with contextlib.suppress(StateError):
            self._move(S.STOPPED, expect=S.STOPPING)
        if problems:
            self.log.warning("FT stopped with problems: %s", "; ".join(problems))
        else:
            self.log.info("FT stopped after %d epochs; the VM runs unprotected", self.epochs)

    def _fail(self, err: BaseException, what: str) -> None:
        """Protection is lost: keep the VM running, let outputs flow, degrade."""
        self.failure = err
        release = True
        if self._may_release is not None:
            try:
                release = self._may_release(err)
            except Exception as verdict_err:  # no verdict: the safe side
                self.log.error("could not decide whether held output may leave: %s", verdict_err)
                release = False
        if not release:
            self._fence(err, what)
            return
        if self.vm_ended is not None:
            self._vm_gone(err)
            return
        if self.ending is not None:
            self.log.info("FT ends (%s): %s; the VM continues unprotected", self.ending, err)
        elif isinstance(err, (DevicesChangedError, ReconfiguredError, ResumedElsewhereError,
                              SuspendedToRAMError)):  # no fault
            self.log.warning("%s; the VM continues unprotected until then", err)
        elif caused_by(err, StandbyMismatchError):
            # the VM changed between the XML the standby was made from and the first save (a
            # device libvirt had not yet removed from its XML): the next attempt reads it anew
            self.log.warning("%s: %s; the VM continues unprotected, the next pairing reads its configuration "
                             "anew", what, err)
        else:
            self.log.error("%s: %s; the VM continues unprotected", what, err)
        self.log.debug("details", exc_info=err)
        problems: list[str] = []
        self._release_resources(problems, orderly=False)
        if problems:
            self.log.error("cleanup after the failure: %s", "; ".join(problems))
        self.stats.reset_link()
        self.stats.set_packets_held(0)
        if self.machine.state in (S.SYNCING, S.PROTECTED):
            with contextlib.suppress(StateError):
                self._move(S.DEGRADED)

    def _vm_gone(self, err: BaseException) -> None:
        """The VM ended on purpose: one INFO line; nothing is left to resume or to clean in QEMU."""
        self.log.info("the VM ended (%s): replication stops after %d epochs", self.vm_ended, self.epochs)
        self.log.debug("the epoch loop's last error: %s", err, exc_info=err)
        problems: list[str] = []
        self._release_resources(problems, orderly=False, qemu_alive=False)
        if problems:
            self.log.debug("cleanup after the VM ended: %s", "; ".join(problems))
        self.stats.reset_link()
        self.stats.set_packets_held(0)
        if self.machine.state in (S.SYNCING, S.PROTECTED):
            with contextlib.suppress(StateError):
                self._move(S.DEGRADED)

    def _fence(self, err: BaseException, what: str) -> None:
        """Stop the VM and keep every unacknowledged packet held: the peer may have taken over."""
        self.log.error("%s: %s; the VM is FENCED (stopped, output held) until the peer's side is known",
                       what, err)
        self.log.debug("details", exc_info=err)
        self._stopping.set()
        problems: list[str] = []
        try:
            self.qmp.execute("stop")
        except CujuError as stop_err:
            problems.append(f"could not stop the VM: {stop_err}")
        self.fenced = True
        self._fenced_output, self._output = self._output, None  # filters stay: nothing leaves
        self._held_output = False
        self._release_resources(problems, orderly=False, run_vm=False)
        if problems:
            self.log.error("fencing: %s", "; ".join(problems))
        self.stats.reset_link()
        if self.machine.state in (S.SYNCING, S.PROTECTED):
            with contextlib.suppress(StateError):
                self._move(S.FAILED)

    def unfence(self) -> None:
        """The peer did not take over (and never will for this session): release the held
        output, resume the VM; the machine goes ``DEGRADED`` (unprotected, re-pairs)."""
        if not self.fenced:
            raise StateError("the VM is not fenced")
        problems: list[str] = []
        if self._fenced_output is not None:
            try:
                self._fenced_output.remove()
            except CujuError as err:
                problems.append(f"output filters: {err}")
            self._fenced_output = None
        if self.chardevs is not None:
            self.chardevs.release_all()
        self.qmp.execute("cont")
        self.fenced = False
        self.stats.set_packets_held(0)
        with contextlib.suppress(StateError):
            self._move(S.DEGRADED, expect=S.FAILED)
        if problems:
            self.log.error("unfencing: %s", "; ".join(problems))
        self.log.warning("unfenced: the peer did not take over; the VM runs on unprotected")

    def _release_resources(self, problems: list[str], *, orderly: bool, run_vm: bool = True,
                           qemu_alive: bool = True) -> None:
        """VM running, filters removed (held packets released), device-state file removed, all closed
        (only the engine's own resources when ``qemu_alive`` is False: QEMU is gone).

        Releasing the packets of unacknowledged epochs is right here: whoever calls this
        has given up on the backup, and the primary continues from the very state that
        produced those packets. Dropping them would only look like a network loss to the
        peers; holding them would stall the guest's connections. Safety against a backup
        that resumes anyway is the failure detector's job (cujud), not the filters':
        every later packet of the primary would conflict with it just the same.
        """
        self._stopping.set()
        if not qemu_alive:  # the filters went with the QEMU
            self._output, self._held_output = None, False
        if run_vm and qemu_alive:
            self._ensure_running(problems)
            if self.chardevs is not None:  # the VM goes on here: its serial output with it
                self.chardevs.release_all()
        if self._output is not None:
            try:
                self._output.remove()
            except CujuError as err:
                problems.append(f"output filters: {err}")
            self._output = None
            self._held_output = False
        if self._saver is not None:
            try:
                self._saver.close()
            except CujuError as err:
                problems.append(f"device-state file: {err}")
            self._saver = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self._sender is not None:
            try:
                self._sender.close(orderly, 5.0 if orderly else 0)
            except CujuError as err:
                problems.append(f"FT link: {err}")
            self._sender = None
        if self._ram is not None:
            with contextlib.suppress(BufferError):
                self._ram.close()
            self._ram = None
        if self._disks is not None:
            self._disks.close()  # the servers and their journals go on (and keep the bitmaps)
            self._disks = None

    def _ensure_running(self, problems: list[str]) -> None:
        """Resume the VM if the engine left it paused; QEMU refusing ``cont`` (not a lost
        monitor) is retried after :data:`RESUME_RETRY_DELAYS`, then reported in one clear
        line: the VM stays paused until someone resumes it (cujud's next pairing tries again)."""
        refused: QMPError | None = None
        for delay in (*RESUME_RETRY_DELAYS, None):
            try:
                status = self.qmp.execute("query-status")["status"]
                if status != "paused":
                    return
                if self._foreign_pause:
                    self.log.info("the VM stays paused: it was paused by someone else, not by the engine")
                    return
                self._stopped_flag = False
                self.qmp.execute("cont")
            except QMPError as err:
                refused = err
                if delay is not None:
                    time.sleep(delay)
                continue
            except CujuError as err:
                problems.append(f"could not make sure the VM runs: {err}")
                return
            if refused is not None:
                self.log.warning("the VM runs again; QEMU had refused to resume it: %s", refused)
            return
        self.log.error(
            "the VM is left PAUSED: QEMU refused to resume it %d times (%s); fix the cause (e.g. "
            "ownership or permissions of its disk images) and run 'virsh resume %s'",
            len(RESUME_RETRY_DELAYS) + 1, refused, self.config.tag,
        )

    def _move(self, new: FTState, *, expect: FTState | tuple[FTState, ...] | None = None) -> None:
        self.machine.move(new, expect=expect)
        self.stats.set_state(new.value)


@dataclass(frozen=True)
class FailoverReport:
    """What a failover did and how long each part took (seconds)."""

    epoch: int
    close_s: float
    load: LoadTimings
    resume: ResumeTimings
    total_s: float


class BackupEngine:
    """The standby side: receive epochs into the standby's RAM file; fail over on request.

    ``qmp`` is the standby QEMU's direct monitor (started paused with ``-incoming defer
    -global migration.send-configuration=off``); ``ram_path`` its guest RAM file
    (written in place, never replaced); ``link`` the accepted FT-link socket (None for
    :meth:`recover`); ``device_state_path`` where committed device state is kept (its
    journal next to it). A fresh standby (:meth:`start`) starts from nothing: stale device
    state and journal files at those paths are removed; :meth:`recover` keeps and replays
    them. ``standby`` is the standby's profile (listed at start if None).
    """

    def __init__(
        self,
        *,
        qmp: QMPClient,
        ram_path: str,
        link: socket.socket | None,
        device_state_path: str,
        stats: DomainStats,
        machine: FTMachine,
        qemu_log: str | None = None,
        tag: str = "vm",
        io_timeout: float = 30.0,
        standby: MachineProfile | None = None,
        disks: Sequence[tuple[str, int]] = (),
        link_keys: bytes | None = None,
    ) -> None:
        """``disks``: the replica images (path, size), in the primary's disk order; each epoch's
        disk records are applied to them together with its pages and device state.
        ``link_keys``: the backup's side of :class:`.linkkeys.LinkKeys` (encrypted link)."""
        self.disks = tuple(disks)
        self._link_keys = link_keys
        self.qmp = qmp
        #: The standby QEMU's profile (device sections included); listed at :meth:`start` if None.
        self.standby = standby
        self.ram_path = ram_path
        self.link = link
        self.device_state_path = device_state_path
        self.stats = stats
        self.machine = machine
        self.qemu_log = qemu_log
        self.io_timeout = io_timeout
        self.log = log.getChild(tag.replace(".", "_"))
        self._rx: EpochReceiver | None = None
        self._ram: mmap.mmap | None = None
        self._watch: threading.Thread | None = None
        self._closed = threading.Event()
        self._counted: dict[str, int] = {}  # the receiver's counters last added to ``stats``
        self._count_lock = threading.Lock()
        #: Seconds :meth:`start` spent populating the standby's RAM mapping.
        self.populate_s = 0.0
        #: The receiver's failure (link lost), once it happened.
        self.link_error: BaseException | None = None

    def start(self) -> None:
        """Serve the FT link in the receiver's C threads; ``STANDBY`` once a consistent epoch is in."""
        if self.link is None:
            raise StateError("the backup engine has no FT link to serve (recover() reopens one without)")
        base = self.device_state_path
        for path in (base, base + ".journal", base + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._open()
        assert self._rx is not None
        self._rx.start(self.link, io_timeout=self.io_timeout, link_keys=self._link_keys)
        self.stats.set_state(self.machine.state.value)
        self._watch = threading.Thread(target=self._watch_link, name="cuju-standby-watch", daemon=True)
        self._watch.start()

    def recover(self) -> int:
        """Reopen what an earlier engine of this standby left (its cujud died; the standby
        QEMU, its RAM file, journal and device-state file survived): replay the committed
        epochs the journal holds, without a link. ``STANDBY`` if a consistent epoch is in
        (:meth:`failover` can then resume it). Returns the epoch the standby holds (0: none)."""
        self._open()
        assert self._rx is not None
        if self.machine.state is S.STANDBY_STARTING and self.consistent():
            self.machine.move(S.STANDBY, expect=S.STANDBY_STARTING)
        self.stats.set_state(self.machine.state.value)
        return self._rx.last_applied

    def _open(self) -> None:
        """Map the standby's RAM and open the receiver on the journal (replaying it)."""
        fd = os.open(self.ram_path, os.O_RDWR)
        try:
            # Populated now, while pairing: applying an epoch then takes no page fault (first
            # touches of a fresh tmpfs file cost about as much as the copy itself).
            t0 = time.perf_counter()
            self._ram = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self.populate_s = time.perf_counter() - t0
        finally:
            os.close(fd)
        if self.standby is None or not self.standby.sections:
            self.standby = standby_profile(self.qmp)
        self._rx = EpochReceiver(self._ram, self.device_state_path, disks=self.disks)

    @property
    def last_applied(self) -> int:
        return self._rx.last_applied if self._rx is not None else 0

    def _count_commits(self) -> None:
        """Add the epochs the receiver applied since the last call to ``stats`` (the watch
        thread calls it every 50 ms, off the C threads' path; failover and close once more)."""
        if self._rx is None:
            return
        with self._count_lock:
            now = self._rx.counters()
            last = self._counted
            epochs = now["epochs_applied"] - last.get("epochs_applied", 0)
            if epochs <= 0:
                return
            self._counted = now
            self.stats.record_commits(
                last_epoch=now["last_applied_epoch"], epochs=epochs,
                pages=now["pages"] - last.get("pages", 0),
                wire_bytes=now["wire_bytes"] - last.get("wire_bytes", 0),
            )

    def consistent(self) -> bool:
        """True once a committed epoch carries device state (the initial sync's stopped round
        or any later epoch): only then is there something consistent to resume."""
        try:
            return os.stat(self.device_state_path).st_size > 0
        except FileNotFoundError:
            return False

    def _watch_link(self) -> None:
        rx = self._rx
        assert rx is not None
        while not self._closed.is_set():
            try:
                ended = rx.wait(0.05)
            except ReplicationError as err:
                self.link_error = err
                self.log.warning("FT link lost at epoch %d: %s", rx.last_applied, err)
                return
            finally:
                self._count_commits()
                if self.machine.state is S.STANDBY_STARTING and self.consistent():
                    with contextlib.suppress(StateError):
                        self.machine.move(S.STANDBY, expect=S.STANDBY_STARTING)
                        self.stats.set_state(S.STANDBY.value)
                        self.log.info("standby holds a consistent epoch (%d)", rx.last_applied)
            if ended:
                self.log.info("the primary ended the session at epoch %d", rx.last_applied)
                return

    def wait_standby(self, timeout: float) -> bool:
        """Wait until the standby can take over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.machine.state is S.STANDBY:
                return True
            time.sleep(0.01)
        return self.machine.state is S.STANDBY

    def failover(self, before_resume: Callable[[int], None] | None = None) -> FailoverReport:
        """Resume the standby from the last committed epoch (the primary was declared dead).

        ``before_resume(epoch)`` (tests) runs once the state is loaded, before ``cont``.
        """
        if self._rx is None:
            raise StateError("the backup engine was not started")
        t0 = time.perf_counter()
        self._closed.set()
        self._rx.close()  # every committed epoch is applied when this returns
        t1 = time.perf_counter()
        self._count_commits()
        if self.machine.state is S.STANDBY_STARTING and self.consistent():
            self.machine.move(S.STANDBY, expect=S.STANDBY_STARTING)
        if not self.consistent() or self.machine.state is not S.STANDBY:
            raise StateError(
                f"{self.machine.name}: cannot fail over: no committed epoch with device state yet "
                f"(state {self.machine.state.value}, epoch {self._rx.last_applied}); the standby holds "
                "no consistent VM (the primary died during the initial synchronisation)"
            )
        epoch = self._rx.last_applied
        self.machine.move(S.TAKING_OVER, expect=S.STANDBY)
        self.stats.set_state(S.TAKING_OVER.value)
        try:
            blob, paused = split_user_pause(Path(self.device_state_path).read_bytes())
            loaded = load_device_state(self.qmp, blob, qemu_log=self.qemu_log, standby=self.standby)
            if before_resume is not None:
                before_resume(epoch)
            resumed = _resume_standby(self.qmp, run=not paused)
            if paused:
                self.log.info("the user had paused the VM (virsh suspend): it stays paused here; "
                              "'virsh resume' runs it")
        except BaseException:
            with contextlib.suppress(StateError):
                self.machine.move(S.FAILED, expect=S.TAKING_OVER)
                self.stats.set_state(S.FAILED.value)
            raise
        total = time.perf_counter() - t0
        self.machine.move(S.PRIMARY_AFTER_FAILOVER, expect=S.TAKING_OVER)
        self.stats.set_state(S.PRIMARY_AFTER_FAILOVER.value)
        self.stats.record_failover(total)
        self.log.info("failed over to epoch %d in %.1f ms (receiver close %.1f, load %.1f, resume %.1f)",
                      epoch, total * 1e3, (t1 - t0) * 1e3, loaded.total * 1e3, resumed.total * 1e3)
        self._release()
        return FailoverReport(epoch, t1 - t0, loaded, resumed, total)

    def close(self) -> None:
        """Stop receiving (no failover); the standby QEMU is the caller's."""
        self._closed.set()
        if self._rx is not None:
            self._rx.close()
        if self._watch is not None:
            self._watch.join(5)
        self._count_commits()
        self._release()

    def _release(self) -> None:
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(5)
        if self._ram is not None:
            with contextlib.suppress(BufferError):
                self._ram.close()
            self._ram = None


def qemu_exit_cause(events: Iterable[dict[str, Any]]) -> str | None:
    """Why QEMU ended, in an operator's words, from its last SHUTDOWN and MIGRATION events
    (oldest first); None without a SHUTDOWN event (SIGKILL, a crash). libvirt's ``virsh
    save`` migrates the state to a file, then sends SIGTERM."""
    events = list(events)
    saved = any(ev["event"] == "MIGRATION" and ev.get("data", {}).get("status") == "completed"
                for ev in events)
    # A guest's poweroff comes first (QEMU runs -no-shutdown), then libvirt's SIGTERM.
    shutdowns = [ev.get("data", {}) for ev in events if ev["event"] == "SHUTDOWN"]
    shutdown = next((d for d in shutdowns if d.get("guest")), shutdowns[-1] if shutdowns else None)
    if shutdown is None:
        return None
    reason = str(shutdown.get("reason", ""))
    if shutdown.get("guest"):
        return "the guest powered off" if reason == "guest-shutdown" else f"the guest ended ({reason})"
    if reason == "host-signal":
        return "virsh save / managedsave" if saved else "virsh destroy (or a SIGTERM to QEMU)"
    if reason == "host-qmp-quit":
        return "a 'quit' on QEMU's monitor"
    return f"QEMU shut down ({reason or 'no reason given'})"


def _event_time(event: dict[str, Any]) -> float:
    """A QMP event's wall-clock stamp in seconds (0 if it has none)."""
    stamp = event.get("timestamp") or {}
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
