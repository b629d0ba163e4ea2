"""The <cuju:ft> element: FTSpec, parsing, emitting, and editing that preserves everything else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from lxml import etree

from cuju_libvirt import FT_NAMESPACE as PACKAGE_NAMESPACE
from cuju_libvirt import domain_xml as dx
from cuju_libvirt.errors import FTElementError, NotADomainXMLError
from tests.domains import c14n, fixture_names, read_fixture

NS = "https://cuju-ft.github.io/libvirt/ft/1.0"
MINIMAL = b"""<domain type='kvm'>
  <name>vm</name>
  <memory unit='MiB'>256</memory>
</domain>
"""


def element(attrs: str, ns: str = NS) -> str:
    return f'<cuju:ft xmlns:cuju="{ns}" {attrs}/>'


def domain_with(metadata_inner: str) -> bytes:
    return f"<domain type='kvm'><name>vm</name><metadata>{metadata_inner}</metadata></domain>".encode()


# --- FTSpec and endpoints -----------------------------------------------------------------


def test_namespace_is_the_package_constant() -> None:
    assert dx.FT_NAMESPACE == PACKAGE_NAMESPACE == NS


def test_defaults() -> None:
    spec = dx.FTSpec.defaults(peer="hostb")
    assert spec.to_dict() == {
        "peer": "hostb",
        "link": "hostb:7791",
        "epoch-ms": 20,
        "epoch-policy": "output",
        "max-epoch-ms": 100,
        "tracker": "auto",
        "output-commit": "on",
        "serial-commit": "auto",
        "max-epoch-packets": 5000,
        "failover": "auto",
        "heartbeat-timeout-ms": 500,
        "on-peer-unavailable": "start-unprotected",
    }
    assert spec.to_attributes() == {"peer": "hostb"}
    assert (spec.peer_host, spec.peer_port, spec.link_host, spec.link_port) == ("hostb", 7790, "hostb", 7791)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("hostb", "hostb", 7790),
        ("hostb.example.org:8000", "hostb.example.org", 8000),
        ("192.0.2.7", "192.0.2.7", 7790),
        ("192.0.2.7:1", "192.0.2.7", 1),
        ("[2001:db8::7]", "2001:db8::7", 7790),
        ("[2001:db8::7]:65535", "2001:db8::7", 65535),
        ("[fe80::1%eth0]:7790", "fe80::1%eth0", 7790),
    ],
)
def test_endpoint_forms(text: str, host: str, port: int) -> None:
    assert dx.parse_endpoint(text, 7790) == dx.Endpoint(host, port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "HOST"),
        (" hostb", "without spaces"),
        ("2001:db8::7", "brackets"),
        ("[2001:db8::7", "closing"),
        ("[2001:db8::7]x", "':PORT'"),
        ("[nonsense]", "not an IPv6"),
        ("hostb:0", "outside 1..65535"),
        ("hostb:70000", "outside 1..65535"),
        ("hostb:http", "not a number"),
        ("256.1.1.1", "not an IPv4"),
        ("-bad.example", "not a valid host name"),
        ("under_score", "not a valid host name"),
        (":7790", "empty"),
    ],
)
def test_endpoint_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        dx.parse_endpoint(text, 7790)


def test_link_defaults_to_peer_host_on_link_port_and_ipv6_is_bracketed() -> None:
    spec = dx.FTSpec(peer="[2001:db8::2]:7800")
    assert spec.link_endpoint == dx.Endpoint("2001:db8::2", 7791)
    assert spec.to_dict()["link"] == "[2001:db8::2]:7791"
    assert dx.FTSpec(peer="a", link="198.18.0.2").link_endpoint == dx.Endpoint("198.18.0.2", 7791)


@pytest.mark.parametrize(
    ("field", "value", "attribute"),
    [
        ("epoch_ms", 4, "epoch-ms"),
        ("epoch_ms", 1001, "epoch-ms"),
        ("max_epoch_packets", 99, "max-epoch-packets"),
        ("max_epoch_packets", 9001, "max-epoch-packets"),
        ("heartbeat_timeout_ms", 49, "heartbeat-timeout-ms"),
        ("heartbeat_timeout_ms", 60001, "heartbeat-timeout-ms"),
        ("tracker", "soft-dirty", "tracker"),
        ("epoch_policy", "sometimes", "epoch-policy"),
        ("max_epoch_ms", 4, "max-epoch-ms"),
        ("max_epoch_ms", 10001, "max-epoch-ms"),
        ("failover", "sometimes", "failover"),
        ("on_peer_unavailable", "pray", "on-peer-unavailable"),
        ("output_commit", "yes", "output-commit"),
        ("epoch_ms", True, "epoch-ms"),
        ("link", "a b", "link"),
    ],
)
def test_spec_rejects_bad_values_naming_the_attribute(field: str, value: object, attribute: str) -> None:
    with pytest.raises(FTElementError) as info:
        dx.FTSpec(peer="hostb", **{field: value})  # type: ignore[arg-type]
    assert len(info.value.problems) == 1
    assert f"attribute {attribute}=" in info.value.problems[0]
    assert "fix:" in info.value.problems[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("epoch_ms", 5), ("epoch_ms", 1000), ("max_epoch_packets", 100), ("max_epoch_packets", 9000),
     ("heartbeat_timeout_ms", 50), ("heartbeat_timeout_ms", 60000)],
)
def test_bounds_are_inclusive(field: str, value: int) -> None:
    spec = dx.FTSpec(peer="hostb", **{field: value})  # type: ignore[arg-type]
    assert getattr(spec, field) == value
    assert dx.parse_element(dx.element_xml(spec)) == spec


def test_spec_is_frozen() -> None:
    spec = dx.FTSpec.defaults("hostb")
    with pytest.raises(AttributeError):
        spec.epoch_ms = 10  # type: ignore[misc]


# --- parsing --------------------------------------------------------------------------------


def test_parse_bare_element_all_attributes() -> None:
    spec = dx.parse_element(
        element(
            'peer="hostb:7000" link="198.18.0.2:7100" epoch-ms="10" tracker="uffd" output-commit="off" '
            'max-epoch-packets="9000" failover="manual" heartbeat-timeout-ms="1000" '
            'on-peer-unavailable="refuse-start"'
        )
    )
    assert spec == dx.FTSpec(
        peer="hostb:7000", link="198.18.0.2:7100", epoch_ms=10, tracker="uffd", output_commit=False,
        max_epoch_packets=9000, failover="manual", heartbeat_timeout_ms=1000,
        on_peer_unavailable="refuse-start",
    )


def test_an_element_without_peer_is_placed_by_the_cluster_and_stays_without_peer() -> None:
    spec = dx.parse_element(element('epoch-ms="30"'))
    assert spec == dx.FTSpec(epoch_ms=30) and spec.placed and spec.peer_host == dx.AUTO_PEER
    assert not dx.FTSpec(peer="auto").placed
    text = dx.libvirt_metadata_xml(spec)
    assert text == '<ft epoch-ms="30"/>'
    assert dx.parse_libvirt_metadata(text) == spec
    assert dx.schema().validate(dx.ft_element(spec))


def test_parse_domain_without_element_is_none() -> None:
    assert dx.parse_domain(MINIMAL) is None
    assert dx.parse_domain(MINIMAL.decode()) is None


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ('peer="b" epoch-ms="3"', "epoch-ms='3'"),
        ('peer="b" epoch-ms="twenty"', "not a decimal integer"),
        ('peer="b" epoch-ms="+20"', "not a decimal integer"),
        ('peer="b" epoch-ms=" 20"', "not a decimal integer"),
        ('peer="b" epoch-ms="20.0"', "not a decimal integer"),
        ('peer="b" epoch-ms="99999999999999999999"', "too many digits"),
        ('peer="b" tracker="UFFD"', "tracker='UFFD'"),
        ('peer="b" output-commit="true"', "output-commit='true'"),
        ('peer="b" epochms="20"', "did you mean 'epoch-ms'"),
        ('peer="b" color="red"', "unknown attribute 'color'"),
        ('peer="b" xmlns:x="urn:x" x:peer="c"', "unknown attribute 'peer (namespace urn:x)'"),
        ('link="b"', "no peer attribute"),
        ('peer=""', "peer=''"),
        ('peer="2001:db8::1"', "brackets"),
    ],
)
def test_invalid_element_names_attribute_and_fix(attrs: str, needle: str) -> None:
    with pytest.raises(FTElementError) as info:
        dx.parse_element(element(attrs))
    text = "\n".join(info.value.problems)
    assert needle in text
    assert "fix:" in text


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(FTElementError) as info:
        dx.parse_element(element('peer="b" epoch-ms="1" tracker="x" bogus="1"'))
    assert len(info.value.problems) == 3


def test_children_and_text_are_refused() -> None:
    with pytest.raises(FTElementError, match="child element <extra>"):
        dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b"><cuju:extra/></cuju:ft>')
    with pytest.raises(FTElementError, match="contains text"):
        dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">hello</cuju:ft>')
    # comments and whitespace are harmless
    assert dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">\n  <!-- note -->\n</cuju:ft>').peer == "b"


def test_wrong_namespace_version_is_named() -> None:
    other = "https://cuju-ft.github.io/libvirt/ft/2.0"
    with pytest.raises(FTElementError, match=r"ft/2\.0.*fix: use https://cuju-ft\.github\.io/libvirt/ft/1\.0"):
        dx.parse_domain(domain_with(element('peer="b"', other)))
    with pytest.raises(FTElementError, match="not supported"):
        dx.parse_element(element('peer="b"', other))


def test_two_elements_are_refused() -> None:
    xml = domain_with(element('peer="b"') + element('peer="c"'))
    with pytest.raises(FTElementError, match="2 <cuju:ft> elements"):
        dx.parse_domain(xml)
    with pytest.raises(FTElementError):
        dx.remove_ft(xml)


def test_element_outside_metadata_is_refused() -> None:
    inner = element('peer="b"')
    xml = f"<domain type='kvm'><name>vm</name>{inner}</domain>".encode()
    with pytest.raises(FTElementError, match=r"inside <domain>.*move it"):
        dx.parse_domain(xml)


def test_unknown_element_in_namespace() -> None:
    with pytest.raises(FTElementError, match="unknown element <mode>"):
        dx.parse_domain(domain_with(f'<cuju:mode xmlns:cuju="{NS}"/>'))


def test_not_a_domain() -> None:
    with pytest.raises(NotADomainXMLError, match="<network>"):
        dx.parse_domain(b"<network><name>default</name></network>")
    with pytest.raises(NotADomainXMLError):
        dx.parse_domain(b'<domain xmlns="urn:other"><name>x</name></domain>')


def test_libvirt_metadata_form_round_trip() -> None:
    spec = dx.FTSpec(peer="hostb", epoch_ms=30, failover="manual")
    text = dx.libvirt_metadata_xml(spec)
    assert text == '<ft peer="hostb" epoch-ms="30" failover="manual"/>'
    assert dx.parse_libvirt_metadata(text) == spec
    with pytest.raises(FTElementError, match="epoch-ms"):
        dx.parse_libvirt_metadata('<ft peer="hostb" epoch-ms="0"/>')


# --- the schema agrees with the typed checks -------------------------------------------------


def test_schema_loads_and_accepts_emitted_elements() -> None:
    spec = dx.FTSpec(peer="[2001:db8::1]:1", link="h:2", epoch_ms=5, output_commit=False)
    assert dx.schema().validate(dx.ft_element(spec))


@pytest.mark.parametrize(
    "attrs",
    ['peer="b" epoch-ms="4"', 'peer="b" tracker="x"', 'peer="b" extra="1"', 'link="b"',
     'peer="a b"', 'peer="b" max-epoch-packets="10000"'],
)
def test_schema_rejects_what_typed_checks_reject(attrs: str) -> None:
    el = etree.fromstring(element(attrs))
    assert not dx.schema().validate(el)


# --- writing and preservation ---------------------------------------------------------------


@pytest.mark.parametrize("name", fixture_names())
def test_enable_then_disable_is_identity(name: str) -> None:
    original = read_fixture(name)
    if dx.parse_domain(original) is not None:
        original = dx.remove_ft(original)
    enabled = dx.set_ft(original, dx.FTSpec(peer="hostb", epoch_ms=25))
    assert c14n(enabled) != c14n(original)
    assert c14n(dx.remove_ft(enabled)) == c14n(original)


@pytest.mark.parametrize("name", fixture_names())
def test_enable_is_idempotent_and_reads_back(name: str) -> None:
    spec = dx.FTSpec(peer="198.18.0.2", link="198.18.1.2:7000", tracker="scan")
    once = dx.set_ft(read_fixture(name), spec)
    assert dx.set_ft(once, spec) == once
    assert dx.parse_domain(once) == spec


@pytest.mark.parametrize("name", fixture_names())
def test_str_and_bytes_give_the_same_document(name: str) -> None:
    data = read_fixture(name)
    spec = dx.FTSpec.defaults("hostb")
    from_bytes = dx.set_ft(data, spec)
    from_str = dx.set_ft(data.decode("utf-8"), spec)
    assert isinstance(from_bytes, bytes)
    assert isinstance(from_str, str)
    assert c14n(from_bytes) == c14n(from_str)


def test_everything_outside_the_element_is_kept() -> None:
    original = read_fixture("commented.xml")
    enabled = dx.set_ft(original, dx.FTSpec.defaults("hostb"))
    root = etree.fromstring(enabled)
    # comments and processing instructions, inside and around the root
    assert enabled.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!--\nWARNING')
    assert b"<?xml-stylesheet" in enabled and b"<?cuju-test marker?>" in enabled
    assert b"<!-- trailing comment -->" in enabled
    comments = [c.text for c in root.iter(etree.Comment)]
    assert comments == [" identity ", " sizing ", " the system disk ", " end "]
    # attribute order
    driver = root.find("devices/disk/driver")
    assert driver is not None
    assert list(driver.attrib) == ["name", "type", "cache", "io"]
    # metadata created after <description>, indented like its siblings
    tags = [c.tag for c in root if isinstance(c.tag, str)]
    assert tags[:5] == ["name", "uuid", "title", "description", "metadata"]
    assert b'</description>\n  <metadata>\n    <cuju:ft xmlns:cuju="' in enabled
    assert b'peer="hostb"/>\n  </metadata>\n  <!-- sizing -->' in enabled


def test_other_metadata_namespaces_are_kept_and_element_is_appended() -> None:
    enabled = dx.set_ft(read_fixture("openstack-nova.xml"), dx.FTSpec.defaults("hostb"))
    metadata = etree.fromstring(enabled).find("metadata")
    assert metadata is not None
    assert [etree.QName(c).localname for c in metadata] == ["instance", "ft"]
    assert metadata[0].findtext("{http://openstack.org/xmlns/libvirt/nova/1.1}name") == "web-1"


def test_replacing_keeps_the_position_and_prefix() -> None:
    data = read_fixture("existing-ft.xml")
    assert dx.parse_domain(data) == dx.FTSpec(peer="[2001:db8::2]:7800", epoch_ms=50, tracker="scan")
    replaced = dx.set_ft(data, dx.FTSpec(peer="hostc"))
    expected = b'<ft:ft xmlns:ft="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostc"/>\n  </metadata>'
    assert expected in replaced
    assert b'<other:tag xmlns:other="urn:example:other" value="1"/>' in replaced
    # the metadata element existed before: removing the element keeps <other:tag>
    removed = etree.fromstring(dx.remove_ft(replaced))
    assert removed.find("metadata/{urn:example:other}tag") is not None


def test_compact_documents_stay_compact() -> None:
    enabled = dx.set_ft(read_fixture("compact.xml"), dx.FTSpec.defaults("hostb"))
    assert b"\n" not in enabled.rstrip(b"\n")
    assert b'<name>compact</name><metadata><cuju:ft xmlns:cuju=' in enabled


def test_tabs_are_followed() -> None:
    enabled = dx.set_ft(read_fixture("tabs.xml"), dx.FTSpec.defaults("hostb"))
    assert b'</app:info>\n\t\t<cuju:ft xmlns:cuju="' in enabled


def test_remove_without_element_changes_nothing() -> None:
    data = read_fixture("virt-install-debian.xml")
    assert c14n(dx.remove_ft(data)) == c14n(data)


def test_existing_empty_metadata_is_removed_with_the_element() -> None:
    """The documented exception to enable/disable identity: an empty <metadata/> goes too."""
    data = b"<domain type='kvm'><name>vm</name><metadata/><memory>1</memory></domain>"
    enabled = dx.set_ft(data, dx.FTSpec.defaults("hostb"))
    assert dx.parse_domain(enabled) is not None
    without = b"<domain type='kvm'><name>vm</name><memory>1</memory></domain>"
    assert c14n(dx.remove_ft(enabled)) == c14n(without)


def test_unicode_and_cdata_survive() -> None:
    data = read_fixture("unicode-cdata.xml")
    enabled = dx.set_ft(data, dx.FTSpec.defaults("hostb"))
    assert "café-日本".encode() in enabled
    assert b"<![CDATA[Owner: <ops@example.org> & friends]]>" in enabled


def test_docs_describe_every_attribute_with_its_default_and_bounds() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ft-element.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `")}
    for attr in dx.ATTRIBUTES:
        row = rows[attr.name]
        if attr.bounds:
            assert f"{attr.bounds[0]}..{attr.bounds[1]}" in row
        if attr.kind == "int":
            assert f"| {attr.default} |" in row
        for choice in attr.choices:
            assert f"`{choice}`" in row


# --- disk records (<cuju:disk>) ---------------------------------------------------------------

QCOW2_DISK = """<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' cache='none'/>
  <source file='/var/lib/libvirt/images/web.qcow2'/>
  <target dev='vda' bus='virtio'/>
  <serial>web-root</serial>
  <boot order='1'/>
