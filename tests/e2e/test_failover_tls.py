"""The product path with peer_tls: on: a protected VM whose peer channel is mutual TLS and
whose FT link runs encrypted (docs/security.md), read by an eavesdropper on the LAN and on
the FT link, tampered with on the FT link, and failed over like in test_failover.py, judged
by the observer's stream.

The eavesdropper (:class:`~cuju_libvirt.rig.tap.Tap`) reads every frame on host b's ``ft0``
(the FT link) and on every interface of the LAN namespace (both hosts' uplinks: the peer
channel and the guests' traffic) from before cujud starts until the guest has run epochs:
the peer channel's handshake, the pairing that hands out the FT-link token, the initial
sync and a few epochs. The guest fills 8 MiB of its RAM with a 16-byte marker drawn for
this run and keeps rewriting it (agent mode ``pattern``); the token and the link secret are
read from cujud on host b (:meth:`~cuju_libvirt.rig.cujud.Cujud.link_tokens`). With TLS
neither the marker (nor its hex digits, on the guest's kernel command line), the token, the
secret nor any frame magic may be found in any frame or TCP stream, while the FT link's
streams carried at least the marker's 8 MiB. In the lesser mode (no TLS) the same capture
shows the marker and the token on the FT link and the token on the LAN: the check can fail.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import cleanup_protected, cujud_pair, protected_linux_xml
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, parse_serial
from cuju_libvirt.rig.nodes import FT_IFACE
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from cuju_libvirt.rig.tap import Capture, Tap, read_capture
from tests.e2e.test_failover import (
    EPOCH_MS,
    MAC,
    PPS,
    _start_protected,
    _still_counting,
    kill_primary_and_judge,
    linux_guest,
    observer,
)

__all__ = ["linux_guest", "observer"]  # fixtures shared with test_failover

MAGICS = (b"CUJU-END", b"CUJU-FT")
#: How much of the guest's RAM holds the marker (agent mode ``pattern``).
PATTERN_MB = 8
PEER_PORT, FT_PORT = 7790, 7791


def _needles(marker: bytes, tokens: list[dict[str, str | None]]) -> dict[str, bytes]:
    """What the eavesdropper must not read: the marker, raw and as the hex digits the guest's
    kernel command line carries, each token and link secret, raw and in hex, the frame magics."""
    out = {"marker": marker, "marker (hex)": marker.hex().encode()}
    for i, entry in enumerate(tokens):
        for kind in ("token", "secret"):
            value = entry[kind]
            if value is not None:
                out[f"{kind} {i}"] = bytes.fromhex(value)
                out[f"{kind} {i} (hex)"] = value.encode()
    out.update({m.decode(): m for m in MAGICS})
    return out


def _pattern_rewrites(serial: Path, timeout: float = 120.0) -> int:
    """The guest's count of pattern rewrites, once it has filled its pattern and rewritten it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = parse_serial(serial.read_text(errors="replace") if serial.exists() else "", "pattern")
        assert not [r for r in reports if "error" in r], reports
        rewrites = [int(r["rewrites"]) for r in reports if "rewrites" in r]
        if rewrites:
            return rewrites[-1]
        time.sleep(0.2)
    raise AssertionError(f"the guest did not fill its pattern within {timeout:.0f} s (see {serial})")


def _summary(name: str, cap: Capture, stats: Mapping[str, int]) -> str:
    return json.dumps({"capture": name, "frames": cap.frames, "bytes": cap.bytes, "tap": dict(stats),
                       "ft_stream_bytes": cap.tcp_bytes(FT_PORT),
                       "peer_stream_bytes": cap.tcp_bytes(PEER_PORT),
                       "missing_stream_bytes": cap.missing, "hits": cap.hits})


