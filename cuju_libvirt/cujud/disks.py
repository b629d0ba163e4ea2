"""cujud's side of replicated disks: which journals the primary seals, which replicas the
backup keeps and serves (mechanism in :mod:`cuju_libvirt.ft_engine.disks` and
:mod:`cuju_libvirt.disk_server`; see docs/disks.md).

Which replica a resync may trust (docs/disks.md, "Resync"): beside each replica the backup
keeps ``<replica>.id`` (JSON: a random replica id, the primary journal's lineage it was
paired with, this host's boot id). ``standby-create`` carries the primary's claim per disk
(:meth:`~cuju_libvirt.ft_engine.disks.DiskSet.claims`); the backup first replays the old
standby's receiver journal into the replicas (so each is exactly a committed epoch), then
keeps a replica only if the replay worked and its id, lineage and boot match the claim.
Any other replica is emptied and gets a new id: it is copied in full. The reply says, per
disk, the id and whether it was kept; the primary resyncs only what changed for a kept
replica it claimed (:meth:`~cuju_libvirt.ft_engine.disks.DiskSet.set_replicas`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cuju_libvirt import disk_server
from cuju_libvirt.disk_xml import FTDisk
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CujuError
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk, prepare_replica, replay_receiver_journal

log = logging.getLogger(__name__)

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


def replica_identity(path: str) -> dict[str, Any]:
    """The ``<replica>.id`` record of a replica ({} when there is none)."""
    try:
        value = json.loads(Path(path + ".id").read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def forget_replica_identity(path: str) -> None:
    """The replica becomes the VM's live disk (a takeover): no resync may ever trust it again."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".id")


def _write_identity(path: str, rid: str, lineage: str) -> None:
    tmp = path + ".id.tmp"
    Path(tmp).write_text(json.dumps({"replica": rid, "lineage": lineage, "boot": _boot_id()}))
    os.replace(tmp, path + ".id")


def keep_replica(path: str, size: int, claim: Mapping[str, Any] | None, replayed: bool) -> str | None:
    """Why the replica at ``path`` cannot be trusted for ``claim``, or None when it can."""
    if claim is None or not claim.get("replica"):
        return "the primary has no replica paired with this disk's journal"
    if not replayed:
        return "no receiver journal of the last standby could be replayed (its epoch is unknown)"
    ident = replica_identity(path)
    if ident.get("replica") != claim["replica"]:
        return "it is not the replica the primary's journal was paired with"
    if ident.get("lineage") != claim.get("lineage"):
        return "the primary's journal changed lineage since"
    if not ident.get("boot") or ident.get("boot") != _boot_id():
        return "this host rebooted since it was written"
    try:
        if os.stat(path).st_size != size:
            return "its size differs from the disk's"
    except FileNotFoundError:
        return "it does not exist"
    return None


def primary_disks(uuid: str, disks: Sequence[FTDisk]) -> DiskSet | None:
    """The journals of the prepared disks (their servers were started by the hook, or, after a
    takeover, by the standby), or None. The images a sync reads are those the servers serve:
    after a takeover that is this host's replica, not the path the disk had on the old primary."""
    if not disks:
        return None
    out = []
    for d in disks:
        paths = disk_server.ServerPaths.of(uuid, d.target)
        out.append(ProtectedDisk(d.target, disk_server.served_image(paths) or d.source, paths.journal))
    return DiskSet(out)


