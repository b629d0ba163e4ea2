"""The cluster witness end to end (issue 9): the two-host rig plus a 3-member etcd cluster,
each member in a network namespace of its own on the rig's LAN, cujud on both hosts with
``etcd_endpoints``.

A protected Linux guest on host a streams numbered UDP and a TCP counter stream to the
observer. Every scenario is judged on the observer's record (never a number twice, at most
one epoch's gap, one TCP stream) and on which host runs the VM: always exactly one.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.cujud.coord import OwnershipStore
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, cujud_pair, protected_linux_xml
from cuju_libvirt.rig.etcd import EtcdCluster, etcd_binary, in_rig
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Host, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import (
    Observer,
    Recording,
    Rules,
    judge_run,
)
from cuju_libvirt.rig.sandbox import pid_alive

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)")

MAC = "52:54:00:19:09:00"
PPS = 300
EPOCH_MS = 20
HEARTBEAT_TIMEOUT_MS = 500


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture(scope="module")
def etcd(ft_rig: Rig) -> Iterator[EtcdCluster]:
    with in_rig(ft_rig, 3) as cluster:
        yield cluster


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
        yield obs


@pytest.fixture
def pair(ft_rig: Rig, etcd: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Cujud, Cujud]]:
    for m in etcd.members:  # a test that stopped members left them stopped
        etcd.start_member(m)
    etcd.wait_healthy(30)
    with cujud_pair(ft_rig, logs=tmp_path / "logs", etcd_endpoints=etcd.endpoints, etcd_timeout=1.0) as p:
        yield p


def store(etcd: EtcdCluster) -> OwnershipStore:
    return OwnershipStore(etcd.client(timeout=3.0))


def start_protected(rig: Rig, guest: LinuxGuest, observer: Observer, name: str,
                    pair: tuple[Cujud, Cujud]) -> str:
    """Start ``name`` on host a, protected by b; returns its UUID."""
    ca, cb = pair
    xml = protected_linux_xml(rig, guest, name, observer, mac=MAC, pps=PPS, epoch_ms=EPOCH_MS,
                              heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=120)
    cb.wait_domain(name, "standby", timeout=30)
    rec = observer.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, timeout=90)
    assert len(rec.udp) >= PPS, f"the guest's stream did not start (see {rig.a.log_file(name)})"
    return rig.a.virsh("domuuid", name).strip()


def still_counting(observer: Observer, after: float, more: int, timeout: float = 60) -> Recording:
    def enough(r: Recording) -> bool:
        return sum(1 for _, t in r.udp if t >= after) >= more and any(t >= after for _, t in r.tcp_chunks)
    return observer.wait_for(enough, timeout)


def runs(host: Host, name: str) -> bool:
    return host.virsh("domstate", name, check=False).strip() in ("running", "paused")


def wait_copy_gone(host: Host, name: str, pid: int, timeout: float = 30) -> None:
    """Wait until the QEMU ``pid`` of ``name`` on ``host`` is gone; then whatever of ``name``
    runs there may only be a new standby (the new primary re-protects onto this host)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"the stale copy of {name} on {host.label} still runs (pid {pid})"
        time.sleep(0.2)
    if runs(host, name):
        xml = host.virsh("dumpxml", name, check=False)
        assert "-incoming" in xml or not runs(host, name), f"{name} runs on {host.label} as a primary again"


