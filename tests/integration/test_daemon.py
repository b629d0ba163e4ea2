"""Two real cujud processes on loopback: control socket, authenticated peer channel,
heartbeats, wrong-key rejection, configuration errors, and clean shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.errors import ControlError
from cuju_libvirt.rig.pki import PKI, HostCredentials, PKIUnavailable

pytestmark = pytest.mark.timeout(60)

VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else "/usr/bin/env python3"
KEY_A = b"daemon-test-key-" + b"a" * 32 + b"\n"
KEY_B = b"daemon-test-key-" + b"b" * 32 + b"\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="daemon-cujud-"))
    yield path
    if not os.environ.get("DAEMON_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


class Cujud:
    """One cujud process, started from a launcher script whose name is its process name."""

    def __init__(self, workdir: Path, name: str, key: bytes, peers: dict[str, int], port: int, *,
                 log_level: str = "DEBUG", extra: str = "") -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        self.run_dir = self.dir / "run"
        self.socket = self.run_dir / "cujud.sock"
        psk = self.dir / "psk"
        psk.write_bytes(key)
        psk.chmod(0o600)
        peer_lines = "".join(f"  {n}: 127.0.0.1:{p}\n" for n, p in peers.items())
        self.config = self.dir / "cujud.yaml"
        self.config.write_text(
            f"node_name: {name}\nlisten: 127.0.0.1:{port}\nft_listen: 127.0.0.1:{free_port()}\n"
            f"metrics_listen: 127.0.0.1:{free_port()}\n"
            f"peers:\n{peer_lines}psk_file: {psk}\nrun_dir: {self.run_dir}\n"
            f"control_socket: {self.socket}\nstate_dir: {self.dir / 'state'}\n"
            f"libvirt_uri: test:///default\nlog_level: {log_level}\nheartbeat_interval: 0.05\n"
            "peer_timeout: 1.0\nreconnect_min: 0.1\nreconnect_max: 0.5\n" + extra
        )
        self.launcher = self.dir / f"daemon-cujud-{name}"  # the process shows under this name
        self.launcher.write_text(
            f"#!{PYTHON}\nimport sys\nfrom cuju_libvirt.cujud.daemon import main\nsys.exit(main())\n"
        )
        self.launcher.chmod(0o755)
        self.log = self.dir / "cujud.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([str(self.launcher), "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                ControlClient(self.socket, timeout=2).call("ping")
                return
            except ControlError:
                time.sleep(0.05)
        raise AssertionError(f"cujud {self.name} not ready:\n{self.log.read_text()}")

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        with ControlClient(self.socket, timeout=5) as client:
            return client.call(method, params)

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def pair(workdir: Path) -> Iterator[tuple[Cujud, Cujud]]:
    pa, pb = free_port(), free_port()
    a = Cujud(workdir, "a", KEY_A, {"b": pb}, pa)
    b = Cujud(workdir, "b", KEY_A, {"a": pa}, pb)
    yield a, b
    a.kill()
    b.kill()


def peer_status(d: Cujud, name: str) -> dict[str, Any]:
    peers = d.call("peers")["peers"]
    return next(p for p in peers if p["node"] == name)  # type: ignore[no-any-return]


def wait_until(cond: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_two_daemons_ping_heartbeat_and_clean_shutdown(pair: tuple[Cujud, Cujud], workdir: Path) -> None:
    a, b = pair
    notify = workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready_sock:
        ready_sock.bind(str(notify))
        ready_sock.settimeout(20)
        b.start()
        a.start(env={"NOTIFY_SOCKET": str(notify)})
        assert ready_sock.recv(100) == b"READY=1"  # systemd Type=notify readiness
        a.wait_ready()
        b.wait_ready()
        assert oct(a.socket.stat().st_mode & 0o777) == "0o600"

        assert wait_until(lambda: peer_status(a, "b")["connected"] and peer_status(b, "a")["connected"])
        assert peer_status(a, "b")["role_in_connection"] == "dials"  # 'a' sorts first
        assert peer_status(b, "a")["role_in_connection"] == "accepts"

        pong = a.call("peer-ping", {"peer": "b"})
        assert pong["peer"] == "b"
        assert 0 < pong["rtt_ms"] < 1000
        assert b.call("peer-ping", {"peer": "a"})["peer"] == "a"

        # heartbeats flow both ways and their round trip is measured
        assert wait_until(lambda: peer_status(a, "b")["heartbeats_acked"] >= 10)
        hb = peer_status(b, "a")
        assert hb["heartbeats_acked"] >= 5
        assert 0 < hb["rtt_min_ms"] <= hb["rtt_mean_ms"] < 1000
        assert hb["rtt_min_ms"] <= hb["rtt_last_ms"]
        assert hb["last_seen_s_ago"] < 1.0

        version = a.call("version")
        assert version["features"]["peer_channel"] is True
        assert version["features"]["protection"] is True
        status = a.call("status")
        assert "disk writes" in status["protection"] and status["domains"] == []
        assert wait_until(lambda: a.call("status")["libvirt"]["state"] == "connected")
        cfg = a.call("config")
        assert cfg["values"]["node_name"] == "a" and cfg["sources"]["node_name"] == str(a.config)
        with pytest.raises(ControlError, match="no peer named 'zz'"):
            a.call("peer-ping", {"peer": "zz"})

        # a second cujud with the same configuration refuses to start and harms nothing
        second = run_cujud("--config", str(a.config))
        assert second.returncode == 1
        assert "another cujud is already running: it answers on" in second.stderr
        assert a.call("ping")["node"] == "a" and a.socket.exists()

        # b goes away: a notices within peer_timeout, then b returns and a re-dials
        assert b.terminate() == 0
        assert wait_until(lambda: not peer_status(a, "b")["connected"], timeout=5)
        assert wait_until(lambda: "INFO cuju_libvirt.cujud.daemon: peer b left: the peer closed the "
                          "connection: cujud is shutting down" in a.text())
        with pytest.raises(ControlError, match="peer b is not connected"):
            a.call("peer-ping", {"peer": "b"})
        b.start()
        b.wait_ready()
        assert wait_until(lambda: peer_status(a, "b")["connected"], timeout=10)
        assert a.call("peer-ping", {"peer": "b"})["peer"] == "b"

        assert a.terminate(signal.SIGINT) == 0
        assert b.terminate() == 0
    assert not a.run_dir.exists() and not b.run_dir.exists()  # sockets and run dirs removed
    assert "Traceback" not in a.text() + b.text()
    assert "peer a at 127.0.0.1:" in b.text() and "authenticated" in b.text()
    assert "cujud stopped" in a.text()
    with pytest.raises(ControlError, match=f"cujud is not running: no socket at {a.socket}"):
        a.call("ping")


def test_wrong_key_is_rejected_and_logged(workdir: Path) -> None:
    pa, pb = free_port(), free_port()
    a = Cujud(workdir, "a", KEY_A, {"b": pb}, pa)
    b = Cujud(workdir, "b", KEY_B, {"a": pa}, pb)
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        assert wait_until(lambda: "the pre-shared keys differ" in b.text() and "pre-shared key" in a.text())
        assert "peer 127.0.0.1:" in b.text()  # the address of the rejected client
        assert not peer_status(a, "b")["connected"] and not peer_status(b, "a")["connected"]
        assert "pre-shared key" in peer_status(a, "b")["last_error"]
        time.sleep(0.5)  # a keeps retrying with backoff, and keeps failing
        assert not peer_status(b, "a")["connected"]
        assert a.terminate() == 0 and b.terminate() == 0
        assert not a.run_dir.exists() and not b.run_dir.exists()
    finally:
        a.kill()
        b.kill()


def run_cujud(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cuju_libvirt.cujud.daemon", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_print_config_and_config_errors(workdir: Path) -> None:
    a = Cujud(workdir, "a", KEY_A, {"b": 7790}, free_port())
    out = run_cujud("--config", str(a.config), "--print-config")
    assert out.returncode == 0, out.stderr
    assert f"node_name: a  # {a.config}" in out.stdout
    assert "metrics_listen: '127.0.0.1:" in out.stdout and "request_timeout: 10.0  # default" in out.stdout

    (a.dir / "cujud.d").mkdir()
    (a.dir / "cujud.d" / "50-typo.yaml").write_text("heartbeat_intervall: 1\n")
    out = run_cujud("--config", str(a.config), "--print-config")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0  # one line, no traceback
    assert "50-typo.yaml: unknown key 'heartbeat_intervall': did you mean 'heartbeat_interval'?" in out.stderr

    missing = run_cujud("--config", str(workdir / "nope.yaml"))
    assert missing.returncode == 1 and "nope.yaml does not exist" in missing.stderr


def test_world_readable_psk_is_refused_with_the_fix(workdir: Path) -> None:
    a = Cujud(workdir, "a", KEY_A, {}, free_port())
    (a.dir / "psk").chmod(0o644)
    out = run_cujud("--config", str(a.config))
    assert out.returncode == 1
    assert f"chmod 600 {a.dir / 'psk'}" in out.stderr and "Traceback" not in out.stderr
    assert not a.run_dir.exists()
    (a.dir / "psk").chmod(0o600)
    ok = run_cujud("--config", str(a.config), "--check-config")
    assert ok.returncode == 0 and "configuration OK" in ok.stdout


def test_address_in_use_fails_cleanly(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        a = Cujud(workdir, "a", KEY_A, {}, busy.getsockname()[1], log_level="INFO")
        out = run_cujud("--config", str(a.config))
    assert out.returncode == 1
    assert "cujud could not start: cannot listen on 127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr
    assert not a.run_dir.exists()  # the control socket it had created is gone again


def tls_config(creds: HostCredentials) -> str:
    return (f"peer_tls: 'on'\ntls_ca_file: {creds.ca_file}\ntls_cert_file: {creds.cert_file}\n"
            f"tls_key_file: {creds.key_file}\n")


def test_two_daemons_over_mutual_tls_and_a_plain_peer_refused(workdir: Path) -> None:
    try:
        pki = PKI(workdir / "pki")
    except PKIUnavailable as err:
        pytest.skip(str(err))
    pa, pb = free_port(), free_port()
    a = Cujud(workdir, "a", KEY_A, {"b": pb}, pa, extra=tls_config(pki.host("a")))
    b = Cujud(workdir, "b", KEY_A, {"a": pa}, pb, extra=tls_config(pki.host("b")))
    plain = Cujud(workdir, "b-plain", KEY_A, {"a": pa}, pb)  # b again, without TLS
    plain.config.write_text(plain.config.read_text().replace("node_name: b-plain", "node_name: b"))
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        assert wait_until(lambda: peer_status(a, "b")["connected"] and peer_status(b, "a")["connected"])
        assert peer_status(a, "b")["security"].startswith("TLS (TLSv1.3, certificates)")
        assert a.call("peer-ping", {"peer": "b"})["peer"] == "b"
        assert a.call("config")["values"]["peer_tls"] == "on"
        assert "(mutual TLS 1.3)" in a.text()
        assert b.terminate() == 0
        # b comes back without TLS (same PSK as before): a refuses it, and b says why
        plain.start()
        plain.wait_ready()
        assert wait_until(lambda: "the peer speaks TLS and this host does not" in plain.text())
        assert wait_until(lambda: "is it configured with peer_tls: on?" in a.text())
        assert not peer_status(a, "b")["connected"]
        assert "NOT encrypted" in plain.text()
    finally:
        for d in (a, b, plain):
            d.kill()
    assert "Traceback" not in a.text()


def test_tls_on_without_certificates_names_the_key_and_the_fix(workdir: Path) -> None:
    a = Cujud(workdir, "a", KEY_A, {}, free_port(),
              extra=f"peer_tls: 'on'\ntls_ca_file: {workdir / 'missing-ca.pem'}\n")
    done = run_cujud("--config", str(a.config), "--check-config")
    assert done.returncode == 1
    assert "tls_ca_file" in done.stderr and "does not exist" in done.stderr and "peer_tls: off" in done.stderr
