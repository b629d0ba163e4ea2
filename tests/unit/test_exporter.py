"""The exporter's collector against DomainStats fed with known values (exposition parsed back)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cuju_libvirt.cujud.exporter import CujuCollector, PeerSample, ProtectedDomains, render
from cuju_libvirt.errors import CujuError
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Peers:
    def __init__(self, samples: list[PeerSample]) -> None:
        self.samples = samples

    def peer_samples(self) -> list[PeerSample]:
        return self.samples


def scrape(collector: CujuCollector) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(render(collector)):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def one(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def fed_stats(clock: Clock) -> DomainStats:
    st = DomainStats("web", "u-1", "primary", peer="hostb", clock=clock, tracker="uffd", epoch_ms=25)
    st.set_state("protected")
    for pause, dirty in ((0.0015, 5), (0.003, 120), (0.012, 3000)):
        st.record_epoch(pause_s=pause, dirty_pages=dirty, device_state_bytes=310_000)
    clock.now = 1000.0
    st.record_ack(epoch=7, epoch_end=999.996, pages=100, wire_bytes=50_000, saved_bytes=360_000)
    clock.now = 1000.010
    st.record_ack(epoch=8, epoch_end=999.990, pages=20, wire_bytes=9_000, saved_bytes=72_000)
    st.set_packets_held(42)
    st.set_initial_sync(1.0)
    st.record_failover(0.75)
    clock.now = 1000.050
    return st


def test_every_value_comes_from_the_stats() -> None:
    clock = Clock()
    domains = ProtectedDomains()
    domains.add(fed_stats(clock))
    s = scrape(CujuCollector(domains))
    ident = {"domain": "web", "uuid": "u-1"}
    # lag: now (1000.050) - end of the newest acked epoch (999.990)
    assert one(s, "cuju_replication_lag_seconds", role="primary", **ident) == pytest.approx(0.060)
    assert one(s, "cuju_epochs_committed_total", **ident) == 2
    assert one(s, "cuju_pages_replicated_total", **ident) == 120
    assert one(s, "cuju_wire_bytes_total", **ident) == 59_000
    assert one(s, "cuju_encoder_saved_bytes_total", **ident) == 432_000
    assert one(s, "cuju_device_state_bytes", **ident) == 310_000
    assert one(s, "cuju_output_packets_held", **ident) == 42
    assert one(s, "cuju_failovers_total", **ident) == 1
    assert one(s, "cuju_last_failover_duration_seconds", **ident) == 0.75
    assert one(s, "cuju_initial_sync_progress_ratio", **ident) == 1.0
    assert one(s, "cuju_epoch_length_seconds", **ident) == 0.025
    assert one(s, "cuju_protected", **ident) == 1.0
    assert one(s, "cuju_tracker_info", tracker="uffd", **ident) == 1.0
    assert one(s, "cuju_domain_info", role="primary", peer="hostb", **ident) == 1.0
    # pause histogram: 1.5 ms, 3 ms, 12 ms against the stats' bounds
    assert one(s, "cuju_epoch_pause_seconds_bucket", le="0.002", **ident) == 1
    assert one(s, "cuju_epoch_pause_seconds_bucket", le="0.004", **ident) == 2
    assert one(s, "cuju_epoch_pause_seconds_bucket", le="0.01", **ident) == 2
    assert one(s, "cuju_epoch_pause_seconds_bucket", le="0.015", **ident) == 3
    assert one(s, "cuju_epoch_pause_seconds_bucket", le="+Inf", **ident) == 3
    assert one(s, "cuju_epoch_pause_seconds_count", **ident) == 3
    assert one(s, "cuju_epoch_pause_seconds_sum", **ident) == pytest.approx(0.0165)
    assert one(s, "cuju_epoch_dirty_pages_bucket", le="10.0", **ident) == 1
    assert one(s, "cuju_epoch_dirty_pages_bucket", le="500.0", **ident) == 2
    assert one(s, "cuju_epoch_dirty_pages_sum", **ident) == 3125
    # ack latency: 1000.0 - 999.996 = 4 ms, 1000.010 - 999.990 = 20 ms
    assert one(s, "cuju_epoch_ack_latency_seconds_bucket", le="0.005", **ident) == 1
    assert one(s, "cuju_epoch_ack_latency_seconds_bucket", le="0.01", **ident) == 1
    assert one(s, "cuju_epoch_ack_latency_seconds_bucket", le="0.02", **ident) == 2
    assert one(s, "cuju_epoch_ack_latency_seconds_sum", **ident) == pytest.approx(0.024)


def test_one_state_series_per_state_exactly_one_set() -> None:
    domains = ProtectedDomains()
    for name, state in (("a", "protected"), ("b", "degraded")):
        st = DomainStats(name, f"u-{name}", "primary")
        st.set_state(state)
        domains.add(st)
    s = scrape(CujuCollector(domains))
    for name, state in (("a", "protected"), ("b", "degraded")):
        rows = {x.labels["state"]: x.value for x in s["cuju_ft_state"] if x.labels["domain"] == name}
        assert set(rows) == {st.value for st in FTState}
        assert {k for k, v in rows.items() if v == 1.0} == {state}
        assert sum(rows.values()) == 1.0


def test_unprotected_domain_keeps_its_series_with_nan_lag() -> None:
    clock = Clock()
    st = fed_stats(clock)
    domains = ProtectedDomains()
    domains.add(st)
    st.set_state("degraded")
    st.reset_link()
    s = scrape(CujuCollector(domains))
    ident = {"domain": "web", "uuid": "u-1"}
    assert math.isnan(one(s, "cuju_replication_lag_seconds", role="primary", **ident))
    assert one(s, "cuju_protected", **ident) == 0.0
    assert one(s, "cuju_ft_state", state="degraded", **ident) == 1.0
    assert one(s, "cuju_epochs_committed_total", **ident) == 2  # counters do not reset
    assert one(s, "cuju_initial_sync_progress_ratio", **ident) == 0.0


def test_no_failover_yet_reads_nan_and_new_domain_has_no_lag() -> None:
    domains = ProtectedDomains()
    domains.add(DomainStats("fresh", "u-f", "primary"))
    s = scrape(CujuCollector(domains))
    assert math.isnan(one(s, "cuju_last_failover_duration_seconds", domain="fresh"))
    assert math.isnan(one(s, "cuju_last_failover_timestamp_seconds", domain="fresh"))
    assert math.isnan(one(s, "cuju_replication_lag_seconds", domain="fresh"))
    assert one(s, "cuju_tracker_info", domain="fresh", tracker="none") == 1.0


def test_machine_drives_the_state_and_remove_detaches() -> None:
    domains = ProtectedDomains()
    st = DomainStats("web", "u-1", "primary")
    machine = FTMachine("web", Role.PRIMARY)
    domains.add(st, machine)
    machine.move(FTState.PAIRING)
    machine.move(FTState.SYNCING)
    assert st.snapshot().state == "syncing"
    with pytest.raises(CujuError, match="registered already"):
        domains.add(DomainStats("web", "u-1", "primary"))
    assert domains.remove("u-1") is st
    machine.move(FTState.PROTECTED)
    assert st.snapshot().state == "syncing"  # no longer listening
    assert "u-1" not in domains and len(domains) == 0
    assert "cuju_ft_state{" not in render(CujuCollector(domains))
    with pytest.raises(KeyError):
        domains.remove("u-1")


def test_peers_up_down_and_never_seen() -> None:
    peers = Peers([PeerSample("hostb", True, 0.0012, 1_700_000_000.5),
                   PeerSample("hostc", False, 0.5, 1_699_999_000.0),
                   PeerSample("hostd", False, None, None)])
    s = scrape(CujuCollector(ProtectedDomains(), peers))
    assert one(s, "cuju_peer_up", peer="hostb") == 1.0
    assert one(s, "cuju_peer_up", peer="hostc") == 0.0
    assert one(s, "cuju_peer_heartbeat_rtt_seconds", peer="hostb") == 0.0012
    assert math.isnan(one(s, "cuju_peer_heartbeat_rtt_seconds", peer="hostc"))  # stale RTT not shown
    assert one(s, "cuju_peer_last_seen_timestamp_seconds", peer="hostc") == 1_699_999_000.0
    assert [x.labels["peer"] for x in s["cuju_peer_last_seen_timestamp_seconds"]] == ["hostb", "hostc"]


def test_build_info_and_help_on_every_family() -> None:
    text = render(CujuCollector(ProtectedDomains()))
    families = list(text_string_to_metric_families(text))
    build = next(f for f in families if f.name == "cuju_build_info")
    assert build.samples[0].labels["version"]
    assert all(f.documentation for f in families)


def test_epoch_rate_from_samples() -> None:
    clock = Clock()
    domains = ProtectedDomains(clock=clock)
    st = DomainStats("web", "u-1", "primary")
    domains.add(st)
    assert domains.rates() == {"u-1": None}
    domains.sample()
    for i in range(50):
        st.record_ack(epoch=i + 1, epoch_end=clock.now, pages=1, wire_bytes=1, saved_bytes=0)
    clock.now += 2.0
    domains.sample()
    assert domains.rates()["u-1"] == pytest.approx(25.0)


def test_alert_rules_only_use_exported_names() -> None:
    clock = Clock()
    domains = ProtectedDomains()
    domains.add(fed_stats(clock))
    exported = set(scrape(CujuCollector(domains, Peers([PeerSample("b", True, 0.001, 1.0)]))))
    rules = (ROOT / "packaging" / "prometheus" / "cuju-alerts.yml").read_text()
    used = set(re.findall(r"\bcuju_[a-z_]+", rules))
    assert used and used <= exported, used - exported


@given(
    name=st.text(min_size=1, max_size=40),
    peer=st.text(max_size=20),
    epochs=st.lists(st.tuples(st.floats(0, 1.0), st.integers(0, 2_000_000), st.integers(0, 1 << 40)),
                    max_size=20),
)
def test_any_names_and_values_round_trip_through_the_exposition(
    name: str, peer: str, epochs: list[tuple[float, int, int]]
) -> None:
    """Whatever a domain is called (quotes, backslashes, newlines, unicode), the text parses back."""
    clock = Clock()
    stats = DomainStats(name, "u-" + str(len(name)), "primary", peer=peer, clock=clock)
    for i, (pause, dirty, wire) in enumerate(epochs):
        stats.record_epoch(pause_s=pause, dirty_pages=dirty, device_state_bytes=wire % 1000)
        stats.record_ack(epoch=i + 1, epoch_end=clock.now, pages=dirty, wire_bytes=wire, saved_bytes=0)
    domains = ProtectedDomains()
    domains.add(stats)
    s = scrape(CujuCollector(domains, Peers([PeerSample(peer or "p", True, 0.001, 5.0)])))
    assert one(s, "cuju_epochs_committed_total", domain=name) == len(epochs)
    assert one(s, "cuju_wire_bytes_total", domain=name) == sum(w for _, _, w in epochs)
    assert one(s, "cuju_epoch_dirty_pages_count", domain=name) == len(epochs)
    assert one(s, "cuju_domain_info", domain=name, peer=peer) == 1.0
    assert one(s, "cuju_peer_up", peer=peer or "p") == 1.0