def longest_silence(rec: Recording, after: float) -> float:
    """The longest time (s) between two datagrams that arrived after ``after`` (from ``after``)."""
    times = [after, *sorted(t for _, t in rec.udp if t >= after)]
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.timeout(300)
def test_backup_host_crash_the_primary_runs_on_within_the_timeout(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """Host b dies. Two hosts alone would fence the VM until b returns; with the witness the
    primary wins the ownership record and runs on, its held output released: nothing lost,
    nothing repeated, no pause longer than heartbeat-timeout-ms + one transaction."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-bcrash"
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        generation = store(etcd).read(uuid).record.generation  # type: ignore[union-attr]
        time.sleep(random.uniform(0.5, 1.5))
        crashed_at = time.monotonic()
        rig.b.crash()
        rec = still_counting(observer, crashed_at, 2 * PPS, timeout=30)
        verdict = judge_run(rec, Rules())
        assert verdict.ok, verdict.as_dict()
        pause = longest_silence(rec, crashed_at)
        print(f"backup-host crash: the primary's output paused {pause * 1e3:.0f} ms at most")
        assert pause * 1e3 <= HEARTBEAT_TIMEOUT_MS + 100, pause
        assert ca.domain(name)["state"] in ("degraded", "pairing", "unprotected")  # type: ignore[index]
        rec_now = store(etcd).read(uuid).record  # type: ignore[union-attr]
        assert (rec_now.owner, rec_now.backup, rec_now.generation) == ("cuju-a", None, generation + 1)
        assert "FENCED" not in ca.log_path.read_text()
        # b returns: the primary re-protects by itself (a new pairing, a new generation)
        rig.b.reboot()
        cb.start()
        ca.wait_domain(name, "protected", timeout=120)
        assert store(etcd).read(uuid).record.generation == generation + 2  # type: ignore[union-attr]
        assert judge_run(still_counting(observer, time.monotonic(), PPS), Rules()).ok
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_primary_isolated_from_everyone_fences_and_the_backup_takes_over(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """Host a loses the FT link and the LAN (and with it etcd): it cannot win the record and
    fences; b wins it and resumes. When the partition heals, a learns it lost and destroys
    its copy. The observer sees one stream."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-isolate"
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        cut_at = time.monotonic()
        rig.a.set_links(False)
        cb.wait_failed_over(name, timeout=20)
        rec = store(etcd).read(uuid).record  # type: ignore[union-attr]
        assert rec.owner == "cuju-b"
        ca.wait_domain(name, "failed", timeout=20)  # fenced: stopped, output held
        old_pid = rig.a.qemu_pid(name)
        assert old_pid is not None
        rig.a.set_links(True)
        wait_copy_gone(rig.a, name, old_pid)
        assert runs(rig.b, name)
        got = still_counting(observer, time.monotonic(), PPS)
        verdict = judge_run(got, Rules(max_gap=max_gap, failover_at=cut_at, tolerance=0.7))
        assert verdict.ok, verdict.as_dict()
        assert "the witness gave the VM to the peer" in ca.log_path.read_text()
    finally:
        rig.a.set_links(True)
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_backup_isolated_from_everyone_stays_paused_and_the_primary_runs_on(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """Host b loses the FT link and the LAN (and with it etcd). In two-host mode b would take
    over after the timeout and a would fence; with the witness b cannot win the record, so its
    standby stays paused, while a wins it and runs on. When the partition heals b reads that
    it lost and drops its standby: one stream, nothing lost or repeated, a never fenced."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-bisolate"
    # the hosts' logs go on across the module's tests: judge only this test's lines
    said_before = ca.log_path.stat().st_size if ca.log_path.exists() else 0
    b_said_before = cb.log_path.stat().st_size if cb.log_path.exists() else 0
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        cut_at = time.monotonic()
        rig.b.set_links(False)
        rec = still_counting(observer, cut_at, 2 * PPS, timeout=30)
        assert judge_run(rec, Rules()).ok
        assert store(etcd).read(uuid).record.owner == "cuju-a"  # type: ignore[union-attr]
        time.sleep(2 * HEARTBEAT_TIMEOUT_MS / 1e3)
        assert (cb.domain(name) or {}).get("failovers") == 0  # b never took over
        rig.b.set_links(True)
        rec = still_counting(observer, time.monotonic(), 2 * PPS)
        verdict = judge_run(rec, Rules())
        assert verdict.ok, verdict.as_dict()
        assert "FENCED" not in ca.log_path.read_bytes()[said_before:].decode(errors="replace")
        b_said = cb.log_path.read_bytes()[b_said_before:].decode(errors="replace")
        assert "TAKING OVER" not in b_said and "this standby loses" in b_said
    finally:
        rig.b.set_links(True)
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_etcd_leader_killed_during_a_failover(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """Host a dies and, as b races for the record, the etcd leader dies too: the claim goes
    through once a new leader is elected; b takes over, nothing is repeated."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-leader"
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        leader = etcd.leader()
        crashed_at = time.monotonic()
        rig.a.crash()
        time.sleep(HEARTBEAT_TIMEOUT_MS / 1e3 * 0.9)
        etcd.kill_member(leader)
        cb.wait_failed_over(name, timeout=20)
        rec = still_counting(observer, crashed_at + 0.7, 2 * PPS)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=crashed_at))
        assert verdict.ok, verdict.as_dict()
        print(f"host crash + etcd leader killed: {verdict.failover_ms:.0f} ms to the first datagram from b")
        assert store(etcd).read(uuid).record.owner == "cuju-b"  # type: ignore[union-attr]
        rig.a.reboot()
        refused = rig.a.run(["virsh", "-c", "qemu:///system", "start", name], check=False)
        assert refused.returncode != 0 and "was protected" in refused.stderr, refused.stderr
        ca.start()  # back, host a becomes the backup by itself; it never runs a copy of its own
        cb.wait_domain(name, "protected", timeout=120)
        assert ca.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-b"
        assert store(etcd).read(uuid).record.backup == "cuju-a"  # type: ignore[union-attr]
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_etcd_down_a_healthy_pair_carries_on_and_a_crash_fails_over_on_the_primarys_word(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """etcd is never on the epoch path: with every member dead the pair stays protected and
    the stream flows untouched. A QEMU crash on a is then reported by a's cujud, and b takes
    over on that word as in two-host mode; the record is brought up to date once etcd is back."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-etcddown"
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        down_at = time.monotonic()
        for m in etcd.members:
            etcd.kill_member(m)
        before = ca.domain(name)["epochs_committed"]  # type: ignore[index]
        rec = still_counting(observer, down_at, 3 * PPS)
        assert judge_run(rec, Rules()).ok
        status = ca.domain(name)
        assert status is not None and status["state"] == "protected" and status["epochs_committed"] > before
        assert cb.domain(name)["state"] == "standby"  # type: ignore[index]

        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        pid = rig.a.qemu_pid(name)
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        cb.wait_failed_over(name, timeout=20)
        rec = still_counting(observer, killed_at + 0.3, 2 * PPS)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=killed_at))
        assert verdict.ok, verdict.as_dict()
        for m in etcd.members:
            etcd.start_member(m)
        etcd.wait_healthy(30)
        deadline = time.monotonic() + 20
        while store(etcd).read(uuid).record.owner != "cuju-b":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the record was not brought up to date"
            time.sleep(0.3)
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_cujud_killed_on_the_primary_and_restarted_destroys_its_stale_copy(
    ft_rig: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, pair: tuple[Cujud, Cujud]
) -> None:
    """cujud on a is SIGKILLed (its QEMU runs on, output held): b sees both paths silent,
    wins the record and resumes. Restarted, a's cujud finds the record moved on (a newer
    generation, owner b) and destroys its copy instead of adopting it."""
    rig, (ca, cb) = ft_rig, pair
    name = "wit-restart"
    try:
        uuid = start_protected(rig, linux_guest, observer, name, pair)
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        killed_at = time.monotonic()
        ca.kill()
        cb.wait_failed_over(name, timeout=20)
        assert store(etcd).read(uuid).record.owner == "cuju-b"  # type: ignore[union-attr]
        old_pid = rig.a.qemu_pid(name)
        assert old_pid is not None and pid_alive(old_pid)  # the old copy still runs (its output held)
        ca.start()
        wait_copy_gone(rig.a, name, old_pid)
        assert "destroying the stale copy" in ca.log_path.read_text()
        assert runs(rig.b, name)
        rec = still_counting(observer, time.monotonic(), PPS)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=killed_at, tolerance=0.7))
        assert verdict.ok, verdict.as_dict()
    finally:
        cleanup_protected(rig, name)
