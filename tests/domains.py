"""Test helpers shared by the domain-XML tests: fixtures on disk and canonical XML."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

DOMAINS_DIR = Path(__file__).parent / "data" / "domains"
#: Fixtures that hold devices no --prepare can fix.
UNFIT = {"unfit-passthrough.xml", "xen-pv.xml"}
LIBVIRT_DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")


def fixture_names() -> list[str]:
    return sorted(p.name for p in DOMAINS_DIR.glob("*.xml"))


def read_fixture(name: str) -> bytes:
    return (DOMAINS_DIR / name).read_bytes()


def c14n(xml: str | bytes) -> bytes:
    """Canonical XML (C14N 1.0, comments kept) of a whole document, top-level nodes included."""
    data = xml.encode() if isinstance(xml, str) else xml
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    tree = etree.fromstring(data, parser).getroottree()
    return etree.tostring(tree, method="c14n", with_comments=True)
