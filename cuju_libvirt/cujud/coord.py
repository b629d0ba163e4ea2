"""The cluster witness: cujud's client for etcd, and the ownership records kept there.

etcd (Debian ``etcd-server``, 3 or 5 members) is the one coordination engine of a
cuju-libvirt cluster. cujud talks to it through etcd's v3 JSON gateway (``/v3/...``) over
plain HTTP with the standard library: one short-lived connection per call, the endpoints
tried in turn until the call's deadline. Every read is *linearizable* (answered through the
leader's quorum), never serializable: a partitioned member still serves stale serializable
reads, and nothing may be decided from one. etcd is never on the epoch path: only pairing,
peer loss and restarts ask it.

Client API (stable; other modules build on it)::

    client = EtcdClient(["http://10.0.0.1:2379", ...], timeout=1.0)
    client.get(key) -> KeyValue | None           client.get_prefix(prefix) -> list[KeyValue]
    client.put(key, value, lease=0) -> revision  client.delete(key) -> number deleted
    client.txn(compare=[Compare...], success=[op...], failure=[op...]) -> TxnResult
        ops: Put(key, value, lease), Get(key, prefix=False), Delete(key, prefix=False)
        Compare.mod_revision(key, rev) / .version(key, n) / .value(key, b) / .create_revision(...)
    client.lease_grant(ttl_s) -> lease id        client.lease_keepalive(id) -> ttl left (0: gone)
    client.lease_revoke(id)                      client.status() -> dict (leader, raft term, ...)

Keys and values are ``str``/``bytes``; revisions are ``int``. :class:`CoordUnavailable`
means no member answered in time, so a write's outcome is *unknown* (it may have been
applied); :class:`CoordError` means etcd refused the request.

Ownership records (``PREFIX/vm/UUID``, canonical JSON) -- :class:`Ownership`::

    {"uuid", "name", "owner": node running the VM, "backup": node holding its standby or null,
     "mode": "protected" | "unprotected" | "stopped", "generation": int}

A record changes only by compare-and-swap (a transaction on its ``mod_revision``), and every
change of who may run the VM raises ``generation`` by one. The generation is a fencing token:
a standby is paired at generation G (it travels in ``standby-create`` and the FT-link
handshake), and a copy whose generation is no longer the record's may not be resumed or
adopted. :class:`OwnershipStore`::

    store = OwnershipStore(client, prefix="/cuju/v1")
    store.read(uuid) -> Versioned | None         store.list() -> list[Versioned]
    store.protect(uuid, name, owner, backup, again=0) -> Ownership   # new generation, mode protected
    store.claim(uuid, me, generation) -> Claim   # the race on peer loss (below)
    store.release(uuid, owner, mode) -> Ownership | None    # owner: unprotected/stopped
    store.want_standby(uuid, name, owner, avoid=None) -> Versioned   # ask the placer for a backup
    store.replace(expect: Versioned, new: Ownership, also=()) -> (won, Versioned | None)  # raw CAS

A VM whose backup the cluster chooses carries ``wants_standby`` (set by its owner), then
``placement`` (the host written by the elected placer, in a transaction that also checks
that it still is the placer; :mod:`cuju_libvirt.cujud.cluster`), ``avoid`` (a host its
owner could not pair with) and ``unplaced`` (the placer's reason when no host fits, so that
the owner can say it). Records without placement encode exactly as before.

``claim`` is what both sides of a pair race when they lose each other: the record must
still be at ``generation`` with ``me`` as its owner or backup; one transaction makes ``me``
the sole owner (backup null, mode unprotected, generation + 1). Exactly one side wins. A
claim whose answer was lost is repeated safely: the record then already shows ``me`` as the
owner at generation + 1, which counts as won. :class:`CoordUnavailable` from a claim means
the outcome is unknown: the caller must neither resume, nor release output, nor promise its
peer anything until a later claim (or read) tells it.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any

from cuju_libvirt.errors import CoordError, CoordUnavailable

LOG = logging.getLogger(__name__)

DEFAULT_PREFIX = "/cuju/v1"
MODES = ("protected", "unprotected", "stopped")
#: Shortest time one endpoint is given before the next one is tried (s).
MIN_ATTEMPT = 0.1
#: How often a CAS that lost to an unrelated change is re-read and retried.
CAS_RETRIES = 5


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(key=_unb64(kv.get("key")).decode(), value=_unb64(kv.get("value")),
                   mod_revision=int(kv.get("mod_revision", 0)),
                   create_revision=int(kv.get("create_revision", 0)),
                   version=int(kv.get("version", 0)), lease=int(kv.get("lease", 0)))


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction (etcd's ``Compare``)."""

    key: str
    target: str  # VERSION, CREATE, MOD, VALUE
    operand: int | bytes
    result: str = "EQUAL"  # EQUAL, NOT_EQUAL, GREATER, LESS

    @classmethod
    def mod_revision(cls, key: str, rev: int, result: str = "EQUAL") -> Compare:
        return cls(key, "MOD", rev, result)

    @classmethod
    def create_revision(cls, key: str, rev: int, result: str = "EQUAL") -> Compare:
        return cls(key, "CREATE", rev, result)

    @classmethod
    def version(cls, key: str, version: int, result: str = "EQUAL") -> Compare:
        """``version(key, 0)``: the key does not exist."""
        return cls(key, "VERSION", version, result)

    @classmethod
    def value(cls, key: str, value: bytes, result: str = "EQUAL") -> Compare:
        return cls(key, "VALUE", value, result)

    def to_json(self) -> dict[str, Any]:
        field_name = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
                      "VALUE": "value"}[self.target]
        operand = _b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        return {"key": _b64(self.key), "target": self.target, "result": self.result, field_name: operand}


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


