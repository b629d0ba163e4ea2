"""Can this domain be protected? The fitness rules, in one place, and the safe fixes.

:func:`check_fitness` lists the problems of a domain XML (each names the device or
attribute and the fix, with a severity); :func:`prepare` makes the changes that are safe
to make automatically and says what it changed. The CLI, the libvirt hook and cujud all
use these functions, so a domain is judged the same way everywhere. Pure: no libvirt calls.

Why each rule exists (docs/ft-element.md has the user-facing version):

* guest RAM must be file-backed and shared: the device-state save carries no RAM at all,
  the data plane replicates that file, and the trackers and the standby work on it;
* device DMA that no tracker sees (PCI/USB passthrough, vDPA, NVMe userspace driver,
  vhost-user back-ends, ivshmem, virtio-pmem/nvdimm/virtio-mem backends outside the RAM
  file) would make the replica silently wrong: errors;
* NICs must not use vhost: QEMU's filter-buffer, used for output commit, refuses vhost
  netdevs (also a NIC without ``<model>`` where libvirt defaults to virtio);
* encrypted guest RAM (``<launchSecurity>``) cannot be read or replicated: an error;
* devices bound to this host (smartcard readers, host input devices, redirected USB) cannot
  follow the VM: errors;
* writable disks are protected once prepared (served to QEMU by the epoch-journaling
  block server over NBD, see :mod:`cuju_libvirt.disk_xml`); a disk that is not prepared,
  or cannot be served, gets a warning naming it: its writes are not epoch-protected. So
  does the EFI variable store, and an architecture the failover path is not tested on.
"""

from __future__ import annotations

import enum
import itertools
import logging
import uuid as uuid_module
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import AnyStr, Generic

from lxml import etree

from cuju_libvirt import chardev_xml
from cuju_libvirt._xml import close_indent, indent_of, insert_child
from cuju_libvirt.disk_xml import (
    ERROR_POLICIES,
    FTDisk,
    is_uuid,
    is_writable,
    serve_over_nbd,
    target_of,
    unservable,
)

# re-exported: the one socket-path helper both sides of the disk data path use
from cuju_libvirt.disk_xml import NBD_SOCKET_DIR as NBD_SOCKET_DIR  # noqa: PLC0414
from cuju_libvirt.disk_xml import nbd_socket_path as nbd_socket_path  # noqa: PLC0414
from cuju_libvirt.domain_xml import FTSpec, find_ft, is_nbd_export, load_domain, set_ft_in, spec_from_element
from cuju_libvirt.errors import FTElementError

LOG = logging.getLogger(__name__)

#: libvirt's namespace for ``<qemu:commandline>``; must be declared on the root ``<domain>``.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Directory of the direct QMP sockets cujud uses for the per-epoch commands.
QMP_SOCKET_DIR = "/run/cuju-libvirt/qmp"
#: Trackers known to see pages discarded by the balloon or free-page reporting
#: (uffd through UFFD_EVENT_REMOVE, scan by comparing contents). "auto" picks one of them.
DISCARD_SAFE_TRACKERS = frozenset({"auto", "uffd", "scan"})
#: Longest UNIX socket path (sun_path is 108 bytes including the terminating NUL).
_MAX_SOCKET_PATH = 107
_VIRTIO_NIC_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional")
#: Guest architectures the engine and the failover path are verified with (libvirt's names).
TESTED_ARCHES = frozenset({"x86_64", "i686"})
_PREPARE = "run 'cuju-libvirt xml enable --prepare'"


class Severity(enum.Enum):
    ERROR = "error"  # the domain cannot be protected as written
    WARNING = "warning"  # it can, with a limitation the operator must know


@dataclass(frozen=True)
class Problem:
    """One finding: what (``subject``: the device or attribute), why, and how to fix it."""

    severity: Severity
    code: str  # stable identifier, e.g. "hostdev", "memory-backing"
    subject: str
    message: str
    fix: str
    preparable: bool = False  # prepare() fixes it

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.subject}: {self.message}; fix: {self.fix}"

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


def qmp_socket_path(domain_name: str) -> str:
    """Path of the direct QMP socket of a domain."""
    return f"{QMP_SOCKET_DIR}/{domain_name}.sock"


def qmp_argument(domain_name: str) -> str:
    """The value that follows ``-qmp`` (commas in the path doubled, as QEMU's option parser wants)."""
    path = qmp_socket_path(domain_name).replace(",", ",,")
    return f"unix:{path},server=on,wait=off"


@dataclass
class _Context:
    root: etree._Element
    spec: FTSpec | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (self.root.findtext("name") or "").strip()

    @property
    def tracker(self) -> str:
        return self.spec.tracker if self.spec is not None else "auto"

    def error(self, code: str, subject: str, message: str, fix: str, preparable: bool = False) -> None:
        self.problems.append(Problem(Severity.ERROR, code, subject, message, fix, preparable))

    def warn(self, code: str, subject: str, message: str, fix: str, preparable: bool = False) -> None:
        self.problems.append(Problem(Severity.WARNING, code, subject, message, fix, preparable))

    def devices(self, tag: str) -> Iterator[etree._Element]:
        yield from self.root.iterfind(f"devices/{tag}")


# --- describing devices -------------------------------------------------------------------


