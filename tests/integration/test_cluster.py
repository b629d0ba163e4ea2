"""Host leases, the placer election and fenced placements (cuju_libvirt.cujud.cluster) against a
real 3-member etcd cluster on loopback. The members are driven round by round (``step``) so
that every test judges etcd's state after each round, not a timing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from cuju_libvirt.cujud.cluster import ClusterMember, cluster_status
from cuju_libvirt.cujud.coord import OwnershipStore
from cuju_libvirt.rig.etcd import EtcdCluster, etcd_binary

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)"),
]

TTL = 2
PEERS = ("a", "b", "c")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster.loopback(3) as c:
        yield c


@pytest.fixture
def store(etcd: EtcdCluster, request: pytest.FixtureRequest) -> OwnershipStore:
    return OwnershipStore(etcd.client(timeout=3.0), prefix=f"/test/{request.node.name}")


def member(store: OwnershipStore, node: str, domain: str, free_mib: int = 4096) -> ClusterMember:
    return ClusterMember(store, node=node, failure_domain=domain, ttl=TTL,
                         peers=lambda: [p for p in PEERS if p != node], stopping=threading.Event(),
                         resources=lambda: (free_mib * 1024, 8 << 20, 2, 0.5))


def wait_until(test: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s"
        time.sleep(0.1)


def test_hosts_register_under_leases_and_a_lost_host_disappears_when_its_lease_expires(
    store: OwnershipStore,
) -> None:
    a, b = member(store, "a", "rack1"), member(store, "b", "rack2", free_mib=2048)
    a.step()
    b.step()
    hosts = a.hosts()
    assert sorted(hosts) == ["a", "b"]
    assert (hosts["b"].failure_domain, hosts["b"].mem_free_kib, hosts["b"].peers) == ("rack2", 2048 * 1024,
                                                                                        ("a", "c"))
    lease = a.lease
    assert hosts["a"].lease == lease != 0
    a.start()  # a's cujud runs on: its own thread keeps the lease alive
    # b dies without a word: nothing renews its lease, its key goes when etcd expires it
    seen_until = time.monotonic()
    wait_until(lambda: "b" not in a.hosts(), "b gone", timeout=TTL + 20)
    assert time.monotonic() - seen_until >= TTL - 0.5  # not before its lease ran out
    time.sleep(TTL)
    assert a.hosts()["a"].lease == lease  # kept alive all the while: never registered anew
    a.close()  # a clean stop revokes the lease: the key goes at once
    assert a.hosts() == {}


def test_one_placer_is_elected_and_another_takes_over_when_its_host_is_lost(store: OwnershipStore) -> None:
    members = [member(store, n, n) for n in PEERS]
    for m in members:
        m.step()
    for m in members:
        m.step()
    placers = [m for m in members if m.is_placer]
    assert len(placers) == 1 and members[0].placer() == placers[0].node
    first = placers[0]
    # the placer's host is lost: it stops renewing; the others keep campaigning
    rest = [m for m in members if m is not first]
    wait_until(lambda: [m.step() for m in rest] and any(m.is_placer for m in rest), "a new placer",
               timeout=TTL + 20)
    assert sum(m.is_placer for m in rest) == 1
    assert first.placer() in {m.node for m in rest}
    for m in rest:
        m.close()


def test_the_placer_places_outside_the_owners_failure_domain_in_one_fenced_transaction(
    store: OwnershipStore,
) -> None:
    a, b, c = member(store, "a", "rack1"), member(store, "b", "rack1"), member(store, "c", "rack2")
    for m in (a, b, c):
        m.step()
    placer = next(m for m in (a, b, c) if m.is_placer)
    asked = store.want_standby("u1", "web", "a", memory_kib=256 * 1024)
    assert (asked.record.generation, asked.record.mode, asked.record.placement) == (1, "unprotected", None)
    assert placer.place_round() == [("web", "c")]
    assert placer.place_round() == []  # placed once: a second round leaves it alone
    got = a.request_standby("u1", "web", avoid=None, memory_kib=256 * 1024, wait=5, ended=lambda: False)
    assert got == ("c", "")
    # the owner pairs with c: protect clears the request, a later loss asks again (and avoids c)
    rec = store.protect("u1", "web", "a", "c")
    assert (rec.generation, rec.wants_standby, rec.placement) == (2, False, None)
    again = store.want_standby("u1", "web", "a", avoid="c")
    assert (again.record.generation, again.record.avoid) == (3, "c")
    assert placer.place_round() == [("web", "b")]  # c avoided: anti-affinity falls back to rack1

    status = cluster_status(store, a, configured=["b", "c", "z"])
    hosts = {h["name"]: h for h in status["hosts"]}
    assert hosts["z"]["lease_alive"] is False and hosts["c"]["failure_domain"] == "rack2"
    assert (hosts["a"]["primaries"], hosts["a"]["mem_free_kib"]) == (1, 4096 * 1024)
    assert status["placer"] == placer.node and status["vms"][0]["placement"] == "b"
    for m in (a, b, c):
        m.close()


def test_two_placers_can_never_both_place_and_a_deposed_one_never_places(store: OwnershipStore) -> None:
    a, b, c = member(store, "a", "r1"), member(store, "b", "r2"), member(store, "c", "r3")
    for m in (a, b, c):
        m.step()
    placer = next(m for m in (a, b, c) if m.is_placer)
    others = [m for m in (a, b, c) if m is not placer]
    asked = store.want_standby("u2", "db", "a")
    # a second cujud that (wrongly) believes it was elected in the same term: the record's
    # compare-and-swap lets exactly one placement through
    impostor = others[0]
    impostor.term = placer.term
    results: list[bool] = []
    start = threading.Barrier(2)

    def race(m: ClusterMember, target: str) -> None:
        start.wait()
        results.append(m._place(asked, target))

    threads = [threading.Thread(target=race, args=(placer, "b")),
               threading.Thread(target=race, args=(impostor, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    winner = store.read("u2")
    assert winner is not None and winner.record.placement in ("b", "c")
    # one elected earlier (an older term of the placer key) cannot place at all
    stale = others[1]
    stale.term = placer.term - 1
    fresh = store.want_standby("u2", "db", "a", avoid=winner.record.placement)
    assert not stale._place(fresh, "b")
    assert store.read("u2") == fresh
    for m in (a, b, c):
        m.close()


def test_the_avoided_host_when_it_is_the_only_one_is_placed_once_and_taken(store: OwnershipStore) -> None:
    """After a failover the owner avoids its old primary host while that host's cujud is not
    back; when that host is all there is, the placer places there once (no new write every
    round) and the owner takes it."""
    a, b = member(store, "a", "r1"), member(store, "b", "r2")
    a.step()
    b.step()
    placer = a if a.is_placer else b
    store.want_standby("u3", "app", "b", avoid="a")
    assert placer.place_round() == [("app", "a")]
    placed = store.read("u3")
    assert placer.place_round() == [] and store.read("u3") == placed
    assert b.request_standby("u3", "app", avoid="a", memory_kib=0, wait=2, ended=lambda: False) == ("a", "")
    assert store.read("u3") == placed  # the same request: asked again, nothing rewritten
    for m in (a, b):
        m.close()


def test_a_placement_on_the_avoided_host_moves_as_soon_as_another_host_qualifies(
    store: OwnershipStore,
) -> None:
    """The avoided host was all there was, so the standby was placed there; a host that joins
    the cluster later takes the placement over in the placer's next round (the owner would
    otherwise retry the host that failed it for as long as that host's lease lives)."""
    a, b = member(store, "a", "r1"), member(store, "b", "r2")
    a.step()
    b.step()
    placer = a if a.is_placer else b
    store.want_standby("u4", "app", "b", avoid="a")
    assert placer.place_round() == [("app", "a")]
    c = member(store, "c", "r3")
    c.step()
    assert placer.place_round() == [("app", "c")]
    moved = store.read("u4")
    assert moved is not None and (moved.record.placement, moved.record.avoid) == ("c", "a")
    assert placer.place_round() == [] and store.read("u4") == moved  # c is not avoided: left alone
    assert b.request_standby("u4", "app", avoid="a", memory_kib=0, wait=2, ended=lambda: False) == ("c", "")
    for m in (a, b, c):
        m.close()