def _range(key: str, prefix: bool) -> dict[str, str]:
    """The key (and ``range_end`` for a prefix) of a range, delete or watch request."""
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(prefix_end(key))
    return body


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": _range(self.key, self.prefix)}


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _range(self.key, self.prefix)}


Op = Put | Get | Delete


@dataclass(frozen=True)
class TxnResult:
    """``succeeded``: the compares held (the success ops ran). ``ranges``: the key-values of
    each :class:`Get` of the branch that ran, in order."""

    succeeded: bool
    revision: int
    ranges: list[list[KeyValue]] = field(default_factory=list)


class EtcdClient:
    """A small etcd v3 client over the JSON gateway; thread-safe (no shared connection)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 1.0,
                 connect: Callable[[str, int, float], socket.socket] | None = None) -> None:
        """``connect(host, port, timeout)`` opens the TCP connection (default: directly; tests
        use it to reach members inside a network namespace)."""
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints = [self._parse(e) for e in endpoints]
        self.timeout = timeout
        self._connect = connect
        self._next = 0
        self._lock = threading.Lock()

    @staticmethod
    def _parse(endpoint: str) -> tuple[str, int]:
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"etcd endpoint {endpoint!r}: use http://HOST:PORT (TLS is not supported yet)")
        return url.hostname, url.port or 2379

    def __repr__(self) -> str:
        return "EtcdClient(" + ", ".join(f"{h}:{p}" for h, p in self.endpoints) + ")"

    # -- transport ---------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` of the first member that answers within the deadline.

        A member that is down, has no leader or times out is skipped for the next one; when
        all failed before the deadline, the round starts again. :class:`CoordUnavailable`
        once the deadline passed.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        data = json.dumps(body).encode()
        errors: list[str] = []
        with self._lock:
            start = self._next
        attempt = 0
        while True:
            index = (start + attempt) % len(self.endpoints)
            host, port = self.endpoints[index]
            left = deadline - time.monotonic()
            if left <= 0:
                raise CoordUnavailable(f"no etcd member answered /v3/{path} in time "
                                       f"({'; '.join(errors[-len(self.endpoints):]) or 'no attempt'})")
            share = max(MIN_ATTEMPT, (self.timeout if timeout is None else timeout) / len(self.endpoints))
            try:
                status, reply = self._post(host, port, path, data, min(left, share))
            except (OSError, http.client.HTTPException, ValueError) as err:
                errors.append(f"{host}:{port}: {err or type(err).__name__}")
            else:
                if status == 200:
                    with self._lock:
                        self._next = index
                    return reply
                message = str(reply.get("message") or reply.get("error") or reply)
                if 400 <= status < 500 and "leader" not in message:
                    raise CoordError(f"etcd refused /v3/{path}: {message} (HTTP {status})")
                errors.append(f"{host}:{port}: {message} (HTTP {status})")
            attempt += 1
            if attempt % len(self.endpoints) == 0:
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _post(self, host: str, port: int, path: str, data: bytes,
              timeout: float) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            if self._connect is not None:
                conn.sock = self._connect(host, port, timeout)
            conn.request("POST", f"/v3/{path}", body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        reply = json.loads(raw) if raw else {}
        if not isinstance(reply, dict):
            raise ValueError(f"not a JSON object: {raw[:80]!r}")
        return resp.status, reply

    # -- key-value ---------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """Linearizable read of one key."""
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        """Linearizable read of every key under ``prefix``, in key order."""
        reply = self.call("kv/range", _range(prefix, True))
        return [KeyValue.from_json(kv) for kv in reply.get("kvs") or []]

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        return int(self.call("kv/deleterange", _range(key, prefix)).get("deleted", 0))

    def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
            failure: Sequence[Op] = ()) -> TxnResult:
        reply = self.call("kv/txn", {"compare": [c.to_json() for c in compare],
                                     "success": [o.to_json() for o in success],
                                     "failure": [o.to_json() for o in failure]})
        ranges = [[KeyValue.from_json(kv) for kv in r["response_range"].get("kvs") or []]
                  for r in reply.get("responses") or [] if "response_range" in r]
        return TxnResult(bool(reply.get("succeeded", False)), int(reply["header"]["revision"]), ranges)

    # -- leases ------------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` whole seconds (etcd's minimum is 1.5 x its election timeout)."""
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Renew ``lease``; the TTL left, 0 when the lease is gone (expired or revoked)."""
        result = self.call("lease/keepalive", {"ID": str(lease)}).get("result") or {}
        return int(result.get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    def status(self) -> dict[str, Any]:
        """The answering member's status (``leader``, ``raftTerm``, ``header.member_id``, ...)."""
        return self.call("maintenance/status", {})