</disk>"""


def record(target: str = "vda", inner: str = QCOW2_DISK, attrs: str = "") -> str:
    return f'<cuju:disk target="{target}"{attrs}>{inner}</cuju:disk>'


def test_disk_record_gives_the_facts_the_data_path_needs() -> None:
    with_replica = record(attrs=" replica='/srv/r/web.qcow2'")
    without_bus = record("sdb", QCOW2_DISK.replace("vda", "sdb").replace(" bus='virtio'", ""))
    spec = dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">{with_replica}{without_bus}</cuju:ft>')
    vda, sdb = spec.disks
    assert (vda.target, vda.source, vda.source_type, vda.format, vda.bus, vda.replica) == (
        "vda", "/var/lib/libvirt/images/web.qcow2", "file", "qcow2", "virtio", "/srv/r/web.qcow2"
    )
    assert sdb.bus == "scsi"  # libvirt's rule for a dev named sd* without bus
    assert sdb.replica is None
    uuid = "0c1b8a57-9a1f-4b43-9e3e-4d7e0a7b0a11"
    assert sdb.replica_path("/var/lib/cuju-libvirt/replicas", uuid) == (
        f"/var/lib/cuju-libvirt/replicas/{uuid}/sdb.qcow2"
    )
    assert vda.replica_path("/elsewhere", uuid) == "/srv/r/web.qcow2"
    assert vda.socket_path(uuid) == f"/run/cuju-libvirt/nbd/{uuid}/vda.sock"
    assert spec.disk("sdb") is sdb and spec.disk("vdz") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        vda.source = "/x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        (record("vda", QCOW2_DISK.replace("qcow2", "vmdk")), "format 'vmdk' cannot be served"),
        (record("vdb"), "fix: set target='vda'"),
        (record(attrs=" replica='relative/path'"), "replica='relative/path' is invalid (not an absolute"),
        (record(attrs=" replica='/a/../b'"), "contains '.' or '..'"),
        (record(attrs=" color='red'"), "unknown attribute 'color'"),
        ('<cuju:disk target="vda"/>', "exactly one element"),
        (record(inner=QCOW2_DISK + QCOW2_DISK), "exactly one element"),
        (record(inner="<source file='/a'/>"), "exactly one element"),
        (record("VDA"), "lower-case"),
        ('<cuju:disk>' + QCOW2_DISK + '</cuju:disk>', "no target attribute"),
        (record() + record(), "records disk 'vda' 2 times"),
        (record(inner=QCOW2_DISK.replace("type='file'", "type='network'")), "cannot be served"),
    ],
)
def test_invalid_disk_records_name_the_disk_and_the_fix(records: str, needle: str) -> None:
    with pytest.raises(FTElementError) as info:
        dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">{records}</cuju:ft>')
    text = "\n".join(info.value.problems)
    assert needle in text
    assert "fix:" in text


def test_disk_records_survive_libvirts_metadata_forms() -> None:
    spec = dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">{record()}</cuju:ft>')
    # virDomainGetMetadata strips the namespace from the records; virDomainSetMetadata of
    # records without namespace puts the cuju namespace on every descendant
    plain = f'<ft peer="b"><disk target="vda">{QCOW2_DISK}</disk></ft>'
    assert dx.parse_libvirt_metadata(plain) == spec
    everywhere = etree.fromstring(f'<cuju:ft xmlns:cuju="{NS}" peer="b">{record()}</cuju:ft>')
    for node in everywhere.iter(etree.Element):
        node.tag = f"{{{NS}}}{etree.QName(node).localname}"
    assert dx.parse_element(etree.tostring(everywhere)) == spec


def test_disable_restores_a_prepared_disk_and_refuses_to_lose_an_edited_one() -> None:
    spec = dx.parse_element(f'<cuju:ft xmlns:cuju="{NS}" peer="b">{record()}</cuju:ft>')
    exported = (
        "<disk type='network' device='disk'>\n      <driver name='qemu' type='qcow2' error_policy='stop'/>\n"
        "      <source protocol='nbd' name='vda'>\n        <host transport='unix' "
        "socket='/run/cuju-libvirt/nbd/0c1b8a57-9a1f-4b43-9e3e-4d7e0a7b0a11/vda.sock'/>\n      </source>\n"
        "      <target dev='vda' bus='virtio'/>\n    </disk>"
    )
    original = QCOW2_DISK.replace("\n", "\n    ")
    doc = "<domain type='kvm'>\n  <name>vm</name>\n  <devices>\n    {}\n  </devices>\n</domain>\n"
    enabled = dx.set_ft(doc.format(exported), spec)
    assert dx.parse_domain(enabled) == spec
    assert c14n(dx.remove_ft(enabled)) == c14n(doc.format(original))
    edited = enabled.replace("type='network'", "type='file'").replace('type="network"', 'type="file"')
    with pytest.raises(FTElementError, match="no longer the NBD export"):
        dx.remove_ft(edited)
    # a recorded disk that was detached since is simply gone
    detached = dx.set_ft(doc.format(""), spec)
    assert dx.parse_domain(dx.remove_ft(detached)) is None
