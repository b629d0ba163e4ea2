"""The product path with peer_tls: on: a protected VM whose peer channel is mutual TLS and
whose FT link runs encrypted (docs/security.md), read by a listener on the FT link and then
killed and failed over like in test_failover.py, judged by the observer's stream.

The listener is a raw packet socket on host b's ``ft0`` (an attacker with a tap on the FT
link). Every epoch frame ends with the trailer magic ``CUJU-END`` (c_ext/wire.h): in the
lesser mode (no TLS) a capture of the initial sync and a few epochs shows it, with TLS it
must not show it nor any other frame magic.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, cujud_pair
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest
from cuju_libvirt.rig.nodes import FT_IFACE
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from tests.e2e.test_failover import (
    PPS,
    _start_protected,
    _still_counting,
    kill_primary_and_judge,
    linux_guest,
    observer,
)

__all__ = ["linux_guest", "observer"]  # fixtures shared with test_failover

#: Runs inside host b: every frame seen on the interface, appended to a file, until killed
#: or CAPTURE_BYTES are written.
CAPTURE = """
import socket, sys
iface, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
n = 0
with open(out, "wb", buffering=0) as f:
    while n < limit:
        data = s.recv(1 << 17)
        f.write(data)
        n += len(data)
"""
CAPTURE_BYTES = 48 << 20
MAGICS = (b"CUJU-END", b"CUJU-FT")

#: Runs inside host a: the FT link's man in the middle. It forwards every connection from
#: 127.0.0.1:PORT to the backup's FT listener; once the file TRIGGER exists it flips one bit
#: of the next primary->backup chunk, removes TRIGGER and writes the connection's number to
#: TRIGGER + ".done"; CONNS holds how many connections it has accepted.
TAMPER = """
import os, socket, sys, threading
port, target, trigger = int(sys.argv[1]), (sys.argv[2], int(sys.argv[3])), sys.argv[4]
lock, count = threading.Lock(), [0]
def pump(src, dst, n, upstream):
    try:
        while data := src.recv(1 << 16):
            with lock:
                if upstream and os.path.exists(trigger):
                    os.unlink(trigger)
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:]
                    with open(trigger + ".done", "w") as f:
                        f.write(str(n))
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
listener = socket.create_server(("127.0.0.1", port))
while True:
    client, _ = listener.accept()
    try:
        server = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        continue
    server.settimeout(None)
    with lock:
        count[0] += 1
        n = count[0]
        with open(trigger + ".conns", "w") as f:
            f.write(str(n))
    threading.Thread(target=pump, args=(client, server, n, True), daemon=True).start()
    threading.Thread(target=pump, args=(server, client, n, False), daemon=True).start()
