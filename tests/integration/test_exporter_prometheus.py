"""cujud's exporter scraped by a real Prometheus while real replication sessions run on loopback.

Two in-process cujud daemons (a primary host and its peer), two "domains" replicated by
:class:`~cuju_libvirt.rig.replication_load.ReplicationLoad` (a writer process paused per
epoch, the scan tracker, EpochSender -> EpochReceiver over TCP), whose DomainStats and FT
machines are registered with each daemon's exporter. Debian's ``prometheus`` scrapes both
every second; everything is checked through its HTTP API, including the alert rules'
expressions.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.ft_engine.epoch import PrimaryConfig
from cuju_libvirt.ft_engine.state import FTState
from cuju_libvirt.rig.engine_pair import protected_pair
from cuju_libvirt.rig.guests import WriterConfig, boot_image
from cuju_libvirt.rig.prometheus import prometheus_binary
from cuju_libvirt.rig.qemu_direct import DirectGuest
from cuju_libvirt.rig.replication_load import ReplicationLoad
from tests.integration.metrics_support import (
    CujudPair,
    cujud_pair,
    dashboard_queries,
    prometheus_for,
    value,
    wait_until,
    workdir,
)

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason="prometheus (Debian package 'prometheus') not installed")

DOMAINS = (("exporter-web", "6f1c4c7e-0000-4000-8000-00000000000a"),
           ("exporter-db", "6f1c4c7e-0000-4000-8000-00000000000b"))
EPOCH_MS = 20
DEVICE_STATE = 32 << 10


@pytest.fixture
def base() -> Iterator[Path]:
    with workdir() as path:
        yield path


@pytest.fixture
def pair(base: Path) -> Iterator[CujudPair]:
    with cujud_pair(base) as p:
        yield p


@pytest.fixture
def loads(base: Path, pair: CujudPair) -> Iterator[list[ReplicationLoad]]:
    """One replication session per domain, registered with both daemons' exporters."""
    started: list[ReplicationLoad] = []
    try:
        for name, uuid in DOMAINS:
            load = ReplicationLoad(base, name, uuid, peer=pair.names[1], backup_peer=pair.names[0],
                                   epoch_ms=EPOCH_MS, device_state_bytes=DEVICE_STATE)
            started.append(load)
            pair.a.domains.add(load.stats, load.machine)
            pair.b.domains.add(load.backup_stats, load.backup_machine)
            load.start()
        yield started
    finally:
        with contextlib.ExitStack() as stack:  # every load is closed even if one close fails
            for load in started:
                stack.callback(load.close)


def by_domain(rows: list[dict[str, object]]) -> dict[str, float]:
    out = {}
    for row in rows:
        metric = row["metric"]
        assert isinstance(metric, dict)
        out[metric["domain"]] = value(row)
    return out


