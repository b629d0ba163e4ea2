"""The cluster of cujud hosts in etcd: host leases, one elected placer, and its placements.

Every cujud with ``etcd_endpoints`` registers its host under an etcd lease of its own
(``host_lease_ttl`` seconds, kept alive every third of it)::

    PREFIX/host/NODE   {"name", "failure_domain", "mem_free_kib", "mem_total_kib", "cpus",
                        "load1", "peers": [the peers its cujud is connected to]}

The key lives exactly as long as the lease: a host whose cujud dies, or that loses etcd,
disappears from the cluster once its lease expires; nothing else has to notice it.

**The placer** is elected with etcd's own primitive, a key bound to a lease and created by
a compare-and-swap (the pattern of etcd's ``concurrency.Election``): each cujud tries
``txn(version(PREFIX/placer) == 0 -> put(PREFIX/placer, NODE, lease))``; the one whose put
went through is the placer for as long as its lease lives. When that host dies its lease
expires, the key goes with it, and the next try of another cujud wins.

**Placing.** An owner that needs a backup host (a VM without ``peer`` or with
``peer='auto'``, or one that failed over here, or whose backup was lost) sets
``wants_standby`` in its ownership record
(:meth:`~cuju_libvirt.cujud.coord.OwnershipStore.want_standby`). The placer chooses a host
(:func:`choose`) and writes it as the record's ``placement`` in one transaction that
compares both the record's ``mod_revision`` and the ``create_revision`` of its own placer
key: a placer that lost its election (or a second one that believes it won) can never place,
and two placements of one record can never both go through. The owner reads the placement
and pairs with that host as before (``protect`` then clears the request).

The choice (:func:`choose`): only live hosts (a lease) other than the owner, that the
owner's cujud is connected to, with room for the VM's memory (the host's registered free
memory less the memory of the standbys already placed there but not yet paired); never in
the owner's failure domain while a host of another domain qualifies (a fallback into the
same domain is logged as a WARNING); not the host the owner's last pairing failed with
(``avoid``) while another qualifies; then the fewest standbys, the most headroom
(:func:`headroom`: the share left of the host's scarcer resource, memory or idle CPU, then
of its memory; within :data:`HEADROOM_TIE` counts as equal), the name. No host fits: the
reason goes into the record (``unplaced``) for the owner to say. A placement on the avoided
host (it was the only one) is moved as soon as another host qualifies, and otherwise left
alone (no rewrite every round).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from cuju_libvirt.cujud.coord import (
    Compare,
    Delete,
    EtcdClient,
    Get,
    Ownership,
    OwnershipStore,
    Put,
    Versioned,
)
from cuju_libvirt.errors import CoordError

LOG = logging.getLogger(__name__)

#: How often the placer looks for records that want a standby, and a cujud campaigns (s).
ROUND_INTERVAL = 0.5
#: How often an owner re-reads its record while it waits for a placement (s).
PLACEMENT_POLL = 0.25
#: Two hosts whose headroom (:func:`headroom`) differs by less than this share of a host
#: count as equally free: free memory and load move all the time, and noise must not decide.
HEADROOM_TIE = 0.05
#: How long an owner still waits once the placer wrote that no host fits (a few rounds) (s).
UNPLACED_WAIT = 3 * ROUND_INTERVAL


@dataclass(frozen=True)
class HostInfo:
    """One host of the cluster as its cujud registered it (``lease`` 0: no lease, i.e. dead)."""

    name: str
    failure_domain: str
    mem_free_kib: int = 0
    mem_total_kib: int = 0
    cpus: int = 0
    load1: float = 0.0
    peers: tuple[str, ...] = ()
    lease: int = 0

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "failure_domain": self.failure_domain,
                           "mem_free_kib": self.mem_free_kib, "mem_total_kib": self.mem_total_kib,
                           "cpus": self.cpus, "load1": self.load1, "peers": list(self.peers)},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, lease: int = 0) -> HostInfo:
        try:
            data = json.loads(raw)
            return cls(name=str(data["name"]), failure_domain=str(data.get("failure_domain") or data["name"]),
                       mem_free_kib=int(data.get("mem_free_kib", 0)),
                       mem_total_kib=int(data.get("mem_total_kib", 0)), cpus=int(data.get("cpus", 0)),
                       load1=float(data.get("load1", 0.0)),
                       peers=tuple(str(p) for p in data.get("peers", ())), lease=lease)
        except (ValueError, KeyError, TypeError) as err:
            raise CoordError(f"malformed host record {raw[:120]!r}: {err}") from err


def local_resources(meminfo: str = "/proc/meminfo") -> tuple[int, int, int, float]:
    """This host's (free memory KiB, total memory KiB, CPUs, 1-minute load average).

    Free memory is the kernel's ``MemAvailable`` (what can be given to a new process
    without swapping), not ``MemFree``."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key] = int(parts[0])
    except OSError:
        pass
    return (fields.get("MemAvailable", fields.get("MemFree", 0)), fields.get("MemTotal", 0),
            os.cpu_count() or 0, os.getloadavg()[0])


