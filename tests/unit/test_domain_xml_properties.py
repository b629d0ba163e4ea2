"""Property-based tests (hypothesis): round trips and agreement with the RELAX NG schema."""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from cuju_libvirt._xml import remove_child
from cuju_libvirt.errors import FTElementError, NotADomainXMLError
from tests.domains import c14n

NS = dx.FT_NAMESPACE

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = (
    st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda h: not h.replace(".", "").isdigit())
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
port = st.integers(1, 65535)


@st.composite
def endpoints(draw: st.DrawFn) -> str:
    host = draw(st.one_of(hostname, ipv4, ipv6))
    return host + (f":{draw(port)}" if draw(st.booleans()) else "")


specs = st.builds(
    dx.FTSpec,
    peer=endpoints(),
    link=st.none() | endpoints(),
    epoch_ms=st.integers(5, 1000),
    tracker=st.sampled_from(["auto", "uffd", "scan"]),
    output_commit=st.booleans(),
    max_epoch_packets=st.integers(100, 9000),
    failover=st.sampled_from(["auto", "manual"]),
    heartbeat_timeout_ms=st.integers(50, 60000),
    on_peer_unavailable=st.sampled_from(["start-unprotected", "refuse-start"]),
)


# --- disk records ---------------------------------------------------------------------------

_PREFIX_BY_BUS = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd", "usb": "sd"}


@st.composite
def original_disks(draw: st.DrawFn, target: str | None = None) -> str:
    """A <disk> that prepare can serve, as libvirt or a person might write it."""
    bus = draw(st.sampled_from(list(_PREFIX_BY_BUS)))
    dev = target or _PREFIX_BY_BUS[bus] + draw(st.from_regex(r"[a-z]{1,2}", fullmatch=True))
    kind = draw(st.sampled_from(["file", "block"]))
    path = "/" + draw(st.from_regex(r"[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_.-]{1,12}){0,3}", fullmatch=True))
    children = []
    fmt = draw(st.sampled_from([None, "raw", "qcow2"]))
    if fmt is not None or draw(st.booleans()):
        extra = draw(st.sampled_from(["", " cache='none'", " discard='unmap' io='native'"]))
        children.append(f"<driver name='qemu'{f' type={fmt!r}' if fmt else ''}{extra}/>")
    children.append(f"<source {'file' if kind == 'file' else 'dev'}='{path}'/>")
    children.append(f"<target dev='{dev}'{f' bus={bus!r}' if draw(st.booleans()) else ''}/>")
    if draw(st.booleans()):
        children.append(f"<serial>{draw(st.from_regex(r'[A-Za-z0-9]{1,10}', fullmatch=True))}</serial>")
    if draw(st.booleans()):
        children.append(f"<boot order='{draw(st.integers(1, 9))}'/>")
    if draw(st.booleans()):
        children.append("<address type='drive' controller='0' bus='0' target='0' unit='1'/>")
    indent = draw(st.sampled_from(["", "\n  ", "\n\t"]))
    closing = "\n" if indent else ""
    return f"<disk type='{kind}' device='disk'>" + "".join(indent + c for c in children) + f"{closing}</disk>"


replicas = st.none() | st.from_regex(r"/[a-z0-9_-]{1,8}(/[a-z0-9_.-]{1,8}){0,3}", fullmatch=True).filter(
    lambda p: dx.replica_problem(p) is None
)


@st.composite
def disk_records(draw: st.DrawFn) -> tuple[dx.FTDisk, ...]:
    records = []
    for text in draw(st.lists(original_disks(), max_size=4)):
        record = dx.FTDisk.from_disk(etree.fromstring(text), replica=draw(replicas))
        if all(r.target != record.target for r in records):
            records.append(record)
    return tuple(records)


specs_with_disks = st.builds(lambda spec, disks: spec.replace(disks=disks), specs, disk_records())


@given(original_disks())
def test_a_record_keeps_what_the_disk_says(text: str) -> None:
    disk = etree.fromstring(text)
    record = dx.FTDisk.from_disk(disk)
    source = disk.find("source")
    assert source is not None
    assert record.source == (source.get("file") or source.get("dev"))
    assert record.source_type == disk.get("type")
    driver = disk.find("driver")
    assert record.format == ((driver.get("type") if driver is not None else None) or "raw")
    assert record.target == disk.find("target").get("dev")  # type: ignore[union-attr]
    assert record.bus != "unknown"
    # the record re-creates the disk exactly, wherever it is placed
    for indent in ("", "  ", "        ", "\t\t"):
        placed = dx.record_element(record.original, indent)
        assert dx.record_text(placed, indent) == record.original
    assert c14n(etree.tostring(dx.record_element(record.original, ""))) == c14n(text)


