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
from cuju_libvirt.rig.observer import Observer
from tests.e2e.test_failover import _start_protected, kill_primary_and_judge, linux_guest, observer

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
