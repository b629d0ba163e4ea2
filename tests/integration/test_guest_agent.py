"""The guest agent run on the host over loopback: stream logic and parameter errors, no QEMU.

The agent is the very binary the Linux test guest runs (``guest_src/agent.c``); here it
talks to the observer on 127.0.0.1, which makes its TCP back-pressure path easy to
exercise: the observer stops reading for a while, the agent's socket fills, and the
stream must still arrive intact, on one connection, once reading resumes.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.linux_guest import compile_agent, parse_serial
from cuju_libvirt.rig.observer import COUNTER, Observer, Rules, judge_run

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("linuxguest-agent")
    path = compile_agent(directory)
    yield path
    shutil.rmtree(directory)


def run_agent(agent: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(agent), *args], stdout=subprocess.PIPE, text=True, start_new_session=True, env={}
    )


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    return out


@pytest.mark.timeout(60)
def test_udp_and_tcp_streams_survive_a_stalled_reader(agent: Path) -> None:
    with Observer(("127.0.0.1", 0)) as obs:
        # A TCP peer of our own that does not read for 1 s, so the agent's send buffer fills.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            host, port = listener.getsockname()
            udp_host, udp_port = obs.udp_address
            proc = run_agent(
                agent,
                "udp",
                f"cuju.peer={udp_host}:{udp_port}",
                f"cuju.tcp={host}:{port}",
                "cuju.pps=1000",
                "cuju.tcp_batch=2048",  # 16 KiB per datagram: ~16 MB/s offered
                "cuju.report_ms=200",
            )
            try:
                listener.settimeout(10)
                conn, _ = listener.accept()
                with conn:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                    time.sleep(1.0)
                    data = bytearray()
                    conn.settimeout(0.5)
                    deadline = time.monotonic() + 1.5
                    while time.monotonic() < deadline:
                        try:
                            chunk = conn.recv(1 << 20)
                        except TimeoutError:
                            continue
                        assert chunk, "the agent closed its TCP connection"
                        data += chunk
            finally:
                out = stop(proc)
        rec = obs.recording()
    count = len(data) // COUNTER.size
    values = [v for (v,) in COUNTER.iter_unpack(bytes(data[: count * COUNTER.size]))]
    assert values == list(range(count))
    # The stall really filled the socket: the agent reported its TCP bytes standing still
    # while datagrams went on, and moving again afterwards.
    progress = [r for r in parse_serial(out, "udp") if "seq" in r]
    sent = [(int(r["seq"]), int(r["tcp_bytes"])) for r in progress]
    stalled = [b1 for (s1, b1), (s2, b2) in itertools.pairwise(sent) if b1 == b2 and s2 - s1 >= 100]
    assert stalled, sent
    assert sent[-1][1] > stalled[0], sent
    assert len(data) >= stalled[0]
    udp = judge_run(rec, Rules(tcp=False))
    assert udp.ok, udp.problems


@pytest.mark.timeout(30)
def test_agent_waits_for_the_observer_to_listen_then_connects_once(agent: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        tcp_port = probe.getsockname()[1]
    with Observer(("127.0.0.1", 0)) as udp_obs:
        udp_host, udp_port = udp_obs.udp_address
        proc = run_agent(
            agent, "udp", f"cuju.peer={udp_host}:{udp_port}", f"cuju.tcp=127.0.0.1:{tcp_port}", "cuju.pps=200"
        )
        try:
            time.sleep(1.0)  # connection refused meanwhile: the agent keeps trying
            with Observer(None, ("127.0.0.1", tcp_port)) as tcp_obs:
                rec = tcp_obs.wait_for(lambda r: len(r.tcp_data) >= 800, 10.0)
        finally:
            out = stop(proc)
        udp_rec = udp_obs.recording()
    assert rec.tcp_connections == 1 and len(rec.tcp_data) >= 800
    values = [v for (v,) in COUNTER.iter_unpack(rec.tcp_data[: len(rec.tcp_data) // 8 * 8])]
    assert values == list(range(len(values)))
    assert udp_rec.udp and udp_rec.udp[0][0] == 0, "UDP must flow while TCP is still connecting"
    assert "tcp=up" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["udp"], "error=missing-parameter key=cuju.peer"),
        (["udp", "cuju.peer=1.2.3:80"], "error=bad-parameter key=cuju.peer"),
        (["udp", "cuju.peer=127.0.0.1:9", "cuju.pps=0"], "error=bad-parameter key=cuju.pps value=0"),
        (["stress", "cuju.stress_mb=lots"], "error=bad-parameter key=cuju.stress_mb"),
        (["echo", "cuju.port="], "error=bad-parameter key=cuju.port value="),
        (["dance"], "error=unknown-mode mode=dance"),
    ],
)
def test_bad_parameters_are_named_and_exit_2(
    agent: Path, args: list[str], message: str, tmp_path: Path
) -> None:
    # Output goes to a file, not a pipe: in a full suite this once took 10 s to finish, and a
    # pipe's EOF also waits for any other process that inherited its write end. On a timeout
    # the agent's kernel state is shown so that a real hang can be told from a slow machine.
    out_path = tmp_path / "agent.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen([str(agent), *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            state = Path(f"/proc/{proc.pid}/stat").read_text()
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
            proc.kill()
            proc.wait()
            pytest.fail(f"agent still running after 10 s: stat={state!r} wchan={wchan!r}")
    assert returncode == 2
    assert message in out_path.read_text()
