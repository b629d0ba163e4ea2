"""cujud's side of replicated disks: which journals the primary seals, which replicas the
backup keeps and serves (mechanism in :mod:`cuju_libvirt.ft_engine.disks` and
:mod:`cuju_libvirt.disk_server`; see docs/disks.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cuju_libvirt import disk_server
from cuju_libvirt.disk_xml import FTDisk
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CujuError
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk, prepare_replica

log = logging.getLogger(__name__)


def primary_disks(uuid: str, disks: Sequence[FTDisk]) -> DiskSet | None:
    """The journals of the prepared disks (their servers were started by the hook), or None."""
    if not disks:
        return None
    return DiskSet([ProtectedDisk(d.target, d.source, disk_server.ServerPaths.of(uuid, d.target).journal)
                    for d in disks])


def backup_replicas(uuid: str, xml: str, sizes: Sequence[int], replica_dir: Path) -> list[tuple[str, int]]:
    """Prepare the replica of every prepared disk of ``xml`` (the primary's sizes, in its disk
    order) and serve it on the same socket path as on the primary, so that the standby QEMU
    opens the replica and, after a takeover, writes through a journaling server."""
    spec = parse_domain(xml)
    disks = spec.disks if spec is not None else ()
    if len(disks) != len(sizes):
        raise CujuError(f"the primary replicates {len(sizes)} disk(s), its XML records {len(disks)}: "
                        "the two cujud versions differ")
    out = []
    for d, size in zip(disks, sizes, strict=True):
        path = d.replica_path(str(replica_dir), uuid)
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        prepare_replica(path, size)
        # The standby's QEMU (not root under libvirt) connects to it: the same owner as on the primary.
        disk_server.start(disk_server.ServerPaths.of(uuid, d.target), path, target=d.target,
                          owner=disk_server.qemu_owner())
        out.append((path, size))
    if out:
        log.info("serving %d replica(s): %s", len(out), ", ".join(p for p, _ in out))
    return out


def stop_servers(uuid: str, xml: str) -> None:
    """Stop the servers of the prepared disks of ``xml`` (a standby that is dropped)."""
    spec = parse_domain(xml)
    for d in spec.disks if spec is not None else ():
        disk_server.stop(disk_server.ServerPaths.of(uuid, d.target))