@pytest.fixture(params=[True, False], ids=["tls", "plain"])
def tls(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.timeout(480)
def test_an_eavesdropper_on_the_lan_and_the_ft_link_reads_no_memory_and_no_token_and_failover_works(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, tmp_path: Path, tls: bool
) -> None:
    rig = ft_rig
    name = "ft-tls" if tls else "ft-plain-tap"
    marker = secrets.token_bytes(16)
    ft_tap = Tap(rig.b, tmp_path / "ft-link.cap", [FT_IFACE])
    lan_tap = Tap(rig.lan, tmp_path / "lan.cap")
    try:
        with ft_tap, lan_tap, \
                cujud_pair(rig, logs=tmp_path / "logs", tls=tls, record_tokens=True) as (ca, cb):
            try:
                if tls:
                    peers = ca.call("peers")["peers"]
                    assert peers[0]["security"].startswith("TLS (TLSv1.3, certificates)"), peers
                _start_protected(rig, linux_guest, observer, name, (ca, cb), mode="count,udp,pattern",
                                 params={"marker": marker.hex(), "pattern_mb": PATTERN_MB})
                serial = rig.a.outside(f"/var/log/libvirt/qemu/{name}-serial.log")
                # a committed epoch holds the filled pattern, and a few more epochs ran
                ca.committed_checkpoint(name, lambda: _pattern_rewrites(serial))
                ft_stats, lan_stats = ft_tap.stop(), lan_tap.stop()
                tokens = cb.link_tokens()
                assert tokens, f"host b handed out no FT-link token (see {cb.log_path})"
                needles = _needles(marker, tokens)
                ft, lan = read_capture(ft_tap.out, needles), read_capture(lan_tap.out, needles)
                said = f"{_summary('ft-link', ft, ft_stats)}\n{_summary('lan', lan, lan_stats)}"
                print(said)
                # the check can fail: the FT link carried at least the marker's pages, the LAN the
                # peer channel (handshake, pairing, heartbeats)
                assert ft.tcp_bytes(FT_PORT) >= PATTERN_MB << 20, said
                assert lan.tcp_bytes(PEER_PORT) > 0, said
                log = ca.log
                if tls:
                    assert all(entry["secret"] for entry in tokens), tokens
                    assert "AES-256-GCM" in log() and "NOT encrypted" not in log(), log()[-2000:]
                    assert not ft.hits and not lan.hits, said
                else:
                    assert "NOT encrypted" in log()
                    # what the same eavesdropper reads in the lesser mode
                    assert {"marker", "token 0", "CUJU-END"} <= set(ft.hits), said
                    assert {"token 0 (hex)", "marker (hex)"} <= set(lan.hits), said

                kill_primary_and_judge(rig, observer, ca, name)
                after = cb.domain(name)
                # host b runs the VM now (and may already be re-protecting it onto host a)
                assert after is not None and after["role"] == "primary" and after["failovers"] == 1, after
            finally:
                cleanup_protected(rig, name)
    finally:
        for tap in (ft_tap, lan_tap):
            tap.out.unlink(missing_ok=True)  # hundreds of MiB; the summary above says what they held


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
            said_b = cb.log
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


#: Runs inside host a: one connection attempt to ADDR:PORT (refused: nothing listens there).
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
except OSError:
    pass
"""
PROBE_PORT = 9


@pytest.fixture(params=["a", "b"], ids=["tls-primary-plain-backup", "plain-primary-tls-backup"])
def tls_host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.timeout(300)
def test_a_tls_host_refuses_a_plain_peer_and_no_ft_link_is_ever_made(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, tmp_path: Path, tls_host: str
) -> None:
    """One host runs peer_tls: on as packaged, the other was left in the lesser mode. The TLS
    host refuses the plain one on the peer channel (as primary and as backup), both log why,
    so the VM started on host a runs
    unprotected (its output is not held), no standby is made on host b and nobody ever opens
    a connection to host b's FT-link port: a capture of ft0 holds not one segment of it."""
    rig, name = ft_rig, f"ft-mixed-{tls_host}"
    ft_tap = Tap(rig.b, tmp_path / "ft-link.cap", [FT_IFACE])
    tls_side = rig.hosts[tls_host]
    try:
        with ft_tap, cujud_pair(rig, logs=tmp_path / "logs", tls=[tls_side], connected=False) as (ca, cb):
            try:
                by_tls = {True: ca if tls_host == "a" else cb, False: cb if tls_host == "a" else ca}
                xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=PPS,
                                          epoch_ms=EPOCH_MS)
                rig.a.virsh("define", str(xml))
                rig.a.virsh("start", name)
                # the VM runs and its output reaches the LAN: nothing holds it for a backup
                rec = observer.wait_for(lambda r: len(r.udp) >= PPS, timeout=120)
                assert len(rec.udp) >= PPS, f"the guest's stream did not start (see {rig.a.log_file(name)})"
                # host a tried to protect it, more than once, and was refused each time
                log_a = ca.log
                deadline = time.monotonic() + 120
                while log_a().count("protection not established") < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert log_a().count("protection not established") >= 2, log_a()[-3000:]
                # each side says why, whether it dials or accepts (docs/security.md)
                said_tls, said_plain = by_tls[True].log(), by_tls[False].log()
                assert "is it configured with peer_tls: on?" in said_tls, said_tls[-3000:]
                assert ("the peer speaks TLS and this host does not" in said_plain
                        or "is it configured with peer_tls: on?" in said_plain), said_plain[-3000:]
                assert not ca.peer_connected() and not cb.peer_connected()
                entry = ca.domain(name)
                assert entry is not None and entry["state"] == "unprotected", entry
                assert cb.domain(name) is None  # no standby
                # the tap does see connections on ft0: one from host a to a closed port of host b
                rig.a.run([sys.executable, "-c", PROBE, rig.b.ft_address, str(PROBE_PORT)])
                stats = ft_tap.stop()
                ft = read_capture(ft_tap.out, {})
                print(_summary("ft-link", ft, stats))
                assert [flow for flow in ft.streams if flow[3] == PROBE_PORT], ft.streams
                assert not [flow for flow in ft.streams if FT_PORT in (flow[1], flow[3])], ft.streams
            finally:
                cleanup_protected(rig, name)
    finally:
        ft_tap.out.unlink(missing_ok=True)
