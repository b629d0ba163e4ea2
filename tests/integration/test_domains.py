"""The test guests' domain XML is accepted by libvirt: its RELAX NG schema and the test driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from cuju_libvirt.rig.domains import direct_qmp_args, domain_xml

pytestmark = pytest.mark.timeout(30)

LIBVIRT_DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
FT = "<cuju:ft xmlns:cuju='https://cuju-ft.github.io/libvirt/ft/1.0' peer='hostb'/>"

VARIANTS = {
    "boot-disk": {"disk": "/var/cache/cuju-libvirt/boot.img", "serial_log": "/tmp/guests-com1.log"},
    "kernel-full": {
        "kernel": "/k/vmlinuz",
        "initrd": "/k/initrd",
        "cmdline": "console=ttyS0",
        "serial_log": "/tmp/guests-com1.log",
        "pty_console": True,
        "bridge": "guests-br0",
        "mac": "52:54:00:00:00:01",
        "metadata": [FT],
        "qemu_args": direct_qmp_args("/tmp/guests-qmp.sock"),
        "qemu_env": {"LD_PRELOAD": "/x.so"},
    },
}


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_libvirt_schema_accepts_it(variant: str) -> None:
    if not LIBVIRT_DOMAIN_RNG.is_file():
        pytest.skip(f"{LIBVIRT_DOMAIN_RNG} missing (Debian package libvirt-common)")
    schema = etree.RelaxNG(etree.parse(str(LIBVIRT_DOMAIN_RNG)))
    document = etree.fromstring(domain_xml(f"guests-{variant}", **VARIANTS[variant]))
    assert schema.validate(document), str(schema.error_log)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_test_driver_defines_it_and_keeps_what_matters(conn: libvirt.virConnect, variant: str) -> None:
    name = f"guests-{variant}"
    dom = conn.defineXML(domain_xml(name, memory_mib=48, **VARIANTS[variant]))
    try:
        back = etree.fromstring(dom.XMLDesc(0))
        assert back.findtext("name") == name
        assert back.find("memoryBacking/access").get("mode") == "shared"
        assert back.find("memoryBacking/source").get("type") == "file"
        assert int(back.findtext("memory")) == 48 * 1024
        if "metadata" in VARIANTS[variant]:
            assert "hostb" in dom.metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://cuju-ft.github.io/libvirt/ft/1.0"
            )
            assert back.find("devices/interface/driver").get("name") == "qemu"
    finally:
        dom.undefine()
