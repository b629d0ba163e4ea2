"""Domain XML of the test guests: structure and argument checks (pure, lxml only)."""

from __future__ import annotations

import pytest
from lxml import etree

from cuju_libvirt.rig.domains import QEMU_NS, direct_qmp_args, domain_xml

FT = "<cuju:ft xmlns:cuju='https://cuju-ft.github.io/libvirt/ft/1.0' peer='hostb'/>"


def test_boot_disk_guest_has_shared_file_memory_and_a_file_serial() -> None:
    xml = domain_xml("guests-a", memory_mib=48, disk="/img/boot.img", serial_log="/l/c.log")
    root = etree.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "guests-a"
    assert root.find("memory").text == "48" and root.find("memory").get("unit") == "MiB"
    assert root.find("memoryBacking/source").get("type") == "file"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("os/boot").get("dev") == "hd"
    assert root.find("devices/disk/source").get("file") == "/img/boot.img"
    assert root.find("devices/disk/target").attrib == {"dev": "hda", "bus": "ide"}
    serial = root.find("devices/serial")
    assert serial.get("type") == "file" and serial.find("source").get("path") == "/l/c.log"
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("devices/interface") is None and root.find("metadata") is None
    assert root.find(f"{{{QEMU_NS}}}commandline") is None


def test_kernel_guest_with_nic_console_metadata_and_qemu_commandline() -> None:
    xml = domain_xml(
        "guests-b",
        kernel="/k/vmlinuz",
        initrd="/k/initrd",
        cmdline="console=ttyS0 ip=198.18.0.2",
        serial_log="/l/b.log",
        pty_console=True,
        bridge="guests-br0",
        mac="52:54:00:AB:00:01",
        metadata=[FT],
        qemu_args=direct_qmp_args("/run/q.sock"),
        qemu_env={"LD_PRELOAD": "/lib/x.so"},
    )
    root = etree.fromstring(xml)
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.findtext("os/initrd") == "/k/initrd"
    assert root.findtext("os/cmdline") == "console=ttyS0 ip=198.18.0.2"
    assert root.find("os/boot") is None and root.find("devices/disk") is None
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/serial/log").get("file") == "/l/b.log"
    assert root.find("devices/console/target").get("type") == "serial"
    nic = root.find("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "guests-br0"
    assert nic.find("model").get("type") == "virtio" and nic.find("driver").get("name") == "qemu"
    assert nic.find("mac").get("address") == "52:54:00:ab:00:01"
    ft = root.find("metadata/{https://cuju-ft.github.io/libvirt/ft/1.0}ft")
    assert ft is not None and ft.get("peer") == "hostb"
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-chardev", "socket,id=cuju-qmp,path=/run/q.sock,server=on,wait=off",
                    "-mon", "chardev=cuju-qmp,mode=control"]  # fmt: skip
    env = root.find(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}env")
    assert (env.get("name"), env.get("value")) == ("LD_PRELOAD", "/lib/x.so")


def test_special_characters_are_escaped() -> None:
    root = etree.fromstring(domain_xml("guests-c", kernel="/k", cmdline="a=<b> & 'c'"))
    assert root.findtext("os/cmdline") == "a=<b> & 'c'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name", "disk": "/d"}, "domain name"),
        ({"name": "ok"}, "boot disk"),
        ({"name": "ok", "disk": "/d", "initrd": "/i"}, "need kernel"),
        ({"name": "ok", "disk": "/d", "mac": "52:54:00:00:00:01"}, "needs bridge"),
        ({"name": "ok", "disk": "/d", "bridge": "b", "mac": "nope"}, "mac"),
        ({"name": "ok", "disk": "/d", "metadata": ["<ft/>"]}, "namespace"),
        ({"name": "ok", "disk": "/d", "metadata": ["<a:ft xmlns:a='u'>"]}, "well-formed"),
        ({"name": "ok", "disk": "/d", "memory_mib": 0}, "memory_mib"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        domain_xml(str(name), **kwargs)
