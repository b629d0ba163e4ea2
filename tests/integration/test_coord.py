"""The etcd client and the ownership records, against a real 3-member etcd cluster on loopback."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

from cuju_libvirt.cujud import daemon, orchestrator
from cuju_libvirt.cujud.coord import Compare, EtcdClient, Get, Ownership, OwnershipStore, Put
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CoordError, CoordUnavailable, CujuError
from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.etcd import EtcdCluster, etcd_binary

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster.loopback(3) as c:
        yield c


@pytest.fixture
def store(cluster: EtcdCluster, request: pytest.FixtureRequest) -> OwnershipStore:
    return OwnershipStore(cluster.client(timeout=3.0), prefix=f"/test/{request.node.name}")


def test_kv_and_compare_and_swap(cluster: EtcdCluster) -> None:
    client = cluster.client()
    key = "/test/kv/x"
    assert client.get(key) is None
    rev = client.put(key, b"one")
    kv = client.get(key)
    assert kv is not None and kv.value == b"one" and kv.mod_revision == rev
    stale = client.txn([Compare.mod_revision(key, rev - 1)], [Put(key, b"two")], [Get(key)])
    assert not stale.succeeded and stale.ranges[0][0].value == b"one"
    fresh = client.txn([Compare.mod_revision(key, rev)], [Put(key, b"two")], [Get(key)])
    assert fresh.succeeded and fresh.revision > rev
    assert client.get(key).value == b"two"  # type: ignore[union-attr]
    assert [kv.key for kv in client.get_prefix("/test/kv/")] == [key]
    assert client.delete("/test/kv/", prefix=True) == 1


def test_protect_claim_release_and_the_fencing_generation(store: OwnershipStore) -> None:
    rec = store.protect("u1", "vm1", owner="a", backup="b")
    assert (rec.owner, rec.backup, rec.mode, rec.generation) == ("a", "b", "protected", 1)
    with pytest.raises(CoordError, match="records a as the owner"):
        store.protect("u1", "vm1", owner="b", backup="a")
    won = store.claim("u1", "b", rec.generation)
    assert won.won and won.record == Ownership("u1", "vm1", "b", None, "unprotected", 2)
    # the loser of the race, and any copy that comes back with the old generation
    lost = store.claim("u1", "a", rec.generation)
    assert not lost.won and lost.record.owner == "b"
    # a repeated claim whose first answer was lost counts as won, and changes nothing
    assert store.claim("u1", "b", rec.generation) == won
    assert store.read("u1").record.generation == 2  # type: ignore[union-attr]
    # an outsider, and a copy newer than the record (nonsense: refuse to guess)
    assert not store.claim("u1", "c", 2).won
    with pytest.raises(CoordError, match="older than this copy"):
        store.claim("u1", "b", 7)
    # the new owner re-protects onto a; a stopped VM may be taken by anyone
    again = store.protect("u1", "vm1", owner="b", backup="a")
    assert again.generation == 3
    assert store.release("u1", "a") is None  # not the owner
    stopped = store.release("u1", "b", mode="stopped")
    assert stopped is not None and stopped.generation == 4 and stopped.backup is None
    assert store.protect("u1", "vm1", owner="a", backup="b").generation == 5
    with pytest.raises(CoordError, match="nothing to claim"):
        store.claim("missing", "a", 1)


def test_a_retried_pairing_keeps_its_generation_until_ownership_changes(store: OwnershipStore) -> None:
    first = store.protect("u1", "vm1", owner="a", backup="b")
    revision = store.read("u1").mod_revision  # type: ignore[union-attr]
    again = store.protect("u1", "vm1", owner="a", backup="b", again=first.generation)
    assert again == first
    assert store.read("u1").mod_revision == revision  # type: ignore[union-attr]  # nothing written
    # another backup is another pairing; without the promise (again=0) the same one too
    assert store.protect("u1", "vm1", owner="a", backup="c", again=first.generation).generation == 2
    assert store.protect("u1", "vm1", owner="a", backup="c").generation == 3
    # the record moved on (a claim): the old generation is no reason to keep anything
    store.claim("u1", "a", 3)
    assert store.protect("u1", "vm1", owner="a", backup="c", again=3).generation == 5


def test_status_lists_the_witness_records_and_says_when_etcd_does_not_answer(store: OwnershipStore) -> None:
    store.protect("u1", "web", owner="a", backup="c")
    cujud: Any = SimpleNamespace(orchestrator=SimpleNamespace(witness=store, cluster=None),
                                 cfg=SimpleNamespace(peers={"c": None}))
    answer = daemon.Daemon.cluster_status(cujud)
    assert answer["vms"] == [{"uuid": "u1", "name": "web", "owner": "a", "backup": "c", "mode": "protected",
                              "generation": 1, "placement": None}]
    # no host registered (no cluster member here): the hosts the records and peers name, not alive
    assert [(h["name"], h["lease_alive"], h["primaries"], h["backups"]) for h in answer["hosts"]] == [
        ("a", False, 1, 0), ("c", False, 0, 1)]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = OwnershipStore(EtcdClient([f"http://127.0.0.1:{unused.getsockname()[1]}"], timeout=0.3))
        cujud.orchestrator.witness = dead
        answer = daemon.Daemon.cluster_status(cujud)
    assert answer["vms"] == [] and "no etcd member answered" in answer["error"]
    cujud.orchestrator = SimpleNamespace(witness=None)
    assert daemon.Daemon.cluster_status(cujud) is None


class RefusingPeer:
    """The backup's cujud: refuses every standby; ``promises``: it answers standby-abandon."""

    def __init__(self, promises: bool) -> None:
        self.promises = promises

    def request(self, kind: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if kind == "standby-abandon" and self.promises:
            return {"abandoned": True}
        raise CujuError(f"{kind}: refused by the test's peer")


class RunningQMP:
    """The QMP client of a QEMU that runs: the pairing asks QEMU's run state before any standby."""

    def __init__(self, path: object) -> None:
        self.path = path

    def __enter__(self) -> RunningQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, command: str) -> dict[str, str]:
        assert command == "query-status", command
        return {"status": "running"}


