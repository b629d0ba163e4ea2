"""Fitness rules and --prepare: each rule fires on what it names, prepare fixes what is safe."""

from __future__ import annotations

import pytest
from lxml import etree

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from cuju_libvirt._xml import remove_child
from cuju_libvirt.rig.domains import direct_qmp_args, domain_xml
from tests.domains import LIBVIRT_DOMAIN_RNG, UNFIT, c14n, fixture_names, read_fixture

QEMU = ft.QEMU_NAMESPACE

FIT = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>fit</name>
  <memory unit='MiB'>256</memory>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type>hvm</type>
  </os>
  <devices>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
      <driver name='qemu'/>
    </interface>
    {devices}
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"""


def fit(devices: str = "") -> str:
    return FIT.replace("{devices}", devices)


def codes(problems: list[ft.Problem], severity: ft.Severity | None = None) -> list[str]:
    return [p.code for p in problems if severity is None or p.severity is severity]


def test_a_fit_domain_has_no_problems() -> None:
    assert ft.check_fitness(fit()) == []


@pytest.mark.parametrize(
    ("devices", "code", "subject"),
    [
        ("<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x65' slot='0x00' "
         "function='0x1'/></source></hostdev>", "hostdev", "<hostdev type='pci'> 0000:65:00.1"),
        ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x046d'/><product id='0xc52b'/>"
         "</source></hostdev>", "hostdev", "0x046d:0xc52b"),
        ("<interface type='hostdev'><source><address type='pci' domain='0' bus='1' slot='0' function='0'/>"
         "</source></interface>", "hostdev", "<interface type='hostdev'>"),
        ("<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>", "hostdev", "vdpa"),
        ("<disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'><address "
         "domain='0' bus='1' slot='0' function='0'/></source><target dev='vde'/></disk>", "hostdev", "vde"),
        ("<interface type='vhostuser'><source type='unix' path='/run/vhu0' mode='server'/>"
         "<model type='virtio'/></interface>", "vhost-user", "path /run/vhu0"),
        ("<disk type='vhostuser' device='disk'><source type='unix' path='/run/vhost-blk'/>"
         "<target dev='vdx'/></disk>", "vhost-user", "vdx"),
        ("<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='tag1'/>"
         "</filesystem>", "vhost-user", "virtiofs tag1"),
        ("<video><model type='virtio'/><driver name='vhostuser'/></video>", "vhost-user", "<video>"),
        ("<shmem name='sh0'><model type='ivshmem-plain'/></shmem>", "shmem", "sh0"),
        ("<vsock model='virtio'><cid auto='yes'/></vsock>", "vsock", "<vsock>"),
        ("<redirdev bus='usb' type='spicevmc'/>", "redirdev", "spicevmc"),
        ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
         "tpm", "passthrough"),
        ("<memory model='nvdimm'><source><path>/dev/pmem0</path></source><target><size unit='GiB'>1"
         "</size></target></memory>", "memory-device", "nvdimm"),
        ("<memory model='virtio-mem'><target><size unit='GiB'>1</size><block unit='MiB'>2</block>"
         "</target></memory>", "memory-device", "virtio-mem"),
        ("<memory model='dimm' access='private'><target><size unit='GiB'>1</size></target></memory>",
         "memory-device", "dimm"),
        ("<memory model='dimm'><target><size unit='GiB'>1</size><node>0</node></target></memory>",
         "memory-device", "dimm"),
        ("<interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>",
         "nic-vhost", "bridge br0"),
        ("<interface type='bridge'><source bridge='br1'/><model type='virtio'/><driver name='vhost'/>"
         "</interface>", "nic-vhost", "bridge br1"),
        # issue 13, "also found": what --prepare accepted although it cannot be protected
        ("<disk type='vhostvdpa' device='disk'><driver name='qemu' type='raw' cache='none'/>"
         "<source dev='/dev/vhost-vdpa-0'/><target dev='vdc' bus='virtio'/></disk>", "hostdev", "vdc"),
        ("<smartcard mode='passthrough' type='spicevmc'/>", "smartcard", "passthrough"),
        ("<smartcard mode='host'/>", "smartcard", "mode='host'"),
        ("<input type='evdev'><source dev='/dev/input/event1' grab='all' repeat='on'/></input>", "input",
         "/dev/input/event1"),
        ("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event2'/></input>", "input",
         "passthrough"),
    ],
)
def test_errors_name_the_device(devices: str, code: str, subject: str) -> None:
    problems = ft.check_fitness(fit(devices))
    errors = [p for p in problems if p.is_error]
    assert [p.code for p in errors] == [code], problems
    assert subject in errors[0].subject
    assert str(errors[0]).startswith(f"error: {errors[0].subject}: ")
    assert "; fix: " in str(errors[0])


def test_the_live_rules_catch_what_a_hot_plug_brings_and_nothing_else() -> None:
    """cujud applies them to the live XML before each pairing: a DIMM or a host device
    hot-plugged since the start is refused, with what to do; a fit domain passes (its
    unprepared disk, a warning, is no reason to refuse a re-pairing)."""
    plain_disk = "<disk type='file' device='disk'><source file='/img/a.raw'/><target dev='vda'/></disk>"
    assert ft.check_live_fitness(fit(plain_disk)) == []
    dimm = "<memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target></memory>"
    (found,) = ft.check_live_fitness(fit(dimm))
    assert found.code == "memory-device" and "virsh detach-device" in found.fix
    hostdev = ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' "
               "function='0'/></source></hostdev>")
    assert [p.code for p in ft.check_live_fitness(fit(hostdev))] == ["hostdev"]


@pytest.mark.parametrize(
    ("devices", "code", "subject"),
    [
        ("<disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda'/></disk>",
         "disk", "<disk> vda (/img/a.qcow2)"),
        ("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdb' bus='scsi'/></disk>",
         "disk", "<disk> sdb (/dev/sdb)"),
        ("<filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>",
         "filesystem", "share"),
        ("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>", "tpm", "emulator"),
        ("<smartcard mode='host-certificates'><certificate>c1</certificate><certificate>c2</certificate>"
         "<certificate>c3</certificate></smartcard>", "smartcard", "host-certificates"),
    ],
)
def test_warnings_name_the_device(devices: str, code: str, subject: str) -> None:
    problems = ft.check_fitness(fit(devices))
    assert codes(problems, ft.Severity.ERROR) == []
    assert codes(problems) == [code]
    assert subject in problems[0].subject


@pytest.mark.parametrize(
    "devices",
    [
        "<disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>",
        "<disk type='file' device='disk'><source file='/img/ro.img'/><target dev='vdb'/><readonly/></disk>",
        "<interface type='bridge'><source bridge='br0'/><model type='e1000'/></interface>",
        "<interface type='user'/>",
        "<memballoon model='virtio' freePageReporting='on'/>",
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
        "<input type='tablet' bus='usb'/>",
        "<input type='keyboard' bus='ps2'/>",
    ],
)
def test_harmless_devices(devices: str) -> None:
    assert ft.check_fitness(fit(devices)) == []


def test_free_page_reporting_needs_a_discard_safe_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    xml = fit("<memballoon model='virtio' freePageReporting='on'/>")
    assert ft.check_fitness(xml, dx.FTSpec(peer="b", tracker="uffd")) == []
    monkeypatch.setattr(ft, "DISCARD_SAFE_TRACKERS", frozenset({"scan"}))
    assert codes(ft.check_fitness(xml, dx.FTSpec(peer="b", tracker="uffd"))) == ["balloon"]


def test_memory_backing_rules() -> None:
    base = fit()
    anonymous = base.replace("<source type='file'/>", "").replace("<access mode='shared'/>", "")
    problems = ft.check_fitness(anonymous)
    assert [p.subject for p in problems] == ["<memoryBacking><source>", "<memoryBacking><access>"]
    assert all(p.preparable for p in problems)
    memfd = base.replace("<source type='file'/>", "<source type='memfd'/>")
    assert "memfd" in ft.check_fitness(memfd)[0].message
    huge = base.replace("<source type='file'/>", "<source type='file'/><hugepages/>")
    assert codes(ft.check_fitness(huge)) == ["hugepages"]
    assert not ft.check_fitness(huge)[0].preparable


def test_domain_type_and_qmp_rules() -> None:
    assert codes(ft.check_fitness(fit().replace("type='qemu'", "type='xen'", 1))) == ["domain-type"]
    no_qmp = fit().replace("unix:/run/cuju-libvirt/qmp/fit.sock", "unix:/run/other.sock")
    problems = ft.check_fitness(no_qmp)
    assert codes(problems) == ["qmp-socket"]
    assert "xml enable --prepare" in problems[0].fix and "tainted" in problems[0].fix
    legacy = fit().replace("server=on,wait=off", "server,nowait")
    assert ft.check_fitness(legacy) == []
    renamed = fit().replace("<name>fit</name>", "<name>other</name>")
    assert codes(ft.check_fitness(renamed)) == ["qmp-socket"]


def test_qmp_socket_path_limits_and_escaping() -> None:
    assert ft.qmp_argument("a,b") == "unix:/run/cuju-libvirt/qmp/a,,b.sock,server=on,wait=off"
    long_name = "x" * 90
    problems = ft.check_fitness(fit().replace("<name>fit</name>", f"<name>{long_name}</name>"))
    assert codes(problems) == ["qmp-socket"]
    assert "shorten the domain name" in problems[0].fix


def test_output_commit_off_is_a_warning() -> None:
    problems = ft.check_fitness(fit(), dx.FTSpec(peer="b", output_commit=False))
    assert [(p.code, p.severity) for p in problems] == [("output-commit", ft.Severity.WARNING)]


def test_room_for_memory_hot_plug_is_a_warning() -> None:
    """Issue 13: a hot-plugged DIMM's RAM is a file of its own that is not replicated."""
    xml = fit().replace("</name>", "</name><maxMemory slots='2' unit='MiB'>512</maxMemory>", 1)
    problems = ft.check_fitness(xml)
    assert [(p.code, p.severity) for p in problems] == [("memory-hotplug", ft.Severity.WARNING)]
    assert "virsh attach-device" in problems[0].message


