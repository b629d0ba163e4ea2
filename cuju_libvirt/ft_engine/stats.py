"""Per-domain replication statistics: written by the epoch engine, read by the exporter.

The contract between the two sides:

* The engine owns one :class:`DomainStats` per protected domain and updates it on the
  epoch path with cheap calls (``record_epoch``, ``record_ack``, ``set_*``): each takes
  one short lock and does a few additions. Nothing here allocates per epoch beyond that,
  and nothing ever waits for a reader.
* The exporter (and ``cuju-libvirt status``) call :meth:`DomainStats.snapshot` at scrape
  time and get an immutable :class:`StatsSnapshot`; reading never blocks the engine for
  longer than one copy of a few integers.

Units are base units (seconds, bytes, pages); clocks are ``time.monotonic`` for ages and
``time.time`` only for wall-clock timestamps that leave the process.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: Pause of the VM per epoch (stop .. cont), seconds.
PAUSE_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.050, 0.100, 0.250)
#: End of an epoch (cont) until the backup's acknowledgement, seconds.
ACK_BUCKETS = (0.001, 0.002, 0.005, 0.010, 0.020, 0.050, 0.100, 0.250, 0.500, 1.0, 2.5)
#: Dirty pages harvested per epoch.
DIRTY_PAGES_BUCKETS = (0, 10, 100, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative bucket counts in Prometheus' shape: ``buckets[i]`` counts values <= ``bounds[i]``."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total: float


class Histogram:
    """A fixed-bucket histogram cheap enough for the epoch path. Thread-safe."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # last slot: above every bound (+Inf)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        slot = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[slot] += 1
            self._total += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = list(self._counts)
            total = self._total
        cumulative: list[int] = []
        running = 0
        for c in counts[:-1]:
            running += c
            cumulative.append(running)
        return HistogramSnapshot(self._bounds, tuple(cumulative), running + counts[-1], total)


@dataclass(frozen=True)
class DiskSync:
    """Progress of the copy of one protected disk to the backup (initial sync or resync)."""

    target: str  # the disk's <target dev>
    synced_bytes: int  # bytes of the disk the backup's replica already holds
    total_bytes: int  # bytes to copy in this sync (the allocated blocks for a full sync)
    #: "full" (a sparse copy of the disk), "changed" (only the changed blocks) or "compare"
    #: (the backup's own image compared unit by unit: synced/total are the bytes compared)
    mode: str = "full"
    why: str = ""  # why this sync sends what it sends (e.g. why not only the changed blocks)

    @property
    def ratio(self) -> float:
        return 1.0 if self.total_bytes == 0 else self.synced_bytes / self.total_bytes

    @property
    def done(self) -> bool:
        return self.synced_bytes >= self.total_bytes


@dataclass(frozen=True)
class StatsSnapshot:
    """One consistent reading of a domain's statistics (see :class:`DomainStats`)."""

    domain: str
    uuid: str
    role: str
    peer: str
    state: str
    tracker: str
    #: Seconds since the newest acknowledged epoch was closed; None before the first ack.
    replication_lag_s: float | None
    last_acked_epoch: int
    epochs_committed: int
    pages_total: int
    wire_bytes_total: int
    encoder_saved_bytes_total: int
    device_state_bytes: int
    output_packets_held: int
    failovers_total: int
    last_failover_duration_s: float | None
    #: Wall-clock time of the last failover (``time.time()``), None if never.
    last_failover_timestamp: float | None
    #: Initial synchronisation progress in [0, 1]; 1.0 once in FT mode.
    initial_sync_ratio: float
    epoch_ms: int
    pause_seconds: HistogramSnapshot
    ack_latency_seconds: HistogramSnapshot
    dirty_pages: HistogramSnapshot
    #: Copy progress of each protected disk, in the order the data path reported them.
    disk_sync: tuple[DiskSync, ...] = ()
    #: The ownership generation of the pairing (the witness's fencing token; 0 without one).
    generation: int = 0


