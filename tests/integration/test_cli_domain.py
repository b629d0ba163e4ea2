"""``cuju-libvirt enable|disable|show DOMAIN`` against libvirt's real test driver (test:///default).

The test driver keeps its state only while a connection is open, so a fixture holds one
for the whole test and the CLI (run in-process) sees the same domains. It stores metadata
like the QEMU driver, but it drops ``<qemu:commandline>``, so the direct-QMP-socket rule can
never be satisfied here; tests that need a "fit" domain say how they deal with that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from lxml import etree

from cuju_libvirt import domain_xml as dx
from cuju_libvirt.cli import domain_cmd, main
from cuju_libvirt.fitness import Problem
from tests.domains import read_fixture

URI = "test:///default"
NS = dx.FT_NAMESPACE


def _ignore(_ctx: object, _err: object) -> None:
    pass


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(_ignore, None)
    connection = libvirt.open(URI)
    defined: list[str] = []
    connection.cuju_defined = defined
    try:
        yield connection
    finally:
        for name in defined:
            try:
                dom = connection.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass
        connection.close()


def define(conn: Any, fixture: str, start: bool = False) -> Any:
    xml = read_fixture(fixture).decode()
    dom = conn.defineXML(xml)
    conn.cuju_defined.append(dom.name())
    if start:
        dom.create()
    return dom


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv[:1], *argv[1:], "-c", URI])
    out, err = capsys.readouterr()
    return code, out, err


def stored(dom: Any, flags: int) -> str | None:
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, flags))
    except libvirt.libvirtError as err:
        assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA
        return None


CONFIG, LIVE = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_AFFECT_LIVE


@pytest.fixture
def without_qmp_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test driver drops <qemu:commandline>; judge everything else for real."""
    real = domain_cmd.check_fitness

    def check(xml: str, spec: dx.FTSpec | None = None) -> list[Problem]:
        return [p for p in real(xml, spec) if p.code != "qmp-socket"]

    monkeypatch.setattr(domain_cmd, "check_fitness", check)


