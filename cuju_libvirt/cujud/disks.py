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
from cuju_libvirt.ft_engine.disks import (
    MAX_PACKED_BITMAP,
    DiskSet,
    ProtectedDisk,
    changed_since_ack,
    content_digests,
    digest_unit,
    forget_pair,
    pack_bitmap,
    pack_bytes,
    prepare_replica,
    read_pair,
    read_record,
    record_takeover,
    replay_receiver_journal,
)

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


def take_over_replica(path: str, journal: str) -> None:
    """The replica at ``path``, journaled by its server in ``journal``, becomes the VM's live
    disk (a takeover): no resync may trust it as a replica again (its ``.id`` goes), but
    the pairing it came from is kept with the journal's lineage (``<journal>.takeover``):
    the old primary's own image may then be resynced with only what either side changed."""
    ident = replica_identity(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".id")
    if ident.get("replica") and ident.get("lineage"):
        try:
            record_takeover(journal, ident)
        except (OSError, ValueError) as err:  # no journal: a later re-protection copies it in full
            log.warning("replica %s: the takeover is not recorded (%s): a full copy will follow", path, err)


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


def pairing_record(state_dir: Path | str, uuid: str, target: str) -> str:
    """Where this host keeps the durable pairing record of a disk it serves as the primary
    (:func:`~cuju_libvirt.ft_engine.disks.read_record`): on persistent storage, unlike the journal."""
    return str(Path(state_dir) / "disks" / uuid / f"{target}.pair")


def primary_disks(uuid: str, disks: Sequence[FTDisk], name: str = "", *,
                  state_dir: Path | str | None = None) -> DiskSet | None:
    """The journals of the prepared disks (their servers were started by the hook, or, after a
    takeover, by the standby), or None. The images a sync reads are those the servers serve:
    after a takeover that is this host's replica, not the path the disk had on the old primary.
    ``name``: the VM's, in the logger of every line about its disks; ``state_dir``: where a
    completed sync leaves each disk's durable pairing record (:func:`pairing_record`)."""
    if not disks:
        return None
    out = []
    for d in disks:
        paths = disk_server.ServerPaths.of(uuid, d.target)
        record = pairing_record(state_dir, uuid, d.target) if state_dir is not None else ""
        image = disk_server.served_image(paths) or d.source
        out.append(ProtectedDisk(d.target, image, paths.journal, record))
    return DiskSet(out, tag=name)


def disk_formats(uuid: str, disks: Sequence[FTDisk]) -> list[dict[str, Any]]:
    """Per prepared disk, what a backup needs to make an empty replica its standby's QEMU can
    open: ``format``, and for qcow2 the image's ``virtual_size`` and ``cluster_size`` (read
    from the image the server serves)."""
    out: list[dict[str, Any]] = []
    for d in disks:
        entry: dict[str, Any] = {"format": d.format}
        if d.format == "qcow2":
            image = disk_server.served_image(disk_server.ServerPaths.of(uuid, d.target)) or d.source
            info = disk_server.image_info(image, d.format)
            entry.update(virtual_size=int(info["virtual-size"]),
                         cluster_size=int(info.get("cluster-size", 65536)))
        out.append(entry)
    return out


def _fresh_replica(path: str, size: int, fmt: Mapping[str, Any] | None) -> int:
    """Empty the replica; for a qcow2 disk write an empty qcow2 of the disk's virtual size at
    its start (the standby's QEMU opens it before the sync). Returns the bytes written there,
    which the sync must overwrite (``written`` in the answer)."""
    prepare_replica(path, size, empty=True)
    if fmt is None or fmt.get("format") != "qcow2":
        return 0
    if "virtual_size" not in fmt:
        raise CujuError("the primary gave no virtual size for a qcow2 disk: the two cujud versions differ")
    written = disk_server.write_qcow2_placeholder(path, int(fmt["virtual_size"]),
                                                  int(fmt.get("cluster_size", 65536)))
    prepare_replica(path, size)
    return written


