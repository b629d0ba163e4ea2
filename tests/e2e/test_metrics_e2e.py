"""cujud's metrics on the product path, read through a real Prometheus (issue 5, item 3).

The cuju hook and cujud run on both rig hosts; a protected boot-sector counter guest is
started with ``virsh start`` on host a. Debian's ``prometheus`` runs inside the rig's LAN
namespace (where both hosts' LAN addresses are reachable), scrapes both cujud every second
with the shipped alert rules loaded, and everything is judged through its HTTP API: while
protected, then after the backup's QEMU is killed, then after cujud re-protects the domain.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import METRICS_PORT, Cujud, cleanup_protected, protected_counter_xml
from cuju_libvirt.rig.guests import read_counter
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.prometheus import PrometheusServer, Result, prometheus_binary

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason="prometheus (Debian package 'prometheus') not installed")

NAME = "prom-vm"
MAC = "52:54:00:19:05:00"
EPOCH_MS = 20
#: The threshold of the shipped CujuReplicationLagHigh alert: a healthy pair stays below it.
#: (The newest acknowledged epoch is a few epochs old at most: 20 ms epochs, TCG pauses.)
LAG_BOUND = 1.0
#: Rate window: at least four 1 s scrapes.
WINDOW = "5s"
ALERT_RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus" / "cuju-alerts.yml"
ALERTS = {"CujuReplicationLagHigh", "CujuDomainUnprotected", "CujuFailoverHappened",
          "CujuPeerHeartbeatLost", "CujuExporterDown"}


@pytest.fixture
def prometheus(ft_rig: Rig, cujuds: tuple[Cujud, Cujud]) -> Iterator[PrometheusServer]:
    """Prometheus in the LAN namespace scraping both cujud (1 s), the alert rules loaded;
    its process and directory go away after the test, also when it fails."""
    targets = [f"{host.lan_address}:{METRICS_PORT}" for host in (ft_rig.a, ft_rig.b)]
    with tempfile.TemporaryDirectory(prefix="promrig-") as tmp, PrometheusServer(
        Path(tmp), targets, name="promrig-prometheus", scrape_interval=1.0, rule_files=[ALERT_RULES],
        node=ft_rig.lan,
    ) as prom:
        yield prom


def value(row: dict[str, object]) -> float:
    v = row["value"]
    assert isinstance(v, list)
    return float(v[1])


def one(result: Result) -> float:
    """The value of a query that must answer exactly one series."""
    assert len(result) == 1, result
    return value(result[0])


@pytest.mark.timeout(180)
def test_prometheus_follows_protection_backup_loss_and_reprotection(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud], prometheus: PrometheusServer
) -> None:
    rig, (ca, cb), prom = ft_rig, cujuds, prometheus
    a = f"{rig.a.lan_address}:{METRICS_PORT}"
    b = f"{rig.b.lan_address}:{METRICS_PORT}"
    on_a, on_b = f'domain="{NAME}",instance="{a}"', f'domain="{NAME}",instance="{b}"'
    t0 = time.monotonic()
    try:
        xml = protected_counter_xml(rig, counter_image, NAME, mac=MAC, epoch_ms=EPOCH_MS)
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", NAME)
        ca.wait_domain(NAME, "protected", timeout=60)
        cb.wait_domain(NAME, "standby", timeout=30)
        protected_at = time.monotonic()

        # -- protected: both cujud scraped; the shipped rules loaded and evaluating cleanly
        prom.wait_for('up{job="cujud"} == 1', lambda r: {x["metric"]["instance"] for x in r} == {a, b},
                      timeout=15)
        groups = prom.rules()
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) >= ALERTS, sorted(rules)
        assert all(rules[n]["health"] == "ok" for n in ALERTS), {n: rules[n].get("lastError") for n in ALERTS}

        # exactly one lag series of the primary for the domain, on host a, finite and sane
        lag = prom.wait_for(f'cuju_replication_lag_seconds{{domain="{NAME}",role="primary"}}',
                            lambda r: len(r) == 1 and math.isfinite(value(r[0])), timeout=15)
        assert lag[0]["metric"]["instance"] == a, lag
        assert 0 <= value(lag[0]) < LAG_BOUND, lag
        # The rate of a window that lies wholly in protected time: one reaching back into the
        # initial sync (no epochs yet) reads low for no fault of the epochs. Every scrape of
        # the window says "protected", and there are enough of them for a rate.
        prom.wait_for(f"min_over_time(cuju_protected{{{on_a}}}[{WINDOW}]) == 1 "
                      f"and count_over_time(cuju_protected{{{on_a}}}[{WINDOW}]) >= 4",
                      lambda r: len(r) == 1, timeout=30)
        # the scraped counter itself (rate() would extrapolate to the window's edges)
        (series,) = prom.query(f"cuju_epochs_committed_total{{{on_a}}}[{WINDOW}]")
        samples = series["values"]
        assert isinstance(samples, list) and len(samples) >= 4, series
        (first_t, first), (last_t, last) = samples[0], samples[-1]
        epochs = (float(last) - float(first)) / (float(last_t) - float(first_t))
        # an epoch is 20 ms of running plus pause and acknowledgement: between 1/s and 1000/EPOCH_MS
        assert 1 < epochs <= 1000 / EPOCH_MS, samples
        wire = one(prom.query(f"rate(cuju_wire_bytes_total{{{on_a}}}[{WINDOW}])"))
        assert wire > 0
        assert one(prom.query(f'cuju_ft_state{{{on_a},state="protected"}}')) == 1
        assert one(prom.query(f'cuju_ft_state{{{on_b},state="standby"}}')) == 1
        assert one(prom.query(f"cuju_protected{{{on_a}}}")) == 1
        assert one(prom.query(f"sum(cuju_ft_state{{{on_a}}})")) == 1  # one state at a time
        # nothing fires while the pair is healthy: a rule evaluated (every 1 s) while the domain
        # was still syncing may show 'pending' until the next evaluation, then nothing
        prom.wait_for("ALERTS", lambda r: r == [], timeout=5)
        healthy_s = time.monotonic() - protected_at

        # -- host b's cujud stops (its standby goes with it): the primary's series stay and
        #    say that the domain is unprotected, while the VM runs on
        stopped_at = time.monotonic()
        cb.stop()
        unprotected = prom.wait_for(f'cuju_ft_state{{{on_a},state=~"degraded|unprotected"}} == 1',
                                    lambda r: len(r) == 1, timeout=20)
        assert one(prom.query(f"cuju_protected{{{on_a}}}")) == 0
        assert math.isnan(one(prom.query(f'cuju_replication_lag_seconds{{{on_a},role="primary"}}')))
        assert one(prom.query(f'cuju_ft_state{{{on_a},state="protected"}}')) == 0
        assert one(prom.query(f"sum(cuju_ft_state{{{on_a}}})")) == 1
        # the shipped rule notices (pending: it fires only after 2 min)
        prom.wait_for(f'ALERTS{{alertname="CujuDomainUnprotected",domain="{NAME}",alertstate="pending"}}',
                      lambda r: len(r) == 1, timeout=10)
        # no scrape of host a since before the stop lacked the domain's series
        since = f"{math.ceil(time.monotonic() - stopped_at) + 3}s"
        scrapes = one(prom.query(f'count_over_time(up{{instance="{a}"}}[{since}])'))
        assert scrapes >= 3
        for metric in ("cuju_protected", "cuju_replication_lag_seconds", "cuju_epochs_committed_total"):
            samples = one(prom.query(f"count_over_time({metric}{{{on_a}}}[{since}])"))
            assert samples == scrapes, (metric, samples, scrapes)
        assert rig.a.virsh("domstate", NAME).strip() != "shut off"
        ram = rig.a.ram_files(NAME)[0]
        before = read_counter(ram)
        time.sleep(1.0)
        assert read_counter(ram) > before, "the unprotected VM on host a stopped counting"

        # -- host b's cujud is back: cujud pairs the domain with a new standby, epochs flow again
        cb.start()
        prom.wait_for(f'cuju_ft_state{{{on_a},state="protected"}} == 1', lambda r: len(r) == 1, timeout=60)
        reprotected_s = time.monotonic() - stopped_at
        prom.wait_for(f'cuju_ft_state{{{on_b},state="standby"}} == 1', lambda r: len(r) == 1, timeout=15)
        lag = prom.wait_for(f'cuju_replication_lag_seconds{{domain="{NAME}",role="primary"}}',
                            lambda r: len(r) == 1 and math.isfinite(value(r[0])), timeout=15)
        assert lag[0]["metric"]["instance"] == a and 0 <= value(lag[0]) < LAG_BOUND, lag
        prom.wait_for(f"increase(cuju_epochs_committed_total{{{on_a}}}[3s])",
                      lambda r: len(r) == 1 and value(r[0]) > 0, timeout=10)
        assert one(prom.query(f"cuju_protected{{{on_a}}}")) == 1
        print(f"healthy checks {healthy_s:.1f} s; {unprotected[0]['metric']['state']} after the stop, "
              f"re-protected {reprotected_s:.1f} s after it; total {time.monotonic() - t0:.1f} s")
    finally:
        cleanup_protected(rig, NAME)
