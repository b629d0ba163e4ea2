"""QMPClient protocol handling against a scripted QMP server on a real UNIX socket.

The real-QEMU behaviour is in tests/integration/test_qmp.py; here the server is scripted so
that error paths (stale replies, malformed data, disconnects, event overflow) are exact.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cuju_libvirt.errors import CujuError, MonitorError, ReplicationError, StateError, caused_by
from cuju_libvirt.qmp import QMPClient, QMPConnectionError, QMPError, QMPTimeoutError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": ["oob"]}}

# A handler gets (request, connection, fds received with it) and returns messages to send, or None to
# hang up.
Handler = Callable[[dict[str, Any], socket.socket, list[int]], list[Any] | None]


class ScriptedServer:
    def __init__(self, path: Path, handler: Handler, greeting: Any = GREETING) -> None:
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(json.dumps(self.greeting).encode() + b"\r\n")
            buf = b""
            while True:
                data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    request = json.loads(line)
                    self.requests.append(request)
                    if request["execute"] == "qmp_capabilities":
                        replies: list[Any] | None = [{"return": {}, "id": request["id"]}]
                    else:
                        replies = self.handler(request, conn, fds)
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    if replies is None:
                        return
                    for reply in replies:
                        raw = reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\r\n"
                        conn.sendall(raw)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(handler: Handler, greeting: Any = GREETING) -> ScriptedServer:
        server = ScriptedServer(tmp_path / f"qmp{len(servers)}.sock", handler, greeting)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def event(name: str, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}}


def test_execute_returns_value_and_buffers_preceding_events(serve: Callable[..., ScriptedServer]) -> None:
    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        return [event("STOP"), {"return": {"status": "paused"}, "id": req["id"]}]

    server = serve(handler)
    with QMPClient(server.path) as qmp:
        assert qmp.greeting["version"]["qemu"]["major"] == 7
        assert qmp.execute("query-status") == {"status": "paused"}
        assert qmp.execute("stop", {"x": 1}) == {"status": "paused"}
        assert [e["event"] for e in qmp.events("STOP", clear=False)] == ["STOP", "STOP"]
        assert qmp.wait_event("STOP", timeout=0.1)["event"] == "STOP"
        assert len(qmp.events()) == 1
        assert qmp.events() == []
    assert [r["execute"] for r in server.requests] == ["qmp_capabilities", "query-status", "stop"]
    assert server.requests[2]["arguments"] == {"x": 1}
    assert len({r["id"] for r in server.requests}) == 3


def test_error_reply_raises_qmperror_with_class_and_desc(serve: Callable[..., ScriptedServer]) -> None:
    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        return [{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
                 "id": req["id"]}]  # fmt: skip

    server = serve(handler)
    with QMPClient(server.path) as qmp, pytest.raises(QMPError) as info:
        qmp.execute("nope")
    assert isinstance(info.value, MonitorError) and isinstance(info.value, CujuError)
    assert info.value.error_class == "CommandNotFound"
    assert info.value.command == "nope"
    assert "has not been found" in info.value.desc and "nope" in str(info.value)


def test_caused_by_finds_a_monitor_error_anywhere_in_the_chain_of_causes() -> None:
    lost = QMPConnectionError("QMP connection lost")
    try:
        try:
            raise ReplicationError("cannot switch filter") from lost
        except ReplicationError as inner:
            raise StateError("epoch loop failed") from inner
    except StateError as outer:
        assert caused_by(outer, MonitorError) and caused_by(lost, QMPConnectionError)
        assert not caused_by(outer, QMPError)
    looped = ReplicationError("a cycle")
    looped.__cause__ = StateError("back")
    looped.__cause__.__cause__ = looped
    assert not caused_by(looped, MonitorError)


def test_timeout_leaves_connection_usable_and_drops_the_late_reply(
    serve: Callable[..., ScriptedServer],
) -> None:
    held: list[dict[str, Any]] = []

    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        if req["execute"] == "slow":
            held.append(req)
            return []
        late = [{"return": "late", "id": r["id"]} for r in held]
        held.clear()
        return [*late, {"return": "fresh", "id": req["id"]}]

    server = serve(handler)
    with QMPClient(server.path) as qmp:
        with pytest.raises(QMPTimeoutError):
            qmp.execute("slow", timeout=0.05)
        assert qmp.execute("fast") == "fresh"


def test_wait_event_times_out(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda req, conn, fds: [{"return": {}, "id": req["id"]}])
    with QMPClient(server.path) as qmp, pytest.raises(QMPTimeoutError, match="RESUME"):
        qmp.wait_event("RESUME", timeout=0.05)


def test_disconnect_raises_clear_error_and_closes(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda req, conn, fds: None)
    with QMPClient(server.path) as qmp:
        with pytest.raises(QMPConnectionError, match="closed by QEMU"):
            qmp.execute("quit")
        assert qmp.closed
        with pytest.raises(QMPConnectionError, match="is closed"):
            qmp.execute("query-status")


def test_events_written_before_a_hang_up_survive_a_failed_send(serve: Callable[..., ScriptedServer]) -> None:
    """QEMU's last words (SHUTDOWN) are still read when the next command finds it gone."""
    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> None:
        conn.sendall(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\r\n"
                     + json.dumps(event("SHUTDOWN", guest=False, reason="host-signal")).encode() + b"\r\n")

    server = serve(handler)
    with QMPClient(server.path) as qmp:
        assert qmp.execute("stop") == {}
        server.thread.join(5)  # the server hung up
        with pytest.raises(QMPConnectionError):
            qmp.execute("cont")
        assert [e["data"]["reason"] for e in qmp.events("SHUTDOWN")] == ["host-signal"]


