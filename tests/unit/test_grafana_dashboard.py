"""The Grafana dashboard is valid JSON and queries only what the exporter exports (alert rules too)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cuju_libvirt.cujud.exporter import CujuCollector, PeerSample, ProtectedDomains, render
from cuju_libvirt.ft_engine.stats import DomainStats

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "cuju-libvirt.json"
RULES = ROOT / "packaging" / "prometheus" / "cuju-alerts.yml"
NAME = re.compile(r"\bcuju_[a-z_]+\b")


class Peers:
    def peer_samples(self) -> list[PeerSample]:
        return [PeerSample("b", True, 0.001, 1.0)]


def exported_names() -> set[str]:
    """Every sample name a scrape returns for one fully fed domain and one peer."""
    domains = ProtectedDomains()
    st = DomainStats("web", "u-1", "primary", peer="b", tracker="uffd", epoch_ms=20)
    st.record_epoch(pause_s=0.003, dirty_pages=10, device_state_bytes=1)
    st.record_ack(epoch=1, epoch_end=st.clock(), pages=1, wire_bytes=1, saved_bytes=1)
    st.record_failover(0.5)
    domains.add(st)
    text = render(CujuCollector(domains, Peers()))
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_is_valid_and_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "cuju-libvirt" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    used = {n for expr in queries(dash) for n in NAME.findall(expr)}
    exported = exported_names()
    assert used <= exported, sorted(used - exported)
    # the series the issue asks for are all on it
    for wanted in ("cuju_replication_lag_seconds", "cuju_epoch_pause_seconds_bucket",
                   "cuju_epoch_dirty_pages_bucket", "cuju_wire_bytes_total", "cuju_ft_state",
                   "cuju_failovers_total", "cuju_peer_heartbeat_rtt_seconds", "cuju_epochs_committed_total"):
        assert wanted in used, wanted


def test_alert_rules_query_only_exported_metrics() -> None:
    used = set(NAME.findall(RULES.read_text()))
    assert {"cuju_replication_lag_seconds", "cuju_ft_state", "cuju_failovers_total",
            "cuju_peer_last_seen_timestamp_seconds"} <= used
    assert used <= exported_names(), sorted(used - exported_names())


def test_the_check_catches_an_unknown_name() -> None:
    """A dashboard querying a name the exporter does not export must fail the check above."""
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"][1]["targets"].append({"expr": "rate(cuju_replication_lag_ms[5m])"})
    used = {n for expr in queries(dash) for n in NAME.findall(expr)}
    assert used - exported_names() == {"cuju_replication_lag_ms"}
