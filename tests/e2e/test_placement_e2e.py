"""Placement across the cluster (issue 9 item 3): three rig hosts, a 3-member etcd in the rig,
cujud on every host with ``etcd_endpoints`` and a failure domain each (a and b share rack1, c
is rack2). Each cujud registers its host under a lease; one of them is elected placer and
places the standby of every VM that has no ``peer``.

Host c's cujud starts first and the others only once it is the placer, so the scenarios know
who places. Every test is judged on cujud's state (``status``: protected, its peer, the
cluster's hosts and placer) and on its log, with generous deadlines."""

from __future__ import annotations

import json
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
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, cujud_cluster, protected_counter_xml
from cuju_libvirt.rig.etcd import EtcdCluster, etcd_binary, in_rig
from cuju_libvirt.rig.hosts import Rig
from tests.e2e.conftest import hooked_rig_or_skip
from tests.e2e.test_failover import runs

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)")

DOMAINS = {"a": "rack1", "b": "rack1", "c": "rack2"}
LEASE_TTL = 3


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    yield from hooked_rig_or_skip(3)


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


def placed_xml(rig: Rig, image: Path, name: str, mac: str) -> Path:
    """The counter guest marked for protection by ``xml enable`` without ``--peer``."""
    xml = protected_counter_xml(rig, image, name, mac=mac, peer="")
    element = etree.parse(str(xml)).find(f".//{{{FT_NAMESPACE}}}ft")
    assert element is not None and element.get("peer") is None
    return xml


def log_since(cujud: Cujud, offset: int) -> str:
    return cujud.log_path.read_bytes()[offset:].decode(errors="replace")


def log_size(cujud: Cujud) -> int:
    return cujud.log_path.stat().st_size if cujud.log_path.exists() else 0


@pytest.mark.timeout(420)
def test_a_vm_without_peer_gets_its_standby_on_a_host_of_another_failure_domain(
    rig3: Rig, etcd: EtcdCluster, counter_image: Path, cujuds: dict[str, Cujud]
) -> None:
    ca, cb, cc = cujuds["a"], cujuds["b"], cujuds["c"]
    name = "pl-domain"
    said = log_size(cc)
    try:
        wait_cluster(ca, lambda s: alive(s) == {"cuju-a", "cuju-b", "cuju-c"}, "three hosts alive")
        rig3.a.virsh("define", str(placed_xml(rig3, counter_image, name, "52:54:00:19:0b:00")))
        rig3.a.virsh("start", name)
        # b is the lighter host by standby count and shares nothing with a but its rack: never b
        assert ca.wait_domain(name, "protected", timeout=180)["peer"] == "cuju-c"
        assert cc.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-a"
        assert cb.domain(name) is None and rig3.b.qemu_pid(name) is None
        assert "placed the standby of pl-domain (owner cuju-a, failure domain rack1) on cuju-c " \
               "(failure domain rack2" in log_since(cc, said)

        uuid = rig3.a.virsh("domuuid", name).strip()
        rec = OwnershipStore(etcd.client(timeout=3.0)).read(uuid)
        assert rec is not None and (rec.record.owner, rec.record.backup, rec.record.mode) == (
            "cuju-a", "cuju-c", "protected")
        # what `cuju-libvirt status --json` shows of the cluster, from any host
        out = rig3.b.run([sys.executable, "-m", "cuju_libvirt.cli", "status", "--json"]).stdout
        cluster = json.loads(out)["cluster"]
        hosts = {h["name"]: h for h in cluster["hosts"]}
        assert {n: (h["lease_alive"], h["failure_domain"]) for n, h in hosts.items()} == {
            "cuju-a": (True, "rack1"), "cuju-b": (True, "rack1"), "cuju-c": (True, "rack2")}
        counts = (hosts["cuju-a"]["primaries"], hosts["cuju-c"]["backups"], hosts["cuju-b"]["backups"])
        assert counts == (1, 1, 0)
        assert all(h["mem_free_kib"] > 0 for h in hosts.values()) and cluster["placer"] == "cuju-c"
        text = rig3.b.run([sys.executable, "-m", "cuju_libvirt.cli", "status"]).stdout
        assert "cluster (etcd): 3 of 3 host(s) alive, placer cuju-c" in text
    finally:
        cleanup_protected(rig3, name)


@pytest.mark.timeout(420)
def test_the_placer_host_dies_another_cujud_becomes_placer_and_the_vm_that_lost_its_standby_gets_one(
    rig3: Rig, etcd: EtcdCluster, counter_image: Path, cujuds: dict[str, Cujud]
) -> None:
    """c is the placer and holds the VM's standby (the only host of another domain). c dies:
    its lease expires, a or b is elected, and the VM, running alone on a, is placed again:
    on b, its own rack being all there is (the fallback is logged)."""
    ca, cb, cc = cujuds["a"], cujuds["b"], cujuds["c"]
    c = rig3.host("c")
    name = "pl-placer"
    said = {n: log_size(x) for n, x in cujuds.items()}
    try:
        rig3.a.virsh("define", str(placed_xml(rig3, counter_image, name, "52:54:00:19:0b:01")))
        rig3.a.virsh("start", name)
        assert ca.wait_domain(name, "protected", timeout=180)["peer"] == "cuju-c"
        cc.wait_domain(name, "standby", timeout=30)
        assert cluster_of(ca)["placer"] == "cuju-c"

        c.crash()
        after = wait_cluster(ca, lambda s: s["placer"] in ("cuju-a", "cuju-b") and "cuju-c" not in alive(s),
                             "a new placer and c's lease gone", timeout=LEASE_TTL + 60)
        again = ca.wait_for(name, lambda e: e["state"] == "protected" and e["peer"] == "cuju-b",
                            "protected again, by b", timeout=180)
        assert again["role"] == "primary"
        assert cb.wait_domain(name, "standby", timeout=30)["peer"] == "cuju-a"
        assert runs(rig3.a, name)  # one read may land in an epoch's pause
        new_placer = {"cuju-a": ca, "cuju-b": cb}[after["placer"]]
        said_there = log_since(new_placer, said["a" if new_placer is ca else "b"])
        assert "this host is the cluster's placer now" in said_there
        assert "placed the standby of pl-placer (owner cuju-a, failure domain rack1) on cuju-b" in said_there
        assert "anti-affinity falls back to a host of the same failure domain" in said_there
    finally:
        cleanup_protected(rig3, name)
        if not c.processes():
            c.reboot()