def _interface_name(nic: etree._Element) -> str:
    parts = [f"<interface type='{nic.get('type', '?')}'>"]
    mac = nic.find("mac")
    if mac is not None and mac.get("address"):
        parts.append(f"mac {mac.get('address')}")
    source = nic.find("source")
    if source is not None:
        for key in ("network", "bridge", "dev", "path"):
            if source.get(key):
                parts.append(f"{key} {source.get(key)}")
                break
    return " ".join(parts)


def _disk_name(disk: etree._Element) -> str:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    source = disk.find("source")
    where = ""
    if source is not None:
        for key in ("file", "dev", "name", "volume", "dir", "path"):
            if source.get(key) and not (key == "name" and source.get(key) == dev):
                where = f" ({source.get(key)})"
                break
    return f"<disk> {dev or '?'}{where}"


def _number(text: str, width: int) -> str:
    try:
        return f"{int(text, 16 if not text.startswith('0x') else 0):0{width}x}"
    except ValueError:
        return text


def _hostdev_name(dev: etree._Element) -> str:
    kind = dev.get("type", "?")
    source = dev.find("source")
    detail = ""
    if source is not None:
        address = source.find("address")
        vendor, product = source.find("vendor"), source.find("product")
        adapter = source.find("adapter")
        if address is not None and address.get("domain") is not None:
            a = {k: str(address.get(k, "0")) for k in ("domain", "bus", "slot", "function")}
            detail = (
                f" {_number(a['domain'], 4)}:{_number(a['bus'], 2)}:{_number(a['slot'], 2)}."
                f"{_number(a['function'], 1)}"
            )
        elif vendor is not None and product is not None:
            detail = f" {vendor.get('id', '?')!s}:{product.get('id', '?')!s}"
        elif address is not None:
            detail = " " + " ".join(f"{k!s}={v!s}" for k, v in address.attrib.items())
        elif adapter is not None:
            detail = f" adapter {adapter.get('name', '?')!s}"
    return f"<hostdev type='{kind!s}'>{detail}"


def _arch_machine(root: etree._Element) -> tuple[str, str]:
    os_type = root.find("os/type")
    if os_type is None:
        return "", ""
    return os_type.get("arch", ""), os_type.get("machine", "")


def nic_model(nic: etree._Element, root: etree._Element) -> str | None:
    """The NIC's model: the one given, or the one libvirt picks when ``<model>`` is left out.

    libvirt (qemuDomainDefaultNetModel) gives a NIC without a model virtio on s390, on the
    ARM and RISC-V ``virt`` machines, and an emulated NIC (rtl8139, e1000) elsewhere; None
    when that cannot be told from the XML alone (no architecture: the host's, x86 here).
    """
    model = nic.find("model")
    if model is not None and model.get("type"):
        return model.get("type")
    arch, machine = _arch_machine(root)
    is_virt = machine == "virt" or machine.startswith("virt-")
    if arch.startswith("s390") or (arch in ("armv6l", "armv7l", "aarch64", "riscv32", "riscv64") and is_virt):
        return "virtio"
    return None


# --- the rules ----------------------------------------------------------------------------


def _rule_domain_type(ctx: _Context) -> None:
    kind = ctx.root.get("type")
    if kind not in ("qemu", "kvm"):
        ctx.error(
            "domain-type", f"<domain type='{kind}'>",
            "only QEMU domains can be protected",
            "use <domain type='kvm'> (or 'qemu' for TCG)",
        )


def _rule_qmp_socket(ctx: _Context) -> None:
    name = ctx.name
    if not name:
        ctx.error("name", "<name>", "the domain has no name", "add <name>")
        return
    path = qmp_socket_path(name)
    if len(path.encode()) > _MAX_SOCKET_PATH:
        ctx.error(
            "qmp-socket", "<name>",
            f"the direct QMP socket {path} would be longer than a UNIX socket path may be "
            f"({_MAX_SOCKET_PATH} bytes)",
            f"shorten the domain name to at most {_MAX_SOCKET_PATH - len(qmp_socket_path(''))} bytes",
        )
        return
    if not has_qmp_socket(ctx.root):
        ctx.error(
            "qmp-socket", "<qemu:commandline>",
            f"no direct QMP socket for cujud's per-epoch commands (-qmp {qmp_argument(name)})",
            f"{_PREPARE} (adds it; libvirt then marks the domain tainted: custom-argv)",
            preparable=True,
        )
    elif ctx.root.nsmap.get(_qemu_prefix(ctx.root) or "") != QEMU_NAMESPACE:
        ctx.error(
            "qmp-socket", "<domain>",
            f"the qemu namespace {QEMU_NAMESPACE} is not declared on the root <domain> element",
            f"{_PREPARE} or add xmlns:qemu='{QEMU_NAMESPACE}' to <domain>",
            preparable=True,
        )


