"""A real replication session on loopback that feeds a domain's statistics, without a VM.

Until the epoch engine protects real guests, this is what drives ``DomainStats`` in the
exporter's tests and the scrape-overhead benchmark -- with nothing invented:

* the "guest" is a child process that writes pseudo-random data into random pages of a
  shared RAM file (as QEMU's guest RAM lives in a shared file);
* each epoch pauses it for real (``SIGSTOP``, waiting until the kernel reports it stopped),
  harvests the dirty pages with the ``scan`` tracker, stages them and a device-state blob
  into :class:`~cuju_libvirt.ft_engine.replicator.EpochSender`, resumes it (``SIGCONT``),
  ships, and waits for the :class:`~cuju_libvirt.ft_engine.replicator.EpochReceiver`'s
  acknowledgement over TCP on loopback;
* an initial full copy runs first (chunked, with its progress), through the FT state
  machine ``unprotected -> pairing -> syncing -> protected``; a broken link moves it to
  ``degraded`` and resets the link in the statistics, as the engine will.

The numbers in the statistics (pause, dirty pages, pages/bytes on the wire, bytes saved,
ack latency) are those measured here or counted by the C data plane.

The pause measured here is ``SIGSTOP`` .. ``SIGCONT`` of the writer around harvest and
gather: the same stages as a VM's pause without QMP and device-state save.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from cuju_libvirt.errors import ReplicationError, RigError
from cuju_libvirt.ft_engine.replicator import (
    PAGE_SIZE,
    EpochReceiver,
    EpochSender,
    accept_link,
    connect_link,
)
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.ft_engine.trackers import ScanTracker, page_buffer

LOG = logging.getLogger(__name__)

#: The writer: maps the RAM file shared and writes 8 random bytes into random pages until its
#: parent is gone (killed with it, even while stopped).
WRITER = r"""
import ctypes, mmap, os, random, sys, time
path, rate, parent = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: also when stopped
if os.getppid() != parent:
    sys.exit(0)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
ram = mmap.mmap(fd, size, mmap.MAP_SHARED)
pages = size // 4096
rng = random.Random(os.getpid())
sys.stdout.write("ready\n"); sys.stdout.flush()
batch = max(1, int(rate / 100))
while os.getppid() == parent:
    for _ in range(batch):
        off = rng.randrange(pages) * 4096 + rng.randrange(0, 4096 - 8, 8)
        ram[off:off + 8] = rng.getrandbits(64).to_bytes(8, "little")
    time.sleep(0.01)
