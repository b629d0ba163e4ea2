"""Protected disks in domain XML: the ``<disk>`` as it was, and as QEMU reaches it over NBD.

Pure: lxml only, no libvirt calls. A writable disk of a protected domain is *prepared*
by rewriting it to a host-local NBD export over a UNIX socket::

    <disk type='network' device='disk'>
      <driver name='qemu' type='qcow2' error_policy='stop' rerror_policy='stop' discard='unmap'/>
      <source protocol='nbd' name='vda'>
        <host transport='unix' socket='/run/cuju-libvirt/nbd/UUID/vda.sock'/>
      </source>
      <target dev='vda' bus='virtio'/>   <!-- everything else kept as it was -->
    </disk>

and the ``<disk>`` as it was is recorded inside ``<cuju:ft>`` (one ``<cuju:disk>`` per
disk, see :class:`FTDisk`), so that removing the element gives the original disk back.
The epoch-journaling block server behind the socket serves the bytes of the original
source (the image *file*, so a qcow2 stays qcow2 and the ``<driver type>`` is kept).

The record is stored with its indentation made relative to column 0 and re-indented
where it is placed (inside ``<cuju:ft>`` or back in ``<devices>``), so that a
consistently indented document (libvirt's own output always is) comes back exactly.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from lxml import etree

from cuju_libvirt._xml import indent_of, safe_parser
from cuju_libvirt.errors import FTElementError

DiskFormat = Literal["raw", "qcow2"]
DiskSourceType = Literal["file", "block"]
#: Image formats the block server can serve (it serves the file's bytes; QEMU decodes qcow2).
DISK_FORMATS: tuple[DiskFormat, ...] = ("raw", "qcow2")
#: Directory of the per-domain NBD sockets on both hosts: NBD_SOCKET_DIR/<uuid>/<target>.sock.
NBD_SOCKET_DIR = "/run/cuju-libvirt/nbd"
#: A target dev usable as NBD export name and socket file name (libvirt's are like vda, sdb, hdc).
TARGET_PATTERN = re.compile(r"[a-z][a-z0-9]{0,31}\Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# libvirt's rule for a <target> without bus: the dev name's prefix.
_BUS_BY_PREFIX = (
    ("vd", "virtio"), ("sd", "scsi"), ("hd", "ide"), ("xvd", "xen"), ("ubd", "uml"), ("fd", "fdc"),
)


def nbd_socket_path(uuid: str, target: str) -> str:
    """The UNIX socket of the NBD export of disk ``target`` of domain ``uuid`` (same on both hosts)."""
    return f"{NBD_SOCKET_DIR}/{uuid.lower()}/{target}.sock"


def is_uuid(text: str) -> bool:
    return _UUID.match(text.lower()) is not None


class DiskFacts(NamedTuple):
    """What a servable ``<disk>`` is: where its bytes are and how QEMU reads them."""

    target: str
    source: str
    source_type: DiskSourceType
    format: DiskFormat
    bus: str


def target_of(disk: etree._Element) -> str | None:
    target = disk.find("target")
    return target.get("dev") if target is not None else None


def bus_of(disk: etree._Element) -> str:
    """The disk's bus: ``<target bus>``, else what libvirt infers from the dev name's prefix."""
    target = disk.find("target")
    bus = target.get("bus") if target is not None else None
    if bus:
        return bus
    dev = target_of(disk) or ""
    return next((b for prefix, b in _BUS_BY_PREFIX if dev.startswith(prefix)), "unknown")


def is_writable(disk: etree._Element) -> bool:
    """A disk the guest writes to: ``device='disk'`` or ``'lun'``, not ``<readonly/>``."""
    return disk.get("device", "disk") in ("disk", "lun") and disk.find("readonly") is None


def unservable(disk: etree._Element) -> tuple[str, str] | None:
    """Why a writable ``<disk>`` cannot be served as an NBD export, and the fix; None if it can."""
    kind = disk.get("type", "file")
    source = disk.find("source")
    if disk.get("device", "disk") == "lun":
        return (
            "a LUN passthrough disk sends SCSI commands to the host device, which cannot be journaled",
            "use device='disk' (then 'cuju-libvirt xml enable --prepare' serves it)",
        )
    if disk.find("shareable") is not None:
        return (
            "a shareable disk is written by other VMs too, so no copy of it can follow this VM's epochs",
            "keep it on storage both hosts reach, or make it a disk of this VM alone",
        )
    if kind == "network":
        protocol = source.get("protocol", "?") if source is not None else "?"
        return (
            f"a network disk (protocol {protocol}) is written by its own server, which cuju-libvirt "
            "cannot journal",
            "keep it on storage both hosts reach, or copy it to a local image file and point the "
            "<disk type='file'> at it",
        )
    if kind == "volume":
        return (
            "a storage-pool volume cannot be served by path",
            "use <disk type='file'> (or type='block') with the volume's path ('virsh vol-path "
            "--pool POOL VOLUME')",
        )
    if kind not in ("file", "block"):
        return (f"a <disk type='{kind}'> cannot be served over NBD", "use an image file or a block device")
    path = source.get("file" if kind == "file" else "dev") if source is not None else None
    if not path:
        return ("the disk has no source (an empty drive)", "give it a <source> or remove it")
    if source is not None and source.find("reservations") is not None:
        return (
            "SCSI persistent reservations need the host device itself",
            "remove <reservations> from the <source>",
        )
    fmt = _format_of(disk)
    if fmt not in DISK_FORMATS:
        return (
            f"format '{fmt}' cannot be served (raw and qcow2 can)",
            f"convert the image: qemu-img convert -O qcow2 {path} NEW.qcow2, and point the disk at it",
        )
    backing = disk.find("backingStore")
    if backing is not None and backing.find("source") is not None:
        return (
            "the image has a backing chain, which QEMU would open beside the NBD export",
            f"flatten it (qemu-img convert -O {fmt} {path} NEW.{fmt}, or 'virsh blockpull')",
        )
    if disk.find("transient") is not None:
        return (
            "a <transient/> disk discards its writes at shutdown through an overlay", "remove <transient/>"
        )
    dev = target_of(disk)
    if not dev or TARGET_PATTERN.match(dev) is None:
        return (
            f"target dev '{dev or ''}' cannot name an NBD export (lower-case letters and digits)",
            "give the disk a target like dev='vdb'",
        )
    return None


def _format_of(disk: etree._Element) -> str:
    driver = disk.find("driver")
    return (driver.get("type") if driver is not None else None) or "raw"


def facts(disk: etree._Element) -> DiskFacts:
    """The facts of a servable ``<disk>``; ValueError with the reason if it is not servable."""
    problem = unservable(disk)
    if problem is not None:
        raise ValueError(problem[0])
    kind: DiskSourceType = "block" if disk.get("type") == "block" else "file"
    source = disk.find("source")
    assert source is not None
    fmt: DiskFormat = "qcow2" if _format_of(disk) == "qcow2" else "raw"
    path = str(source.get("file" if kind == "file" else "dev"))
    return DiskFacts(str(target_of(disk)), path, kind, fmt, bus_of(disk))


# --- indentation of a recorded disk -------------------------------------------------------


def _whitespace_slots(element: etree._Element) -> list[tuple[etree._Element, str]]:
    """(node, 'text'|'tail') of every whitespace-only text inside ``element`` (its own tail excluded)."""
    slots: list[tuple[etree._Element, str]] = []
    for node in element.iter():
        if node is not element and node.tail is not None and not node.tail.strip():
            slots.append((node, "tail"))
        if node.text is not None and not node.text.strip() and len(node):
            slots.append((node, "text"))
    return slots


def reindent(element: etree._Element, old: str, new: str) -> bool:
    """Replace the leading ``old`` of every line's indentation inside ``element`` by ``new``.

    Returns False (and changes nothing) when some indented line does not start with ``old``:
    then the element was not indented consistently and is left as it is.
    """
    slots = _whitespace_slots(element)
    texts = [getattr(node, which) or "" for node, which in slots]
    for text in texts:
        if "\n" in text and not text[text.rindex("\n") + 1 :].startswith(old):
            return False
    for (node, which), text in zip(slots, texts, strict=True):
        if "\n" in text:
            cut = text.rindex("\n") + 1
            setattr(node, which, text[:cut] + new + text[cut + len(old) :])
    return True


def record_text(disk: etree._Element, indent: str | None) -> str:
    """The XML text of a ``<disk>`` as recorded: no namespace, indentation relative to column 0.

    ``indent`` is the indentation of the line the disk starts on (None: compact document).
    """
    clone = copy.deepcopy(disk)
    clone.tail = None
    for node in clone.iter(etree.Element):
        qname = etree.QName(node)
        if qname.namespace is not None:
            node.tag = qname.localname  # libvirt's metadata API may have put it in the cuju namespace
    etree.cleanup_namespaces(clone)
    if indent:
        reindent(clone, indent, "")
    return etree.tostring(clone, encoding="unicode")


def record_element(text: str, indent: str | None) -> etree._Element:
    """The ``<disk>`` element of a record, indented to start on a line indented by ``indent``."""
    element = etree.fromstring(text, safe_parser())
    if indent:
        reindent(element, "", indent)
    return element


def _parse_record(target: str, text: str) -> etree._Element:
    try:
        element = etree.fromstring(text, safe_parser())
    except etree.XMLSyntaxError as err:
        raise FTElementError(
            [f"<cuju:disk target='{target}'>: the recorded <disk> is not well-formed XML ({err}); "
             "fix: restore the disk by hand and run 'cuju-libvirt xml enable --prepare' again"]
        ) from err
    return element


# --- the record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FTDisk:
    """One prepared disk: its ``<cuju:disk>`` record in ``<cuju:ft>``.

    ``target``, ``replica`` and ``original`` are what the element holds; ``source``,
    ``source_type``, ``format`` and ``bus`` are read from ``original`` (the ``<disk>`` as
    it was before prepare, as XML text without namespace, indented from column 0).
    """

    target: str  # <target dev>: the NBD export name and the socket's file name
    original: str
    replica: str | None = None  # where the backup keeps the copy; None: under replica_dir
    source: str = field(init=False)  # the primary's image file or block device
    source_type: DiskSourceType = field(init=False)
    format: DiskFormat = field(init=False)
    bus: str = field(init=False)

    def __post_init__(self) -> None:
        where = f"<cuju:disk target='{self.target}'>"
        problems: list[str] = []
        if not isinstance(self.target, str) or TARGET_PATTERN.match(self.target) is None:
            problems.append(
                f"{where}: target must be the disk's <target dev> (lower-case letters and digits, "
                "e.g. vda); fix: set it to the dev of the recorded <disk>"
            )
        if self.replica is not None:
            reason = replica_problem(self.replica)
            if reason is not None:
                problems.append(
                    f"{where} attribute replica={self.replica!r} is invalid ({reason}): it must be an "
                    "absolute path on the backup host, default: under replica_dir of cujud.yaml; "
                    "fix: set it to a valid path or remove it"
                )
        if problems:
            raise FTElementError(problems)
        element = _parse_record(self.target, self.original)
        if element.tag != "disk":
            raise FTElementError(
                [f"{where} records <{element.tag}>, not a <disk>; fix: restore the disk by hand and run "
                 "'cuju-libvirt xml enable --prepare' again"]
            )
        try:
            found = facts(element)
        except ValueError as err:
            raise FTElementError(
                [f"{where}: the recorded <disk> cannot be served ({err}); fix: restore it by hand "
                 "('cuju-libvirt xml disable') and check 'cuju-libvirt xml validate'"]
            ) from err
        if found.target != self.target:
            raise FTElementError(
                [f"{where} records the <disk> with target dev '{found.target}'; fix: set "
                 f"target='{found.target}'"]
            )
        object.__setattr__(self, "source", found.source)
        object.__setattr__(self, "source_type", found.source_type)
        object.__setattr__(self, "format", found.format)
        object.__setattr__(self, "bus", found.bus)

    @classmethod
    def from_disk(cls, disk: etree._Element, indent: str | None = None, replica: str | None = None) -> FTDisk:
        """The record of a ``<disk>`` element (``indent``: that of the line it starts on)."""
        return cls(target=str(target_of(disk) or ""), original=record_text(disk, indent), replica=replica)

    def socket_path(self, uuid: str) -> str:
        return nbd_socket_path(uuid, self.target)

    def replica_path(self, replica_dir: str, uuid: str) -> str:
        """Where the backup keeps the copy: ``replica``, else ``replica_dir/<uuid>/<target>.<format>``."""
        if self.replica is not None:
            return self.replica
        return f"{replica_dir.rstrip('/') or '/'}/{uuid.lower()}/{self.target}.{self.format}"


def replica_problem(path: str) -> str | None:
    """Why ``path`` is not a usable replica path, or None."""
    if not path.startswith("/"):
        return "not an absolute path"
    if path.endswith("/"):
        return "a directory, not a file"
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        return "contains control characters"
    if any(part in (".", "..") for part in path.split("/")):
        return "contains '.' or '..'"
    if len(path.encode()) > 4095:
        return "longer than PATH_MAX"
    return None


# --- the rewrite ----------------------------------------------------------------------------

#: Children of a file/block ``<source>`` that keep their meaning on the NBD source.
_KEPT_SOURCE_CHILDREN = ("encryption", "slices")
ERROR_POLICIES = (("error_policy", "stop"), ("rerror_policy", "stop"))


def serve_over_nbd(disk: etree._Element, socket_path: str) -> list[str]:
    """Rewrite a servable ``<disk>`` in place to the NBD export at ``socket_path``.

    Keeps everything but ``type`` and ``<source>`` (``<encryption>`` and ``<slices>`` move
    into the new source); adds ``error_policy='stop' rerror_policy='stop'`` to ``<driver>``
    (created with the image's format if missing) so that a block-server restart pauses the
    VM instead of failing its I/O, and ``discard='unmap'`` unless the disk says otherwise (a
    guest's TRIM then reaches the server and replicates). Returns what was dropped
    (``<source>`` attributes and children that have no meaning on an NBD source).
    """
    target = str(target_of(disk))
    fmt = _format_of(disk)
    old = disk.find("source")
    assert old is not None
    dropped = [f"{name!s}='{value!s}'" for name, value in old.attrib.items() if name not in ("file", "dev")]
    new = etree.Element("source")
    new.set("protocol", "nbd")
    new.set("name", target)
    host = etree.SubElement(new, "host")
    host.set("transport", "unix")
    host.set("socket", socket_path)
    kept = [c for c in old if isinstance(c.tag, str) and c.tag in _KEPT_SOURCE_CHILDREN]
    dropped += [f"<{c.tag}>" for c in old if isinstance(c.tag, str) and c.tag not in _KEPT_SOURCE_CHILDREN]
    for child in kept:
        new.append(child)
    _indent_like(new, old)
    new.tail = old.tail
    disk.replace(old, new)
    disk.set("type", "network")
    driver = disk.find("driver")
    if driver is None:
        driver = etree.Element("driver")
        driver.set("name", "qemu")
        driver.set("type", fmt)
        driver.tail = _space_before(disk, disk.index(new))
        disk.insert(disk.index(new), driver)
    for name, value in ERROR_POLICIES:
        driver.set(name, value)
    if driver.get("discard") is None:
        # The guest's TRIM reaches the server, which punches the hole and journals it: the
        # replica follows (an explicit discard='ignore' is kept).
        driver.set("discard", "unmap")
    return dropped


def _space_before(parent: etree._Element, index: int) -> str | None:
    return parent.text if index == 0 else parent[index - 1].tail


def _indent_like(new: etree._Element, old: etree._Element) -> None:
    """Lay out the children of ``new`` one level below the line of ``old`` (nothing if compact)."""
    line = indent_of(old)
    parent = old.getparent()
    above = indent_of(parent) if parent is not None else None
    if line is None:
        return
    step = line[len(above) :] if above is not None and line.startswith(above) and line != above else "  "
    new.text = "\n" + line + step
    for i, child in enumerate(new):
        child.tail = "\n" + line + (step if i < len(new) - 1 else "")