@pytest.mark.timeout(120)
def test_prometheus_sees_lag_rates_and_unprotected(base: Path, pair: CujudPair,
                                                   loads: list[ReplicationLoad]) -> None:
    a_target, b_target = pair.metrics_targets()
    names = {name for name, _ in DOMAINS}
    with prometheus_for(base, [a_target, b_target]) as prom:
        # -- protected: one sane lag value per domain, from the primary's cujud only
        lag = prom.wait_for('cuju_replication_lag_seconds{role="primary"}',
                            lambda r: {row["metric"]["domain"] for row in r} == names, timeout=20)
        assert len(lag) == 2 and all(row["metric"]["instance"] == a_target for row in lag)
        for domain, seconds in by_domain(lag).items():
            # the age of the newest ack: at most a few epochs (pause + ship + ack) on loopback
            assert 0 <= seconds < 0.5, (domain, seconds)

        # -- rates over the counters work (at least 3 scrapes in the window)
        epochs = by_domain(prom.wait_for(f'rate(cuju_epochs_committed_total{{instance="{a_target}"}}[4s])',
                                         lambda r: len(r) == 2 and all(value(x) > 0 for x in r), timeout=20))
        for domain, per_s in epochs.items():
            # an epoch is EPOCH_MS of running plus pause and ack: well above 5/s, below 1000/EPOCH_MS
            assert 5 < per_s <= 1000 / EPOCH_MS * 1.2, (domain, per_s)
        wire = by_domain(prom.query(f'rate(cuju_wire_bytes_total{{instance="{a_target}"}}[4s])'))
        for domain, bytes_per_s in wire.items():
            # every epoch carries the device-state blob, so the wire rate is at least that much
            assert bytes_per_s >= 0.8 * epochs[domain] * DEVICE_STATE, (domain, bytes_per_s, epochs[domain])
        # the backup counts the epochs it committed: the same rate, seen from the other host
        backup = by_domain(prom.wait_for(f'rate(cuju_epochs_committed_total{{instance="{b_target}"}}[4s])',
                                         lambda r: len(r) == 2, timeout=10))
        assert set(backup) == names and all(v > 0.5 * epochs[d] for d, v in backup.items()), backup
        pause = by_domain(prom.query(
            f'histogram_quantile(0.5, rate(cuju_epoch_pause_seconds_bucket{{instance="{a_target}"}}[4s]))'))
        assert set(pause) == names and all(0 < p < 0.1 for p in pause.values()), pause
        protected = by_domain(prom.query(f'cuju_ft_state{{state="protected", instance="{a_target}"}}'))
        assert protected == dict.fromkeys(names, 1.0)
        standby = by_domain(prom.query(f'cuju_ft_state{{state="standby", instance="{b_target}"}}'))
        assert standby == dict.fromkeys(names, 1.0)
        rtt = prom.wait_for('cuju_peer_heartbeat_rtt_seconds{peer="exporter-b"}',
                            lambda r: len(r) == 1 and 0 < value(r[0]) < 1, timeout=10)
        assert rtt[0]["metric"]["instance"] == a_target
        sync = by_domain(prom.query(f'cuju_initial_sync_progress_ratio{{instance="{a_target}"}}'))
        assert sync == dict.fromkeys(names, 1.0)
        # every query of the Grafana dashboard is valid PromQL and finds data
        for title, expr in dashboard_queries():
            assert prom.query(expr), f"dashboard panel {title!r}: no data for {expr}"

        # no alert while everything is healthy (the rules are loaded and evaluated)
        assert prom.query("ALERTS") == []

        # -- the backup host dies: its cujud stops and both receivers with it
        pair.b.stop()
        for load in loads:
            load.kill_backup()
        for load in loads:
            load.wait_state(FTState.DEGRADED, timeout=10)

        # the series say "unprotected" instead of vanishing
        degraded = prom.wait_for(f'cuju_ft_state{{state="degraded", instance="{a_target}"}} == 1',
                                 lambda r: len(r) == 2, timeout=15)
        assert {row["metric"]["domain"] for row in degraded} == names
        assert by_domain(prom.query(f'cuju_protected{{instance="{a_target}"}}')) == dict.fromkeys(names, 0.0)
        lag_after = by_domain(prom.query(f'cuju_replication_lag_seconds{{instance="{a_target}"}}'))
        assert set(lag_after) == names and all(math.isnan(v) for v in lag_after.values()), lag_after
        # the alert rule's own expression (packaging/prometheus/cuju-alerts.yml) finds both domains
        alert = prom.query(
            'max by (domain, uuid) (cuju_ft_state{state=~"unprotected|pairing|syncing|degraded"}) == 1')
        assert {row["metric"]["domain"] for row in alert} == names
        # the shipped rule itself (loaded into this Prometheus) goes pending for both domains
        pending = prom.wait_for('ALERTS{alertname="CujuDomainUnprotected", alertstate="pending"}',
                                lambda r: len(r) == 2, timeout=10)
        assert {row["metric"]["domain"] for row in pending} == names
        # the lag alert does not fire on NaN (the unprotected alert covers it)
        assert prom.query('max by (domain, uuid) (cuju_replication_lag_seconds{role="primary"}) > 1') == []
        # the peer: down, its last contact kept for the heartbeat alert
        assert by_domain_peer(prom.wait_for('cuju_peer_up{peer="exporter-b"}',
                                            lambda r: len(r) == 1 and value(r[0]) == 0, timeout=10)) == 0
        seen = prom.query('time() - cuju_peer_last_seen_timestamp_seconds{peer="exporter-b"}')
        assert len(seen) == 1 and 0 <= value(seen[0]) < 30
        assert prom.wait_for(f'up{{instance="{b_target}"}}', lambda r: len(r) == 1 and value(r[0]) == 0,
                             timeout=10)
        # counters kept their values (no reset, no vanishing): rate over the loss is still defined
        assert len(prom.query("cuju_epochs_committed_total")) == 2
        assert wait_until(lambda: all(load.error is not None for load in loads), timeout=1)


