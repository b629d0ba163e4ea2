"""Fixtures for the exporter's tests: in-process cujud pairs, a Prometheus server, replication loads.

Structured so a later test can swap the source of the statistics: whatever protects a
domain (today :class:`~cuju_libvirt.rig.replication_load.ReplicationLoad`, later the
orchestration with a TCG guest) registers its ``DomainStats`` with ``Daemon.domains``;
:class:`CujudPair` and :func:`prometheus_for` do not care who that is.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cuju_libvirt import config
from cuju_libvirt.cujud.daemon import Daemon
from cuju_libvirt.rig.prometheus import PrometheusServer

ALERT_RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus" / "cuju-alerts.yml"
PSK = b"exporter-test-key-" + b"k" * 32 + b"\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="exporter-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(base: Path, name: str, ports: dict[str, int], peers: dict[str, int]) -> config.Config:
    """A cujud configuration on loopback with fast heartbeats; ``ports``: listen, ft, metrics."""
    home = base / name
    home.mkdir()
    psk = home / "psk"
    psk.write_bytes(PSK)
    psk.chmod(0o600)
    peer_lines = "".join(f"  {n}: 127.0.0.1:{p}\n" for n, p in peers.items()) or "  {}\n"
    text = (
        f"node_name: {name}\nlisten: 127.0.0.1:{ports['listen']}\nft_listen: 127.0.0.1:{ports['ft']}\n"
        f"metrics_listen: 127.0.0.1:{ports['metrics']}\npeers:\n{peer_lines}psk_file: {psk}\n"
        f"run_dir: {home / 'run'}\ncontrol_socket: {home / 'run' / 'cujud.sock'}\n"
        f"state_dir: {home / 'state'}\nlibvirt_uri: test:///default\nheartbeat_interval: 0.1\n"
        "peer_timeout: 3.0\nreconnect_min: 0.1\nreconnect_max: 0.5\n"
    )
    if not peers:
        text = text.replace("peers:\n  {}\n", "peers: {}\n")
    (home / "cujud.yaml").write_text(text)
    return config.load(home / "cujud.yaml", home / "cujud.d")


class CujudPair:
    """Two cujud daemons in this process (``a`` dials ``b``), each with its exporter."""

    def __init__(self, base: Path, names: tuple[str, str] = ("exporter-a", "exporter-b")) -> None:
        self.names = names
        ports = {n: {"listen": free_port(), "ft": free_port(), "metrics": free_port()} for n in names}
        a, b = names
        self.a = Daemon(make_config(base, a, ports[a], {b: ports[b]["listen"]}), PSK.strip())
        self.b = Daemon(make_config(base, b, ports[b], {a: ports[a]["listen"]}), PSK.strip())

    def start(self) -> None:
        self.b.start()
        self.a.start()

    def metrics_targets(self) -> list[str]:
        return [f"127.0.0.1:{d.cfg.metrics_listen.port}" for d in (self.a, self.b)]

    def close(self) -> None:
        for d in (self.a, self.b):
            if not d.stopping.is_set():
                d.stop()


@contextmanager
def cujud_pair(base: Path) -> Iterator[CujudPair]:
    pair = CujudPair(base)
    try:
        pair.start()
        yield pair
    finally:
        pair.close()


@contextmanager
def prometheus_for(base: Path, targets: list[str]) -> Iterator[PrometheusServer]:
    with PrometheusServer(base, targets, name="exporter-prometheus", scrape_interval=1.0,
                          rule_files=[ALERT_RULES]) as prom:
        yield prom


def value(row: dict[str, object]) -> float:
    """The float value of one instant-query row ('NaN' included)."""
    v = row["value"]
    assert isinstance(v, list)
    return float(v[1])


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "cuju-libvirt.json"
#: Grafana's variables as a test substitutes them (every domain and cujud, short windows).
GRAFANA_VARIABLES = {"$domain": ".*", "$instance": ".*", "$__rate_interval": "4s", "$__range": "1m"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the Grafana dashboard, variables substituted."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, val in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, val)
            out.append((panel["title"], expr))
    return out