def test_malformed_reply_is_a_connection_error(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda req, conn, fds: [b"{not json\r\n"])
    with QMPClient(server.path) as qmp, pytest.raises(QMPConnectionError, match="malformed"):
        qmp.execute("query-status")


def test_not_a_qmp_socket(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda req, conn, fds: [], greeting={"hello": "world"})
    with pytest.raises(QMPConnectionError, match="not a QMP socket"):
        QMPClient(server.path)


def test_missing_socket_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(QMPConnectionError, match=str(path)):
        QMPClient(path)


def test_event_buffer_is_bounded_and_counts_drops(serve: Callable[..., ScriptedServer]) -> None:
    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        return [*(event("TICK", n=n) for n in range(10)), {"return": {}, "id": req["id"]}]

    server = serve(handler)
    with QMPClient(server.path, event_buffer=4) as qmp:
        qmp.execute("tick")
        kept = qmp.events("TICK")
        assert [e["data"]["n"] for e in kept] == [6, 7, 8, 9]
        assert qmp.dropped_events == 6


def test_fd_travels_with_the_command(serve: Callable[..., ScriptedServer], tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        for fd in fds:
            st = os.fstat(fd)
            seen.append((st.st_dev, st.st_ino))
        return [{"return": {}, "id": req["id"]}]

    server = serve(handler)
    target = tmp_path / "payload"
    target.write_bytes(b"x")
    with QMPClient(server.path) as qmp, open(target, "rb") as f:
        qmp.execute("getfd", {"fdname": "mig"}, fd=f.fileno())
        st = os.fstat(f.fileno())
    assert seen == [(st.st_dev, st.st_ino)]


def test_pipelined_answers_are_kept_through_other_reads(serve: Callable[..., ScriptedServer]) -> None:
    """stop and the device-state save go back to back; the save's answer, read while the
    engine waits for other things (events, a third command), stays for its own reply()."""
    def handler(req: dict[str, Any], conn: socket.socket, fds: list[int]) -> list[Any]:
        if req["execute"] == "bad":
            return [{"error": {"class": "GenericError", "desc": "no"}, "id": req["id"]}]
        return [event("STOP"), {"return": req["execute"], "id": req["id"]}]

    server = serve(handler)
    with QMPClient(server.path) as qmp:
        first, second, bad = qmp.send("stop"), qmp.send("save", {"f": 1}), qmp.send("bad")
        assert qmp.reply(first) == "stop"
        time.sleep(0.05)  # all answers are on the socket now: events() reads them
        assert len(qmp.events("STOP")) == 2
        assert qmp.execute("cont") == "cont"  # reads past the answers still awaited
        with pytest.raises(QMPError):
            qmp.reply(bad)
        assert qmp.reply(second) == "save"
        with pytest.raises(StateError):
            qmp.reply(second)  # collected once
    assert [r["execute"] for r in server.requests] == ["qmp_capabilities", "stop", "save", "bad", "cont"]