def test_spec_defaults_to_the_domains_own_element() -> None:
    xml = dx.set_ft(fit(), dx.FTSpec(peer="b", output_commit=False))
    assert codes(ft.check_fitness(xml)) == ["output-commit"]


# --- prepare ------------------------------------------------------------------------------


def test_prepare_makes_the_safe_changes_and_lists_them() -> None:
    data = read_fixture("openstack-nova.xml")
    result = ft.prepare(data)
    assert result.fit
    text = "\n".join(result.changes)
    assert "added <memoryBacking>" in text
    assert "set <driver name='qemu'> (was 'vhost')" in text
    assert "tainted" in text and "declared xmlns:qemu" in text
    root = etree.fromstring(result.xml)
    assert root.nsmap["qemu"] == QEMU
    driver = root.find("devices/interface/driver")
    assert driver is not None and dict(driver.attrib) == {"name": "qemu", "rx_queue_size": "512"}
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU}}}commandline/{{{QEMU}}}arg")]
    assert args == ["-qmp", "unix:/run/cuju-libvirt/qmp/instance-0000002a.sock,server=on,wait=off"]
    # memoryBacking goes right after <memory>
    tags = [c.tag for c in root if isinstance(c.tag, str)]
    assert tags[tags.index("memory") + 1] == "memoryBacking"