def standby_counts(records: Iterable[Ownership]) -> Counter[str]:
    """How many standbys each host holds or is about to receive (placed, not yet paired)."""
    counts: Counter[str] = Counter()
    for rec in records:
        if rec.mode == "protected" and rec.backup:
            counts[rec.backup] += 1
        elif rec.wants_standby and rec.placement:
            counts[rec.placement] += 1
    return counts


def promised_memory(records: Iterable[Ownership]) -> Counter[str]:
    """The memory (KiB) of the standbys placed on each host but not paired yet: the host's
    registered free memory does not show them, so the placer counts it as taken."""
    promised: Counter[str] = Counter()
    for rec in records:
        if rec.wants_standby and rec.placement and rec.mode == "unprotected":
            promised[rec.placement] += rec.memory_kib
    return promised


def choose(rec: Ownership, hosts: Mapping[str, HostInfo], standbys: Mapping[str, int],
           promised: Mapping[str, int] | None = None) -> tuple[str | None, str]:
    """The host for the standby of ``rec``'s VM among the live ``hosts``, and a note.

    ``standbys``: the standbys each host holds or was placed (:func:`standby_counts`);
    ``promised``: the memory of those placed but not paired yet (:func:`promised_memory`,
    without ``rec``'s own), taken from the host's registered free memory. The note says why
    no host was chosen, or that anti-affinity had to fall back (the host shares the owner's
    failure domain); it is empty for an ordinary choice."""
    owner = hosts.get(rec.owner)
    candidates = [h for name, h in hosts.items() if name != rec.owner]
    if owner is not None:
        candidates = [h for h in candidates if h.name in owner.peers]
        if not candidates:
            return None, (f"no live host is connected to {rec.owner}'s cujud (connected: "
                          f"{', '.join(owner.peers) or 'none'})")
    if not candidates:
        return None, "no live host other than its owner"
    if rec.avoid and any(h.name != rec.avoid for h in candidates):
        candidates = [h for h in candidates if h.name != rec.avoid]
    promised = promised or {}

    def free(h: HostInfo) -> int:
        return h.mem_free_kib - promised.get(h.name, 0)

    if rec.memory_kib:
        fitting = [h for h in candidates if free(h) >= rec.memory_kib]
        if not fitting:
            return None, (f"no live host has {rec.memory_kib // 1024} MiB free for its standby (most: "
                          f"{max(free(h) for h in candidates) // 1024} MiB, standbys placed there "
                          "but not yet paired counted)")
        candidates = fitting
    note = ""
    domain = owner.failure_domain if owner is not None else None
    elsewhere = [h for h in candidates if h.failure_domain != domain]
    if elsewhere:
        candidates = elsewhere
    elif domain is not None:
        note = (f"no live host outside failure domain {domain!r} of {rec.owner} can hold it: anti-affinity "
                "falls back to a host of the same failure domain")
    fewest = min(standbys.get(h.name, 0) for h in candidates)
    pool = [h for h in candidates if standbys.get(h.name, 0) == fewest]
    room = {h.name: headroom(h, free(h) - rec.memory_kib) for h in pool}
    for part in (0, 1):  # the scarcer resource, then memory; near-equal counts as equal
        best = max(room[h.name][part] for h in pool)
        pool = [h for h in pool if room[h.name][part] >= best - HEADROOM_TIE]
    return min(pool, key=lambda h: h.name).name, note