# --- ownership records -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ownership:
    """Who runs one protected VM, who holds its standby, and the fencing generation."""

    uuid: str
    name: str
    owner: str
    backup: str | None
    mode: str
    generation: int
    #: The owner asks the cluster's placer for a backup host (:mod:`cuju_libvirt.cujud.cluster`).
    wants_standby: bool = False
    #: The host the placer chose for the next standby (None: not placed yet).
    placement: str | None = None
    #: A host the owner could not pair with last time: placed elsewhere while another fits.
    avoid: str | None = None
    #: The VM's memory (KiB), so that the placer chooses a host with room for its standby.
    memory_kib: int = 0
    #: Why the placer found no host for the standby (None: placed, or not looked at yet).
    unplaced: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ownership mode {self.mode!r} is not one of {', '.join(MODES)}")

    def encode(self) -> bytes:
        body: dict[str, Any] = {"uuid": self.uuid, "name": self.name, "owner": self.owner,
                                "backup": self.backup, "mode": self.mode, "generation": self.generation}
        if self.wants_standby or self.placement is not None:  # records without placement look as before
            body.update(wants_standby=self.wants_standby, placement=self.placement, avoid=self.avoid,
                        memory_kib=self.memory_kib)
            if self.unplaced is not None:
                body["unplaced"] = self.unplaced
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ownership:
        try:
            data = json.loads(raw)
            return cls(uuid=str(data["uuid"]), name=str(data.get("name", "")), owner=str(data["owner"]),
                       backup=_text_or_none(data.get("backup")),
                       mode=str(data["mode"]), generation=int(data["generation"]),
                       wants_standby=bool(data.get("wants_standby", False)),
                       placement=_text_or_none(data.get("placement")), avoid=_text_or_none(data.get("avoid")),
                       memory_kib=int(data.get("memory_kib") or 0),
                       unplaced=_text_or_none(data.get("unplaced")))
        except (ValueError, KeyError, TypeError) as err:
            raise CoordError(f"malformed ownership record {raw[:120]!r}: {err}") from err


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Versioned:
    record: Ownership
    mod_revision: int


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`OwnershipStore.claim`: ``won``, and the record as it now is."""

    won: bool
    record: Ownership


class OwnershipStore:
    """The ownership records under ``prefix``; every change a compare-and-swap."""

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    def key(self, uuid: str) -> str:
        if not uuid or "/" in uuid:
            raise ValueError(f"not a domain UUID: {uuid!r}")
        return f"{self.prefix}/vm/{uuid}"

    @staticmethod
    def _versioned(kv: KeyValue) -> Versioned:
        return Versioned(Ownership.decode(kv.value), kv.mod_revision)

    def read(self, uuid: str) -> Versioned | None:
        kv = self.client.get(self.key(uuid))
        return None if kv is None else self._versioned(kv)

    def list(self) -> list[Versioned]:
        return [self._versioned(kv) for kv in self.client.get_prefix(f"{self.prefix}/vm/")]

    def replace(self, expect: Versioned | None, new: Ownership,
                also: Sequence[Compare] = ()) -> tuple[bool, Versioned | None]:
        """Write ``new`` if the record is still ``expect`` (None: it must not exist) and every
        compare of ``also`` holds (the placer's: it is still the elected one).

        Returns (True, the written record) or (False, the record as it is now, or None)."""
        key = self.key(new.uuid)
        cond = Compare.version(key, 0) if expect is None else Compare.mod_revision(key, expect.mod_revision)
        result = self.client.txn([cond, *also], success=[Put(key, new.encode())], failure=[Get(key)])
        if result.succeeded:
            return True, Versioned(new, result.revision)
        current = result.ranges[0] if result.ranges else []
        return False, (self._versioned(current[0]) if current else None)

    def protect(self, uuid: str, name: str, owner: str, backup: str, *, again: int = 0) -> Ownership:
        """A new generation with ``owner`` running the VM and ``backup`` to hold its standby.

        ``again``: the generation of a failed pairing attempt with the same backup whose
        standby is known gone (the backup promised it). When the record is still exactly that
        pairing, it is returned unchanged: ownership did not change, so neither does the
        generation (a retry loop must not make the record count up). Refused
        (:class:`CoordError`) when the record names another owner that has not stopped the
        VM: that host may run it."""
        current = self.read(uuid)
        for _ in range(CAS_RETRIES):
            _refuse_another_owner(current, name, owner)
            if again and current is not None \
                    and current.record == Ownership(uuid, name, owner, backup, "protected", again):
                return current.record
            generation = 1 if current is None else current.record.generation + 1
            new = Ownership(uuid, name, owner, backup, "protected", generation)
            won, now = self.replace(current, new)
            if won:
                return new
            current = now
        raise CoordError(f"the ownership record of {name} kept changing; gave up after {CAS_RETRIES} tries")

    def want_standby(self, uuid: str, name: str, owner: str, *, avoid: str | None = None,
                     memory_kib: int = 0) -> Versioned:
        """``owner`` runs the VM alone and asks the cluster's placer for a backup host.

        The record becomes ``{owner, backup: null, mode: unprotected, wants_standby}``, with
        ``avoid`` (the host the last pairing failed with: the placer takes another while one
        qualifies) and no placement yet: a new generation unless it already was this owner
        alone (a standby of the record's last pairing may then never resume). A record that
        already asks exactly so (the same ``avoid``) is returned as it is, with the placement
        the placer may have written into it. Refused
        (:class:`CoordError`) like :meth:`protect` when another owner may run the VM."""
        current = self.read(uuid)
        for _ in range(CAS_RETRIES):
            _refuse_another_owner(current, name, owner)
            rec = None if current is None else current.record
            if rec is not None and rec.owner == owner and rec.mode == "unprotected" and rec.wants_standby \
                    and rec.avoid == avoid:
                assert current is not None
                return current
            alone = rec is not None and rec.owner == owner and rec.mode == "unprotected"
            generation = 1 if rec is None else rec.generation + (0 if alone else 1)
            new = Ownership(uuid, name, owner, None, "unprotected", generation, wants_standby=True,
                            avoid=avoid, memory_kib=memory_kib)
            won, now = self.replace(current, new)
            if won:
                assert now is not None
                return now
            current = now
        raise CoordError(f"the ownership record of {name} kept changing; gave up after {CAS_RETRIES} tries")

    def claim(self, uuid: str, me: str, generation: int) -> Claim:
        """Race for sole ownership after losing the peer (see the module docstring)."""
        current = self.read(uuid)
        for _ in range(CAS_RETRIES):
            if current is None:
                raise CoordError(f"no ownership record for {uuid}: nothing to claim (refusing to guess)")
            rec = current.record
            if rec.generation == generation + 1 and rec.owner == me and rec.backup is None:
                return Claim(True, rec)  # our own earlier claim (its answer was lost)
            if rec.generation != generation or me not in (rec.owner, rec.backup) or rec.mode == "stopped":
                if rec.generation < generation:
                    raise CoordError(f"the ownership record of {rec.name or uuid} is at generation "
                                     f"{rec.generation}, older than this copy's {generation}: "
                                     "refusing to guess")
                return Claim(False, rec)
            won, now = self.replace(current, dc_replace(rec, owner=me, backup=None, mode="unprotected",
                                                        generation=generation + 1))
            if won:
                assert now is not None
                return Claim(True, now.record)
            current = now
        raise CoordError(f"the ownership record of {uuid} kept changing; gave up after {CAS_RETRIES} tries")

    def release(self, uuid: str, owner: str, mode: str = "unprotected") -> Ownership | None:
        """``owner`` goes on alone (``unprotected``, a new generation) or stopped the VM
        (``stopped``). None when ``owner`` no longer owns the record (or there is none)."""
        current = self.read(uuid)
        for _ in range(CAS_RETRIES):
            if current is None or current.record.owner != owner:
                return None
            rec = current.record
            if rec.mode == mode and rec.backup is None:
                return rec
            new = dc_replace(rec, backup=None, mode=mode, generation=rec.generation + 1)
            if mode == "stopped":  # a stopped VM needs no standby
                new = dc_replace(new, wants_standby=False, placement=None, avoid=None, unplaced=None)
            won, now = self.replace(current, new)
            if won:
                return new
            current = now
        raise CoordError(f"the ownership record of {uuid} kept changing; gave up after {CAS_RETRIES} tries")


def _refuse_another_owner(current: Versioned | None, name: str, owner: str) -> None:
    """:class:`CoordError` when the record names another owner that has not stopped the VM."""
    if current is not None and current.record.owner != owner and current.record.mode != "stopped":
        rec = current.record
        raise CoordError(f"the witness records {rec.owner} as the owner of {name} (generation "
                         f"{rec.generation}, {rec.mode}); it may run there")