@given(specs_with_disks)
def test_element_round_trip_with_disks(spec: dx.FTSpec) -> None:
    assert dx.parse_element(dx.element_xml(spec)) == spec
    assert dx.parse_libvirt_metadata(dx.libvirt_metadata_xml(spec)) == spec
    assert dx.schema().validate(dx.ft_element(spec))
    doc = dx.set_ft(b"<domain type='kvm'>\n  <name>vm</name>\n</domain>\n", spec)
    assert dx.parse_domain(doc) == spec
    assert dx.set_ft(doc, spec) == doc


@given(specs)
def test_element_round_trip(spec: dx.FTSpec) -> None:
    assert dx.parse_element(dx.element_xml(spec)) == spec
    assert dx.parse_libvirt_metadata(dx.libvirt_metadata_xml(spec)) == spec
    assert dx.FTSpec.from_attributes(spec.to_attributes()) == spec
    # the effective dict re-parses to the same settings (link made explicit)
    as_text = {k: (str(v) if isinstance(v, int) else v) for k, v in spec.to_dict().items()}
    again = dx.FTSpec.from_attributes(as_text)
    assert again.to_dict() == spec.to_dict()
    assert again.link_endpoint == spec.link_endpoint


@given(endpoints())
def test_endpoint_host_and_port_survive_formatting(text: str) -> None:
    endpoint = dx.parse_endpoint(text, 7790)
    assert dx.parse_endpoint(str(endpoint), 1) == endpoint
    if ":" in endpoint.host:
        ipaddress.IPv6Address(endpoint.host)


attribute_names = st.sampled_from([a.name for a in dx.ATTRIBUTES] + ["epochms", "x", "peer2"])
attribute_values = st.one_of(
    st.sampled_from(["auto", "uffd", "scan", "on", "off", "manual", "refuse-start", "start-unprotected", ""]),
    st.integers(-10, 70000).map(str),
    endpoints(),
    st.text(alphabet="ab:[]0123456789.-% ", max_size=12),
)


@given(st.dictionaries(attribute_names, attribute_values, max_size=6))
def test_typed_checks_never_accept_what_the_schema_rejects(attributes: dict[str, str]) -> None:
    element = etree.Element(dx.FT_TAG, nsmap={"cuju": NS})
    for name, value in attributes.items():
        element.set(name, value)
    try:
        dx.FTSpec.from_attributes(attributes)
        typed_ok = True
    except FTElementError as err:
        typed_ok = False
        assert all("fix" in p for p in err.problems)
    schema_ok = dx.schema().validate(element)
    if typed_ok:
        assert schema_ok, (attributes, dx.schema().error_log)
    # for everything but endpoints the two checks agree exactly
    if "peer" in attributes and not any(n in attributes for n in ("link",)):
        try:
            dx.parse_endpoint(attributes["peer"], 1)
        except ValueError:
            return
        assert typed_ok == schema_ok, (attributes, dx.schema().error_log)


# --- enable -> disable identity over generated domain documents ------------------------------

blank = st.sampled_from(["", "\n", "\n  ", "\n\t", "  "])
comment = st.text(alphabet="abc xyz", max_size=8).map(lambda t: f"<!--{t}-->")
other_metadata = st.sampled_from(
    [
        '<libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">'
        '<libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo>',
        '<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:name>x</nova:name>'
        "</nova:instance>",
        '<app xmlns="urn:example:app" a="1" b="2"/>',
    ]
)
head_elements = st.sampled_from(
    ["<uuid>0c1b8a57-9a1f-4b43-9e3e-4d7e0a7b0a11</uuid>", "<title>t</title>",
     "<description>d &amp; e</description>", "<genid/>"]
)
body_elements = st.sampled_from(
    ["<memory unit='KiB'>1048576</memory>", "<vcpu>2</vcpu>", "<os><type>hvm</type></os>",
     "<devices><disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk></devices>",
     "<?pi data?>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
     "<qemu:arg value='-S'/></qemu:commandline>"]
)


@st.composite
def domains(draw: st.DrawFn) -> str:
    indent = draw(st.sampled_from(["", "\n  ", "\n\t", "\n    "]))
    parts = ["<name>vm</name>", *draw(st.lists(head_elements, max_size=3, unique=True))]
    if draw(st.booleans()):
        inner = draw(st.lists(st.one_of(other_metadata, comment), min_size=1, max_size=3, unique=True))
        spacer = draw(blank)
        parts.append("<metadata>" + "".join(spacer + i for i in inner) + draw(blank) + "</metadata>")
    parts += draw(st.lists(st.one_of(body_elements, comment), max_size=5))
    order = draw(st.permutations(parts[1:])) if draw(st.booleans()) else parts[1:]
    children = [parts[0], *order]
    attrs = draw(st.sampled_from(["type='kvm'", "type='qemu' id='3'", "id='1' type='kvm'"]))
    prolog = draw(st.sampled_from(["", "<?xml version='1.0'?>\n", "<!-- top -->\n"]))
    closing = "\n" if indent else ""
    return f"{prolog}<domain {attrs}>" + "".join(indent + c for c in children) + f"{closing}</domain>"