def headroom(h: HostInfo, mem_left_kib: int) -> tuple[float, float]:
    """What ``h`` has left once the standby is there, as shares of the host: (that of its
    scarcer resource, that of its memory). Memory: ``mem_left_kib`` of its total; CPU: the
    CPUs its 1-minute load leaves idle, of its CPUs (0 when saturated or over). A host that
    registered no total memory or CPU count has none of it to offer."""
    mem = max(0.0, mem_left_kib / h.mem_total_kib) if h.mem_total_kib > 0 else 0.0
    cpu = max(0.0, (h.cpus - h.load1) / h.cpus) if h.cpus > 0 else 0.0
    return min(mem, cpu), mem


class ClusterMember:
    """This cujud's part of the cluster: its host lease, its candidacy as placer, and (while
    elected) the placements. One thread; every etcd failure is logged once and retried."""

    def __init__(self, store: OwnershipStore, *, node: str, failure_domain: str, ttl: int,
                 peers: Callable[[], Sequence[str]], stopping: threading.Event,
                 resources: Callable[[], tuple[int, int, int, float]] = local_resources) -> None:
        self.store = store
        self.client: EtcdClient = store.client
        self.node = node
        self.failure_domain = failure_domain or node
        self.ttl = max(1, int(ttl))
        self._peers = peers
        self._resources = resources
        self.stopping = stopping
        self.host_key = f"{store.prefix}/host/{node}"
        self.placer_key = f"{store.prefix}/placer"
        #: The lease this host is registered under (0: none yet, or it was lost).
        self.lease = 0
        #: The ``create_revision`` of the placer key while this cujud is the placer, else 0.
        self.term = 0
        self._renewed = 0.0
        self._trouble = ""
        self._noted: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_placer(self) -> bool:
        return self.term != 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cujud-cluster", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Leave the cluster: revoke the lease (the host key, and the placer key if held, go
        with it at once instead of at its expiry)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self.lease:
            try:
                self.client.lease_revoke(self.lease)
            except CoordError as err:
                LOG.warning("could not revoke this host's lease in etcd (it expires in %d s): %s",
                            self.ttl, err)
            self.lease, self.term = 0, 0

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set() and not self.stopping.is_set():
            try:
                self.step()
                if self._trouble:
                    LOG.info("etcd answers again: this host is registered in the cluster (lease %x)",
                             self.lease)
                    self._trouble = ""
            except CoordError as err:
                if str(err) != self._trouble:
                    LOG.warning("cluster membership in etcd: %s (retrying)", err)
                    self._trouble = str(err)
                if self.term:
                    LOG.warning("no longer sure to be the placer: stops placing until etcd answers")
                self.term = 0
            self._stop.wait(ROUND_INTERVAL)

    def step(self) -> None:
        """One round: keep the lease and the host record fresh, campaign, place (if elected)."""
        self._keep_lease()
        self._campaign()
        if self.term:
            self.place_round()

    def _keep_lease(self) -> None:
        now = time.monotonic()
        if self.lease and now - self._renewed < self.ttl / 3:
            return
        if self.lease and self.client.lease_keepalive(self.lease) <= 0:
            LOG.warning("this host's lease in etcd expired (etcd unreachable for more than %d s?): "
                        "registering again", self.ttl)
            self.lease, self.term = 0, 0
        if not self.lease:
            self.lease = self.client.lease_grant(self.ttl)
            LOG.info("registered this host in the cluster (failure domain %r, lease %x of %d s)",
                     self.failure_domain, self.lease, self.ttl)
        free, total, cpus, load1 = self._resources()
        info = HostInfo(self.node, self.failure_domain, free, total, cpus, round(load1, 2),
                        tuple(sorted(self._peers())))
        self.client.put(self.host_key, info.encode(), lease=self.lease)
        self._renewed = now

    def _campaign(self) -> None:
        """Become the placer if nobody is; learn whether this host still is."""
        result = self.client.txn([Compare.version(self.placer_key, 0)],
                                 success=[Put(self.placer_key, self.node.encode(), self.lease)],
                                 failure=[Get(self.placer_key)])
        if result.succeeded:
            self.term = result.revision
            LOG.info("this host is the cluster's placer now (it places the standbys of VMs without a backup)")
            return
        holder = result.ranges[0][0] if result.ranges and result.ranges[0] else None
        if holder is None:
            self.term = 0
            return
        if holder.value.decode(errors="replace") == self.node and holder.lease == self.lease:
            self.term = holder.create_revision
            return
        if self.term:
            LOG.warning("no longer the placer (%s is)", holder.value.decode(errors="replace"))
        self.term = 0
        if holder.value.decode(errors="replace") == self.node:  # this node's, from an earlier lease
            self.client.txn([Compare.mod_revision(self.placer_key, holder.mod_revision)],
                            success=[Delete(self.placer_key)])

    # -- reading the cluster -----------------------------------------------------------------

    def hosts(self) -> dict[str, HostInfo]:
        """Every live host (one with a lease), by name."""
        return {h.name: h for h in (HostInfo.decode(kv.value, kv.lease)
                                    for kv in self.client.get_prefix(f"{self.store.prefix}/host/"))}

    def placer(self) -> str | None:
        kv = self.client.get(self.placer_key)
        return None if kv is None else kv.value.decode(errors="replace")

    # -- placing -----------------------------------------------------------------------------

    def place_round(self) -> list[tuple[str, str]]:
        """Place every record that wants a standby and has no live placement; the (VM, host)
        pairs placed. Each placement is one transaction fenced by this placer's term."""
        hosts = self.hosts()
        records = self.store.list()
        counts = standby_counts(v.record for v in records)
        promised = promised_memory(v.record for v in records)
        placed = []
        for v in records:
            rec = v.record
            if not rec.wants_standby or rec.mode != "unprotected" or rec.owner not in hosts:
                continue  # no request, or its owner is gone (the VM is someone else's to re-protect)
            if rec.placement is not None and rec.placement in hosts and rec.placement != rec.avoid:
                continue  # placed, and that host lives: the owner pairs with it
            moving, (host, note) = self._choice(rec, hosts, counts, promised)
            if host is not None and host == rec.placement:
                continue  # placed on the avoided host, still the only one that qualifies: left alone
            if host is None:
                self._unplaced(v, note)
                continue
            if self._place(v, host):
                if moving is not None:  # moved off the avoided host: its count and memory go along
                    counts[moving] -= 1
                    promised[moving] -= rec.memory_kib
                counts[host] += 1
                promised[host] += rec.memory_kib
                placed.append((rec.name or rec.uuid, host))
                target = hosts[host]
                LOG.log(logging.WARNING if note else logging.INFO,
                        "placed the standby of %s (owner %s, failure domain %s) on %s (failure domain %s, "
                        "%d standbys, %d MiB free, load %.2f on %d CPUs)%s", rec.name or rec.uuid, rec.owner,
                        hosts[rec.owner].failure_domain, host, target.failure_domain, counts[host] - 1,
                        target.mem_free_kib // 1024, target.load1, target.cpus, f": {note}" if note else "")
                self._noted.pop(rec.uuid, None)
        return placed

    @staticmethod
    def _choice(rec: Ownership, hosts: Mapping[str, HostInfo], counts: Mapping[str, int],
                promised: Counter[str]) -> tuple[str | None, tuple[str | None, str]]:
        """The live placement ``rec`` has now (None: none), and :func:`choose`'s answer for it
        (its own placement's memory not counted against that host)."""
        moving = rec.placement if rec.placement is not None and rec.placement in hosts else None
        own: Counter[str] = Counter({moving: rec.memory_kib} if moving is not None else {})
        return moving, choose(rec, hosts, counts, promised - own)

    def _place(self, expect: Versioned, host: str) -> bool:
        won, _ = self.store.replace(expect, dc_replace(expect.record, placement=host, unplaced=None),
                                    also=[Compare.create_revision(self.placer_key, self.term)])
        return won

    def _unplaced(self, v: Versioned, note: str) -> None:
        """No host fits ``v``'s VM: say why, once while the reason holds, in this log and in the
        record (its owner says it too). The figures in a reason (free MiB) move all the time:
        only its words before them count as a change."""
        rec = v.record
        if gist(self._noted.get(rec.uuid, "")) != gist(note):
            LOG.warning("cannot place the standby of %s yet: %s", rec.name or rec.uuid, note)
            self._noted[rec.uuid] = note
        if gist(rec.unplaced or "") != gist(note):
            self.store.replace(v, dc_replace(rec, unplaced=note),
                               also=[Compare.create_revision(self.placer_key, self.term)])

    # -- the owner's side --------------------------------------------------------------------

    def request_standby(self, uuid: str, name: str, *, avoid: str | None, memory_kib: int,
                        wait: float, ended: Callable[[], bool]) -> tuple[str | None, str]:
        """Ask the placer for a backup host of ``name`` (this host runs it alone) and wait up to
        ``wait`` seconds for its placement: (the host, "") once placed; (None, the placer's
        reason) when it finds no host that fits (given a few more rounds to change its mind);
        (None, "") when it said nothing."""
        deadline = time.monotonic() + wait
        current: Versioned | None = self.store.want_standby(uuid, name, self.node, avoid=avoid,
                                                            memory_kib=memory_kib)
        while True:
            rec = None if current is None else current.record
            if rec is None or rec.owner != self.node or not rec.wants_standby:
                raise CoordError(f"the ownership record of {name} changed while it waited for a placement "
                                 f"({rec})")
            if rec.placement is not None:  # ``avoid`` itself when no other host qualified
                return rec.placement, ""
            if rec.unplaced is not None:
                deadline = min(deadline, time.monotonic() + UNPLACED_WAIT)
            if time.monotonic() >= deadline or ended():
                return None, rec.unplaced or ""
            time.sleep(PLACEMENT_POLL)
            current = self.store.read(uuid)

    def choose_here(self, uuid: str) -> tuple[str | None, str]:
        """:func:`choose` for ``uuid``'s VM run by this cujud, from the cluster as etcd has it
        now: the owner's fallback when the placer says nothing (its choice is not fenced, the
        pairing's ``protect`` is)."""
        hosts = self.hosts()
        records = self.store.list()
        mine = next((v.record for v in records if v.record.uuid == uuid), None)
        if mine is None:
            return None, f"no ownership record for {uuid}"
        _, answer = self._choice(mine, hosts, standby_counts(v.record for v in records),
                                 promised_memory(v.record for v in records))
        return answer


def gist(note: str) -> str:
    """A reason without its figures (the words before its first parenthesis)."""
    return note.split(" (", 1)[0]


def cluster_status(store: OwnershipStore, member: ClusterMember | None,
                   configured: Iterable[str] = ()) -> dict[str, Any]:
    """What ``status`` shows of the cluster: every VM record, every host (live ones from their
    leases; hosts named by records or configured as peers but without a lease as not alive)
    with its failure domain, free memory and VMs as primary/backup, and the elected placer."""
    records = [v.record for v in store.list()]
    live: dict[str, HostInfo] = member.hosts() if member is not None else {}
    names = set(live) | set(configured) | {r.owner for r in records} | {r.backup for r in records if r.backup}
    if member is not None:
        names.add(member.node)
    hosts = []
    for name in sorted(names):
        info = live.get(name)
        hosts.append({
            "name": name, "lease_alive": info is not None,
            "failure_domain": None if info is None else info.failure_domain,
            "mem_free_kib": None if info is None else info.mem_free_kib,
            "mem_total_kib": None if info is None else info.mem_total_kib,
            "cpus": None if info is None else info.cpus, "load1": None if info is None else info.load1,
            "primaries": sum(1 for r in records if r.owner == name and r.mode != "stopped"),
            "backups": sum(1 for r in records if r.backup == name and r.mode == "protected"),
        })
    return {
        "vms": [{"uuid": r.uuid, "name": r.name, "owner": r.owner, "backup": r.backup, "mode": r.mode,
                 "generation": r.generation, "placement": r.placement} for r in records],
        "hosts": hosts,
        "placer": member.placer() if member is not None else None,
    }