def _rule_memory(ctx: _Context) -> None:
    backing = ctx.root.find("memoryBacking")
    source = backing.find("source") if backing is not None else None
    access = backing.find("access") if backing is not None else None
    source_type = source.get("type") if source is not None else None
    if source_type != "file":
        ctx.error(
            "memory-backing", "<memoryBacking><source>",
            f"guest RAM is {source_type or 'anonymous'} memory; it must be file-backed",
            f"{_PREPARE} or add <source type='file'/> to <memoryBacking>",
            preparable=True,
        )
    if (access.get("mode") if access is not None else None) != "shared":
        ctx.error(
            "memory-backing", "<memoryBacking><access>",
            "guest RAM is not shared; it must be (the device-state save skips only shared RAM)",
            f"{_PREPARE} or add <access mode='shared'/> to <memoryBacking>",
            preparable=True,
        )
    if backing is not None and backing.find("hugepages") is not None:
        ctx.error(
            "hugepages", "<memoryBacking><hugepages>",
            "huge pages put guest RAM in hugetlbfs, where the trackers are not verified "
            "(dirty granularity becomes the huge page size)",
            "remove <hugepages/> from <memoryBacking>",
        )
    slots = ctx.root.find("maxMemory")
    if slots is not None and slots.get("slots", "0") != "0":
        ctx.warn(
            "memory-hotplug", "<maxMemory slots>",
            "memory hot-plug (virsh attach-device of a <memory> device) ends protection: the VM runs "
            "unprotected until the device is removed (a DIMM's RAM is not replicated)",
            "remove <maxMemory> to rule memory hot-plug out",
        )
    for cell in ctx.root.iterfind("cpu/numa/cell"):
        if cell.get("memAccess") == "private":
            ctx.error(
                "memory-backing", f"<cpu><numa><cell id='{cell.get('id', '?')}' memAccess='private'>",
                "this NUMA cell's RAM is private, not shared",
                f"{_PREPARE} or set memAccess='shared' (or remove it)",
                preparable=True,
            )
    for mem in ctx.devices("memory"):
        model = mem.get("model", "?")
        if model == "dimm":
            ctx.error(
                "memory-device", "<memory model='dimm'>",
                "a DIMM's RAM is a memory backend (a file) of its own, and the engine replicates only "
                "the one guest RAM file: its contents would not reach the standby",
                "remove the device (give the guest its RAM in <memory>); one hot-plugged into the running "
                "VM: virsh detach-device, if the guest lets it go, or restart the VM without it",
            )
            continue
        ctx.error(
            "memory-device", f"<memory model='{model}'>",
            "memory outside the guest RAM file (nvdimm, virtio-pmem, virtio-mem, SGX EPC) is not "
            "tracked or is plugged and discarded at run time",
            "remove the device",
        )


def _rule_passthrough(ctx: _Context) -> None:
    dma = "its DMA goes straight to guest RAM where no dirty-page tracker sees it"
    for dev in ctx.devices("hostdev"):
        ctx.error("hostdev", _hostdev_name(dev), f"host device passthrough: {dma}", "remove the <hostdev>")
    for nic in ctx.devices("interface"):
        kind = nic.get("type")
        if kind in ("hostdev", "vdpa"):
            ctx.error(
                "hostdev", _interface_name(nic), f"a {kind} NIC is passed-through hardware: {dma}",
                "use a virtio NIC on a bridge or network with <driver name='qemu'/>",
            )
    for disk in ctx.devices("disk"):
        if disk.get("type") == "nvme":
            ctx.error(
                "hostdev", _disk_name(disk), f"an NVMe disk with QEMU's userspace driver (VFIO): {dma}",
                "use the NVMe device as <disk type='block'> instead",
            )
        elif disk.get("type") == "vhostvdpa":
            ctx.error(
                "hostdev", _disk_name(disk), f"a vhost-vDPA disk is passed-through hardware: {dma}",
                "use a file, block or network disk",
            )
    for card in ctx.devices("smartcard"):
        mode = card.get("mode", "?")
        if mode in ("passthrough", "host"):
            ctx.error(
                "smartcard", f"<smartcard mode='{mode}'>",
                "the smartcard (its reader, or the client that forwards it) is on this host and "
                "cannot follow the VM to the peer",
                "remove the <smartcard>",
            )
        elif mode == "host-certificates":
            ctx.warn(
                "smartcard", "<smartcard mode='host-certificates'>",
                "the emulated card reads its certificates from this host's NSS database",
                "keep the same certificate database on the peer",
            )
    for dev in ctx.devices("input"):
        kind = dev.get("type", "?")
        if kind in ("evdev", "passthrough"):
            source = dev.find("source")
            where = source.get("dev" if kind == "evdev" else "evdev", "") if source is not None else ""
            ctx.error(
                "input", f"<input type='{kind}'>{' ' + where if where else ''}",
                "a host input device (keyboard, mouse, its evdev node) is on this host and cannot "
                "follow the VM to the peer",
                "use an emulated input device (<input type='tablet' bus='usb'/>, 'keyboard', 'mouse')",
            )
    for dev in ctx.devices("redirdev"):
        ctx.error(
            "redirdev", f"<redirdev bus='{dev.get('bus', 'usb')}' type='{dev.get('type', '?')}'>",
            "a redirected USB device lives on the client side and cannot follow the VM to the peer",
            "remove the <redirdev>",
        )
    for tpm in ctx.devices("tpm"):
        backend = tpm.find("backend")
        kind = backend.get("type") if backend is not None else None
        if kind == "passthrough":
            ctx.error(
                "tpm", "<tpm><backend type='passthrough'>",
                "the host's TPM cannot be replicated to the peer",
                "use <backend type='emulator'/> (swtpm) or remove the <tpm>",
            )
        elif kind == "emulator":
            ctx.warn(
                "tpm", "<tpm><backend type='emulator'>",
                "the emulated TPM's state is saved with the device state every epoch (larger "
                "pauses); its persistent state file must also exist on the peer",
                "keep swtpm's state directory on storage that both hosts can reach",
            )


