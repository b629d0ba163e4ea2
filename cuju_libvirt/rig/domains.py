"""libvirt domain XML for the test guests.

:func:`domain_xml` writes a small, complete ``<domain type='qemu'>`` (TCG) whose RAM is
file-backed and shared (``<memoryBacking><source type='file'/><access mode='shared'/>``),
as cuju-libvirt requires, with the boot disk or a direct kernel boot, COM1 to a file and/or
a pty console, an optional bridged virtio NIC on QEMU's own back-end (``<driver
name='qemu'/>``: filters refuse vhost), no balloon and no USB, plus any ``<metadata>``
elements the caller passes (e.g. the ``<cuju:ft>`` element as a string) and optional
``<qemu:commandline>`` arguments and environment.

Example::

    xml = domain_xml("guests-vm1", memory_mib=64, disk=boot_image(), serial_log="/tmp/com1.log",
                     metadata=[ft_element_string])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from lxml import etree

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_MAC = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}")


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrib: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _metadata_element(text: str) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        element = etree.fromstring(text.encode(), parser)
    except etree.XMLSyntaxError as err:
        raise ValueError(f"metadata element is not well-formed XML: {err}") from err
    if etree.QName(element).namespace is None:
        raise ValueError(
            f"metadata element <{element.tag}> needs a namespace: libvirt keeps only namespaced "
            "elements in <metadata>"
        )
    return element


def domain_xml(
    name: str,
    *,
    memory_mib: int = 64,
    vcpus: int = 1,
    disk: str | os.PathLike[str] | None = None,
    data_disk: str | os.PathLike[str] | None = None,
    data_disk_format: str = "raw",
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str | None = None,
    serial_log: str | os.PathLike[str] | None = None,
    pty_console: bool = False,
    bridge: str | None = None,
    mac: str | None = None,
    metadata: Sequence[str] = (),
    qemu_args: Sequence[str] = (),
    qemu_env: Mapping[str, str] | None = None,
    uuid: str | None = None,
) -> str:
    """Return the domain XML of a TCG test guest (see the module docstring).

    ``serial_log`` alone gives ``<serial type='file'>``; with ``pty_console`` the serial port
    is a pty (``virsh console`` works) whose output libvirt also logs to ``serial_log``.
    ``data_disk`` adds a writable image (``data_disk_format``: raw or qcow2) as virtio disk
    ``vda`` (not booted from).
    ``bridge`` adds a virtio NIC on that bridge (``mac`` optional). ``metadata`` holds
    namespaced elements as XML strings.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"domain name {name!r}: use letters, digits and '_.+-' only")
    if memory_mib < 1 or vcpus < 1:
        raise ValueError("memory_mib and vcpus must be at least 1")
    if disk is None and kernel is None:
        raise ValueError("give a boot disk (disk=) or a kernel (kernel=)")
    if (initrd is not None or cmdline is not None) and kernel is None:
        raise ValueError("initrd and cmdline need kernel=")
    if mac is not None and (bridge is None or not _MAC.fullmatch(mac)):
        raise ValueError(f"mac {mac!r} needs bridge= and the form 52:54:00:xx:xx:xx")

    nsmap = {"qemu": QEMU_NS} if qemu_args or qemu_env else None
    root = etree.Element("domain", {"type": "qemu"}, nsmap=nsmap)
    _sub(root, "name", name)
    if uuid is not None:
        _sub(root, "uuid", uuid)
    if metadata:
        meta = _sub(root, "metadata")
        for text in metadata:
            meta.append(_metadata_element(text))
    _sub(root, "memory", str(memory_mib), unit="MiB")
    _sub(root, "vcpu", str(vcpus))
    backing = _sub(root, "memoryBacking")
    _sub(backing, "source", type="file")
    _sub(backing, "access", mode="shared")

    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if kernel is not None:
        _sub(os_el, "kernel", os.fspath(kernel))
        if initrd is not None:
            _sub(os_el, "initrd", os.fspath(initrd))
        if cmdline is not None:
            _sub(os_el, "cmdline", cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    if disk is not None:
        disk_el = _sub(devices, "disk", type="file", device="disk")
        _sub(disk_el, "driver", name="qemu", type="raw")
        _sub(disk_el, "source", file=os.fspath(disk))
        _sub(disk_el, "target", dev="hda", bus="ide")
    if data_disk is not None:
        disk_el = _sub(devices, "disk", type="file", device="disk")
        _sub(disk_el, "driver", name="qemu", type=data_disk_format)
        _sub(disk_el, "source", file=os.fspath(data_disk))
        _sub(disk_el, "target", dev="vda", bus="virtio")
    if pty_console:
        serial = _sub(devices, "serial", type="pty")
        if serial_log is not None:
            _sub(serial, "log", file=os.fspath(serial_log), append="off")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    elif serial_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=os.fspath(serial_log))
        _sub(serial, "target", port="0")
    if bridge is not None:
        nic = _sub(devices, "interface", type="bridge")
        _sub(nic, "source", bridge=bridge)
        if mac is not None:
            _sub(nic, "mac", address=mac.lower())
        _sub(nic, "model", type="virtio")
        _sub(nic, "driver", name="qemu")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")

    if qemu_args or qemu_env:
        commandline = _sub(root, f"{{{QEMU_NS}}}commandline")
        for arg in qemu_args:
            _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
        for key, value in (qemu_env or {}).items():
            _sub(commandline, f"{{{QEMU_NS}}}env", name=key, value=value)

    return etree.tostring(root, pretty_print=True, encoding="unicode")


def direct_qmp_args(socket_path: str | os.PathLike[str], chardev_id: str = "cuju-qmp") -> list[str]:
    """QEMU arguments for a second, direct QMP socket (a server QEMU creates at ``socket_path``).

    Pass them as ``qemu_args`` to :func:`domain_xml`; DESIGN.md, "The monitor path", says why.
    """
    return [
        "-chardev", f"socket,id={chardev_id},path={os.fspath(socket_path)},server=on,wait=off",
        "-mon", f"chardev={chardev_id},mode=control",
    ]  # fmt: skip
