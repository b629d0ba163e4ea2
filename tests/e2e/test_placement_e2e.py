"""Placement across the cluster (issue 9 items 3 and 4): three rig hosts, a 3-member etcd in the
rig (each member in a namespace of its own), cujud on every host with ``etcd_endpoints`` and a
failure domain each (a and b share rack1, c is rack2). Each cujud registers its host under a
lease; one of them is elected placer and places the standby of every VM that has no ``peer``.

Host c's cujud starts first and the others only once it is the placer, so the scenarios know
who places. The Linux test guest streams to the observer; every test is judged by that stream
(never a number twice, at most one epoch's datagrams missing at a failover:
``Cujud.one_epoch_gap``, one TCP stream) and by which hosts run a copy, then by cujud's state
(``status``: protected, its peer, the cluster's hosts and placer) and its log, with generous
deadlines."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from cuju_libvirt.cujud.coord import OwnershipStore
from cuju_libvirt.domain_xml import FT_NAMESPACE
from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, cujud_cluster, protected_linux_xml
from cuju_libvirt.rig.etcd import EtcdCluster, etcd_binary, in_rig
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Host, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from tests.e2e.conftest import hooked_rig_or_skip
from tests.e2e.test_failover import EPOCH_MS, PPS, _still_counting, runs

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)")

DOMAINS = {"a": "rack1", "b": "rack1", "c": "rack2"}
LEASE_TTL = 3


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    yield from hooked_rig_or_skip(3)


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture(scope="module")
def etcd(rig3: Rig) -> Iterator[EtcdCluster]:
    with in_rig(rig3, 3) as cluster:
        yield cluster


def cluster_of(cujud: Cujud) -> dict[str, Any]:
    status = cujud.call("status")["cluster"]
    assert status is not None and not status.get("error"), status
    return dict(status)


def wait_cluster(cujud: Cujud, test: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = cluster_of(cujud)
        if test(seen):
            return seen
        time.sleep(0.2)
    raise RigError(f"the cluster as {cujud.host.label} sees it: not {what} within {timeout:.0f} s "
                   f"(last {seen}; see {cujud.log_path})")


def alive(cluster: dict[str, Any]) -> set[str]:
    return {h["name"] for h in cluster["hosts"] if h["lease_alive"]}


@pytest.fixture
def cujuds(rig3: Rig, etcd: EtcdCluster, tmp_path: Path) -> Iterator[dict[str, Cujud]]:
    """cujud on c, a and b (in that order), c the placer before a and b start."""
    for m in etcd.members:
        etcd.start_member(m)
    etcd.wait_healthy(30)
    c = rig3.host("c")

    def first_is_placer(cujud: Cujud) -> None:
        if cujud.host is c:
            wait_cluster(cujud, lambda s: s["placer"] == c.hostname, "placer on c", timeout=30)

    with cujud_cluster(rig3, [c, rig3.a, rig3.b], logs=tmp_path / "logs", etcd_endpoints=etcd.endpoints,
                       etcd_timeout=1.0, host_lease_ttl=LEASE_TTL, after_start=first_is_placer,
                       host_settings={n: {"failure_domain": d} for n, d in DOMAINS.items()}) as (cc, ca, cb):
        yield {"a": ca, "b": cb, "c": cc}


@pytest.fixture
def observer(rig3: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig3.lan.netns_path) as obs:
        yield obs


def start_placed(rig: Rig, guest: LinuxGuest, obs: Observer, name: str, mac: str, *,
                 peer: str | None = "") -> None:
    """The Linux guest, marked for protection by ``xml enable`` without ``--peer`` (the placer
    chooses its backup; ``peer``: as given, None: host b), defined and started on host a."""
    xml = protected_linux_xml(rig, guest, name, obs, mac=mac, pps=PPS, epoch_ms=EPOCH_MS, peer=peer)
    element = etree.parse(str(xml)).find(f".//{{{FT_NAMESPACE}}}ft")
    written = rig.b.hostname if peer is None else peer or None
    assert element is not None and element.get("peer") == written
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)


def wait_streaming(obs: Observer) -> None:
    obs.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, timeout=90)
    time.sleep(random.uniform(0.5, 2.0))  # the fault lands anywhere in an epoch


def crash(*hosts: Host) -> float:
    """Power loss of ``hosts``, one right after the other; when it began."""
    at = time.monotonic()
    for host in hosts:
        host.crash()
    return at


def reboot_crashed(rig: Rig) -> None:
    for host in rig.hosts.values():
        if not host.processes():
            host.reboot()


def log_since(cujud: Cujud, offset: int) -> str:
    return cujud.log_path.read_bytes()[offset:].decode(errors="replace")


def log_size(cujud: Cujud) -> int:
    return cujud.log_path.stat().st_size if cujud.log_path.exists() else 0


@pytest.mark.timeout(420)
def test_the_standby_goes_outside_the_primarys_failure_domain_and_survives_that_domains_power_loss(
    rig3: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, cujuds: dict[str, Cujud]
) -> None:
    """A VM without ``peer`` on a (rack1): the placer puts its standby on c (rack2), never on b,
    though b holds no standby either. Then rack1 loses power, a and b at once: c wins the
    record and resumes the VM. One copy runs (on c), the stream misses at most one epoch and
    repeats nothing: the placement is what made the VM survive its failure domain."""
    ca, cb, cc = cujuds["a"], cujuds["b"], cujuds["c"]
    a, b, c = rig3.a, rig3.b, rig3.host("c")
    name = "pl-domain"
    said = log_size(cc)
    try:
        wait_cluster(ca, lambda s: alive(s) == {"cuju-a", "cuju-b", "cuju-c"}, "three hosts alive")
        start_placed(rig3, linux_guest, observer, name, "52:54:00:19:0b:00")
        assert ca.wait_domain(name, "protected", timeout=180)["peer"] == "cuju-c"
        assert cc.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-a"
        assert cb.domain(name) is None and b.qemu_pid(name) is None
        assert "placed the standby of pl-domain (owner cuju-a, failure domain rack1) on cuju-c " \
               "(failure domain rack2" in log_since(cc, said)

        uuid = a.virsh("domuuid", name).strip()
        store = OwnershipStore(etcd.client(timeout=3.0))
        rec = store.read(uuid)
        assert rec is not None and (rec.record.owner, rec.record.backup, rec.record.mode) == (
            "cuju-a", "cuju-c", "protected")
        # what `cuju-libvirt status --json` shows of the cluster, from any host
        out = b.run([sys.executable, "-m", "cuju_libvirt.cli", "status", "--json"]).stdout
        cluster = json.loads(out)["cluster"]
        hosts = {h["name"]: h for h in cluster["hosts"]}
        assert {n: (h["lease_alive"], h["failure_domain"]) for n, h in hosts.items()} == {
            "cuju-a": (True, "rack1"), "cuju-b": (True, "rack1"), "cuju-c": (True, "rack2")}
        counts = (hosts["cuju-a"]["primaries"], hosts["cuju-c"]["backups"], hosts["cuju-b"]["backups"])
        assert counts == (1, 1, 0)
        assert all(h["mem_free_kib"] > 0 and h["cpus"] > 0 for h in hosts.values())
        assert cluster["placer"] == "cuju-c"
        text = b.run([sys.executable, "-m", "cuju_libvirt.cli", "status"]).stdout
        assert "cluster (etcd): 3 of 3 host(s) alive, placer cuju-c" in text

        wait_streaming(observer)
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        crashed_at = crash(a, b)  # rack1's power feed
        cc.wait_failed_over(name, timeout=30)
        assert runs(c, name)
        assert a.qemu_pid(name) is None and b.qemu_pid(name) is None
        assert not a.processes() and not b.processes()
        got = _still_counting(observer, time.monotonic(), PPS, timeout=60)
        verdict = judge_run(got, Rules(max_gap=max_gap, failover_at=crashed_at, tolerance=0.5))
        assert verdict.ok, verdict.as_dict()
        print(f"rack1 lost: {verdict.failover_ms:.0f} ms crash -> first datagram from c "
              f"(gap bound {max_gap} datagrams)")
        won = store.read(uuid)
        assert won is not None and (won.record.owner, won.record.backup) == ("cuju-c", None)
        assert won.record.generation > rec.record.generation
    finally:
        reboot_crashed(rig3)
        cleanup_protected(rig3, name)


@pytest.mark.timeout(480)
def test_the_placer_host_dies_another_cujud_places_and_the_new_standby_takes_over(
    rig3: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, cujuds: dict[str, Cujud]
) -> None:
    """c is the placer and holds the VM's standby (the only host of another domain). c dies:
    a wins the record and runs on (nothing lost, nothing repeated), c's lease expires, a or b
    is elected placer, and the VM is placed again: on b, its own rack being all there is (the
    fallback is logged). Then a dies too: b, the new placer's choice, takes over with at most
    one epoch's gap, and only b runs it. Then host a, the old primary, boots again (c stays
    down): its cujud starts with the host, and b's VM, alone with no other live host, gets
    its standby on a without any operator action; a never runs a copy of its own, the stream
    flows on untouched, and the record names b as owner and a as backup."""
    ca, cb, cc = cujuds["a"], cujuds["b"], cujuds["c"]
    a, b, c = rig3.a, rig3.b, rig3.host("c")
    name = "pl-placer"
    said = {n: log_size(x) for n, x in cujuds.items()}
    try:
        start_placed(rig3, linux_guest, observer, name, "52:54:00:19:0b:01")
        assert ca.wait_domain(name, "protected", timeout=180)["peer"] == "cuju-c"
        cc.wait_domain(name, "standby", timeout=30)
        assert cluster_of(ca)["placer"] == "cuju-c"

        wait_streaming(observer)
        crash(c)
        after = wait_cluster(ca, lambda s: s["placer"] in ("cuju-a", "cuju-b") and "cuju-c" not in alive(s),
                             "a new placer and c's lease gone", timeout=LEASE_TTL + 60)
        again = ca.wait_for(name, lambda e: e["state"] == "protected" and e["peer"] == "cuju-b",
                            "protected again, by b", timeout=180)
        assert again["role"] == "primary" and again["failovers"] == 0
        assert cb.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-a"
        assert runs(a, name) and b.virsh("domstate", name).strip() == "paused"
        # the primary ran on through the backup's loss and the new pairing: no gap, no repeat
        ran_on = _still_counting(observer, time.monotonic(), PPS, timeout=60)
        verdict = judge_run(ran_on, Rules())
        assert verdict.ok, verdict.as_dict()
        new_placer = {"cuju-a": ca, "cuju-b": cb}[after["placer"]]
        said_there = log_since(new_placer, said["a" if new_placer is ca else "b"])
        assert "this host is the cluster's placer now" in said_there
        assert "placed the standby of pl-placer (owner cuju-a, failure domain rack1) on cuju-b" in said_there
        assert "anti-affinity falls back to a host of the same failure domain" in said_there

        # the standby the new placer placed is a real one: a dies, b takes over
        time.sleep(random.uniform(0.5, 2.0))
        max_gap = ca.one_epoch_gap(name, PPS, EPOCH_MS)
        crashed_at = crash(a)
        cb.wait_failed_over(name, timeout=30)
        assert runs(b, name) and a.qemu_pid(name) is None and c.qemu_pid(name) is None
        got = _still_counting(observer, time.monotonic(), PPS, timeout=60)
        verdict = judge_run(got, Rules(max_gap=max_gap, failover_at=crashed_at, tolerance=0.5))
        assert verdict.ok, verdict.as_dict()

        # the old primary host returns (its cujud starts at boot) and becomes the backup
        a.reboot()
        ca.start()
        back = cb.wait_for(name, lambda e: e["state"] == "protected" and e["peer"] == "cuju-a",
                           "protected again, by a", timeout=180)
        assert back["role"] == "primary" and back["failovers"] == 1
        assert ca.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-b"
        assert runs(b, name) and a.virsh("domstate", name).strip() == "paused"
        rec = OwnershipStore(etcd.client(timeout=3.0)).read(b.virsh("domuuid", name).strip())
        assert rec is not None and (rec.record.owner, rec.record.backup, rec.record.mode) == (
            "cuju-b", "cuju-a", "protected")
        # the whole stream: the one failover gap (a's crash) and nothing else, nothing repeated
        got = _still_counting(observer, time.monotonic(), PPS, timeout=60)
        verdict = judge_run(got, Rules(max_gap=max_gap, failover_at=crashed_at, tolerance=0.5))
        assert verdict.ok, verdict.as_dict()
    finally:
        reboot_crashed(rig3)
        cleanup_protected(rig3, name)


@pytest.mark.timeout(480)
def test_peer_auto_is_placed_by_the_placer_and_an_explicit_peer_still_wins(
    rig3: Rig, etcd: EtcdCluster, linux_guest: LinuxGuest, observer: Observer, cujuds: dict[str, Cujud]
) -> None:
    """With etcd, ``peer='auto'`` is placed like an element without ``peer``: the VM on a
    (rack1) gets its standby on c (rack2), the placer's choice, where a's own choice among its
    peers would be b (no standby either, first by name). Judged by where the standby runs,
    by the ownership record and by both logs. Then the same guest with an explicit
    ``peer='cuju-b'`` pairs with b, in a's own rack: the explicit peer wins, the placer is
    not asked (no request in the record, nothing placed in c's log)."""
    ca, cb, cc = cujuds["a"], cujuds["b"], cujuds["c"]
    a, b, c = rig3.a, rig3.b, rig3.host("c")
    auto, explicit = "pl-auto", "pl-explicit"
    said_a, said_c = log_size(ca), log_size(cc)
    store = OwnershipStore(etcd.client(timeout=3.0))
    try:
        wait_cluster(ca, lambda s: alive(s) == {"cuju-a", "cuju-b", "cuju-c"}, "three hosts alive")
        start_placed(rig3, linux_guest, observer, auto, "52:54:00:19:0b:02", peer="auto")
        assert ca.wait_domain(auto, "protected", timeout=180)["peer"] == "cuju-c"
        assert cc.wait_domain(auto, "standby", timeout=30)["peer"] == "cuju-a"
        assert cb.domain(auto) is None and b.qemu_pid(auto) is None
        assert runs(a, auto) and c.virsh("domstate", auto).strip() == "paused"
        rec = store.read(a.virsh("domuuid", auto).strip())
        assert rec is not None
        assert (rec.record.owner, rec.record.backup, rec.record.mode, rec.record.wants_standby) == (
            "cuju-a", "cuju-c", "protected", False)
        assert "placed the standby of pl-auto (owner cuju-a, failure domain rack1) on cuju-c " \
               "(failure domain rack2" in log_since(cc, said_c)
        assert "the standby goes to cuju-c, the cluster's choice" in log_since(ca, said_a)
        wait_streaming(observer)
        verdict = judge_run(_still_counting(observer, time.monotonic(), PPS, timeout=60), Rules())
        assert verdict.ok, verdict.as_dict()  # protected all along: no gap, nothing repeated
        cleanup_protected(rig3, auto)

        said_c = log_size(cc)
        start_placed(rig3, linux_guest, observer, explicit, "52:54:00:19:0b:03", peer=None)
        assert ca.wait_domain(explicit, "protected", timeout=180)["peer"] == "cuju-b"
        assert cb.wait_domain(explicit, "standby", timeout=30)["peer"] == "cuju-a"
        assert cc.domain(explicit) is None and c.qemu_pid(explicit) is None
        rec = store.read(a.virsh("domuuid", explicit).strip())
        assert rec is not None
        assert (rec.record.owner, rec.record.backup, rec.record.mode, rec.record.wants_standby,
                rec.record.placement) == ("cuju-a", "cuju-b", "protected", False, None)
        assert "pl-explicit" not in log_since(cc, said_c)
    finally:
        cleanup_protected(rig3, auto)
        cleanup_protected(rig3, explicit)