"""
TAMPER_PORT = 7799


@pytest.fixture(params=[True, False], ids=["tls", "plain"])
def tls(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def pair(ft_rig: Rig, tmp_path: Path, tls: bool) -> Iterator[tuple[Cujud, Cujud]]:
    with cujud_pair(ft_rig, logs=tmp_path / "logs", tls=tls) as p:
        yield p


@pytest.mark.timeout(300)
def test_a_tap_on_the_ft_link_reads_nothing_with_tls_and_failover_works(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud], tls: bool
) -> None:
    rig, (ca, cb) = ft_rig, pair
    name = "ft-tls" if tls else "ft-plain-tap"
    capture = rig.b.outside("/var/log/cuju-libvirt") / "ft-link.cap"
    capture.parent.mkdir(parents=True, exist_ok=True)
    tap = rig.b.popen([sys.executable, "-c", CAPTURE, FT_IFACE, "/var/log/cuju-libvirt/ft-link.cap",
                       str(CAPTURE_BYTES)], stderr=subprocess.PIPE)
    try:
        peers = ca.call("peers")["peers"]
        log = ca.log_path.read_text
        if tls:
            assert peers[0]["security"].startswith("TLS (TLSv1.3, certificates)"), peers
        _start_protected(rig, linux_guest, observer, name, pair)
        time.sleep(1.0)  # a few epochs after the initial sync
        tap.terminate()
        tap.wait(10)
        seen = capture.read_bytes()
        assert len(seen) > 1 << 20, (len(seen), tap.stderr.read() if tap.stderr else "")
        if tls:
            assert "AES-256-GCM" in log() and "NOT encrypted" not in log(), log()[-2000:]
            assert not [m for m in MAGICS if m in seen]
        else:
            assert "NOT encrypted" in log()
            assert b"CUJU-END" in seen  # the tap does read frames: the check above can fail

        kill_primary_and_judge(rig, observer, ca, name)
        after = cb.domain(name)
        # host b runs the VM now (and may already be re-protecting it onto host a)
        assert after is not None and after["role"] == "primary" and after["failovers"] == 1, after
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait(10)
        capture.unlink(missing_ok=True)
        cleanup_protected(rig, name)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.timeout(400)
def test_a_bit_flipped_on_the_encrypted_ft_link_is_refused_and_protection_comes_back(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, tmp_path: Path
) -> None:
    """An attacker on the FT link flips one bit of a record in FT mode: the backup refuses the
    record (the epoch is never applied), the link ends, the primary goes on and protects itself
    again by itself over a new connection (new keys), and a failover afterwards is exact."""
    rig, name = ft_rig, "ft-tamper"
    trigger_inside = "/var/log/cuju-libvirt/ft-tamper"
    trigger = rig.a.outside(trigger_inside)
    trigger.parent.mkdir(parents=True, exist_ok=True)
    done, conns = Path(f"{trigger}.done"), Path(f"{trigger}.conns")
    relay = rig.a.popen([sys.executable, "-c", TAMPER, str(TAMPER_PORT), rig.b.ft_address, "7791",
                         trigger_inside], stderr=subprocess.PIPE)
    try:
        with cujud_pair(rig, logs=tmp_path / "logs", tls=True) as (ca, cb):
            _start_protected(rig, linux_guest, observer, name, (ca, cb),
                             extra=("--link", f"127.0.0.1:{TAMPER_PORT}"))
            assert _read_int(conns) >= 1, "the FT link did not go through the relay"
            time.sleep(1.0)  # in FT mode
            before = _read_int(conns)
            flipped_at = time.monotonic()
            trigger.write_text("")
            deadline = time.monotonic() + 30
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert done.exists(), "the relay saw no FT-link traffic to tamper with"
            assert _read_int(done) == before  # the live link was the one tampered with

            # refused on the backup with the reason; the primary is never fenced for it
            said_b = cb.log_path.read_text
            deadline = time.monotonic() + 60
            while "failed authentication" not in said_b() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "failed authentication" in said_b(), said_b()[-3000:]
            # protection comes back by itself over a new connection
            deadline = time.monotonic() + 180
            while _read_int(conns) <= before and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _read_int(conns) > before, "no new FT-link connection after the tamper"
            ca.wait_domain(name, "protected", timeout=180)
            cb.wait_domain(name, "standby", timeout=60)
            # the guest's stream never stopped nor repeated across it (no failover happened)
            rec = _still_counting(observer, time.monotonic(), PPS, timeout=60)
            verdict = judge_run(rec, Rules(max_gap=0))
            assert verdict.ok, verdict.as_dict()
            assert rig.a.virsh("domstate", name).strip() in ("running", "paused")
            print(f"protected again {time.monotonic() - flipped_at:.1f} s after the flipped bit")

            # the new standby is exact: a failover to it is judged like any other
            kill_primary_and_judge(rig, observer, ca, name)
            after = cb.domain(name)
            assert after is not None and after["role"] == "primary" and after["failovers"] == 1, after
    finally:
        relay.kill()
        relay.wait(10)
        for path in (trigger, done, conns):
            path.unlink(missing_ok=True)
        cleanup_protected(rig, name)
