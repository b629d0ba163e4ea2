"""Held serial ports in domain XML: prepare rewrites them to the chardev server's socket,
disable gives back exactly what was there."""

from __future__ import annotations

import pytest
from lxml import etree

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from cuju_libvirt.chardev_xml import chardev_socket_path, holdable_targets, is_held_socket, key_of
from cuju_libvirt.errors import FTElementError
from tests.domains import LIBVIRT_DOMAIN_RNG

UUID = "0c1b8a57-9a1f-4b43-9e3e-4d7e0a7b0a11"

CHARDEVS = """\
    <serial type='file'>
      <source path='/var/log/vm/com1.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <serial type='pty'>
      <log file='/var/log/vm/com2.log' append='off'/>
      <target port='1'/>
    </serial>
    <serial type='tcp'>
      <source mode='bind' host='127.0.0.1' service='4555'/>
      <protocol type='raw'/>
      <target port='2'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='/run/vm/com4.sock'/>
      <target port='3'/>
    </serial>
    <serial type='tcp'>
      <source mode='bind' host='127.0.0.1' service='4556'/>
      <protocol type='telnet'/>
      <target port='4'/>
    </serial>
    <console type='file'>
      <source path='/var/log/vm/com1.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <console type='pty'>
      <target type='virtio' port='1'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
"""

DOMAIN = f"""\
<domain type='qemu'>
  <name>vm</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>65536</memory>
  <devices>
{CHARDEVS}  </devices>
</domain>
"""


def prepared(spec: dx.FTSpec | None = None) -> str:
    return ft.prepare(dx.set_ft(DOMAIN, spec or dx.FTSpec.defaults("hostb"))).xml


def test_prepare_holds_each_holdable_chardev_and_records_it() -> None:
    xml = prepared(dx.FTSpec.defaults("hostb").replace(serial_commit="on"))
    root = etree.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    serials, consoles = devices.findall("serial"), devices.findall("console")
    for i in range(4):
        assert is_held_socket(serials[i], f"serial{i}"), etree.tostring(serials[i])
        assert serials[i].find("source").get("path") == chardev_socket_path(UUID, f"serial{i}")  # type: ignore[union-attr]
        assert serials[i].find("log") is None and serials[i].find("protocol") is None
    assert serials[4].get("type") == "tcp"  # telnet: left alone
    # the compat console is serial0 itself: the same socket; the virtio console has its own
    assert key_of(devices, "console", 0) == "serial0"
    assert consoles[0].find("source").get("path") == chardev_socket_path(UUID, "serial0")  # type: ignore[union-attr]
    assert consoles[1].find("source").get("path") == chardev_socket_path(UUID, "console1")  # type: ignore[union-attr]
    assert serials[0].find("alias").get("name") == "serial0"  # type: ignore[union-attr]
    assert devices.find("channel").get("type") == "unix"  # type: ignore[union-attr]  # not a serial port
    spec = dx.parse_domain(xml)
    assert spec is not None
    assert [(c.device, c.index) for c in spec.chardevs] == [
        ("serial", 0), ("serial", 1), ("serial", 2), ("serial", 3), ("console", 0), ("console", 1)]
    targets = holdable_targets(spec.chardevs, root)
    assert sorted(targets) == ["console1", "serial0", "serial1", "serial2", "serial3"]
    assert targets["serial0"].kind == "file" and targets["serial0"].append
    assert targets["serial1"].kind == "pty" and targets["serial1"].log == "/var/log/vm/com2.log"
    assert targets["serial2"].describe() == "tcp bind 127.0.0.1:4555"
    assert targets["serial3"].describe() == "unix bind /run/vm/com4.sock"


def _held(xml: str) -> list[tuple[str, int]]:
    spec = dx.parse_domain(xml)
    assert spec is not None
    return [(c.device, c.index) for c in spec.chardevs]


def test_by_default_a_pty_stays_libvirts_so_virsh_console_works() -> None:
    """Review finding: holding a pty by default took ``virsh console`` away (libvirt only
    opens ptys it made). The default holds the log-like ports, file, unix and tcp."""
    xml = prepared()
    devices = etree.fromstring(xml).find("devices")
    assert devices is not None
    serials, consoles = devices.findall("serial"), devices.findall("console")
    assert serials[1].get("type") == "pty" and serials[1].find("log") is not None  # as it was
    assert consoles[1].get("type") == "pty"
    assert _held(xml) == [("serial", 0), ("serial", 2), ("serial", 3), ("console", 0)]
    assert dx.parse_domain(xml).serial_commit == "auto"  # type: ignore[union-attr]
    assert "serial-commit" not in xml  # the default is not written


def test_serial_commit_can_name_the_ports_to_hold() -> None:
    xml = prepared(dx.FTSpec.defaults("hostb").replace(serial_commit="serial1 serial3"))
    assert _held(xml) == [("serial", 1), ("serial", 3)]  # a pty opted in, the file opted out
    assert "serial-commit=\"serial1 serial3\"" in xml
    # the console that mirrors COM1 is that port: naming either holds both
    assert _held(prepared(dx.FTSpec.defaults("hostb").replace(serial_commit="console0"))) == [
        ("serial", 0), ("console", 0)]


