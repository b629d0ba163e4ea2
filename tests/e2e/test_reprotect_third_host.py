"""Re-protection onto a third host (issue 9): three rig hosts, cujud on each (two-host mode, no
etcd), the Linux guest protected from host a to host b. Host a dies (power loss): b takes
over and, with a gone, protects the VM again with a new standby on host c, by itself. Judged
on the observer's record (never a number twice, at most one epoch's gap, one TCP stream) and
on which hosts run a copy: b runs the VM, c holds a paused standby, a runs nothing."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import cujud_cluster, protected_linux_xml
from cuju_libvirt.rig.etcd import etcd_binary, in_rig
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from tests.e2e.conftest import hooked_rig_or_skip
from tests.e2e.test_failover import EPOCH_MS, PPS, _still_counting, runs

MAC = "52:54:00:19:0a:00"
NAME = "rp3-vm"


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    yield from hooked_rig_or_skip(3)


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.mark.timeout(360)
def test_primary_host_crash_fails_over_to_b_and_re_protects_onto_c(
    rig3: Rig, linux_guest: LinuxGuest, tmp_path: Path
) -> None:
    rig = rig3
    a, b, c = rig.a, rig.b, rig.host("c")
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs, \
            cujud_cluster(rig, logs=tmp_path / "logs") as (ca, cb, cc):
        xml = protected_linux_xml(rig, linux_guest, NAME, obs, mac=MAC, pps=PPS, epoch_ms=20)
        a.virsh("define", str(xml))
        a.virsh("start", NAME)
        assert ca.wait_domain(NAME, "protected", timeout=120)["peer"] == "cuju-b"
        cb.wait_domain(NAME, "standby", timeout=30)
        obs.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, timeout=90)
        time.sleep(random.uniform(0.5, 2.0))
        max_gap = ca.one_epoch_gap(NAME, PPS, EPOCH_MS)
        crashed_at = time.monotonic()
        a.crash()

        cb.wait_failed_over(NAME, timeout=20)
        again = cb.wait_domain(NAME, "protected", timeout=180)
        assert again["peer"] == "cuju-c" and again["role"] == "primary", again
        standby = cc.wait_domain(NAME, "standby", timeout=30)
        assert standby["peer"] == "cuju-b"
        print(f"re-protected onto host c {time.monotonic() - crashed_at:.1f} s after host a died")
        assert runs(b, NAME)
        assert c.virsh("domstate", NAME).strip() == "paused"  # the standby: one copy runs, on b
        assert a.qemu_pid(NAME) is None and not a.processes()
        rec = _still_counting(obs, time.monotonic(), PPS, timeout=30)
        verdict = judge_run(rec, Rules(max_gap=max_gap, failover_at=crashed_at, tolerance=0.5))
        assert verdict.ok, verdict.as_dict()
        # c may not start the VM on its own while b runs it
        assert list(c.outside("/var/lib/cuju-libvirt/ceded").glob("*.json"))

        # the old primary host comes back: it refuses the VM (it was protected there)
        a.reboot()
        refused = a.run(["virsh", "-c", "qemu:///system", "start", NAME], check=False)
        assert refused.returncode != 0 and "was protected" in refused.stderr, refused.stderr
        for host in (c, b):  # the standby first: no failover when the VM goes
            host.virsh("destroy", NAME, check=False)
        for host in rig.hosts.values():
            host.virsh("undefine", NAME, check=False)


@pytest.mark.timeout(420)
@pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)")
def test_backup_host_crash_with_the_witness_re_protects_onto_the_third_host(
    rig3: Rig, linux_guest: LinuxGuest, tmp_path: Path
) -> None:
    """peer='auto' on three hosts with the etcd witness: the standby is placed on b; host b
    dies; a wins the ownership record and runs on (no fencing), then places a new standby on
    c by itself. One stream, nothing repeated; a runs the VM, c holds the standby."""
    rig = rig3
    a, b, c = rig.a, rig.b, rig.host("c")
    name = "rp3-auto"
    with in_rig(rig, 3) as etcd, \
            Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs, \
            cujud_cluster(rig, logs=tmp_path / "logs", etcd_endpoints=etcd.endpoints,
                          etcd_timeout=1.0) as (ca, cb, cc):
        etcd.wait_healthy(30)
        xml = protected_linux_xml(rig, linux_guest, name, obs, mac="52:54:00:19:0a:01", pps=PPS,
                                  epoch_ms=20, peer="auto")
        a.virsh("define", str(xml))
        a.virsh("start", name)
        # the placer's choice: three like hosts, each its own failure domain, equal headroom: by name
        assert ca.wait_domain(name, "protected", timeout=120)["peer"] == "cuju-b"
        cb.wait_domain(name, "standby", timeout=30)
        obs.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, timeout=90)
        time.sleep(random.uniform(0.5, 2.0))
        crashed_at = time.monotonic()
        b.crash()
        again = ca.wait_for(name, lambda e: e["state"] == "protected" and e["peer"] == "cuju-c",
                            "protected by cuju-c", timeout=180)
        print(f"re-protected onto host c {time.monotonic() - crashed_at:.1f} s after host b died")
        assert again["failovers"] == 0
        standby = cc.wait_domain(name, "standby", timeout=30)
        # status shows the pairing's ownership generation on both sides, a new one for c
        assert again["generation"] == standby["generation"] > 1
        assert runs(a, name) and c.virsh("domstate", name).strip() == "paused"
        rec = _still_counting(obs, time.monotonic(), PPS, timeout=30)
        verdict = judge_run(rec, Rules())  # the primary ran on: no gap, no repeat
        assert verdict.ok, verdict.as_dict()
        assert "FENCED" not in ca.log_path.read_text()
        for host in (c, a):
            host.virsh("destroy", name, check=False)
        for host in rig.hosts.values():
            host.virsh("undefine", name, check=False)
    b.reboot()
