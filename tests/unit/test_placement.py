"""The placer's choice (cuju_libvirt.cujud.cluster.choose) and the placement fields of the
ownership records: pure, no etcd (tests/integration/test_cluster.py runs them against etcd)."""

from __future__ import annotations

import pytest

from cuju_libvirt.cujud.cluster import HostInfo, choose, headroom, promised_memory, standby_counts
from cuju_libvirt.cujud.coord import Ownership
from cuju_libvirt.errors import CoordError

GIB = 1 << 20  # KiB


def host(name: str, domain: str, free_gib: float = 8, peers: tuple[str, ...] | None = None, *,
         load1: float = 0.0, cpus: int = 4) -> HostInfo:
    return HostInfo(name, domain, mem_free_kib=int(free_gib * GIB), mem_total_kib=16 * GIB, cpus=cpus,
                    load1=load1, peers=peers if peers is not None else ("a", "b", "c", "d"))


def want(owner: str = "a", **kw: object) -> Ownership:
    return Ownership("u1", "web", owner, None, "unprotected", 3, wants_standby=True, **kw)  # type: ignore[arg-type]


def test_never_the_owners_host_nor_its_failure_domain_while_another_exists() -> None:
    hosts = {"a": host("a", "rack1"), "b": host("b", "rack1", free_gib=15),
             "c": host("c", "rack2", free_gib=1)}
    assert choose(want(), hosts, {}) == ("c", "")  # b has more memory free, but shares a's rack


def test_the_same_failure_domain_only_as_a_fallback_and_then_with_a_note() -> None:
    hosts = {"a": host("a", "rack1"), "b": host("b", "rack1")}
    chosen, note = choose(want(), hosts, {})
    assert chosen == "b"
    assert "no live host outside failure domain 'rack1' of a" in note and "falls back" in note


def test_balance_fewest_standbys_then_most_free_memory_then_name() -> None:
    hosts = {"a": host("a", "r1"), "b": host("b", "r2", free_gib=4), "c": host("c", "r3", free_gib=6),
             "d": host("d", "r4", free_gib=6)}
    assert choose(want(), hosts, {"c": 2, "d": 2}) == ("b", "")
    assert choose(want(), hosts, {"b": 1}) == ("c", "")  # c and d tie on memory: by name
    assert choose(want(), hosts, {}) == ("c", "")


def test_a_busy_cpu_weighs_like_scarce_memory_the_scarcer_resource_decides() -> None:
    """Headroom is the share of the host left of its scarcer resource: b has twice c's memory
    free but its 4 CPUs are all busy (load 4), so the standby goes to the idle c; with b half
    busy (2 of 4 CPUs idle: 50 %) b's memory (50 %) and CPU tie above c's 25 % of memory."""
    vm = want(memory_kib=GIB)
    hosts = {"a": host("a", "r1"), "b": host("b", "r2", free_gib=9, load1=4.0),
             "c": host("c", "r3", free_gib=5)}
    assert choose(vm, hosts, {}) == ("c", "")
    assert choose(vm, {**hosts, "b": host("b", "r2", free_gib=9, load1=2.0)}, {}) == ("b", "")
    # the fewest standbys still come first: an idle host with one standby loses to a busy one
    assert choose(vm, hosts, {"c": 1}) == ("b", "")


def test_noise_in_free_memory_and_load_never_decides_between_equal_hosts() -> None:
    """Hosts whose headroom differs by less than HEADROOM_TIE (5 % of a host) are equal: the
    name decides, whatever the last renewal read (free memory and load move all the time)."""
    for b_free, c_free, b_load, c_load in ((8.0, 8.3, 1.0, 1.1), (8.3, 8.0, 1.1, 1.0), (8.0, 8.0, 0.0, 0.1)):
        hosts = {"a": host("a", "r1"), "b": host("b", "r2", b_free, load1=b_load),
                 "c": host("c", "r3", c_free, load1=c_load)}
        assert choose(want(), hosts, {}) == ("b", ""), (b_free, c_free, b_load, c_load)


def test_with_every_cpu_saturated_memory_still_balances() -> None:
    """A shared machine whose load exceeds its CPUs everywhere (no CPU headroom anywhere): the
    memory left decides, not the name."""
    hosts = {"a": host("a", "r1"), "b": host("b", "r2", free_gib=2, load1=9.0),
             "c": host("c", "r3", free_gib=10, load1=6.0)}
    assert choose(want(), hosts, {}) == ("c", "")


