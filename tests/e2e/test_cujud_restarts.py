"""cujud and libvirtd restarts on the two-host rig (issue 13, items 4 and 5; Deliver 3).

A protected Linux guest on host a streams numbered UDP and a TCP counter stream to the
observer; cujud (or libvirtd) is stopped, killed and restarted under it. What must hold:
nothing half-applied (no output filter of a dead session in QEMU, records that say what
is true), a restarted cujud takes back what it owns from libvirt, its records and the
peer, never two running copies, and the observer never sees a number twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.cujud import records
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, protected_linux_xml
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Host, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import (
    Observer,
    Recording,
    Rules,
    judge_run,
)

MAC = "52:54:00:19:13:00"
PPS = 300
EPOCH_MS = 20


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


def make_observer(rig: Rig) -> Observer:
    return Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path)


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with make_observer(ft_rig) as obs:
        yield obs


def start_protected(rig: Rig, guest: LinuxGuest, observer: Observer, name: str,
                    cujuds: tuple[Cujud, Cujud]) -> None:
    ca, cb = cujuds
    xml = protected_linux_xml(rig, guest, name, observer, mac=MAC, pps=PPS, epoch_ms=EPOCH_MS)
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=120)
    cb.wait_domain(name, "standby", timeout=30)
    rec = observer.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, timeout=90)
    assert len(rec.udp) >= PPS, f"the guest's stream did not start (see {rig.a.log_file(name)})"


def still_counting(observer: Observer, after: float, more: int, timeout: float = 60) -> Recording:
    def enough(r: Recording) -> bool:
        return sum(1 for _, t in r.udp if t >= after) >= more and any(t >= after for _, t in r.tcp_chunks)
    return observer.wait_for(enough, timeout)


def cuju_objects(host: Host, name: str) -> list[str]:
    """The cuju output-commit objects in the QEMU of ``name`` on ``host`` (asked through
    libvirt's monitor: cujud holds the direct one while it protects the VM)."""
    out = host.virsh("qemu-monitor-command", name, json.dumps({"execute": "qom-list",
                                                                "arguments": {"path": "/objects"}}))
    return sorted(str(o["name"]) for o in json.loads(out)["return"] if str(o["name"]).startswith("cuju-"))


def runs(host: Host, name: str, tries: int = 50) -> bool:
    for _ in range(tries):
        if host.virsh("domstate", name, check=False).strip() == "running":
            return True
        time.sleep(0.02)
    return False


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def wait_primary(cujud: Cujud, name: str, timeout: float) -> None:
    """Wait until ``cujud`` runs ``name`` as its primary (after a failover it re-protects the
    VM at once, so the state moves on from primary_after_failover)."""
    def primary() -> bool:
        entry = cujud.domain(name)
        return entry is not None and entry["role"] == "primary" and entry["failovers"] >= 1
    wait(primary, timeout, f"{name} runs as primary on {cujud.host.label} after a failover")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def standbys_created(cujud: Cujud) -> int:
    return cujud.log_path.read_text(errors="replace").count("standby created")


def state_dir(host: Host) -> Path:
    return host.outside("/var/lib/cuju-libvirt")


def uuid_of(host: Host, name: str) -> str:
    return host.virsh("domuuid", name).strip()


@pytest.mark.timeout(300)
def test_sigterm_of_the_primary_cujud_ends_protection_cleanly_and_a_restart_re_protects(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Issue 13 item 4: after SIGTERM of the primary's cujud no filter is left in QEMU and no
    ``protected`` record on disk; the restarted cujud shows the running VM and protects it
    again; a libvirtd restart afterwards neither breaks protection nor makes the peer create
    standby after standby."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "ft-term"
    try:
        start_protected(rig, linux_guest, observer, name, cujuds)
        uuid = uuid_of(rig.a, name)
        assert cuju_objects(rig.a, name), "no output filters while protected: the test checks nothing"
        assert records.read(state_dir(rig.a), records.PROTECTED, uuid) is not None
        ca.stop()  # SIGTERM

        assert runs(rig.a, name), "the VM does not run after cujud stopped"
        assert cuju_objects(rig.a, name) == [], "cujud's SIGTERM left output filters in QEMU"
        assert records.read(state_dir(rig.a), records.PROTECTED, uuid) is None, \
            "protection ended in order, but the 'protected' record stayed"
        wait(lambda: rig.b.qemu_pid(name) is None, 30, "the standby on host b is dropped")
        still_counting(observer, time.monotonic(), PPS)

        ca.start()
        entry = ca.wait_domain(name, "protected", timeout=120)
        assert entry["role"] == "primary"
        cb.wait_domain(name, "standby", timeout=30)
        created = standbys_created(cb)

        rig.a.restart_libvirtd()
        time.sleep(8.0)  # the hook's 'reconnect', and several back-off rounds if pairing failed
        assert ca.domain(name) is not None and ca.domain(name)["state"] == "protected"  # type: ignore[index]
        assert standbys_created(cb) == created, "the peer created standbys again after the libvirtd restart"
        said = ca.log_path.read_text(errors="replace")
        assert "duplicate property" not in said and "cannot delete filter" not in said, said[-3000:]

        rec = still_counting(observer, time.monotonic(), PPS)
        verdict = judge_run(rec, Rules())  # the VM never stopped: no gap, no repeat
        assert verdict.ok, verdict.as_dict()
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_a_restarted_cujud_cedes_a_copy_the_backup_took_over_after_its_sigkill(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Issue 13 item 5: SIGKILL of the primary's cujud; the backup takes over; the old QEMU
    on host a runs on (its output held). The restarted cujud learns from its record and the
    peer that its copy was taken over: it destroys it and writes ``ceded``; ``status`` shows
    the VM as primary on host b only."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "ft-ckill"
    try:
        start_protected(rig, linux_guest, observer, name, cujuds)
        uuid = uuid_of(rig.a, name)
        time.sleep(random.uniform(0.5, 2.0))
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        killed_at = time.monotonic()
        ca.kill()
        wait_primary(cb, name, 20)
        stale = rig.a.qemu_pid(name)
        assert stale is not None  # the stale copy: nobody destroyed it yet

        ca.start()
        wait(lambda: not _alive(stale), 30, "the restarted cujud destroys the taken-over copy")
        assert records.read(state_dir(rig.a), records.CEDED, uuid) is not None
        # host a shows the VM at most as host b's backup now (b re-protects it), never as primary
        def not_primary_here() -> bool:
            entry = ca.domain(name)
            return entry is None or entry["role"] == "backup"
        wait(not_primary_here, 15, "host a's status stops showing the VM as its primary")
        assert cb.domain(name)["role"] == "primary"  # type: ignore[index]
        assert rig.a.virsh("domstate", name, check=False).strip() != "running"
        rec = still_counting(observer, time.monotonic(), PPS)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=killed_at, tolerance=1.0))
        assert verdict.ok, verdict.as_dict()

        # item 7: a domain that no longer runs here has no status row (nor metrics)
        rig.b.virsh("destroy", name)
        wait(lambda: cb.domain(name) is None, 15, "host b's status forgets the VM destroyed there")
        wait(lambda: ca.domain(name) is None, 15, "host a's status forgets the standby of the destroyed VM")
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_a_libvirtd_restart_on_the_backup_host_keeps_the_standby_ready_to_take_over(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Deliver 3: libvirtd on host b restarts while it holds the standby. The standby is not
    taken for an orphan, not created again, and a later failover still works."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "ft-lvb"
    try:
        start_protected(rig, linux_guest, observer, name, cujuds)
        created = standbys_created(cb)
        standby = rig.b.qemu_pid(name)
        rig.b.restart_libvirtd()
        time.sleep(5.0)
        assert rig.b.qemu_pid(name) == standby, "the standby QEMU did not survive libvirtd's restart"
        assert standbys_created(cb) == created
        assert cb.domain(name)["state"] == "standby"  # type: ignore[index]
        assert ca.domain(name)["state"] == "protected"  # type: ignore[index]

        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        pid = rig.a.qemu_pid(name)
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_primary(cb, name, 30)
        rec = still_counting(observer, killed_at + 0.5, 2 * PPS)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=killed_at))
        assert verdict.ok, verdict.as_dict()
        assert runs(rig.b, name)
    finally:
        cleanup_protected(rig, name)