def test_prepare_keeps_other_memory_backing_children_and_fixes_numa() -> None:
    result = ft.prepare(read_fixture("numa.xml"))
    root = etree.fromstring(result.xml)
    backing = root.find("memoryBacking")
    assert backing is not None
    assert [c.tag for c in backing] == ["locked", "source", "access"]
    assert backing.find("source").get("type") == "file"  # type: ignore[union-attr]
    assert [c.get("memAccess") for c in root.iterfind("cpu/numa/cell")] == [None, "shared"]
    driver = root.find("devices/interface/driver")
    assert driver is not None and driver.get("name") == "qemu" and driver.get("queues") == "4"
    assert driver.find("host") is not None


def test_prepare_uses_an_existing_root_declaration_and_commandline() -> None:
    data = read_fixture("root-declared-ns.xml")
    result = ft.prepare(data)
    assert result.fit
    root = etree.fromstring(result.xml)
    assert root.nsmap == {"qemu": QEMU, "nova": "http://openstack.org/xmlns/libvirt/nova/1.1"}
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU}}}commandline/{{{QEMU}}}arg")]
    assert args[:2] == ["-msg", "timestamp=on"] and args[2] == "-qmp"
    assert not any("declared" in c for c in result.changes)


def test_prepare_is_idempotent() -> None:
    once = ft.prepare(read_fixture("virt-install-debian.xml"))
    twice = ft.prepare(once.xml)
    assert twice.changes == []
    assert twice.xml == once.xml


