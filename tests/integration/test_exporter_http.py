"""The exporter's HTTP side: served by a real cujud process on metrics_listen, clear errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cuju_libvirt.cujud.exporter import CujuCollector, MetricsServer, ProtectedDomains
from cuju_libvirt.errors import ConfigError
from cuju_libvirt.ft_engine.stats import DomainStats
from tests.integration.metrics_support import PSK, free_port, workdir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def base() -> Iterator[Path]:
    with workdir() as path:
        yield path


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def test_server_serves_the_collector_and_stops() -> None:
    domains = ProtectedDomains()
    domains.add(DomainStats("web", "u-1", "primary"))
    server = MetricsServer("127.0.0.1", 0, CujuCollector(domains))
    try:
        names = {f.name for f in text_string_to_metric_families(fetch(server.url))}
        assert {"cuju_replication_lag_seconds", "cuju_ft_state", "cuju_build_info"} <= names
        domains.remove("u-1")
        assert "cuju_ft_state{" not in fetch(server.url)  # read at scrape time, not cached
    finally:
        server.close()
    with pytest.raises(OSError):
        fetch(server.url)


def test_address_in_use_names_the_key() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics_listen 127\.0\.0\.1:{port}: cannot listen"):
            MetricsServer("127.0.0.1", port, CujuCollector(ProtectedDomains()))


def test_real_cujud_serves_metrics_on_metrics_listen(base: Path) -> None:
    port = free_port()
    (base / "psk").write_bytes(PSK)
    (base / "psk").chmod(0o600)

    def write_config(name: str) -> Path:
        path = base / f"{name}.yaml"
        path.write_text(
            f"node_name: {name}\nlisten: 127.0.0.1:{free_port()}\nft_listen: 127.0.0.1:{free_port()}\n"
            f"metrics_listen: 127.0.0.1:{port}\npeers:\n  exporter-other: 127.0.0.1:{free_port()}\n"
            f"psk_file: {base / 'psk'}\nrun_dir: {base / name}\ncontrol_socket: {base / name / 'sock'}\n"
            f"state_dir: {base / 'state'}\nlibvirt_uri: test:///default\n"
        )
        return path

    config = write_config("exporter-solo")
    proc = subprocess.Popen([sys.executable, "-m", "cuju_libvirt.cujud.daemon", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = ""
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                text = fetch(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                time.sleep(0.1)
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        # the configured peer is there from the start, down, with no last contact yet
        assert samples["cuju_peer_up"].labels == {"peer": "exporter-other"}
        assert samples["cuju_peer_up"].value == 0.0
        assert "cuju_peer_last_seen_timestamp_seconds" not in samples
        assert samples["cuju_build_info"].value == 1.0

        # a second cujud on the same metrics port refuses to start and says which key to change
        other = subprocess.run(
            [sys.executable, "-m", "cuju_libvirt.cujud.daemon",
             "--config", str(write_config("exporter-two"))],
            capture_output=True, text=True, timeout=30, check=False)
        assert other.returncode == 1
        assert f"metrics_listen 127.0.0.1:{port}: cannot listen" in other.stderr, other.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