def _rule_vhost_user(ctx: _Context) -> None:
    why = "a vhost-user back-end is another process writing guest RAM, which no tracker sees"
    for nic in ctx.devices("interface"):
        if nic.get("type") == "vhostuser":
            ctx.error("vhost-user", _interface_name(nic), why, "use a virtio NIC with <driver name='qemu'/>")
    for disk in ctx.devices("disk"):
        if disk.get("type") == "vhostuser":
            ctx.error("vhost-user", _disk_name(disk), why, "use a file, block or network disk")
    for fs in ctx.devices("filesystem"):
        driver = fs.find("driver")
        target = fs.find("target")
        mount = target.get("dir") if target is not None else "?"
        if driver is not None and driver.get("type") == "virtiofs":
            ctx.error("vhost-user", f"<filesystem> virtiofs {mount}", f"virtiofsd: {why}", "remove it")
        else:
            ctx.warn(
                "filesystem", f"<filesystem> {mount}",
                "writes to a shared host directory are not epoch-protected",
                "use it read-only or accept that the peer may see writes of a lost epoch",
            )
    for video in ctx.devices("video"):
        driver = video.find("driver")
        if driver is not None and driver.get("name") == "vhostuser":
            ctx.error("vhost-user", "<video><driver name='vhostuser'>", why, "use a QEMU video model")
    if any(True for _ in ctx.devices("vsock")):
        ctx.error(
            "vsock", "<vsock>",
            "vhost-vsock runs in a kernel worker outside QEMU's filters: its host connections "
            "cannot follow the VM to the peer and its output is not held until commit",
            "remove the <vsock> (use a virtio-serial <channel> or the network)",
        )
    for shm in ctx.devices("shmem"):
        ctx.error(
            "shmem", f"<shmem name='{shm.get('name', '?')}'>",
            "ivshmem maps memory that other processes write, where no tracker sees it",
            "remove the <shmem>",
        )


def _rule_launch_security(ctx: _Context) -> None:
    for sec in ctx.root.iterfind("launchSecurity"):
        kind = sec.get("type", "?")
        ctx.error(
            "launch-security", f"<launchSecurity type='{kind}'>",
            "the guest's RAM is encrypted (SEV, SEV-SNP, TDX, s390 protected virtualization): "
            "cujud cannot read it from the RAM file to replicate it, and the peer's QEMU could not "
            "use another host's encrypted pages",
            "remove <launchSecurity> to protect this domain (or do not protect it)",
        )


def _rule_arch(ctx: _Context) -> None:
    arch, _machine = _arch_machine(ctx.root)
    if arch and arch not in TESTED_ARCHES:
        ctx.warn(
            "arch", f"<os><type arch='{arch}'>",
            f"only {', '.join(sorted(TESTED_ARCHES))} guests are tested (dirty tracking, device state, "
            "failover); the peer must run the same architecture and QEMU",
            "test failover of this guest on your hosts before relying on it",
        )


def _rule_nvram(ctx: _Context) -> None:
    os_el = ctx.root.find("os")
    if os_el is None:
        return
    nvram = os_el.find("nvram")
    loader = os_el.find("loader")
    efi = os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"
                                            and loader.get("readonly") == "yes")
    if nvram is None and not efi:
        return
    path = nvram.text.strip() if nvram is not None and nvram.text else ""
    ctx.warn(
        "nvram", "<os><nvram>" + (f" {path}" if path else ""),
        "the EFI variable store is a writable flash image, written like a disk: its writes are "
        "not epoch-protected, and the standby on the peer opens the same file",
        "keep the varstore on storage both hosts reach, as for a writable disk",
    )


def _rule_nics(ctx: _Context) -> None:
    for nic in ctx.devices("interface"):
        if nic.get("type") in ("hostdev", "vdpa", "vhostuser"):
            continue  # reported by the passthrough / vhost-user rules
        if nic_model(nic, ctx.root) not in _VIRTIO_NIC_MODELS:
            continue  # only virtio NICs can use vhost
        driver = nic.find("driver")
        if driver is None or driver.get("name") != "qemu":
            ctx.error(
                "nic-vhost", _interface_name(nic),
                "a virtio NIC without <driver name='qemu'/> uses vhost, and QEMU's filter-buffer "
                "(output commit) refuses vhost netdevs",
                f"{_PREPARE} or add <driver name='qemu'/> to the <interface>",
                preparable=True,
            )


def _rule_balloon(ctx: _Context) -> None:
    for balloon in ctx.devices("memballoon"):
        if balloon.get("freePageReporting") == "on" and ctx.tracker not in DISCARD_SAFE_TRACKERS:
            ctx.error(
                "balloon", "<memballoon freePageReporting='on'>",
                f"free-page reporting discards guest pages, which tracker '{ctx.tracker}' does not see",
                "set freePageReporting='off' or use a tracker that handles discards",
            )


def domain_uuid(root: etree._Element) -> str | None:
    """The domain's ``<uuid>`` in lower case, None if it has none (or not a valid one)."""
    text = (root.findtext("uuid") or "").strip().lower()
    return text if is_uuid(text) else None