def test_prepare_leaves_unfit_devices_and_reports_them() -> None:
    result = ft.prepare(read_fixture("unfit-passthrough.xml"))
    assert not result.fit
    remaining = codes(result.problems, ft.Severity.ERROR)
    assert remaining.count("hostdev") == 2
    for code in ("vhost-user", "shmem", "vsock", "redirdev", "tpm", "memory-device", "hugepages"):
        assert code in remaining


@pytest.mark.parametrize("name", fixture_names())
def test_prepared_fixtures_validate_unless_unfit(name: str) -> None:
    enabled = dx.set_ft(read_fixture(name), dx.FTSpec.defaults("hostb"))
    result = ft.prepare(enabled, disks=True)
    assert result.fit == (name not in UNFIT), [str(p) for p in result.problems]
    # prepare touches the element only to record the disks and chardevs it rewrote
    prepared = dx.parse_domain(result.xml)
    assert prepared is not None and prepared.replace(disks=(), chardevs=()) == dx.FTSpec.defaults("hostb")
    exports = [d for d in etree.fromstring(result.xml).iterfind("devices/disk") if dx.is_nbd_export(d)]
    assert [d.find("target").get("dev") for d in exports] == [r.target for r in prepared.disks]  # type: ignore[union-attr]


@pytest.mark.skipif(not LIBVIRT_DOMAIN_RNG.exists(), reason="libvirt's domain.rng is not installed")
@pytest.mark.parametrize("name", fixture_names())
def test_enabled_and_prepared_documents_satisfy_libvirts_own_schema(name: str) -> None:
    rng = etree.RelaxNG(etree.parse(str(LIBVIRT_DOMAIN_RNG)))
    original = read_fixture(name)
    assert rng.validate(etree.fromstring(original)), rng.error_log
    enabled = dx.set_ft(original, dx.FTSpec.defaults("hostb"))
    assert rng.validate(etree.fromstring(enabled)), rng.error_log
    prepared = ft.prepare(enabled, disks=True).xml
    assert rng.validate(etree.fromstring(prepared)), rng.error_log


def test_prepare_changes_nothing_it_does_not_list() -> None:
    """A fit domain comes out of prepare canonically identical."""
    data = dx.set_ft(fit(), dx.FTSpec.defaults("b"))
    result = ft.prepare(data)
    assert result.changes == []
    assert c14n(result.xml) == c14n(data)


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["-qmp", "unix:/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off"], True),
        (["-qmp", "unix:/run/cuju-libvirt/qmp/fit.sock,wait=off,server"], True),
        (["-qmp", "unix:/run/cuju-libvirt/qmp/fit.sock,server=on"], False),
        (["-qmp", "unix:/run/cuju-libvirt/qmp/fit.sockx,server=on,wait=off"], False),
        (["-chardev", "socket,id=cq,path=/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off",
          "-mon", "chardev=cq,mode=control"], True),
        (["-mon", "mode=control,chardev=cq",
          "-chardev", "socket,path=/run/cuju-libvirt/qmp/fit.sock,id=cq,server,nowait"], True),
        (["-chardev", "socket,id=cq,path=/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off",
          "-mon", "chardev=other,mode=control"], False),
        (["-chardev", "socket,id=cq,path=/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off",
          "-mon", "chardev=cq,mode=readline"], False),
        (["-chardev", "socket,id=cq,path=/tmp/elsewhere.sock,server=on,wait=off",
          "-mon", "chardev=cq,mode=control"], False),
    ],
)
def test_direct_qmp_socket_forms(args: list[str], ok: bool) -> None:
    values = "".join(f"<qemu:arg value='{a}'/>" for a in args)
    original = (
        "<qemu:arg value='-qmp'/>\n"
        "    <qemu:arg value='unix:/run/cuju-libvirt/qmp/fit.sock,server=on,wait=off'/>"
    )
    assert original in fit()
    xml = fit().replace(original, values)
    assert (codes(ft.check_fitness(xml)) == []) is ok