def choose_replicas(replicas: Sequence[tuple[str, int]], claims: Sequence[Mapping[str, Any]],
                    receiver_journal: str | None, targets: Sequence[str]) -> list[dict[str, Any]]:
    """Keep or empty each replica (path, size) for the primary's ``claims``; returns the answer
    per disk (``replica`` id, ``kept``). Every replica exists with its size afterwards."""
    replayed = False
    # Only replicas that exist with the right size can be replayed into (the others are new).
    if receiver_journal is not None and any(c.get("replica") for c in claims) and \
            all(os.path.exists(p) and os.stat(p).st_size == n for p, n in replicas):
        epoch = replay_receiver_journal(receiver_journal, replicas)
        replayed = epoch is not None
        if replayed:
            log.info("replicas replayed from %s to its last committed epoch (%d)", receiver_journal, epoch)
    answers = []
    for i, (path, size) in enumerate(replicas):
        claim = claims[i] if i < len(claims) else None
        why = keep_replica(path, size, claim, replayed)
        if why is None:
            rid = str(replica_identity(path)["replica"])
            log.info("disk %s: keeping replica %s (%s): only the changed blocks will be resent", targets[i],
                     path, rid)
        else:
            rid = secrets.token_hex(8)
            if os.path.exists(path):
                log.info("disk %s: replica %s starts afresh (%s): a full copy follows", targets[i], path, why)
            prepare_replica(path, size, empty=True)
        _write_identity(path, rid, str(claim.get("lineage", "")) if claim else "")
        answers.append({"replica": rid, "kept": why is None})
    return answers


def backup_replicas(
    uuid: str, xml: str, sizes: Sequence[int], replica_dir: Path, *,
    claims: Sequence[Mapping[str, Any]] | None = None, receiver_journal: str | None = None,
) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """Prepare the replica of every prepared disk of ``xml`` (the primary's sizes, in its disk
    order) and serve it on the same socket path as on the primary, so that the standby QEMU
    opens the replica and, after a takeover, writes through a journaling server.

    ``claims`` (the primary's, per disk) and ``receiver_journal`` (the last standby's):
    which replicas may be kept for a resync of only what changed (see the module's doc).
    Returns the replicas (path, size) and the answer per disk (``replica`` id, ``kept``)."""
    disks, out = _replica_paths(uuid, xml, sizes, replica_dir)
    for path, _ in out:
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    answers = choose_replicas(out, claims or [], receiver_journal, [d.target for d in disks])
    for d, (path, _) in zip(disks, out, strict=True):
        # The standby's QEMU (not root under libvirt) connects to it: the same owner as on the primary.
        disk_server.start(disk_server.ServerPaths.of(uuid, d.target), path, target=d.target,
                          owner=disk_server.qemu_owner())
    if out:
        log.info("serving %d replica(s): %s", len(out), ", ".join(p for p, _ in out))
    return out, answers


def _replica_paths(uuid: str, xml: str, sizes: Sequence[int],
                   replica_dir: Path) -> tuple[Sequence[FTDisk], list[tuple[str, int]]]:
    """The prepared disks of ``xml`` and their replicas (path, the primary's size) here."""
    spec = parse_domain(xml)
    disks = spec.disks if spec is not None else ()
    if len(disks) != len(sizes):
        raise CujuError(f"the primary replicates {len(sizes)} disk(s), its XML records {len(disks)}: "
                        "the two cujud versions differ")
    return disks, [(d.replica_path(str(replica_dir), uuid), n) for d, n in zip(disks, sizes, strict=True)]


def left_replicas(uuid: str, xml: str, sizes: Sequence[int], replica_dir: Path) -> list[tuple[str, int]]:
    """The replicas of a standby an earlier cujud of this host left (it died), exactly as they
    are: they hold the committed epochs (the receiver's journal replays the last one), so they
    are never emptied nor re-chosen here. Each must exist with its size and its block server
    must still run (the standby QEMU is connected to it; nbdkit outlives cujud); otherwise the
    standby cannot be taken back (CujuError)."""
    disks, out = _replica_paths(uuid, xml, sizes, replica_dir)
    for d, (path, size) in zip(disks, out, strict=True):
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            raise CujuError(f"disk {d.target}: its replica {path} is gone") from None
        if actual != size:
            raise CujuError(f"disk {d.target}: its replica {path} has {actual} bytes, not {size}")
        if disk_server.running_pid(disk_server.ServerPaths.of(uuid, d.target)) is None:
            raise CujuError(f"disk {d.target}: the block server of its replica no longer runs")
    return out


def stop_servers(uuid: str, xml: str) -> None:
    """Stop the servers of the prepared disks of ``xml`` (a standby that is dropped)."""
    spec = parse_domain(xml)
    for d in spec.disks if spec is not None else ():
        disk_server.stop(disk_server.ServerPaths.of(uuid, d.target))