def test_a_port_opted_out_later_is_given_back_exactly() -> None:
    held_all = prepared(dx.FTSpec.defaults("hostb").replace(serial_commit="on"))
    spec = dx.parse_domain(held_all)
    assert spec is not None
    result = ft.prepare(dx.set_ft(held_all, spec.replace(serial_commit="auto")))
    assert _held(result.xml) == [("serial", 0), ("serial", 2), ("serial", 3), ("console", 0)]
    assert any("restored <serial> 1" in c and "does not hold it" in c for c in result.changes), result.changes
    assert devices_text(dx.remove_ft(result.xml)) == devices_text(DOMAIN)
    none = ft.prepare(dx.set_ft(result.xml, spec.replace(serial_commit="off", chardevs=dx.parse_domain(
        result.xml).chardevs)))  # type: ignore[union-attr]
    assert _held(none.xml) == [] and devices_text(none.xml) == devices_text(DOMAIN)


@pytest.mark.parametrize("ports, message", [
    ("serial9", "no such port"),
    ("serial4", "cannot be held: tcp with protocol 'telnet'"),
])
def test_a_named_port_that_cannot_be_held_is_refused(ports: str, message: str) -> None:
    with pytest.raises(FTElementError, match=message):
        prepared(dx.FTSpec.defaults("hostb").replace(serial_commit=ports))


@pytest.mark.parametrize("value", ["serial0 serial0", "com1", "", "on off"])
def test_serial_commit_values_are_checked(value: str) -> None:
    with pytest.raises(FTElementError, match="serial-commit"):
        dx.FTSpec.from_attributes({"peer": "b", "serial-commit": value})


def devices_text(xml: str) -> str:
    """The ``<devices>`` element as written (prepare's other changes, memory backing and the
    QMP socket, are outside it and stay after disable, as documented). lxml writes every
    attribute in double quotes, whatever the input had: the one difference allowed."""
    return xml[xml.index("<devices>"):xml.index("</devices>")].replace("'", '"')


def test_disable_gives_back_exactly_what_was_there() -> None:
    enabled = dx.set_ft(DOMAIN, dx.FTSpec.defaults("hostb"))
    xml = ft.prepare(enabled).xml
    assert devices_text(xml) != devices_text(DOMAIN)
    assert devices_text(dx.remove_ft(xml)) == devices_text(DOMAIN)  # byte for byte
    assert ft.prepare(xml).changes == []  # prepare again: nothing to do


@pytest.mark.parametrize("indent", ["  ", "\t", "    "])
def test_round_trip_keeps_any_consistent_indentation(indent: str) -> None:
    doc = DOMAIN.replace("  ", indent)
    xml = ft.prepare(dx.set_ft(doc, dx.FTSpec.defaults("hostb"))).xml
    assert devices_text(dx.remove_ft(xml)) == devices_text(doc)


def test_serial_commit_off_leaves_the_chardevs_alone() -> None:
    spec = dx.FTSpec.defaults("hostb").replace(serial_commit="off")
    enabled = dx.set_ft(DOMAIN, spec)
    result = ft.prepare(enabled)
    assert "chardev" not in result.xml.replace("<cuju:ft", "")
    spec2 = dx.parse_domain(result.xml)
    assert spec2 is not None and spec2.chardevs == () and spec2.serial_commit == "off"


def test_the_libvirt_metadata_form_round_trips_the_records() -> None:
    spec = dx.parse_domain(prepared())
    assert spec is not None
    again = dx.parse_libvirt_metadata(dx.libvirt_metadata_xml(spec))
    assert again == spec


def test_disable_refuses_to_undo_an_edit_of_a_held_chardev() -> None:
    doc = dx.load_domain(prepared())
    serial = doc.root.find("devices/serial")
    assert serial is not None
    serial.set("type", "pty")
    with pytest.raises(FTElementError, match=r"<serial> 0 is no longer the socket"):
        dx.remove_ft(doc.dump())


@pytest.mark.parametrize("record, message", [
    ("<cuju:chardev device='disk' index='0'><disk/></cuju:chardev>", "device must be"),
    ("<cuju:chardev device='serial' index='x'><serial type='pty'/></cuju:chardev>", "index must be"),
    ("<cuju:chardev device='serial' index='0'><console type='pty'/></cuju:chardev>", "exactly one element"),
    ("<cuju:chardev device='serial' index='0'><serial type='null'/></cuju:chardev>", "cannot be held"),
])
def test_broken_records_are_refused_with_the_fix(record: str, message: str) -> None:
    xml = f"<domain><name>v</name><metadata><cuju:ft xmlns:cuju='{dx.FT_NAMESPACE}' peer='b'>{record}" \
          "</cuju:ft></metadata></domain>"
    with pytest.raises(FTElementError, match=message):
        dx.parse_domain(xml)


@pytest.mark.skipif(not LIBVIRT_DOMAIN_RNG.exists(), reason="libvirt's domain.rng is not installed")
def test_the_prepared_domain_satisfies_libvirts_schema() -> None:
    rng = etree.RelaxNG(etree.parse(str(LIBVIRT_DOMAIN_RNG)))
    assert rng.validate(etree.fromstring(DOMAIN.encode())), rng.error_log
    assert rng.validate(etree.fromstring(prepared().encode())), rng.error_log