def adopt_own_image(paths: disk_server.ServerPaths, size: int, claim: Mapping[str, Any], *, target: str,
                    owner: tuple[int, int] | None = None) -> tuple[str, dict[str, Any]] | str:
    """After a failover, re-protected onto this host (the old primary): may this host's own
    image of the disk be the replica, with only what either side changed resent?

    Only if this host's journal of the disk (``paths``) completed a sync with the very
    replica the new primary took over (``claim['takeover']``), in the same lineage, and
    still is in that lineage once its server runs on the image again (the server's start
    renews it if the image changed while none ran, or the last server was killed). Then
    the image differs from the takeover's epoch only in the blocks its journal marked since
    the last acknowledged epoch (the C test's failover model). Returns (image, the answer's
    ``changed``/``block_size``) with the server running on it, or why not (no server left)."""
    took = claim.get("takeover")
    if not isinstance(took, Mapping):
        return "the primary holds no takeover of a replica of this disk"
    pair = read_pair(paths.journal)
    image = str(pair.get("image", ""))
    if pair.get("synced") is not True or pair.get("replica") != took.get("from_replica"):
        return "this host's journal of the disk never completed a sync with the replica the primary took over"
    if pair.get("lineage") != took.get("from_lineage") or not image:
        return "this host's journal of the disk changed lineage since"
    try:
        have = os.stat(image).st_size
    except FileNotFoundError:
        return f"its image {image} is gone"
    if have > size:
        return f"its image {image} is larger than the disk"
    disk_server.start(paths, image, target=target, owner=owner, export_size=size if have != size else None)
    why = ""
    try:
        lineage, info, changed = changed_since_ack(paths.journal)
        packed = pack_bitmap(changed, info["bitmap_bytes"])
        if f"{lineage:016x}" != took.get("from_lineage") or disk_server.served_image(paths) != image:
            why = "its image changed, or its server was killed, since this host was the primary"
        elif info["disk_size"] != size:
            why = "its journal is of a disk of another size"
        elif len(packed) > MAX_PACKED_BITMAP:
            why = "the blocks it changed are too many to send in a message"
    except (OSError, ValueError) as err:
        why = f"its journal {paths.journal} cannot be read ({err})"
    if why:
        disk_server.stop(paths)
        return why
    # Once only: from here on the receiver writes the image beside the journal, and a later
    # attempt (this resync cut short) could miss an epoch acknowledged but not applied here.
    # That attempt copies in full; a completed resync pairs the image as any replica.
    forget_pair(paths.journal)
    prepare_replica(image, size)  # a qcow2 file grows to the export's size, as every replica
    return image, {"changed": packed, "block_size": info["block_size"]}