@dataclass
class DomainStats:
    """Live statistics of one protected domain on one host (engine writes, exporter reads)."""

    domain: str
    uuid: str
    role: str
    peer: str = ""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    state: str = "unprotected"
    tracker: str = ""
    epoch_ms: int = 0
    #: The ownership generation of the pairing (0 without the witness); cujud sets it.
    generation: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._last_acked_epoch = 0
        self._last_ack_epoch_end: float | None = None  # monotonic time the acked epoch was closed
        self._epochs_committed = 0
        self._pages_total = 0
        self._wire_bytes_total = 0
        self._saved_bytes_total = 0
        self._device_state_bytes = 0
        self._packets_held = 0
        self._failovers_total = 0
        self._last_failover_s: float | None = None
        self._last_failover_ts: float | None = None
        self._sync_ratio = 0.0
        self._disk_sync: dict[str, DiskSync] = {}
        self.pause = Histogram(PAUSE_BUCKETS)
        self.ack_latency = Histogram(ACK_BUCKETS)
        self.dirty = Histogram(DIRTY_PAGES_BUCKETS)

    # -- written by the engine ---------------------------------------------------------
    def record_epoch(self, *, pause_s: float, dirty_pages: int, device_state_bytes: int) -> None:
        """An epoch was closed (VM resumed); called once per epoch by the engine."""
        self.pause.observe(pause_s)
        self.dirty.observe(dirty_pages)
        with self._lock:
            self._device_state_bytes = device_state_bytes

    def record_ack(
        self, *, epoch: int, epoch_end: float, pages: int, wire_bytes: int, saved_bytes: int
    ) -> None:
        """The backup acknowledged ``epoch``, which was closed at monotonic time ``epoch_end``."""
        now = self.clock()
        self.ack_latency.observe(max(0.0, now - epoch_end))
        with self._lock:
            self._last_acked_epoch = epoch
            self._last_ack_epoch_end = epoch_end
            self._epochs_committed += 1
            self._pages_total += pages
            self._wire_bytes_total += wire_bytes
            self._saved_bytes_total += saved_bytes

    def record_commits(self, *, last_epoch: int, epochs: int, pages: int, wire_bytes: int) -> None:
        """The backup committed ``epochs`` more epochs (up to ``last_epoch``) carrying ``pages``
        pages in ``wire_bytes`` bytes. The backup's lag stays unknown (NaN): it cannot tell
        when the primary closed an epoch, only the primary's lag is an age."""
        with self._lock:
            self._last_acked_epoch = last_epoch
            self._epochs_committed += epochs
            self._pages_total += pages
            self._wire_bytes_total += wire_bytes

    def set_state(self, state: str) -> None:
        with self._lock:
            self.state = state

    def set_packets_held(self, packets: int) -> None:
        with self._lock:
            self._packets_held = packets

    def set_initial_sync(self, ratio: float) -> None:
        with self._lock:
            self._sync_ratio = min(1.0, max(0.0, ratio))

    def set_disk_sync(self, target: str, synced_bytes: int, total_bytes: int, mode: str = "full",
                      why: str = "") -> None:
        """The disk data path's progress copying disk ``target`` to the backup (``mode`` and
        ``why``: see :class:`DiskSync`)."""
        if not 0 <= synced_bytes <= total_bytes:
            raise ValueError(f"disk {target}: synced_bytes {synced_bytes} outside 0..{total_bytes}")
        with self._lock:
            self._disk_sync[target] = DiskSync(target, synced_bytes, total_bytes, mode, why)

    def record_failover(self, duration_s: float) -> None:
        with self._lock:
            self._failovers_total += 1
            self._last_failover_s = duration_s
            self._last_failover_ts = time.time()

    def reset_link(self) -> None:
        """Protection was lost (backup gone): lag is unknown until the next ack."""
        with self._lock:
            self._last_ack_epoch_end = None
            self._sync_ratio = 0.0

    # -- read at scrape time -------------------------------------------------------------
    def snapshot(self) -> StatsSnapshot:
        now = self.clock()
        with self._lock:
            end = self._last_ack_epoch_end
            snap = StatsSnapshot(
                domain=self.domain,
                uuid=self.uuid,
                role=self.role,
                peer=self.peer,
                state=self.state,
                tracker=self.tracker,
                replication_lag_s=None if end is None else max(0.0, now - end),
                last_acked_epoch=self._last_acked_epoch,
                epochs_committed=self._epochs_committed,
                pages_total=self._pages_total,
                wire_bytes_total=self._wire_bytes_total,
                encoder_saved_bytes_total=self._saved_bytes_total,
                device_state_bytes=self._device_state_bytes,
                output_packets_held=self._packets_held,
                failovers_total=self._failovers_total,
                last_failover_duration_s=self._last_failover_s,
                last_failover_timestamp=self._last_failover_ts,
                initial_sync_ratio=self._sync_ratio,
                epoch_ms=self.epoch_ms,
                pause_seconds=self.pause.snapshot(),
                ack_latency_seconds=self.ack_latency.snapshot(),
                dirty_pages=self.dirty.snapshot(),
                disk_sync=tuple(self._disk_sync.values()),
                generation=self.generation,
            )
        return snap
