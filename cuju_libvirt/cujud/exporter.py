"""cujud's Prometheus exporter: a custom collector read at scrape time, and its HTTP server.

Three sources, all read only when Prometheus scrapes (nothing on the epoch path waits
for a scrape, and a scrape never waits for an epoch longer than one snapshot copy):

* :class:`ProtectedDomains`, the daemon's registry of protected domains. Whoever
  protects a domain (the orchestration) calls ``domains.add(stats, machine)`` with the
  domain's :class:`~cuju_libvirt.ft_engine.stats.DomainStats` (updated by the epoch
  engine) and, optionally, its :class:`~cuju_libvirt.ft_engine.state.FTMachine`; and
  ``domains.remove(uuid)`` when protection ends for good.
* a :class:`PeerSource` (cujud's peer links): heartbeat round trip and last contact.
* build information (package version, wire version, data-plane features).

A registered domain never loses its series while it is registered: when the backup is
gone its ``cuju_ft_state`` moves to ``degraded`` (or ``unprotected``), ``cuju_protected``
drops to 0 and ``cuju_replication_lag_seconds`` reads NaN ("no acknowledged epoch since
protection was lost") instead of vanishing. See docs/metrics.md for every metric.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from cuju_libvirt import __version__, _cuju
from cuju_libvirt.errors import ConfigError, CujuError
from cuju_libvirt.ft_engine.state import Change, FTMachine, FTState
from cuju_libvirt.ft_engine.stats import DomainStats, HistogramSnapshot, StatsSnapshot

LOG = logging.getLogger(__name__)

NAN = float("nan")
#: FT states in which a committed epoch exists on the backup host that could take over.
PROTECTED_STATES = frozenset({FTState.PROTECTED.value, FTState.STANDBY.value})
#: How far back ``ProtectedDomains.rates`` looks for the epoch rate (seconds).
RATE_WINDOW = 10.0


@dataclass(frozen=True)
class PeerSample:
    """One configured peer as the exporter shows it."""

    name: str
    connected: bool
    #: Last heartbeat round trip (seconds); None when not connected or none answered yet.
    rtt_s: float | None
    #: Wall-clock time (``time.time()``) anything was last heard from the peer; None if never.
    last_seen: float | None


class PeerSource(Protocol):
    def peer_samples(self) -> Sequence[PeerSample]: ...


class _Entry:
    def __init__(self, stats: DomainStats, machine: FTMachine | None,
                 listener: Callable[[FTMachine, Change], None] | None) -> None:
        self.stats = stats
        self.machine = machine
        self.listener = listener
        #: (monotonic time, epochs committed) samples for the epoch rate; owned by the registry lock.
        self.samples: deque[tuple[float, int]] = deque(maxlen=64)


class ProtectedDomains:
    """The domains this cujud protects (or stands by for), keyed by UUID. Thread-safe.

    ``add`` when protection of a domain starts on this host, ``remove`` when it ends.
    With a machine, every state change of the machine is copied into the stats (so the
    exporter reads one consistent source); without one, the engine calls
    ``stats.set_state`` itself.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._clock = clock

    def add(self, stats: DomainStats, machine: FTMachine | None = None) -> None:
        """Register a domain; CujuError if its UUID is registered already (remove it first)."""
        listener = None
        if machine is not None:
            def listener(m: FTMachine, _change: Change) -> None:
                # the machine's current state, not the change's: listeners run outside the
                # machine's lock, so a late call for an older change must not win
                stats.set_state(m.state.value)
        entry = _Entry(stats, machine, listener)
        with self._lock:
            if stats.uuid in self._entries:
                raise CujuError(
                    f"domain {stats.domain} ({stats.uuid}) is registered already: remove it first")
            self._entries[stats.uuid] = entry
        if machine is not None and listener is not None:
            machine.add_listener(listener)
            stats.set_state(machine.state.value)
        LOG.info("exporting metrics of %s (%s) as %s", stats.domain, stats.uuid, stats.role)

    def remove(self, uuid: str) -> DomainStats:
        """Unregister a domain (its series disappear from the next scrape); KeyError if unknown."""
        with self._lock:
            entry = self._entries.pop(uuid)
        if entry.machine is not None and entry.listener is not None:
            with contextlib.suppress(ValueError):
                entry.machine.remove_listener(entry.listener)
        LOG.info("no longer exporting metrics of %s (%s)", entry.stats.domain, uuid)
        return entry.stats

    def get(self, uuid: str) -> DomainStats | None:
        with self._lock:
            entry = self._entries.get(uuid)
        return None if entry is None else entry.stats

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, uuid: object) -> bool:
        with self._lock:
            return uuid in self._entries

    def snapshots(self) -> list[StatsSnapshot]:
        """One snapshot per registered domain, sorted by domain name."""
        with self._lock:
            entries = list(self._entries.values())
        return sorted((e.stats.snapshot() for e in entries), key=lambda s: (s.domain, s.uuid))

    def sample(self) -> None:
        """Note every domain's committed-epoch count (cujud calls this about once a second)."""
        now = self._clock()
        with self._lock:
            entries = list(self._entries.values())
        counts = [(e, e.stats.snapshot().epochs_committed) for e in entries]
        with self._lock:
            for entry, count in counts:
                entry.samples.append((now, count))
                while entry.samples and now - entry.samples[0][0] > RATE_WINDOW:
                    entry.samples.popleft()

    def rates(self) -> dict[str, float | None]:
        """Epochs committed per second over the last samples (up to RATE_WINDOW), by UUID."""
        out: dict[str, float | None] = {}
        with self._lock:
            for uuid, entry in self._entries.items():
                if len(entry.samples) < 2:
                    out[uuid] = None
                    continue
                (t0, n0), (t1, n1) = entry.samples[0], entry.samples[-1]
                out[uuid] = (n1 - n0) / (t1 - t0) if t1 > t0 and n1 >= n0 else None
        return out