def test_show_unprotected_domain(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    define(conn, "qemu-commandline.xml")
    code, out, _ = cli(capsys, "show", "tcg-guest")
    assert code == 0 and "not protected" in out
    code, out, _ = cli(capsys, "show", "tcg-guest", "--json")
    assert code == 0 and json.loads(out) is None


def test_enable_refuses_an_unfit_domain_and_sets_nothing(
    conn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "enable", "test", "--peer", "hostb")
    assert code == 1
    assert "<domain type='test'>: only QEMU domains can be protected" in err
    assert "<cuju:ft> not set" in err
    dom = conn.lookupByName("test")
    assert stored(dom, CONFIG) is None and stored(dom, LIVE) is None


def test_enable_show_disable_on_a_running_domain(
    conn: Any, capsys: pytest.CaptureFixture[str], without_qmp_rule: None
) -> None:
    dom = define(conn, "qemu-commandline.xml", start=True)
    code, out, err = cli(capsys, "enable", "tcg-guest", "--peer", "hostb", "--epoch-ms", "15")
    assert code == 0, err
    assert "set in the persistent configuration" in out
    spec = dx.FTSpec(peer="hostb", epoch_ms=15)
    # stored by libvirt in both configurations, readable by the hook's parser from the domain XML
    assert stored(dom, CONFIG) == '<ft peer="hostb" epoch-ms="15"/>'
    assert stored(dom, LIVE) == '<ft peer="hostb" epoch-ms="15"/>'
    assert dx.parse_domain(dom.XMLDesc(0)) == spec
    assert dx.parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == spec
    code, out, _ = cli(capsys, "show", "tcg-guest", "--json")
    assert json.loads(out) == spec.to_dict()
    # update one setting, the others are kept
    code, _, _ = cli(capsys, "enable", "tcg-guest", "--failover", "manual")
    assert code == 0
    assert dx.parse_domain(dom.XMLDesc(0)) == spec.replace(failover="manual")
    # disable from both, then idempotent
    code, out, _ = cli(capsys, "disable", "tcg-guest")
    assert code == 0 and "persistent configuration and the running domain" in out
    assert stored(dom, CONFIG) is None and stored(dom, LIVE) is None
    code, out, _ = cli(capsys, "disable", "tcg-guest")
    assert code == 0 and "nothing to do" in out


def test_force_sets_the_element_on_an_unfit_domain(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "enable", "test", "--peer", "198.18.0.2", "--force")
    assert code == 0
    assert "only QEMU domains" in err  # still reported
    dom = conn.lookupByName("test")
    assert stored(dom, CONFIG) == stored(dom, LIVE) == '<ft peer="198.18.0.2"/>'
    code, out, _ = cli(capsys, "show", "test", "--config")
    assert "peer                  198.18.0.2" in out


def test_prepare_redefines_and_judges_what_libvirt_kept(
    conn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dom = define(conn, "openstack-nova.xml")
    code, _, err = cli(capsys, "enable", "instance-0000002a", "--peer", "hostb", "--prepare")
    # the safe changes were defined ...
    assert "changed: added <memoryBacking>" in err
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<source type='file'/>" in xml and "<access mode='shared'/>" in xml
    assert "<driver name='qemu' rx_queue_size='512'/>" in xml
    # ... but the test driver dropped <qemu:commandline>, which is reported, and nothing is set
    assert code == 1
    assert "error: <qemu:commandline>" in err
    assert stored(dom, CONFIG) is None


def test_prepare_needs_a_persistent_domain(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dom = conn.createXML(read_fixture("tabs.xml").decode(), 0)
    try:
        code, _, err = cli(capsys, "enable", "tabbed", "--peer", "hostb", "--prepare")
        assert code == 1 and "transient" in err
        code, _, err = cli(capsys, "enable", "tabbed", "--peer", "hostb", "--force")
        assert code == 0, err
        assert stored(dom, LIVE) == '<ft peer="hostb"/>'
    finally:
        dom.destroy()


def test_invalid_stored_element(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dom = define(conn, "qemu-commandline.xml")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<ft peer="b" epoch-ms="1"/>', "cuju", NS, CONFIG)
    code, _, err = cli(capsys, "show", "tcg-guest")
    assert code == 1 and "epoch-ms='1'" in err
    code, _, err = cli(capsys, "enable", "tcg-guest", "--epoch-ms", "30")
    assert code == 1 and "epoch-ms='1'" in err  # cannot merge into an invalid element without --peer
    code, _, _ = cli(capsys, "disable", "tcg-guest")
    assert code == 0 and stored(dom, CONFIG) is None


def test_lookup_by_uuid_and_id(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dom = conn.lookupByName("test")
    assert cli(capsys, "show", dom.UUIDString())[0] == 0
    code, out, _ = cli(capsys, "show", str(dom.ID()))
    assert code == 0 and "domain 'test'" in out


def test_unknown_domain_and_unreachable_uri_exit_2(conn: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "show", "xmlcli-no-such-domain")
    assert code == 2 and "no domain 'xmlcli-no-such-domain' on test:///default" in err
    code = main(["show", "x", "-c", "test:///nonexistent/xmlcli.xml"])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot connect to test:///nonexistent/xmlcli.xml" in err
    assert "Traceback" not in err


def _disks(xml: str) -> dict[str, Any]:
    root = etree.fromstring(xml)
    return {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}


def test_prepare_serves_disks_only_once_the_rest_is_fit_and_disable_gives_them_back(
    conn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dom = define(conn, "several-disks.xml")
    inactive = libvirt.VIR_DOMAIN_XML_INACTIVE
    # the test driver drops <qemu:commandline>: unfit after the first step, so the disks stay
    code, _, err = cli(capsys, "enable", "db1", "--peer", "hostb", "--prepare", "--serve-disks")
    assert code == 1 and "error: <qemu:commandline>" in err
    assert "serving <disk>" not in err
    assert not any(dx.is_nbd_export(d) for d in _disks(dom.XMLDesc(inactive)).values())
    before = {t: _canonical(d) for t, d in _disks(dom.XMLDesc(inactive)).items()}
    # forced: the disks are rewritten in the same redefine that records their originals
    code, _, err = cli(capsys, "enable", "db1", "--peer", "hostb", "--prepare", "--serve-disks", "--force")
    assert code == 0, err
    assert err.count("changed: serving <disk>") == 5
    xml = dom.XMLDesc(inactive)
    spec = dx.parse_domain(xml)
    assert spec is not None and [d.target for d in spec.disks] == ["vda", "vdb", "sda", "sdb", "sdc"]
    assert dx.parse_libvirt_metadata(stored(dom, CONFIG) or "") == spec
    exported = sorted(t for t, d in _disks(xml).items() if dx.is_nbd_export(d))
    assert exported == ["sda", "sdb", "sdc", "vda", "vdb"]
    # changing a setting keeps the records; running enable --prepare again changes nothing
    code, _, err = cli(capsys, "enable", "db1", "--epoch-ms", "10", "--prepare", "--serve-disks", "--force")
    assert code == 0 and "serving <disk>" not in err
    assert dx.parse_domain(dom.XMLDesc(inactive)) == spec.replace(epoch_ms=10)
    # a replica override goes through the metadata API with the records
    code, _, err = cli(capsys, "enable", "db1", "--disk-replica", "vdb=/srv/r/data.img", "--force")
    assert code == 0, err
    stored_spec = dx.parse_domain(dom.XMLDesc(inactive))
    assert stored_spec is not None and stored_spec.disk("vdb").replica == "/srv/r/data.img"  # type: ignore[union-attr]
    # disable redefines the domain with the original disks
    code, _, err = cli(capsys, "disable", "db1")
    assert code == 0, err
    assert err.count("changed: restored <disk>") == 5
    xml = dom.XMLDesc(inactive)
    assert dx.parse_domain(xml) is None
    assert {t: _canonical(d) for t, d in _disks(xml).items()} == before


def _canonical(disk: Any) -> bytes:
    clone = etree.fromstring(etree.tostring(disk, with_tail=False))
    etree.cleanup_namespaces(clone)
    return etree.tostring(clone, method="c14n")