def test_a_host_that_registered_no_cpu_count_or_total_memory_has_no_headroom() -> None:
    old = HostInfo("b", "r2", mem_free_kib=12 * GIB)  # a record of an older cujud: no total, no CPUs
    assert headroom(old, 12 * GIB) == (0.0, 0.0)
    assert headroom(host("c", "r3", free_gib=4, load1=1.0), 4 * GIB) == (0.25, 0.25)
    assert headroom(host("c", "r3", free_gib=8, load1=1.0), 8 * GIB) == (0.5, 0.5)
    assert headroom(host("c", "r3", free_gib=8, load1=3.0), 8 * GIB) == (0.25, 0.5)
    assert choose(want(), {"a": host("a", "r1"), "b": old, "c": host("c", "r3", free_gib=4)}, {}) == ("c", "")


def test_only_hosts_the_owner_is_connected_to_and_with_room_for_the_vm() -> None:
    hosts = {"a": host("a", "r1", peers=("b",)), "b": host("b", "r1"), "c": host("c", "r2")}
    chosen, note = choose(want(), hosts, {})
    assert chosen == "b" and "falls back" in note  # c is of another domain but not connected to a
    lonely = {"a": host("a", "r1", peers=()), "c": host("c", "r2")}
    assert choose(want(), lonely, {}) == (None, "no live host is connected to a's cujud (connected: none)")
    big = want(memory_kib=10 * GIB)
    assert choose(big, {"a": host("a", "r1"), "b": host("b", "r2", free_gib=9)}, {})[0] is None
    assert "10240 MiB free" in choose(big, {"a": host("a", "r1"), "b": host("b", "r2", free_gib=9)}, {})[1]


def test_the_host_the_last_pairing_failed_with_is_avoided_unless_it_is_the_only_one() -> None:
    hosts = {"a": host("a", "r1"), "b": host("b", "r2"), "c": host("c", "r3", free_gib=1)}
    assert choose(want(avoid="b"), hosts, {}) == ("c", "")
    assert choose(want(avoid="b"), {"a": hosts["a"], "b": hosts["b"]}, {}) == ("b", "")
    assert choose(want(), {"a": hosts["a"]}, {}) == (None, "no live host is connected to a's cujud "
                                                          "(connected: a, b, c, d)")


def test_standby_counts_include_placements_not_yet_paired() -> None:
    records = [Ownership("u1", "x", "a", "b", "protected", 1),
               Ownership("u2", "y", "a", None, "unprotected", 1, wants_standby=True, placement="b"),
               Ownership("u3", "z", "c", None, "unprotected", 1, wants_standby=True),
               Ownership("u4", "w", "c", None, "stopped", 1)]
    assert standby_counts(records) == {"b": 2}


def test_memory_promised_to_standbys_placed_but_not_yet_paired_counts_as_taken() -> None:
    """A host's registered free memory does not show the standbys placed on it a moment ago
    (the host re-registers every third of its lease): two 3 GiB VMs never both go to one host
    with 4 GiB free."""
    records = [Ownership("u1", "x", "a", "b", "protected", 1),
               want(placement="b", memory_kib=3 * GIB),
               Ownership("u5", "v", "c", None, "unprotected", 1, wants_standby=True, memory_kib=GIB)]
    assert promised_memory(records) == {"b": 3 * GIB}
    hosts = {"a": host("a", "r1"), "b": host("b", "r2", free_gib=4), "c": host("c", "r3", free_gib=2)}
    second = want(memory_kib=3 * GIB)
    assert choose(second, hosts, {}) == ("b", "")
    chosen, note = choose(second, hosts, {}, promised_memory(records))
    assert chosen is None and "no live host has 3072 MiB free" in note and "(most: 2048 MiB" in note
    # balance by the memory left: b (4 - 3 GiB) loses to c (2 GiB) for a small VM
    assert choose(want(memory_kib=GIB // 2), hosts, {}, promised_memory(records)) == ("c", "")


def test_records_without_placement_encode_as_before_and_placement_round_trips() -> None:
    plain = Ownership("u1", "web", "a", "b", "protected", 2)
    assert plain.encode() == (b'{"backup": "b", "generation": 2, "mode": "protected", "name": "web", '
                              b'"owner": "a", "uuid": "u1"}')
    placed = want(placement="c", avoid="b", memory_kib=262144)
    assert Ownership.decode(placed.encode()) == placed
    unplaced = want(unplaced="no live host has 1024 MiB free")
    assert Ownership.decode(unplaced.encode()) == unplaced and b'"unplaced"' not in placed.encode()
    assert Ownership.decode(plain.encode()) == plain


def test_host_records_round_trip_and_malformed_ones_are_refused() -> None:
    info = host("b", "rack2")
    assert HostInfo.decode(info.encode(), lease=7) == HostInfo(**{**info.__dict__, "lease": 7})
    assert HostInfo.decode(b'{"name": "x"}').failure_domain == "x"
    with pytest.raises(CoordError, match="malformed host record"):
        HostInfo.decode(b'{"failure_domain": "r"}')