def test_a_host_without_room_for_the_vm_is_never_chosen_and_placed_memory_counts(
    store: OwnershipStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """Free memory as the hosts registered it, less what is placed there and not yet paired:
    b has 3 GiB free, c 1 GiB; a 2 GiB VM goes to b, a second one to no host (a WARNING
    says why) until b's first standby pairs and b registers what is really left."""
    a = member(store, "a", "r1")
    b, c = member(store, "b", "r2", free_mib=3072), member(store, "c", "r3", free_mib=1024)
    for m in (a, b, c):
        m.step()
    placer = next(m for m in (a, b, c) if m.is_placer)
    store.want_standby("u5", "big1", "a", memory_kib=2048 * 1024)
    store.want_standby("u6", "big2", "a", memory_kib=2048 * 1024)
    with caplog.at_level(logging.WARNING, logger="cuju_libvirt.cujud.cluster"):
        assert placer.place_round() == [("big1", "b")]
        assert placer.place_round() == []
    second = store.read("u6")
    assert second is not None and second.record.placement is None
    said = [r.getMessage() for r in caplog.records if "big2" in r.getMessage()]
    reason = ("no live host has 2048 MiB free for its standby (most: 1024 MiB, standbys placed there but "
              "not yet paired counted)")
    assert said == [f"cannot place the standby of big2 yet: {reason}"]  # once
    # the reason is in the record: the owner stops waiting and says it (a few rounds, not 60 s)
    assert second.record.unplaced == reason
    asked_at = time.monotonic()
    assert a.request_standby("u6", "big2", avoid=None, memory_kib=2048 * 1024, wait=60,
                             ended=lambda: False) == (None, reason)
    assert time.monotonic() - asked_at < 30
    # b's first standby pairs, b registers 4 GiB free: the next round places big2 there
    store.protect("u5", "big1", "a", "b")
    b._resources = lambda: (4096 * 1024, 8 << 20, 2, 0.5)
    b._renewed = 0.0
    b.step()
    assert placer.place_round() == [("big2", "b")]
    placed = store.read("u6")
    assert placed is not None and (placed.record.placement, placed.record.unplaced) == ("b", None)
    for m in (a, b, c):
        m.close()


def test_when_the_placer_says_nothing_the_owner_chooses_by_the_same_rules(store: OwnershipStore) -> None:
    """No placer places (none runs its rounds here): the owner's wait ends with no answer and
    no reason, and ``choose_here`` gives the placer's choice from etcd's view of the cluster."""
    a, b, c = member(store, "a", "rack1"), member(store, "b", "rack1"), member(store, "c", "rack2")
    for m in (a, b, c):
        m.step()
    answer = a.request_standby("u7", "quiet", avoid=None, memory_kib=0, wait=1, ended=lambda: False)
    assert answer == (None, "")
    assert a.choose_here("u7") == ("c", "")  # outside a's rack, as the placer would
    assert a.choose_here("nope")[0] is None
    for m in (a, b, c):
        m.close()