def test_qemu_option_escaping() -> None:
    name_with_comma = fit().replace("<name>fit</name>", "<name>a,b</name>").replace(
        "qmp/fit.sock", "qmp/a,,b.sock"
    )
    assert ft.check_fitness(name_with_comma) == []
    assert ft.prepare(name_with_comma).changes == []


def test_the_rigs_domain_builder_produces_protectable_domains() -> None:
    """The test rig's builder and these rules agree (the rig's guests are what e2e tests protect)."""
    spec = dx.FTSpec(peer="198.18.0.2", tracker="uffd")
    name = "xmlcli-rig"
    xml = domain_xml(
        name, disk="/tmp/xmlcli-boot.img", bridge="xmlcli-br0", metadata=[dx.element_xml(spec)],
        qemu_args=direct_qmp_args(ft.qmp_socket_path(name)),
    )
    assert dx.parse_domain(xml) == spec
    problems = ft.check_fitness(xml)
    assert [(p.code, p.severity) for p in problems] == [("disk", ft.Severity.WARNING)]
    # without the direct socket, prepare adds it and the result is fit too
    plain = domain_xml(
        name, disk="/tmp/xmlcli-boot.img", bridge="xmlcli-br0", metadata=[dx.element_xml(spec)]
    )
    assert codes(ft.check_fitness(plain), ft.Severity.ERROR) == ["qmp-socket"]
    assert ft.prepare(plain).fit


# --- disks: prepare serves them over NBD, disable gives them back ----------------------------

UUID = "3f2c6a1e-8b4d-4c1a-9e2f-6d7a8b9c0d1e"


def disks_by_target(xml: str | bytes) -> dict[str, etree._Element]:
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    return {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}  # type: ignore[union-attr]


def disk_c14n(disk: etree._Element) -> bytes:
    """Canonical form of one <disk>, without the namespace declarations in scope where it is."""
    clone = etree.fromstring(etree.tostring(disk, with_tail=False))
    etree.cleanup_namespaces(clone)
    return etree.tostring(clone, method="c14n")


@pytest.mark.parametrize("name", fixture_names())
def test_enable_prepare_then_disable_gives_back_every_disk(name: str) -> None:
    """The round trip is exact: what disable gives back is the original with only the
    non-disk changes of prepare (which stay, as documented), canonically equal."""
    original = read_fixture(name)
    prepared = ft.prepare(dx.set_ft(original, dx.FTSpec.defaults("hostb")), disks=True).xml
    disabled = dx.remove_ft(prepared)
    spec = dx.parse_domain(prepared)
    if etree.fromstring(original).find("uuid") is None and spec is not None and (spec.disks or spec.chardevs):
        # prepare gave the domain the <uuid> that names its NBD and chardev sockets; like its other
        # changes outside the disks, it stays
        doc = dx.load_domain(disabled)
        uuid = doc.root.find("uuid")
        assert uuid is not None
        remove_child(uuid)
        disabled = doc.dump()
    assert c14n(disabled) == c14n(ft.prepare(dx.remove_ft(original)).xml)
    before, after = disks_by_target(original), disks_by_target(disabled)
    assert before.keys() == after.keys()
    for target, disk in before.items():
        assert disk_c14n(after[target]) == disk_c14n(disk), target