"""

#: Pages sent per epoch of the initial full copy.
SYNC_CHUNK_PAGES = 1024


def _process_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] in (b"T", b"t")


class ReplicationLoad:
    """Primary and backup of one "domain" on loopback, epochs in a thread of their own.

    ``stats``/``machine`` are the primary's; ``backup_stats``/``backup_machine`` the
    backup's: its epochs are those its receiver committed, its lag the age of the newest.
    Register each with a cujud's :class:`~cuju_libvirt.cujud.exporter.ProtectedDomains`.
    Use as a context manager; everything (child process, sockets, files) is gone after it.
    """

    def __init__(
        self, workdir: Path, domain: str, uuid: str, *, peer: str = "", backup_peer: str = "",
        region_mib: int = 16, epoch_ms: int = 20, pages_per_s: float = 5000.0,
        device_state_bytes: int = 32 << 10,
    ) -> None:
        self.workdir = workdir
        self.epoch_ms = epoch_ms
        self.size = region_mib << 20
        self.pages_per_s = pages_per_s
        self.stats = DomainStats(domain, uuid, "primary", peer=peer, tracker="scan", epoch_ms=epoch_ms)
        self.machine = FTMachine(domain, Role.PRIMARY)
        self.backup_stats = DomainStats(domain, uuid, "backup", peer=backup_peer, tracker="scan",
                                        epoch_ms=epoch_ms)
        self.backup_machine = FTMachine(domain, Role.BACKUP)
        self._device_state = os.urandom(device_state_bytes)
        self.ram_path = workdir / f"{domain}.ram"
        self.error: BaseException | None = None
        #: Pauses of every epoch so far (seconds), for benchmarks.
        self.pauses: list[float] = []
        self._stop = threading.Event()
        self._writer: subprocess.Popen[bytes] | None = None
        self._ram: mmap.mmap | None = None
        self._standby: mmap.mmap | None = None
        self._tracker: ScanTracker | None = None
        self._tx: EpochSender | None = None
        self._rx: EpochReceiver | None = None
        self._thread: threading.Thread | None = None
        self._epoch = 0

    # --- life cycle ---

    def start(self, sync_timeout: float = 30.0) -> None:
        """Start the writer, pair, run the initial copy, then epochs in a thread. Returns in FT mode.

        The writer dies with the thread that calls this (``PR_SET_PDEATHSIG``): call it from
        a thread that lives as long as the load (the main thread in tests and benchmarks).
        """
        try:
            self._start(sync_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, sync_timeout: float) -> None:
        with open(self.ram_path, "wb") as f:
            f.truncate(self.size)
        fd = os.open(self.ram_path, os.O_RDWR)
        try:
            self._ram = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._standby = mmap.mmap(-1, self.size)
        self._writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(self.ram_path), str(self.pages_per_s), str(os.getpid())],
            stdout=subprocess.PIPE, start_new_session=True,
        )
        assert self._writer.stdout is not None
        if self._writer.stdout.readline().strip() != b"ready":
            raise RigError("the RAM writer did not start")
        self._tracker = ScanTracker.open(self.ram_path, self._writer_stopped)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = connect_link(listener.getsockname(), timeout=5)
            server = accept_link(listener, timeout=5)
        with client, server:
            self._rx = EpochReceiver(self._standby, str(self.workdir / f"{self.stats.domain}.state"))
            self._rx.start(server)
            self._tx = EpochSender(client, self._ram)
        self.machine.move(FTState.PAIRING)
        self._epoch = self._tx.handshake(timeout=5)
        self.machine.move(FTState.SYNCING)
        self._initial_sync(time.monotonic() + sync_timeout)
        self.machine.move(FTState.PROTECTED)
        self._thread = threading.Thread(target=self._run, name=f"replication-load-{self.stats.domain}",
                                        daemon=True)
        self._thread.start()

    def _initial_sync(self, deadline: float) -> None:
        assert self._tx is not None and self._tracker is not None
        self._pause()
        try:
            self._tracker.arm()  # from here on, every write is caught by the first epochs
        finally:
            self._resume()
        npages = self.size // PAGE_SIZE
        for first in range(0, npages, SYNC_CHUNK_PAGES):
            chunk = array.array("Q", range(first, min(npages, first + SYNC_CHUNK_PAGES)))
            self._epoch += 1
            self._tx.stage(self._epoch, chunk)
            self._tx.ship()
            if not self._tx.wait_ack(self._epoch, max(0.1, deadline - time.monotonic())):
                raise RigError(f"initial copy: epoch {self._epoch} not acknowledged in time")
            self.stats.set_initial_sync((first + len(chunk)) / npages)
        self.backup_machine.move(FTState.STANDBY)
        self.backup_stats.set_initial_sync(1.0)

    def _writer_stopped(self) -> bool:
        return self._writer is not None and _process_stopped(self._writer.pid)

    def _pause(self) -> None:
        assert self._writer is not None
        os.kill(self._writer.pid, signal.SIGSTOP)
        while not self._writer_stopped():
            time.sleep(0.0001)

    def _resume(self) -> None:
        assert self._writer is not None
        os.kill(self._writer.pid, signal.SIGCONT)

    # --- the epoch loop ---

    def _run(self) -> None:
        assert self._tx is not None and self._tracker is not None
        out = page_buffer(self._tracker.npages)
        before = self._tx.counters()
        rx_before = self._rx.counters() if self._rx is not None else {}
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                self._pause()
                try:
                    harvest = self._tracker.harvest(out)
                    self._epoch += 1
                    if harvest.full_resync:
                        dirty: memoryview | array.array[int] = array.array("Q", range(self._tracker.npages))
                    else:
                        dirty = memoryview(out)[: harvest.count]
                    self._tx.stage(self._epoch, dirty, self._device_state)
                finally:
                    self._resume()
                end = time.monotonic()
                pause = end - start
                self.pauses.append(pause)
                self.stats.record_epoch(pause_s=pause, dirty_pages=len(dirty),
                                        device_state_bytes=len(self._device_state))
                self._tx.ship()
                if not self._tx.wait_ack(self._epoch, 5.0):
                    raise ReplicationError(f"epoch {self._epoch} not acknowledged within 5 s")
                now = self._tx.counters()
                self.stats.record_ack(
                    epoch=self._epoch, epoch_end=end, pages=now["pages"] - before["pages"],
                    wire_bytes=now["wire_bytes"] - before["wire_bytes"],
                    saved_bytes=now["saved_bytes"] - before["saved_bytes"],
                )
                before = now
                if self._rx is not None:  # the backup's own view: the epochs it committed
                    got = self._rx.counters()
                    self.backup_stats.record_ack(
                        epoch=self._epoch, epoch_end=end, pages=got["pages"] - rx_before["pages"],
                        wire_bytes=got["wire_bytes"] - rx_before["wire_bytes"], saved_bytes=0,
                    )
                    rx_before = got
                self._stop.wait(max(0.0, self.epoch_ms / 1e3 - (time.monotonic() - end)))
        except ReplicationError as err:
            if not self._stop.is_set():
                LOG.warning("%s: backup lost: %s; running unprotected", self.stats.domain, err)
                self.machine.move(FTState.DEGRADED)
                self.stats.reset_link()
                self.error = err.with_traceback(None)  # its frames would hold the regions' buffers
        except BaseException as err:
            LOG.exception("%s: replication load failed", self.stats.domain)
            self.error = err.with_traceback(None)

    # --- what tests do to it ---

    def kill_backup(self) -> None:
        """The backup host dies: its receiver stops and the link breaks (the primary carries on)."""
        if self._rx is not None:
            self._rx.close()
        if self.backup_machine.state is FTState.STANDBY:
            self.backup_machine.move(FTState.FAILED)

    def wait_state(self, state: FTState, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.machine.state is not state:
            if time.monotonic() > end:
                raise RigError(f"{self.stats.domain}: state {self.machine.state.value}, not {state.value}")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._writer is not None and self._writer.poll() is None:
            os.killpg(self._writer.pid, signal.SIGKILL)  # SIGKILL also ends a stopped process
            self._writer.wait(10)
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.close(False, 0)
        rx, self._rx = self._rx, None
        if rx is not None:
            rx.close()
        del tx, rx  # the data plane holds the regions' buffers until its objects are freed
        if self._tracker is not None:
            self._tracker.close()
        for m in (self._ram, self._standby):
            if m is not None:
                try:
                    m.close()
                except BufferError:  # still exported by an object not freed yet: the GC unmaps it
                    LOG.debug("%s: region still referenced at close", self.stats.domain)
        self._ram = self._standby = None
        for path in (self.ram_path, self.workdir / f"{self.stats.domain}.state",
                     self.workdir / f"{self.stats.domain}.state.journal"):
            path.unlink(missing_ok=True)
        if self._writer is not None and self._writer.stdout is not None:
            self._writer.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