def _rule_disks(ctx: _Context) -> None:
    records = {d.target: d for d in ctx.spec.disks} if ctx.spec is not None else {}
    uuid = domain_uuid(ctx.root)
    seen: set[str] = set()
    for disk in ctx.devices("disk"):
        if disk.get("type") in ("vhostuser", "nvme", "vhostvdpa") or not is_writable(disk):
            continue  # reported by the passthrough / vhost-user rules; cdroms and read-only disks
        target = target_of(disk) or ""
        seen.add(target)
        if is_nbd_export(disk):
            _check_prepared(ctx, disk, records.get(target), uuid)
            continue
        if target in records:
            ctx.error(
                "disk-record", _disk_name(disk),
                f"<cuju:ft> records this disk as prepared, but it is no longer the NBD export "
                f"(the block server would serve {records[target].source}, not what the disk says now)",
                "for a running domain prepared since it started: restart it (the persistent "
                f"configuration has the export); otherwise remove <cuju:disk target='{target}'> "
                f"from <cuju:ft>, then {_PREPARE}",
            )
            continue
        problem = unservable(disk)
        if problem is not None:
            why, fix = problem
            ctx.warn(
                "disk", _disk_name(disk),
                f"disk writes are not epoch-protected: {why}; after a failover the standby opens "
                "the same source, which may hold writes of the lost epoch",
                fix,
            )
            continue
        ctx.warn(
            "disk", _disk_name(disk),
            "disk writes are not epoch-protected yet: after a failover the disk may hold writes "
            "of the lost epoch, and the standby on the peer opens the same source",
            f"{_PREPARE} (serves it through the replicating block server, for the backup to "
            "keep a copy as of each committed epoch: docs/failover.md)",
            preparable=True,
        )
    for target, record in records.items():
        if target not in seen:
            ctx.warn(
                "disk-record", f"<cuju:disk target='{target}'>",
                f"records a disk ({record.source}) that the domain no longer has",
                f"remove <cuju:disk target='{target}'> from <cuju:ft>",
            )


def _check_prepared(ctx: _Context, disk: etree._Element, record: FTDisk | None, uuid: str | None) -> None:
    name = _disk_name(disk)
    target = target_of(disk) or "?"
    if record is None:
        ctx.error(
            "disk-record", name,
            "the disk is an NBD export of cuju-libvirt's block server, but <cuju:ft> has no record "
            "of the original disk: the server does not know what to serve, and disable cannot give it back",
            "put the original <disk> back by hand, then "
            f"{_PREPARE}",
        )
        return
    host = disk.find("source/host")
    socket = host.get("socket") if host is not None else None
    if uuid is None:
        ctx.error(
            "disk-socket", name,
            "the domain has no <uuid>, which names the directory of its NBD sockets",
            f"{_PREPARE} (adds a <uuid>)", preparable=True,
        )
    elif socket != nbd_socket_path(uuid, target):
        ctx.error(
            "disk-socket", name,
            f"the NBD socket is {socket}, but the block server of this domain listens on "
            f"{nbd_socket_path(uuid, target)} (was the domain copied under a new <uuid>?)",
            f"{_PREPARE} (points the disk at the right socket)", preparable=True,
        )
    driver = disk.find("driver")
    if driver is None or any(driver.get(k) != v for k, v in ERROR_POLICIES):
        ctx.error(
            "disk-error-policy", name,
            "without error_policy='stop' rerror_policy='stop' a restart of the block server fails "
            "the guest's I/O instead of pausing the VM",
            f"{_PREPARE} or set both on the disk's <driver>", preparable=True,
        )


def _rule_element(ctx: _Context) -> None:
    if ctx.spec is not None and not ctx.spec.output_commit:
        ctx.warn(
            "output-commit", "<cuju:ft output-commit='off'>",
            "network output leaves before the peer has the state that produced it: after a "
            "failover, peers may have seen packets from a state the VM lost",
            "remove output-commit (default on)",
        )


#: Every rule, in report order. Each appends Problems to the context.
RULES: tuple[Callable[[_Context], None], ...] = (
    _rule_domain_type,
    _rule_launch_security,
    _rule_arch,
    _rule_memory,
    _rule_passthrough,
    _rule_vhost_user,
    _rule_nics,
    _rule_balloon,
    _rule_qmp_socket,
    _rule_disks,
    _rule_nvram,
    _rule_element,
)


def check_fitness_in(root: etree._Element, spec: FTSpec | None = None) -> list[Problem]:
    """The problems of a parsed ``<domain>`` tree; ``spec`` defaults to its own element."""
    if spec is None:
        element = find_ft(root)
        spec = spec_from_element(element) if element is not None else None
    ctx = _Context(root, spec)
    for rule in RULES:
        rule(ctx)
    return ctx.problems


def check_fitness(xml: str | bytes, spec: FTSpec | None = None) -> list[Problem]:
    """The problems that keep a domain XML from being protected (errors) or limit it (warnings).

    Raises :class:`~cuju_libvirt.errors.NotADomainXMLError` for unreadable input and
    :class:`~cuju_libvirt.errors.FTElementError` for an invalid element.
    """
    return check_fitness_in(load_domain(xml).root, spec)


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


