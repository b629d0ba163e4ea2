"""``cuju-libvirt status`` against a running cujud whose domain is fed by a real replication session."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.ft_engine.state import FTState
from cuju_libvirt.rig.replication_load import ReplicationLoad
from tests.integration.metrics_support import cujud_pair, wait_until, workdir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def base() -> Iterator[Path]:
    with workdir() as path:
        yield path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cuju_libvirt.cli", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def test_status_json_and_table(base: Path) -> None:
    with cujud_pair(base) as pair, ReplicationLoad(base, "exporter-vm", "u-vm", peer=pair.names[1]) as load:
        pair.a.domains.add(load.stats, load.machine)
        sock = str(pair.a.cfg.control_socket)
        out = cli("status", "--json", "--socket", sock)
        assert out.returncode == 0, out.stderr
        before = json.loads(out.stdout)["domains"]
        assert [(d["domain"], d["state"], d["protected"], d["lag_s"]) for d in before] == [
            ("exporter-vm", "unprotected", False, None)]
        load.start()

        def rate_known() -> bool:
            with ControlClient(pair.a.cfg.control_socket) as c:
                d = c.call("status")["domains"][0]
            return d["epochs_per_s"] is not None and d["epochs_per_s"] > 0

        assert wait_until(rate_known, timeout=10)
        out = cli("status", "--json", "--socket", sock)
        status = json.loads(out.stdout)
        (d,) = status["domains"]
        assert (d["role"], d["peer"], d["state"]) == ("primary", "exporter-b", "protected")
        assert d["protected"] is True
        assert 5 < d["epochs_per_s"] < 60 and 0 <= d["lag_s"] < 0.5 and d["initial_sync_ratio"] == 1.0
        assert d["failovers"] == 0 and d["epochs_committed"] > 0
        assert d["disk_sync"] == []  # a diskless guest; the disk data path fills it per disk

        table = cli("status", "--socket", sock)
        assert table.returncode == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if line.startswith("exporter-vm"))
        assert row.split()[:4] == ["exporter-vm", "primary", "exporter-b", "protected"]

        # --watch: one JSON line per round until interrupted
        argv = [sys.executable, "-m", "cuju_libvirt.cli", "status", "--json", "--watch", "0.2",
                "--socket", sock]
        watch = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert watch.stdout is not None
            rounds = [json.loads(watch.stdout.readline()) for _ in range(3)]
        finally:
            watch.kill()
            watch.wait(10)
            assert watch.stdout is not None
            watch.stdout.close()
        committed = [r["domains"][0]["epochs_committed"] for r in rounds]
        assert committed == sorted(committed) and committed[-1] > committed[0]

        load.kill_backup()
        load.wait_state(FTState.DEGRADED, timeout=10)
        row = next(line for line in cli("status", "--socket", sock).stdout.splitlines()
                   if line.startswith("exporter-vm"))
        assert "degraded (UNPROTECTED)" in row


def test_status_when_cujud_is_not_running(base: Path) -> None:
    out = cli("status", "--socket", str(base / "nothing.sock"))
    assert out.returncode == 1
    assert out.stderr.startswith("cuju-libvirt: cujud is not running: no socket at")
    assert "Traceback" not in out.stderr
