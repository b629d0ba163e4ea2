"""What libvirt's events about a running protected domain mean for its protection.

libvirt gives its hooks no say over hot-plug, block jobs, snapshots or ``undefine``: the
QEMU hook runs only around a start, a stop, an incoming migration and a restore (the hook
refuses ``virsh migrate`` at ``migrate begin``). Everything else is learnt after the fact,
from the domain events cujud subscribes to (:data:`~cuju_libvirt.cujud.virt.DOMAIN_EVENTS`
and the lifecycle). :func:`verdict` maps each to one of:

* ``RECONFIGURE``: the standby no longer matches the VM (a device came or went, a disk's
  image chain changed, the persistent configuration changed): protection ends before the
  next epoch ships, with one WARNING line naming the cause, and cujud pairs again with a
  standby of the new configuration;
* ``NOTE``: protection goes on as it is; one INFO line says what happened and why it is safe;
* None: nothing to say (the epochs' own pauses, events of no consequence).

Some changes come with no event at all: ``virsh snapshot-create --disk-only`` moves each
disk onto a new overlay image and ``virsh blockresize`` changes a disk's size, and neither
libvirt nor QEMU says anything. cujud compares, about twice a second, each disk's image
chain in the live XML (:func:`disk_chains`, :func:`disks_changed`) and its capacity in
libvirt's block stats (:func:`disk_sizes`, :func:`disks_resized`) with what the standby
was made from.

Pure: no libvirt calls, so every row is unit-tested (tests/unit/test_domain_events.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from lxml import etree

from cuju_libvirt import _xml
from cuju_libvirt.cujud.virt import DomainEvent, LifecycleEvent


class Action(enum.Enum):
    RECONFIGURE = "reconfigure"
    NOTE = "note"


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: What happened, in an operator's words (the log line's start).
    cause: str


#: Block jobs that leave a disk on another image (or image chain) once they complete.
_CHAIN_CHANGING_JOBS = {
    "COPY": "virsh blockcopy", "ACTIVE_COMMIT": "virsh blockcommit --active",
    "COMMIT": "virsh blockcommit", "PULL": "virsh blockpull",
}
#: Finished libvirt jobs that may have changed the VM's disks (an external disk snapshot
#: moves each disk onto a new overlay image the standby does not open).
_DISK_CHANGING_OPERATIONS = {"SNAPSHOT": "virsh snapshot-create", "SNAPSHOT_REVERT": "virsh snapshot-revert"}


def verdict(event: DomainEvent | LifecycleEvent) -> Verdict | None:
    """What ``event`` means for a domain protected from this host (see the module docstring)."""
    if isinstance(event, LifecycleEvent):
        return _lifecycle(event)
    info, kind = event.info, event.kind
    if kind == "device-added":
        return Verdict(Action.RECONFIGURE, f"device {info['alias']} was hot-plugged (virsh attach-device, "
                                           "setvcpus or setmem of a memory device)")
    if kind == "device-removed":
        return Verdict(Action.RECONFIGURE, f"device {info['alias']} was unplugged (virsh detach-device)")
    if kind == "memory-device-size-change":
        return Verdict(Action.RECONFIGURE, f"memory device {info['alias']} changed its size to "
                                           f"{info['size_kib']} KiB (virsh update-memory-device)")
    if kind == "block-job":
        job = _CHAIN_CHANGING_JOBS.get(str(info["type"]))
        if job is not None and info["status"] == "COMPLETED":
            return Verdict(Action.RECONFIGURE, f"{job} of disk {info['disk']} finished: the disk is on "
                                               "another image now")
        if job is not None and info["status"] == "READY":
            return Verdict(Action.NOTE, f"{job} of disk {info['disk']} is ready: the source image still "
                                        "gets every write; protection ends when the job pivots")
        return Verdict(Action.NOTE, f"block job {info['type']} of disk {info['disk']} ended "
                                    f"({str(info['status']).lower()}): the disk stays on its image")
    if kind == "job-completed":
        op = str(info["operation"])
        if op in _DISK_CHANGING_OPERATIONS:
            return Verdict(Action.RECONFIGURE, f"{_DISK_CHANGING_OPERATIONS[op]} finished: the disks may be "
                                               "on new overlay images")
        return None  # save, migration, dump: the lifecycle (or nothing at all) says the rest
    if kind == "balloon-change":
        return Verdict(Action.NOTE, f"the balloon holds the guest at {info['actual_kib']} KiB "
                                    "(virsh setmem): pages it gives back are replicated as zero pages")
    if kind == "pm-suspend":
        if info.get("disk"):
            return Verdict(Action.NOTE, "the guest hibernates (suspend to disk): it powers off when done, "
                                        "which ends protection")
        return Verdict(Action.NOTE, "the guest suspended itself to RAM (virsh dompmsuspend or the guest): "
                                    "protection ends while it sleeps (the engine says why)")
    if kind == "pm-wakeup":
        return Verdict(Action.NOTE, "the guest woke up from its suspend to RAM: cujud protects it again")
    if kind == "reboot":
        return Verdict(Action.NOTE, "the guest was reset (virsh reset or reboot, or the guest itself): the "
                                    "same QEMU runs on and the reset is replicated like any other change")
    return None


def _lifecycle(event: LifecycleEvent) -> Verdict | None:
    if event.event_name == "UNDEFINED":
        return Verdict(Action.RECONFIGURE, "virsh undefine: the domain is transient now, and so must its "
                                           "copy be after a failover")
    if event.event_name == "DEFINED" and event.detail_name == "UPDATED":
        return Verdict(Action.RECONFIGURE, "virsh define changed the domain's persistent configuration, "
                                           "which a failover defines on the other host")
    return None


DiskChains = dict[str, tuple[tuple[tuple[str, str], ...], ...]]


def disk_chains(xml: str) -> DiskChains:
    """Each disk's image chain in a live domain XML: its target, then the attributes of its
    ``<source>`` and of every ``<backingStore>``'s source (without libvirt's node ``index``)."""
    root = _xml.parse_xml(xml)[0].getroot()
    chains: DiskChains = {}
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        chain: list[tuple[tuple[str, str], ...]] = []
        for source in disk.iter("source"):
            if isinstance(source, etree._Element):
                attrs = ((str(k), str(v)) for k, v in source.attrib.items() if k != "index")
                chain.append(tuple(sorted(attrs)))
        chains[str(dev)] = tuple(chain)
    return chains


def disks_changed(before: DiskChains, now: DiskChains) -> Verdict | None:
    """RECONFIGURE when a disk came, went or moved to other images since ``before``."""
    if before == now:
        return None
    moved = sorted(dev for dev in before.keys() & now.keys() if before[dev] != now[dev])
    parts = ([f"disk {', '.join(moved)} is on other images now (virsh snapshot-create --disk-only?)"]
             if moved else []) + [f"disk {dev} came" for dev in sorted(now.keys() - before.keys())] + \
        [f"disk {dev} went" for dev in sorted(before.keys() - now.keys())]
    return Verdict(Action.RECONFIGURE, "; ".join(parts))


#: Each disk's capacity in bytes (the size the guest sees), by target.
DiskSizes = dict[str, int]


def disk_sizes(stats: dict[str, Any]) -> DiskSizes:
    """Each disk's capacity from libvirt's block stats of one domain
    (``VIR_DOMAIN_STATS_BLOCK``: ``block.N.name``, ``block.N.capacity``). A disk whose
    capacity libvirt could not read at the moment (a job held the domain) is left out."""
    sizes: DiskSizes = {}
    for i in range(int(stats.get("block.count", 0))):
        name, size = stats.get(f"block.{i}.name"), stats.get(f"block.{i}.capacity")
        if name is not None and size is not None:
            sizes.setdefault(str(name), int(size))  # the top image first (no backing entries asked)
    return sizes


def disks_resized(before: DiskSizes, now: DiskSizes) -> Verdict | None:
    """RECONFIGURE when a disk's capacity changed since ``before`` (disks that came or went
    are :func:`disks_changed`'s)."""
    resized = sorted(dev for dev in before.keys() & now.keys() if before[dev] != now[dev])
    if not resized:
        return None
    return Verdict(Action.RECONFIGURE, "; ".join(
        f"disk {dev} was resized from {before[dev]} to {now[dev]} bytes (virsh blockresize)"
        for dev in resized))