@given(domains(), specs)
def test_enable_then_disable_gives_back_the_document(xml: str, spec: dx.FTSpec) -> None:
    enabled = dx.set_ft(xml, spec)
    assert dx.parse_domain(enabled) == spec
    assert dx.set_ft(enabled, spec) == enabled
    assert c14n(dx.remove_ft(enabled)) == c14n(xml)
    assert c14n(dx.remove_ft(xml)) == c14n(xml)


@given(domains(), specs, specs)
def test_replacing_then_disabling_gives_back_the_document(
    xml: str, first: dx.FTSpec, second: dx.FTSpec
) -> None:
    enabled = dx.set_ft(dx.set_ft(xml, first), second)
    assert dx.parse_domain(enabled) == second
    assert c14n(dx.remove_ft(enabled)) == c14n(xml)


def _kept(original: str, prepared: str) -> list[str]:
    """Elements of ``original`` with no counterpart in ``prepared`` (same tag and text, the
    same or more attributes). Namespace declarations may move (prepare hoists xmlns:qemu to
    <domain>), so documents are compared element by element, not by their serialised size."""
    after = list(etree.fromstring(prepared.encode()).iter())
    lost = []
    for el in etree.fromstring(original.encode()).iter():
        if not any(o.tag == el.tag and (o.text or "").strip() == (el.text or "").strip()
                   and all(o.get(k) == v for k, v in el.attrib.items()) for o in after):
            lost.append(f"<{el.tag} {dict(el.attrib)}>")
    return lost


@given(domains())
def test_prepare_is_idempotent_and_only_adds(xml: str) -> None:
    once = ft.prepare(xml)
    twice = ft.prepare(once.xml)
    assert twice.changes == []
    assert c14n(twice.xml) == c14n(once.xml)
    assume(once.changes)
    assert _kept(xml, once.xml) == []
    assert c14n(once.xml) != c14n(xml)


@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: "<domain>" + t))
def test_garbage_raises_only_our_errors(data: bytes | str) -> None:
    try:
        dx.parse_domain(data)
        ft.check_fitness(data)
    except (NotADomainXMLError, FTElementError):
        pass


@st.composite
def domains_with_disks(draw: st.DrawFn) -> str:
    indent = draw(st.sampled_from(["\n  ", "\n\t", "\n    ", ""]))
    step = indent[1:] if indent else ""
    disks = []
    for text in draw(st.lists(original_disks(), min_size=1, max_size=4)):
        target = etree.fromstring(text).find("target").get("dev")  # type: ignore[union-attr]
        if all(f"dev='{target}'" not in d for d in disks):
            disks.append(text)
    if draw(st.booleans()):
        cdrom = "<source file='/iso/x.iso'/><target dev='hdzzz'/><readonly/>"  # no generated dev clashes
        disks.append(f"<disk type='file' device='cdrom'>{cdrom}</disk>")

    def nest(text: str) -> str:  # indent a <disk> one level below <devices>
        return text.replace("\n", "\n" + step + step) if indent else text

    inner = "".join(indent + step + nest(d) for d in disks) + indent
    uuid = "<uuid>0c1b8a57-9a1f-4b43-9e3e-4d7e0a7b0a11</uuid>" if draw(st.booleans()) else ""
    parts = ["<name>vm</name>", uuid, "<memory unit='KiB'>1048576</memory>", f"<devices>{inner}</devices>"]
    closing = "\n" if indent else ""
    return "<domain type='kvm'>" + "".join(indent + p for p in parts if p) + f"{closing}</domain>"


@settings(max_examples=50)  # each example prepares a whole domain: keep the unit tier fast
@given(domains_with_disks(), specs)
def test_prepare_then_disable_gives_back_every_disk(xml: str, spec: dx.FTSpec) -> None:
    prepared = ft.prepare(dx.set_ft(xml, spec), disks=True)
    recorded = dx.parse_domain(prepared.xml)
    assert recorded is not None and recorded.replace(disks=()) == spec
    assert len(recorded.disks) >= 1
    assert ft.prepare(prepared.xml, disks=True).changes == []
    disabled = dx.remove_ft(prepared.xml)
    if "<uuid>" not in xml:  # prepare added the <uuid> naming the sockets; it stays
        doc = dx.load_domain(disabled)
        uuid = doc.root.find("uuid")
        assert uuid is not None
        remove_child(uuid)
        disabled = doc.dump()
    assert c14n(disabled) == c14n(ft.prepare(xml).xml)