def _or_nan(value: float | None) -> float:
    return NAN if value is None else float(value)


#: HELP text of every family (the exposition shows it; docs/metrics.md repeats it).
HELP = {
    "lag": "Age of the newest epoch the backup acknowledged (NaN: none since protection was (re)established)",
    "protected": "1 when a backup holds a committed epoch this domain could fail over to, else 0",
    "state": "FT lifecycle state of the domain: one series per state, 1 for the current one",
    "domain": "This host's role for the domain and the peer host it pairs with",
    "tracker": "Dirty-page tracker in use for the domain",
    "cuju_epoch_ack_latency_seconds": "From the end of an epoch (VM resumed) to the backup's acknowledgement",
    "cuju_epoch_pause_seconds": "VM pause per epoch (stop to cont)",
    "cuju_epoch_dirty_pages": "Dirty pages harvested per epoch",
    "cuju_pages_replicated": "Pages sent to the backup in acknowledged epochs",
    "cuju_wire_bytes": "Bytes on the FT link in acknowledged epochs",
    "cuju_encoder_saved_bytes": "Bytes the epoch encoding saved against sending whole pages",
    "cuju_epochs_committed": "Epochs the backup acknowledged",
    "cuju_failovers": "Failovers of the domain to this host",
    "cuju_device_state_bytes": "Size of the last epoch's device state",
    "cuju_output_packets_held": "Guest output packets held until their epoch is acknowledged",
    "cuju_last_failover_duration_seconds": "Duration of the last failover (NaN: none yet)",
    "cuju_last_failover_timestamp_seconds": "Unix time of the last failover (NaN: none yet)",
    "cuju_initial_sync_progress_ratio": "Progress of the initial full copy, 0..1 (1 once in FT mode)",
    "cuju_epoch_length_seconds": "Configured epoch length",
    "peer_up": "1 while the authenticated channel to the peer's cujud is up",
    "peer_rtt": "Round trip of the last heartbeat to the peer (NaN while disconnected)",
    "peer_seen": "Unix time anything was last heard from the peer (absent before the first contact)",
    "build": "cujud build: package version, FT wire version, data-plane features",
}

Getter = Callable[[StatsSnapshot], "float | int | None"]
HISTOGRAMS: tuple[tuple[str, Callable[[StatsSnapshot], HistogramSnapshot]], ...] = (
    ("cuju_epoch_ack_latency_seconds", lambda s: s.ack_latency_seconds),
    ("cuju_epoch_pause_seconds", lambda s: s.pause_seconds),
    ("cuju_epoch_dirty_pages", lambda s: s.dirty_pages),
)
#: Counter families, named without ``_total`` (prometheus-client appends it).
COUNTERS: tuple[tuple[str, Getter], ...] = (
    ("cuju_pages_replicated", lambda s: s.pages_total),
    ("cuju_wire_bytes", lambda s: s.wire_bytes_total),
    ("cuju_encoder_saved_bytes", lambda s: s.encoder_saved_bytes_total),
    ("cuju_epochs_committed", lambda s: s.epochs_committed),
    ("cuju_failovers", lambda s: s.failovers_total),
)
GAUGES: tuple[tuple[str, Getter], ...] = (
    ("cuju_device_state_bytes", lambda s: s.device_state_bytes),
    ("cuju_output_packets_held", lambda s: s.output_packets_held),
    ("cuju_last_failover_duration_seconds", lambda s: s.last_failover_duration_s),
    ("cuju_last_failover_timestamp_seconds", lambda s: s.last_failover_timestamp),
    ("cuju_initial_sync_progress_ratio", lambda s: s.initial_sync_ratio),
    ("cuju_epoch_length_seconds", lambda s: s.epoch_ms / 1e3),
)