def test_prepare_serves_every_writable_disk_on_every_bus_and_keeps_the_rest() -> None:
    original = read_fixture("several-disks.xml")
    result = ft.prepare(dx.set_ft(original, dx.FTSpec.defaults("hostb")), disks=True)
    assert result.fit, [str(p) for p in result.problems]
    spec = dx.parse_domain(result.xml)
    assert spec is not None
    assert [(d.target, d.bus, d.format, d.source_type) for d in spec.disks] == [
        ("vda", "virtio", "qcow2", "file"), ("vdb", "virtio", "raw", "block"), ("sda", "scsi", "raw", "file"),
        ("sdb", "sata", "qcow2", "file"), ("sdc", "sata", "raw", "file"),
    ]
    before, after = disks_by_target(original), disks_by_target(result.xml)
    for record in spec.disks:
        disk = after[record.target]
        assert dx.is_nbd_export(disk)
        host = disk.find("source/host")
        assert host is not None and host.get("socket") == ft.nbd_socket_path(UUID, record.target)
        assert host.get("socket") == f"/run/cuju-libvirt/nbd/{UUID}/{record.target}.sock"
        driver = disk.find("driver")
        assert driver is not None
        assert (driver.get("error_policy"), driver.get("rerror_policy")) == ("stop", "stop")
        assert driver.get("type") == record.format
        # everything but type, <source> and the policies is kept as it was, in order
        old = before[record.target]
        kept = [disk_c14n(c) for c in old if c.tag not in ("source", "driver")]
        assert [disk_c14n(c) for c in disk if c.tag not in ("source", "driver")] == kept
        old_driver = old.find("driver")
        if old_driver is not None:
            policies = {"error_policy": "stop", "rerror_policy": "stop",
                        "discard": old_driver.get("discard", "unmap")}
            assert {**old_driver.attrib, **policies} == dict(driver.attrib)
        if old_driver is None or old_driver.get("discard") is None:
            assert driver.get("discard") == "unmap"  # a guest's TRIM reaches the server and replicates
    for untouched in ("sdd", "vdc", "vdd"):  # cdrom, read-only, shareable
        assert disk_c14n(after[untouched]) == disk_c14n(before[untouched])
    warnings = [str(p) for p in result.problems if p.code == "disk"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: <disk> vdd") and "shareable" in warnings[0]
    # the served disks are epoch-protected: no warning of theirs is left (tests/e2e/test_disk_failover.py)
    assert [p.code for p in result.problems] == ["disk"]


def test_validate_warns_only_for_disks_that_are_not_prepared() -> None:
    enabled = dx.set_ft(read_fixture("several-disks.xml"), dx.FTSpec.defaults("hostb"))
    before = [p for p in ft.check_fitness(enabled) if p.code == "disk"]
    assert sorted(p.subject.split()[1] for p in before if "not epoch-protected yet" in p.message) == [
        "sda", "sdb", "sdc", "vda", "vdb"
    ]
    assert all(p.preparable for p in before if "yet" in p.message)
    prepared = ft.prepare(enabled, disks=True).xml
    after = [p for p in ft.check_fitness(prepared) if p.code == "disk"]
    assert [p.subject.split()[1] for p in after] == ["vdd"]
    assert "not epoch-protected yet" not in str(after[0])


def test_disks_that_cannot_be_served_stay_and_are_named_with_the_fix() -> None:
    original = read_fixture("unservable-disks.xml")
    result = ft.prepare(dx.set_ft(original, dx.FTSpec.defaults("hostb")), disks=True)
    assert result.fit
    assert dx.parse_domain(result.xml).disks == ()  # type: ignore[union-attr]
    found = {p.subject.split()[1]: str(p) for p in result.problems if p.code == "disk"}
    expected = {
        "vda": "virsh vol-path", "vdb": "protocol rbd", "sda": "device='disk'", "vdc": "qemu-img convert",
        "vdd": "backing chain", "vde": "remove <transient/>",
    }
    assert found.keys() == expected.keys()
    for target, needle in expected.items():
        assert needle in found[target] and "not epoch-protected" in found[target], found[target]
    before, after = disks_by_target(original), disks_by_target(result.xml)
    assert all(disk_c14n(after[t]) == disk_c14n(d) for t, d in before.items())


def test_without_the_element_prepare_leaves_disks_alone() -> None:
    original = read_fixture("several-disks.xml")
    result = ft.prepare(original, disks=True)
    assert not any(dx.is_nbd_export(d) for d in disks_by_target(result.xml).values())


def test_disks_are_served_by_default_and_left_alone_only_when_asked() -> None:
    """Plain prepare serves every servable writable disk; ``disks=False`` (--no-serve-disks:
    shared storage) keeps them as they are, each with the warning that names the fix."""
    enabled = dx.set_ft(read_fixture("several-disks.xml"), dx.FTSpec.defaults("hostb"))
    served = ft.prepare(enabled)
    assert len(dx.parse_domain(served.xml).disks) == 5  # type: ignore[union-attr]
    unprotected = [p for p in served.problems if "not epoch-protected" in p.message]
    assert all("shareable" in p.message for p in unprotected), unprotected
    result = ft.prepare(enabled, disks=False)
    assert not any(dx.is_nbd_export(d) for d in disks_by_target(result.xml).values())
    assert dx.parse_domain(result.xml).disks == ()  # type: ignore[union-attr]
    yet = [p for p in result.problems if p.code == "disk" and p.preparable]
    assert len(yet) == 5 and all("--prepare" in p.fix for p in yet)


def test_prepare_with_disks_is_idempotent_and_adds_a_missing_uuid() -> None:
    no_uuid = read_fixture("several-disks.xml").replace(f"  <uuid>{UUID}</uuid>\n".encode(), b"")
    once = ft.prepare(dx.set_ft(no_uuid, dx.FTSpec.defaults("hostb")), disks=True)
    uuid = etree.fromstring(once.xml).findtext("uuid")
    assert uuid is not None and any(c.startswith("added <uuid>") for c in once.changes)
    assert disks_by_target(once.xml)["vda"].find("source/host").get("socket") == (  # type: ignore[union-attr]
        f"/run/cuju-libvirt/nbd/{uuid}/vda.sock"
    )
    twice = ft.prepare(once.xml, disks=True)
    assert twice.changes == []
    assert c14n(twice.xml) == c14n(once.xml)


def _prepared() -> bytes:
    enabled = dx.set_ft(read_fixture("several-disks.xml"), dx.FTSpec.defaults("hostb"))
    return ft.prepare(enabled, disks=True).xml


def test_a_copied_domain_gets_its_sockets_repointed() -> None:
    other = "00000000-1111-4222-8333-444444444444"
    copied = _prepared().replace(f"<uuid>{UUID}</uuid>".encode(), f"<uuid>{other}</uuid>".encode())
    problems = [p for p in ft.check_fitness(copied) if p.code == "disk-socket"]
    assert len(problems) == 5 and all(p.is_error and p.preparable for p in problems)
    assert "was the domain copied under a new <uuid>?" in problems[0].message
    fixed = ft.prepare(copied)
    assert fixed.fit and len([c for c in fixed.changes if c.startswith("pointed <disk>")]) == 5
    assert f"/nbd/{other}/vda.sock" in fixed.xml.decode()


def _disk(doc: etree._Element, target: str) -> etree._Element:
    return next(d for d in doc.iterfind("devices/disk") if d.find("target").get("dev") == target)  # type: ignore[union-attr]


def test_an_export_without_record_and_a_record_without_export_are_errors() -> None:
    doc = etree.fromstring(_prepared())
    element = dx.find_ft(doc)
    assert element is not None
    element.remove(element[0])  # drop the record of vda
    problems = ft.errors(ft.check_fitness(etree.tostring(doc)))
    assert [(p.code, p.subject) for p in problems] == [("disk-record", "<disk> vda")]
    assert "no record of the original disk" in problems[0].message
    # the other way: vdb edited back to its block device behind prepare's back
    doc = etree.fromstring(_prepared())
    exported = _disk(doc, "vdb")
    original = disks_by_target(read_fixture("several-disks.xml"))["vdb"]
    original.tail = exported.tail
    doc.find("devices").replace(exported, original)  # type: ignore[union-attr]
    problems = ft.errors(ft.check_fitness(etree.tostring(doc)))
    assert [(p.code, p.subject) for p in problems] == [("disk-record", "<disk> vdb (/dev/vg0/db1-data)")]
    assert "no longer the NBD export" in problems[0].message


def test_error_policies_are_required_on_a_prepared_disk() -> None:
    relaxed = _prepared().replace(b' error_policy="stop" rerror_policy="stop"', b"", 1)
    problems = ft.errors(ft.check_fitness(relaxed))
    assert [(p.code, p.preparable) for p in problems] == [("disk-error-policy", True)]
    assert "pausing the VM" in problems[0].message
    assert ft.prepare(relaxed).fit


def test_a_record_of_a_detached_disk_is_a_warning() -> None:
    prepared = _prepared()
    doc = etree.fromstring(prepared)
    devices = doc.find("devices")
    assert devices is not None
    devices.remove(_disk(doc, "sdc"))
    problems = [p for p in ft.check_fitness(etree.tostring(doc)) if p.code == "disk-record"]
    assert [(p.severity, p.subject) for p in problems] == [(ft.Severity.WARNING, "<cuju:disk target='sdc'>")]


@pytest.mark.parametrize("kind", ["sev", "sev-snp", "s390-pv", "tdx"])
def test_encrypted_guest_ram_is_refused(kind: str) -> None:
    xml = fit().replace("</devices>", f"</devices><launchSecurity type='{kind}'><policy>0x0003</policy>"
                                      "</launchSecurity>")
    problems = ft.check_fitness(xml)
    assert codes(problems, ft.Severity.ERROR) == ["launch-security"], problems
    assert kind in problems[0].subject and "encrypted" in problems[0].message


def _with_os(os_xml: str, devices: str = "") -> str:
    return fit(devices).replace("<os>\n    <type>hvm</type>\n  </os>", os_xml)


def test_an_untested_architecture_is_warned_about() -> None:
    x86 = "<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>"
    assert codes(ft.check_fitness(_with_os(x86))) == []
    assert codes(ft.check_fitness(_with_os("<os><type arch='i686'>hvm</type></os>"))) == []
    problems = ft.check_fitness(_with_os("<os><type arch='aarch64' machine='virt'>hvm</type></os>"))
    assert codes(problems) == ["arch"] and not problems[0].is_error
    assert "aarch64" in problems[0].subject


@pytest.mark.parametrize("os_xml", [
    "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>",
    "<os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>"
    "/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/fit_VARS.fd</nvram></os>",
])
def test_an_efi_variable_store_is_warned_about_like_a_writable_disk(os_xml: str) -> None:
    problems = ft.check_fitness(_with_os(os_xml))
    assert codes(problems) == ["nvram"], problems
    assert "not epoch-protected" in problems[0].message and not problems[0].is_error


@pytest.mark.parametrize(("os_xml", "vhost"), [
    ("<os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>", True),
    ("<os><type arch='s390x' machine='s390-ccw-virtio'>hvm</type></os>", True),
    ("<os><type arch='riscv64' machine='virt'>hvm</type></os>", True),
    ("<os><type arch='x86_64' machine='pc'>hvm</type></os>", False),  # libvirt picks rtl8139 or e1000
    ("<os><type arch='armv7l' machine='vexpress-a9'>hvm</type></os>", False),  # lan9118
])
def test_a_nic_without_a_model_is_judged_by_libvirts_default(os_xml: str, vhost: bool) -> None:
    nic = "<interface type='bridge'><source bridge='br9'/></interface>"
    problems = [p for p in ft.check_fitness(_with_os(os_xml, nic)) if p.code != "arch"]
    assert codes(problems) == (["nic-vhost"] if vhost else []), problems
    prepared = ft.prepare(_with_os(os_xml, nic))
    root = etree.fromstring(prepared.xml.encode())
    nic_el = next(n for n in root.iterfind("devices/interface") if n.find("source").get("bridge") == "br9")
    driver = nic_el.find("driver")
    assert (driver is not None and driver.get("name") == "qemu") is vhost, prepared.changes
    if vhost:
        assert [p for p in ft.check_fitness(prepared.xml) if p.code == "nic-vhost"] == []