def by_domain_peer(rows: list[dict[str, object]]) -> float:
    assert len(rows) == 1
    return value(rows[0])


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the uffd tracker attaches to QEMU with ptrace)")
def test_prometheus_on_a_tcg_guest_protected_by_the_engine(base: Path, pair: CujudPair) -> None:
    """The epoch engine protects a real TCG guest; its DomainStats are what Prometheus sees."""
    cfg = WriterConfig()
    img = boot_image(cfg)
    a_target, b_target = pair.metrics_targets()
    with (
        DirectGuest(name="exporter-gp", memory_mib=64, disk=img) as primary,
        DirectGuest(name="exporter-gs", memory_mib=64, disk=img, incoming=True) as standby,
    ):
        primary.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        config = PrimaryConfig(ram_path=str(primary.ram_path), ram_size=primary.ram_size, tracker="auto",
                               epoch_ms=EPOCH_MS, output_commit=False, tag="exporter-prom")
        with protected_pair(primary, standby, config) as engines, \
                prometheus_for(base, [a_target, b_target]) as prom:
            pair.a.domains.add(engines.pstats, engines.pmachine)
            pair.b.domains.add(engines.bstats, engines.bmachine)
            lag = prom.wait_for('cuju_replication_lag_seconds{role="primary"}', lambda r: len(r) == 1,
                                timeout=20)
            assert 0 <= value(lag[0]) < 1.0, lag
            rate = prom.wait_for(f'rate(cuju_epochs_committed_total{{instance="{a_target}"}}[4s])',
                                 lambda r: len(r) == 1 and value(r[0]) > 0, timeout=20)
            assert 2 < value(rate[0]) <= 1000 / EPOCH_MS * 1.2, rate
            wire = prom.query(f'rate(cuju_wire_bytes_total{{instance="{a_target}"}}[4s])')
            assert len(wire) == 1 and value(wire[0]) > 0
            assert value(prom.query(f'cuju_ft_state{{state="protected", instance="{a_target}"}}')[0]) == 1
            assert value(prom.query(f'cuju_ft_state{{state="standby", instance="{b_target}"}}')[0]) == 1
            tracker = prom.query(f'cuju_tracker_info{{instance="{a_target}"}}')
            assert len(tracker) == 1 and tracker[0]["metric"]["tracker"] in ("uffd", "scan"), tracker
            buckets = f'cuju_epoch_pause_seconds_bucket{{instance="{a_target}"}}'
            pause = prom.query(f"histogram_quantile(0.5, rate({buckets}[4s]))")
            assert len(pause) == 1 and 0 < value(pause[0]) < 0.25, pause

            engines.backup.close()  # the backup goes away: the engine degrades, the VM runs on
            prom.wait_for(f'cuju_ft_state{{state="degraded", instance="{a_target}"}} == 1',
                          lambda r: len(r) == 1, timeout=20)
            lag_after = prom.query(f'cuju_replication_lag_seconds{{instance="{a_target}"}}')
            assert len(lag_after) == 1 and math.isnan(value(lag_after[0]))
            assert value(prom.query(f'cuju_protected{{instance="{a_target}"}}')[0]) == 0