class CujuCollector(Collector):
    """Builds every ``cuju_*`` family from the registry, the peers and the build at scrape time."""

    def __init__(self, domains: ProtectedDomains, peers: PeerSource | None = None) -> None:
        self.domains = domains
        self.peers = peers
        self._build = _build_info()

    def describe(self) -> Iterable[Metric]:
        return ()  # the series depend on what is registered at scrape time

    def collect(self) -> Iterable[Metric]:
        yield from self._domain_families(self.domains.snapshots())
        yield from self._peer_families(self.peers.peer_samples() if self.peers is not None else ())
        info = InfoMetricFamily("cuju_build", HELP["build"])
        info.add_metric([], self._build)
        yield info

    @staticmethod
    def _domain_families(snaps: Sequence[StatsSnapshot]) -> Iterator[Metric]:
        dom = ["domain", "uuid"]
        lag = GaugeMetricFamily("cuju_replication_lag_seconds", HELP["lag"], labels=[*dom, "role"])
        protected = GaugeMetricFamily("cuju_protected", HELP["protected"], labels=dom)
        state = GaugeMetricFamily("cuju_ft_state", HELP["state"], labels=[*dom, "state"])
        info = InfoMetricFamily("cuju_domain", HELP["domain"], labels=dom)
        tracker = InfoMetricFamily("cuju_tracker", HELP["tracker"], labels=dom)
        hists = [(HistogramMetricFamily(name, HELP[name], labels=dom), get) for name, get in HISTOGRAMS]
        counters = [(CounterMetricFamily(name, HELP[name], labels=dom), get) for name, get in COUNTERS]
        gauges = [(GaugeMetricFamily(name, HELP[name], labels=dom), get) for name, get in GAUGES]
        states = [s.value for s in FTState]
        for s in snaps:
            ident = [s.domain, s.uuid]
            lag.add_metric([*ident, s.role], _or_nan(s.replication_lag_s))
            protected.add_metric(ident, 1.0 if s.state in PROTECTED_STATES else 0.0)
            if s.state not in states:
                LOG.warning("domain %s reports an unknown FT state %r", s.domain, s.state)
            for name in states:
                state.add_metric([*ident, name], 1.0 if s.state == name else 0.0)
            info.add_metric(ident, {"role": s.role, "peer": s.peer})
            tracker.add_metric(ident, {"tracker": s.tracker or "none"})
            for hfamily, hget in hists:
                h = hget(s)
                hfamily.add_metric(ident, _buckets(h), h.total)
            for cfamily, cget in counters:
                cfamily.add_metric(ident, _or_nan(cget(s)))
            for gfamily, gget in gauges:
                gfamily.add_metric(ident, _or_nan(gget(s)))
        yield from (lag, protected, state, info, tracker)
        yield from (f for f, _ in hists)
        yield from (f for f, _ in counters)
        yield from (f for f, _ in gauges)

    @staticmethod
    def _peer_families(samples: Sequence[PeerSample]) -> Iterator[Metric]:
        up = GaugeMetricFamily("cuju_peer_up", HELP["peer_up"], labels=["peer"])
        rtt = GaugeMetricFamily("cuju_peer_heartbeat_rtt_seconds", HELP["peer_rtt"], labels=["peer"])
        seen = GaugeMetricFamily("cuju_peer_last_seen_timestamp_seconds", HELP["peer_seen"], labels=["peer"])
        for p in samples:
            up.add_metric([p.name], 1.0 if p.connected else 0.0)
            rtt.add_metric([p.name], _or_nan(p.rtt_s if p.connected else None))
            if p.last_seen is not None:
                seen.add_metric([p.name], p.last_seen)
        yield from (up, rtt, seen)


def _buckets(h: HistogramSnapshot) -> list[tuple[str, float]]:
    out = [(_le(b), float(c)) for b, c in zip(h.bounds, h.cumulative, strict=True)]
    out.append(("+Inf", float(h.count)))
    return out


def _le(bound: float) -> str:
    return repr(float(bound)) if not math.isinf(bound) else "+Inf"


def _build_info() -> dict[str, str]:
    info = {"version": __version__, "wire_version": "", "features": ""}
    info["wire_version"] = str(_cuju.WIRE_VERSION)
    info["features"] = ",".join(sorted(_cuju.features))
    return info


# --- the HTTP server --------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        LOG.debug("metrics %s: " + format, self.address_string(), *args)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics`` (any path) over HTTP on one address, in a thread of its own."""

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            self._httpd = make_server(host, port, make_wsgi_app(self.registry), server_class,
                                      handler_class=_QuietHandler)
        except OSError as err:
            raise ConfigError(
                f"metrics_listen {_show(host, port)}: cannot listen: {err.strerror or err}; "
                "set metrics_listen to a free address and port"
            ) from err
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="cujud-metrics", daemon=True)
        self._thread.start()
        LOG.info("metrics exported on http://%s/metrics", _show(host, self.port))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        return f"http://{_show(host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render(collector: Collector) -> str:
    """The exposition text a scrape would return (for tests and ``--print`` style tools)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()