@pytest.mark.parametrize("promises", [True, False])
def test_a_failing_pairing_raises_the_generation_only_without_the_peers_promise(
        store: OwnershipStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, promises: bool) -> None:
    """Issue 9: every retry of a failed pairing raised the record's generation. With the
    peer's promise that no standby is left, a retry is the same pairing (same generation);
    without it, a copy at the old generation may exist, so the next attempt fences it off."""
    uuid = f"0f1e2d3c-0000-4000-8000-00000000000{int(promises)}"
    spec = parse_domain(domain_xml("vm", kernel="/k", metadata=[
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostb"/>']))
    assert spec is not None
    dom = SimpleNamespace(XMLDesc=lambda flags: "<domain/>", isPersistent=lambda: False,
                          state=lambda: [libvirt.VIR_DOMAIN_RUNNING, 0])
    no_stats = SimpleNamespace(domainListGetStats=lambda *a: [])  # no disk sizes (3c23cd8 reads them)
    orch: Any = SimpleNamespace(node="hosta", witness=store, state_dir=tmp_path, lookup=lambda uuid: dom,
                                links=SimpleNamespace(connection=lambda name: RefusingPeer(promises)),
                                cfg=SimpleNamespace(request_timeout=1.0),
                                libvirt=SimpleNamespace(conn=no_stats))
    orch.witness_protect = lambda *a, **k: orchestrator.Orchestrator.witness_protect(orch, *a, **k)
    monkeypatch.setattr(orchestrator, "qemu_pid", lambda name: 1)
    monkeypatch.setattr(orchestrator, "ram_backing", lambda pid: None)
    monkeypatch.setattr(orchestrator.fitness, "check_live_fitness", lambda xml: [])  # the fake's "<domain/>"
    monkeypatch.setattr(orchestrator, "QMPClient", RunningQMP)  # d97b844 asks QEMU for its run state
    p = orchestrator.PrimaryDomain(orch, "vm", uuid, spec, "hostb", spec_link=False)
    monkeypatch.setattr(p, "_settle", lambda: True)
    generations = []
    for _ in range(3):
        with pytest.raises(CujuError, match="pairing with hostb failed"):
            p._pair_once()
        generations.append(store.read(uuid).record.generation)  # type: ignore[union-attr]
    assert generations == ([1, 1, 1] if promises else [1, 2, 3])


def test_both_sides_race_one_transaction_exactly_one_wins(store: OwnershipStore) -> None:
    """Two racers per round, released together: one winner, the loser sees the winner's record."""
    for round_no in range(25):
        uuid = f"race-{round_no}"
        rec = store.protect(uuid, "vm", owner="a", backup="b")
        results: dict[str, object] = {}
        barrier = threading.Barrier(2)

        def race(me: str, uuid: str = uuid, gen: int = rec.generation, barrier: threading.Barrier = barrier,
                 results: dict[str, object] = results) -> None:
            barrier.wait()
            results[me] = store.claim(uuid, me, gen)

        threads = [threading.Thread(target=race, args=(me,)) for me in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        claims = [results["a"], results["b"]]
        winners = [c for c in claims if c.won]  # type: ignore[attr-defined]
        assert len(winners) == 1, claims
        winner = winners[0].record  # type: ignore[attr-defined]
        assert all(c.record == winner for c in claims), claims  # type: ignore[attr-defined]
        assert store.read(uuid).record == winner  # type: ignore[union-attr]


def test_no_member_answers_is_unavailable_within_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = EtcdClient([f"http://127.0.0.1:{port}"], timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(CoordUnavailable, match="no etcd member answered"):
        OwnershipStore(client).claim("u", "a", 1)
    assert time.monotonic() - t0 < 1.0


def test_a_frozen_member_is_skipped_and_a_killed_leader_replaced(cluster: EtcdCluster,
                                                                store: OwnershipStore) -> None:
    rec = store.protect("leader", "vm", owner="a", backup="b")
    leader = cluster.leader()
    assert leader.proc is not None
    # a member that hangs (SIGSTOP): the client, which tries it first, goes on to the next one
    frozen = EtcdClient([leader.client_url] + [m.client_url for m in cluster.members if m is not leader],
                        timeout=3.0)
    os.kill(leader.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        claim = OwnershipStore(frozen, store.prefix).claim("leader", "b", rec.generation)
        frozen_s = time.monotonic() - t0
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    assert claim.won and claim.record.owner == "b"
    assert frozen_s < 3.0
    cluster.wait_healthy(30)
    # SIGKILL the leader: the next transaction goes through a follower once a new leader is elected
    leader = cluster.leader()
    cluster.kill_member(leader)
    try:
        t0 = time.monotonic()
        again = store.protect("leader", "vm", owner="b", backup="a")
        killed_s = time.monotonic() - t0
        assert again.generation == 3
        assert killed_s < 3.0
        assert cluster.leader() is not leader
    finally:
        cluster.start_member(leader)
        cluster.wait_healthy(30)