#: The rules a running VM can come to break after its start, by hot-plug (``virsh
#: attach-device`` of a DIMM or a host device): cujud applies them to the live
#: configuration before each pairing, so that it never pairs a VM whose standby could not
#: follow it (a DIMM's RAM would be missing from the replica, a host device's DMA untracked).
LIVE_RULES: tuple[Callable[[_Context], None], ...] = (_rule_memory, _rule_passthrough)


def check_live_fitness(xml: str | bytes) -> list[Problem]:
    """The errors of a running domain's live XML by :data:`LIVE_RULES`."""
    ctx = _Context(load_domain(xml).root, None)
    for rule in LIVE_RULES:
        rule(ctx)
    return errors(ctx.problems)


# --- prepare: the safe changes ------------------------------------------------------------


def _qemu_prefix(root: etree._Element) -> str | None:
    for prefix, uri in root.nsmap.items():
        if uri == QEMU_NAMESPACE and prefix:
            return prefix
    return None


def _qemu_options(value: str) -> list[str]:
    """Split a QEMU option string at single commas (',,' is an escaped comma)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def _flags(options: list[str]) -> dict[str, str]:
    """key=value options as a dict; bare flags become 'on' ('nowait' becomes wait=off)."""
    result: dict[str, str] = {}
    for option in options:
        key, sep, val = option.partition("=")
        if not sep:
            key, val = ("wait", "off") if key == "nowait" else (key, "on")
        result[key] = val
    return result


def _server_nowait(flags: dict[str, str]) -> bool:
    return flags.get("server") in ("on", "yes", "true") and flags.get("wait") in ("off", "no", "false")


def has_qmp_socket(root: etree._Element) -> bool:
    """Whether ``<qemu:commandline>`` gives QEMU cujud's direct QMP socket for this domain.

    Accepted: ``-qmp unix:PATH,server=on,wait=off`` or ``-chardev socket,id=ID,path=PATH,
    server=on,wait=off`` with ``-mon chardev=ID,mode=control``, PATH being
    :func:`qmp_socket_path` of the domain's name.
    """
    path = qmp_socket_path((root.findtext("name") or "").strip())
    q = f"{{{QEMU_NAMESPACE}}}"
    args = [str(a.get("value", "")) for a in root.iterfind(f"{q}commandline/{q}arg")]
    chardevs: set[str] = set()
    monitors: set[str] = set()
    for flag, value in itertools.pairwise(args):
        options = _qemu_options(value)
        flags = _flags(options[1:])
        if flag == "-qmp" and options[0] == f"unix:{path}" and _server_nowait(flags):
            return True
        socket = flag == "-chardev" and options[0] == "socket" and flags.get("path") == path
        if socket and _server_nowait(flags):
            chardevs.add(flags.get("id", ""))
        if flag == "-mon":
            mon = _flags(options)
            if mon.get("mode") == "control" and "chardev" in mon:
                monitors.add(mon["chardev"])
    return bool(chardevs & monitors)


def _ensure(
    parent: etree._Element, tag: str, attribute: str, value: str, *, changes: list[str], what: str
) -> None:
    child = parent.find(tag)
    if child is None:
        child = etree.Element(tag)
        child.set(attribute, value)
        insert_child(parent, child)
        changes.append(f"added <{tag} {attribute}='{value}'/> to {what}")
    elif child.get(attribute) != value:
        old = child.get(attribute)
        child.set(attribute, value)
        was = f" (was '{old}')" if old is not None else ""
        changes.append(f"set <{tag} {attribute}='{value}'>{was} in {what}")


def _prepare_memory(root: etree._Element, changes: list[str]) -> None:
    backing = root.find("memoryBacking")
    created = backing is None
    if backing is None:
        backing = etree.Element("memoryBacking")
        index = None
        for i, child in enumerate(root):
            if child.tag in ("memory", "currentMemory", "maxMemory"):
                index = i + 1
        insert_child(root, backing, index if index is not None and index < len(root) else None)
        changes.append("added <memoryBacking> (guest RAM in a shared file)")
    _ensure(backing, "source", "type", "file", changes=changes, what="<memoryBacking>")
    _ensure(backing, "access", "mode", "shared", changes=changes, what="<memoryBacking>")
    if created:
        close_indent(backing)
    for cell in root.iterfind("cpu/numa/cell"):
        if cell.get("memAccess") == "private":
            cell.set("memAccess", "shared")
            cell_id = cell.get("id", "?")
            changes.append(f"set <numa><cell id='{cell_id}'> memAccess from 'private' to 'shared'")


def _prepare_nics(root: etree._Element, changes: list[str]) -> None:
    for nic in root.iterfind("devices/interface"):
        if nic.get("type") in ("hostdev", "vdpa", "vhostuser"):
            continue
        if nic_model(nic, root) not in _VIRTIO_NIC_MODELS:
            continue
        _ensure(nic, "driver", "name", "qemu", changes=changes, what=_interface_name(nic))


def _all_prefixes(root: etree._Element) -> list[str]:
    prefixes: set[str] = set()
    for element in root.iter(etree.Element):
        prefixes.update(p for p in element.nsmap if p)
    return sorted(prefixes)


def _prepare_qmp(root: etree._Element, changes: list[str]) -> None:
    name = (root.findtext("name") or "").strip()
    if not name or len(qmp_socket_path(name).encode()) > _MAX_SOCKET_PATH:
        return  # reported as an error by the rule; nothing safe to do
    prefix = _qemu_prefix(root)
    present = has_qmp_socket(root)
    if present and prefix is not None:
        return
    if prefix is None:
        prefix = next(p for p in ("qemu", *(f"qemu{i}" for i in range(1, 100))) if p not in root.nsmap)
    q = f"{{{QEMU_NAMESPACE}}}"
    if not present:
        commandline = root.find(f"{q}commandline")
        if commandline is None:
            commandline = etree.Element(f"{q}commandline", nsmap={prefix: QEMU_NAMESPACE})
            insert_child(root, commandline)
        for value in ("-qmp", qmp_argument(name)):
            arg = etree.Element(f"{q}arg", nsmap={prefix: QEMU_NAMESPACE})
            arg.set("value", value)
            insert_child(commandline, arg)
        close_indent(commandline)
        changes.append(
            f"added <qemu:commandline> -qmp {qmp_argument(name)}: cujud's direct QMP socket; "
            "libvirt marks the domain tainted (custom-argv) when it starts"
        )
    if _qemu_prefix(root) is None:
        # lxml cannot add a declaration to an existing element; cleanup_namespaces can, and
        # moves the local declarations of that URI up. Keep every other declaration.
        etree.cleanup_namespaces(
            root, top_nsmap={prefix: QEMU_NAMESPACE}, keep_ns_prefixes=_all_prefixes(root)
        )
        changes.append(f"declared xmlns:{prefix}='{QEMU_NAMESPACE}' on <domain>")


@dataclass(frozen=True)
class PrepareResult(Generic[AnyStr]):
    xml: AnyStr
    changes: list[str]
    problems: list[Problem]  # what remains after the changes

    @property
    def fit(self) -> bool:
        return not errors(self.problems)


def _prepare_uuid(root: etree._Element, changes: list[str]) -> str:
    uuid = domain_uuid(root)
    if uuid is not None:
        return uuid
    uuid = str(uuid_module.uuid4())
    element = root.find("uuid")
    if element is not None:
        old = (element.text or "").strip()
        element.text = uuid
        changes.append(f"replaced the invalid <uuid> '{old}' by {uuid} (it names the NBD socket directory)")
        return uuid
    element = etree.Element("uuid")
    element.text = uuid
    names = [i for i, child in enumerate(root) if child.tag == "name"]
    insert_child(root, element, names[0] + 1 if names and names[0] + 1 < len(root) else None)
    changes.append(f"added <uuid>{uuid}</uuid> (libvirt would pick one at define; it names the NBD sockets)")
    return uuid


def _prepare_disks(root: etree._Element, changes: list[str], serve: bool) -> None:
    """Serve every servable writable disk over NBD and record its original in ``<cuju:ft>``
    (only with ``serve``); disks prepared before are kept right (socket, error policies).

    Needs the element (the records live in it): without one, disks are left alone.
    """
    element = find_ft(root)
    if element is None:
        return
    spec = spec_from_element(element)
    records = list(spec.disks)
    targets = {d.target for d in records}
    disks = [
        d for d in root.iterfind("devices/disk") if d.get("type") not in ("vhostuser", "nvme", "vhostvdpa")
    ]
    pending = [d for d in disks if is_writable(d) and (
        (serve and not is_nbd_export(d) and target_of(d) not in targets and unservable(d) is None)
        or (is_nbd_export(d) and target_of(d) in targets)
    )]
    if not pending:
        return
    uuid = _prepare_uuid(root, changes)
    for disk in pending:
        target = str(target_of(disk))
        socket = nbd_socket_path(uuid, target)
        if is_nbd_export(disk):
            host = disk.find("source/host")
            assert host is not None
            if host.get("socket") != socket:
                was = host.get("socket")
                changes.append(f"pointed <disk> {target} at its NBD socket {socket} (was {was})")
                host.set("socket", socket)
            driver = disk.find("driver")
            if driver is not None and any(driver.get(k) != v for k, v in ERROR_POLICIES):
                for name, value in ERROR_POLICIES:
                    driver.set(name, value)
                changes.append(f"set error_policy='stop' rerror_policy='stop' on <disk> {target}")
            continue
        record = FTDisk.from_disk(disk, indent_of(disk))
        dropped = serve_over_nbd(disk, socket)
        records.append(record)
        lost = f"; dropped from its <source>: {', '.join(dropped)}" if dropped else ""
        changes.append(
            f"serving <disk> {target} ({record.format} {record.source_type} {record.source}, bus "
            f"{record.bus}) through the replicating block server: NBD export '{target}' at {socket}, "
            f"error_policy='stop'; the original is recorded in <cuju:ft>{lost}"
        )
    if len(records) != len(spec.disks):
        set_ft_in(root, spec.replace(disks=tuple(records)))


def _prepare_chardevs(root: etree._Element, changes: list[str]) -> None:
    """Hold the ``<serial>``/``<console>`` ports ``serial-commit`` selects (:meth:`FTSpec.holds_port`):
    rewrite each to its chardev server's socket and record the original in ``<cuju:ft>``.
    Ports prepared before keep their record (and get their socket path right); a recorded
    port no longer selected is given back (the user opted it out)."""
    element = find_ft(root)
    devices = root.find("devices")
    if element is None or devices is None:
        return
    spec = spec_from_element(element)
    found = chardev_xml.chardevs_in(root)
    keys = {(d, i): chardev_xml.key_of(devices, d, i) for d, i, _ in found}
    names: dict[str, set[str]] = {}  # key -> the names of the elements that are that port
    for (device, index), key in keys.items():
        names.setdefault(key, {key}).add(f"{device}{index}")
    _check_listed_ports(spec, found, keys, names)
    recorded = {(c.device, c.index): c for c in spec.chardevs}

    def selected(device: chardev_xml.ChardevDevice, index: int, kind: str) -> bool:
        return spec.holds_port(names[keys[(device, index)]], kind)

    dropped = tuple(r for r in spec.chardevs if (r.device, r.index) in keys
                    and not selected(r.device, r.index, r.target.kind))
    for line in chardev_xml.restore_chardevs_in(root, dropped):
        changes.append(f"{line}: serial-commit='{spec.serial_commit}' does not hold it (its output is "
                       "not held: after a failover the standby prints again the lines of the lost epoch)")
    pending = {(d, i) for d, i, e in found if (d, i) not in recorded and chardev_xml.unholdable(e) is None
               and selected(d, i, e.get("type", "pty"))}
    if not pending and len(recorded) == len(dropped):
        if dropped:
            set_ft_in(root, spec.replace(chardevs=tuple(r for r in spec.chardevs if r not in dropped)))
        return
    uuid = _prepare_uuid(root, changes)
    records = [r for r in spec.chardevs if r not in dropped]
    for device, index, el in found:
        key = keys[(device, index)]
        path = chardev_xml.chardev_socket_path(uuid, key)
        if (device, index) in recorded:
            source = el.find("source")
            if chardev_xml.is_held_socket(el, key) and source is not None and source.get("path") != path:
                changes.append(f"pointed <{device}> {index} at its chardev socket {path} "
                               f"(was {source.get('path')})")
                source.set("path", path)
            continue
        if (device, index) not in pending:
            continue
        record = chardev_xml.FTChardev.from_element(el, device, index, indent_of(el))
        chardev_xml.hold_over_socket(el, path)
        records.append(record)
        changes.append(f"holding the output of <{device}> {index} ({record.target.describe()}) per epoch: "
                       f"QEMU writes to the chardev server's socket {path}, which writes what each "
                       "committed epoch printed to the original target; the original is recorded in "
                       "<cuju:ft>")
    if records != list(spec.chardevs):
        set_ft_in(root, spec.replace(chardevs=tuple(records)))


def _check_listed_ports(spec: FTSpec, found: Sequence[tuple[chardev_xml.ChardevDevice, int, etree._Element]],
                        keys: Mapping[tuple[chardev_xml.ChardevDevice, int], str],
                        names: Mapping[str, set[str]]) -> None:
    """A port ``serial-commit`` names must exist and be holdable (a typo must not leave it unheld)."""
    if spec.serial_commit in ("auto", "on", "off"):
        return
    known = {n for ns in names.values() for n in ns}
    problems = [f"serial-commit names '{n}', but the domain has no such port (ports: "
                f"{', '.join(sorted(known)) or 'none'}); fix: name ports that exist, or use auto"
                for n in spec.serial_commit.split() if n not in known]
    recorded = {(c.device, c.index) for c in spec.chardevs}
    for device, index, el in found:
        why = chardev_xml.unholdable(el)
        if why is not None and (device, index) not in recorded and \
                spec.holds_port(names[keys[(device, index)]], el.get("type", "pty")):
            problems.append(f"serial-commit names <{device}> {index}, whose output cannot be held: {why}; "
                            "fix: change its type or leave it out of serial-commit")
    if problems:
        raise FTElementError(problems)


def prepare_in(root: etree._Element, *, disks: bool = True) -> list[str]:
    """Make the safe changes in a parsed ``<domain>`` tree; returns what was changed.

    ``disks``: serve the writable disks through the replicating block server (False: leave
    them on their sources, not epoch-protected).
    """
    changes: list[str] = []
    _prepare_memory(root, changes)
    _prepare_nics(root, changes)
    _prepare_qmp(root, changes)
    _prepare_disks(root, changes, serve=disks)
    _prepare_chardevs(root, changes)
    for change in changes:
        LOG.debug("prepare %s: %s", (root.findtext("name") or "?").strip(), change)
    return changes


def prepare(xml: AnyStr, spec: FTSpec | None = None, *, disks: bool = True) -> PrepareResult[AnyStr]:
    """The domain XML with the safe changes made, what changed, and the problems left.

    Safe changes: guest RAM file-backed and shared (other ``<memoryBacking>`` children are
    kept), ``<driver name='qemu'/>`` on virtio NICs (other driver attributes are kept), and
    the direct QMP socket in ``<qemu:commandline>``, and (``disks``, the default) every
    writable disk that can be served rewritten to its NBD export (the original recorded in
    the element).
    Devices that cannot be protected are left alone and reported in ``problems``.
    """
    doc = load_domain(xml)
    changes = prepare_in(doc.root, disks=disks)
    problems = check_fitness_in(doc.root, spec)
    return PrepareResult(xml=doc.dump(), changes=changes, problems=problems)  # type: ignore[arg-type]