def adopt_by_content(record: str, size: int, claim: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """After a failover whose journal here cannot say what this host changed (its host crashed
    and the tmpfs journal is gone, its server was killed, an earlier resync was cut short):
    may this host's own image of the disk be the replica, resynced by content compare?

    Only if this host's durable pairing record (``record``, :func:`pairing_record`) says that
    its image was paired with the very replica the new primary took over
    (``claim['takeover']``): the image is then this disk at some moment, and its content
    digests (:func:`~cuju_libvirt.ft_engine.disks.content_digests`, in units the primary's
    ``block_size`` divides) let the primary resend only the units that differ, whatever this
    host wrote after its last acknowledged epoch. Without such a record the image's lineage
    is unknown: why not (a full copy follows). Returns (image, the answer's ``digests``,
    ``unit``, ``block_size``)."""
    took = claim.get("takeover")
    if not isinstance(took, Mapping):
        return "the primary holds no takeover of a replica of this disk"
    rec = read_record(record) if record else {}
    image = str(rec.get("image", ""))
    if not rec or rec.get("replica") != took.get("from_replica") or not image:
        return ("this host holds no durable record that its image was paired with the replica the primary "
                "took over (unknown lineage)")
    block = took.get("block_size")
    if not isinstance(block, int) or block < 4096 or block & (block - 1):
        return "the primary gave no block size for a content compare (the two cujud versions differ)"
    try:
        have = os.stat(image).st_size
    except FileNotFoundError:
        return f"its image {image} is gone"
    if have > size:
        return f"its image {image} is larger than the disk"
    prepare_replica(image, size)  # a qcow2 file grows to the export's size, as every replica
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        unit = digest_unit(fd, size, block, MAX_PACKED_BITMAP)
        packed = pack_bytes(content_digests(fd, size, unit))
    finally:
        os.close(fd)
    if len(packed) > MAX_PACKED_BITMAP:
        return "its content digests are too many to send in a message"
    return image, {"digests": packed, "unit": unit, "block_size": block}


def choose_replicas(replicas: Sequence[tuple[str, int]], claims: Sequence[Mapping[str, Any]],
                    receiver_journal: str | None, targets: Sequence[str], *,
                    formats: Sequence[Mapping[str, Any]] = (),
                    adopted: Mapping[int, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Keep or empty each replica (path, size) for the primary's ``claims``; returns the answer
    per disk (``replica`` id, ``kept``, ``written``: bytes at the start of an emptied replica
    that are not zeros, see :func:`_fresh_replica`). Every replica exists with its size
    afterwards, and a qcow2 one is a valid qcow2 (``formats``, the primary's :func:`disk_formats`).
    ``adopted``: the disks whose replica is this host's own image (:func:`adopt_own_image`),
    with what their answer adds (``changed``, ``block_size``)."""
    adopted = adopted or {}
    replayed = False
    # Only replicas that exist with the right size can be replayed into (the others are new);
    # never an image adopted after a failover (the last standby's journal is not its past).
    if receiver_journal is not None and any(c.get("replica") for c in claims) and not adopted and \
            all(os.path.exists(p) and os.stat(p).st_size == n for p, n in replicas):
        epoch = replay_receiver_journal(receiver_journal, replicas)
        replayed = epoch is not None
        if replayed:
            log.info("replicas replayed from %s to its last committed epoch (%d)", receiver_journal, epoch)
    answers = []
    for i, (path, size) in enumerate(replicas):
        claim = claims[i] if i < len(claims) else None
        if i in adopted:
            rid = secrets.token_hex(8)
            what = ("the units whose content differs" if "digests" in adopted[i]
                    else "the blocks either side changed since the failover")
            log.info("disk %s: this host's own image %s is the replica (%s): only %s will be resent",
                     targets[i], path, rid, what)
            _write_identity(path, rid, str(claim.get("lineage", "")) if claim else "")
            answers.append({"replica": rid, "kept": True, "written": 0, **adopted[i]})
            continue
        why = keep_replica(path, size, claim, replayed)
        written = 0
        if why is None:
            rid = str(replica_identity(path)["replica"])
            log.info("disk %s: keeping replica %s (%s): only the changed blocks will be resent", targets[i],
                     path, rid)
        else:
            rid = secrets.token_hex(8)
            if os.path.exists(path):
                log.info("disk %s: replica %s starts afresh (%s): a full copy follows", targets[i], path, why)
            written = _fresh_replica(path, size, formats[i] if i < len(formats) else None)
        _write_identity(path, rid, str(claim.get("lineage", "")) if claim else "")
        answers.append({"replica": rid, "kept": why is None, "written": written})
    return answers


def backup_replicas(
    uuid: str, xml: str, sizes: Sequence[int], replica_dir: Path, *,
    claims: Sequence[Mapping[str, Any]] | None = None, receiver_journal: str | None = None,
    formats: Sequence[Mapping[str, Any]] = (), state_dir: Path | None = None,
) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """Prepare the replica of every prepared disk of ``xml`` (the primary's sizes, in its disk
    order) and serve it on the same socket path as on the primary, so that the standby QEMU
    opens the replica and, after a takeover, writes through a journaling server.

    ``claims`` (the primary's, per disk) and ``receiver_journal`` (the last standby's):
    which replicas may be kept for a resync of only what changed (see the module's doc).
    ``formats``: the primary's :func:`disk_formats` (an emptied qcow2 replica gets a header).
    ``state_dir``: where this host's durable pairing records are (:func:`adopt_by_content`).
    Returns the replicas (path, size) and the answer per disk (``replica`` id, ``kept``, ``written``,
    and ``refused``: why this host's own image could not be the replica after a failover)."""
    spec = parse_domain(xml)
    disks = spec.disks if spec is not None else ()
    if len(disks) != len(sizes):
        raise CujuError(f"the primary replicates {len(sizes)} disk(s), its XML records {len(disks)}: "
                        "the two cujud versions differ")
    out = [(d.replica_path(str(replica_dir), uuid), size) for d, size in zip(disks, sizes, strict=True)]
    owner = disk_server.qemu_owner()  # the standby's QEMU (not root under libvirt) connects to it
    adopted: dict[int, dict[str, Any]] = {}
    refused: dict[int, str] = {}
    for i, (d, claim) in enumerate(zip(disks, claims or [], strict=False)):
        if claim.get("takeover") and not claim.get("replica"):
            got = adopt_own_image(disk_server.ServerPaths.of(uuid, d.target), sizes[i], claim,
                                  target=d.target, owner=owner)
            if isinstance(got, str):
                record = pairing_record(state_dir, uuid, d.target) if state_dir is not None else ""
                log.info("disk %s: this host's journal cannot say what its own image changed (%s): "
                         "trying a content compare", d.target, got)
                got = adopt_by_content(record, sizes[i], claim)
            if isinstance(got, str):
                log.info("disk %s: this host's own image cannot be the replica (%s): a full copy follows",
                         d.target, got)
                refused[i] = got
            else:
                out[i] = (got[0], sizes[i])
                adopted[i] = got[1]
    for i, (path, _) in enumerate(out):
        if i not in adopted:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    answers = choose_replicas(out, claims or [], receiver_journal, [d.target for d in disks], formats=formats,
                              adopted=adopted)
    for i, why in refused.items():
        answers[i]["refused"] = why
    for d, (path, _) in zip(disks, out, strict=True):
        disk_server.start(disk_server.ServerPaths.of(uuid, d.target), path, target=d.target, owner=owner)
    if out:
        log.info("serving %d replica(s): %s", len(out), ", ".join(p for p, _ in out))
    return out, answers


def disk_targets(xml: str) -> list[str]:
    """The target devs of the prepared disks of ``xml``, in the primary's disk order."""
    spec = parse_domain(xml)
    return [d.target for d in spec.disks] if spec is not None else []


def left_replicas(uuid: str, xml: str, sizes: Sequence[int]) -> list[tuple[str, int]]:
    """The replicas of a standby an earlier cujud of this host left (it died), exactly as they
    are: they hold the committed epochs (the receiver's journal replays the last one), so they
    are never emptied nor re-chosen here. Each is the image its block server serves (nbdkit
    outlives cujud; the standby QEMU is connected to it): a disk whose server is gone means
    the standby cannot be taken back (CujuError)."""
    targets = disk_targets(xml)
    if len(targets) != len(sizes):
        raise CujuError(f"the standby's record has {len(sizes)} disk size(s), its XML {len(targets)} disk(s)")
    out = []
    for target, size in zip(targets, sizes, strict=True):
        image = disk_server.served_image(disk_server.ServerPaths.of(uuid, target))
        if image is None or not os.path.exists(image):
            raise CujuError(f"disk {target}: the block server of its replica no longer runs")
        out.append((image, size))
    return out


def stop_servers(uuid: str, xml: str) -> None:
    """Stop the servers of the prepared disks of ``xml`` (a standby that is dropped)."""
    for target in disk_targets(xml):
        disk_server.stop(disk_server.ServerPaths.of(uuid, target))
