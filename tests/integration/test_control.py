"""The local control socket on real UNIX sockets: dispatch, errors, permissions, credentials."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.cujud.control import MAX_LINE, ControlClient, ControlServer
from cuju_libvirt.errors import ConfigError, ControlError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def rundir() -> Iterator[Path]:
    # not under pytest's tmp_path (mode 0700): the credential test connects as 'nobody'
    path = Path(tempfile.mkdtemp(prefix="daemon-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bad_config(_p: dict[str, object]) -> dict[str, object]:
    raise ConfigError("node_name: not set; add it to /etc/cuju-libvirt/cujud.yaml")


def crash(_p: dict[str, object]) -> dict[str, object]:
    raise ZeroDivisionError("bug")


def slow(_p: dict[str, object]) -> dict[str, object]:
    time.sleep(1.0)
    return {}


@pytest.fixture
def server(rundir: Path) -> Iterator[ControlServer]:
    srv = ControlServer(rundir / "sub" / "cujud.sock", {
        "ping": lambda p: {"pong": p.get("x")},
        "refuse": bad_config,
        "crash": crash,
        "slow": slow,
    })
    yield srv
    srv.close()


def raw_exchange(path: Path, data: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        return json.loads(s.makefile("rb").readline())  # type: ignore[no-any-return]


def test_socket_mode_and_round_trips(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    with ControlClient(server.path) as client:
        assert client.call("ping", {"x": 1}) == {"pong": 1}
        assert client.call("ping", {"x": "again"}) == {"pong": "again"}  # same connection


def test_error_answers(server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cuju_libvirt.cujud.control")
    with ControlClient(server.path) as client:
        with pytest.raises(ControlError, match="has no method 'nope' \\(it has: crash, ping") as info:
            client.call("nope")
        assert info.value.code == "unknown-method"
        with pytest.raises(ControlError, match="node_name: not set") as info:
            client.call("refuse")
        assert info.value.code == "refused"
        with pytest.raises(ControlError, match="internal error in 'crash'") as info:
            client.call("crash")
        assert info.value.code == "internal"
        assert client.call("ping", {"x": 2}) == {"pong": 2}  # the server survived
    summary = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(summary) == 1 and "ZeroDivisionError" not in summary[0].getMessage()
    assert "control method 'crash': bug" in summary[0].getMessage()
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b'{"v": 2, "id": 1, "method": "ping"}\n', "unsupported-version"),
        (b"not json\n", "bad-request"),
        (b"[1, 2]\n", "bad-request"),
        (b'{"v": 1, "id": 1, "method": 3}\n', "bad-request"),
        (b'{"v": 1, "id": 1, "method": "ping", "params": []}\n', "bad-request"),
    ],
)
def test_malformed_requests(server: ControlServer, line: bytes, code: str) -> None:
    reply = raw_exchange(server.path, line)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code  # type: ignore[index]


def test_oversized_line(server: ControlServer) -> None:
    reply = raw_exchange(server.path, b"x" * (MAX_LINE + 100))
    assert reply["error"]["code"] == "bad-request"  # type: ignore[index]
    assert "longer than" in reply["error"]["message"]  # type: ignore[index]


def test_client_timeout(server: ControlServer) -> None:
    with ControlClient(server.path, timeout=0.2) as client, \
            pytest.raises(ControlError, match=r"did not answer 'slow' within 0\.2 s"):
        client.call("slow")


def test_not_running_messages(rundir: Path) -> None:
    path = rundir / "cujud.sock"
    with pytest.raises(ControlError, match=f"cujud is not running: no socket at {path}; start it with"):
        ControlClient(path).call("ping")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with pytest.raises(ControlError, match="stale socket nobody listens on; start it with"):
        ControlClient(path).call("ping")


def test_stale_socket_is_replaced_live_one_is_not(rundir: Path) -> None:
    path = rundir / "cujud.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    first = ControlServer(path, {"ping": lambda p: {}})
    try:
        assert ControlClient(path).call("ping") == {}
        with pytest.raises(ControlError, match="another cujud is already running"):
            ControlServer(path)
        assert ControlClient(path).call("ping") == {}  # the running one was left alone
    finally:
        first.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(path)


def test_close_removes_only_its_own_socket(rundir: Path) -> None:
    path = rundir / "cujud.sock"
    srv = ControlServer(path)
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))  # someone else's socket now at the path
    try:
        srv.close()
        assert path.exists()
    finally:
        other.close()


# the test's own interpreter may live where 'nobody' cannot run it (e.g. under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_non_root_peer_is_refused_by_credentials(server: ControlServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.control")
    server.path.parent.chmod(0o755)
    server.path.chmod(0o666)  # let the file system allow it: SO_PEERCRED must still refuse
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(server.path)!r})\n"
        "try:\n"
        "    s.sendall(b'{\"v\":1,\"id\":1,\"method\":\"ping\"}\\n')\n"
        "except BrokenPipeError:\n"  # the server may refuse (and close) before we send
        "    pass\n"
        "sys.stdout.write(s.makefile().readline())\n"
    )
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", code], user=65534, group=65534, capture_output=True,
                         text=True, timeout=20, check=True).stdout
    reply = json.loads(out)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "permission-denied"
    assert "uid 65534" in reply["error"]["message"]
    assert "refused pid" in caplog.text and "uid 65534" in caplog.text


def test_socket_not_accessible_to_others_by_mode(server: ControlServer) -> None:
    # 0600 root: the file system alone already keeps other users out
    assert os.stat(server.path).st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(server.path).st_mode) & 0o077 == 0
