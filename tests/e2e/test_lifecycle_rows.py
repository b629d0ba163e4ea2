"""The rows of docs/failover.md's lifecycle table on one protected guest (issue 13 item 2).

One rig, one cujud pair and one protected counter guest (``lc-rows``, host a -> host b)
serve every test of this module, in the order written: first the operations that leave
protection as it is (reset, reboot, what libvirt itself refuses), then those after which
cujud pairs again with a standby of the new configuration (setvcpus, SCSI hot-plug and
unplug, blockcopy, snapshots, undefine), each test starting from a protected guest. The
last one fails the guest over to host b. Rows that need a guest of their own are in
test_lifecycle.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, cujud_pair
from cuju_libvirt.rig.guests import POWER_OFF, RESET, boot_image, command_guest, read_counter
from cuju_libvirt.rig.hosts import Rig
from tests.e2e.test_lifecycle import advancing, capacity, protect

NAME = "lc-rows"
#: The engine's words when the blob's device sections changed.
DEVICES_CHANGED = "the VM's devices changed"
pytestmark = pytest.mark.timeout(300)


@dataclass
class Row:
    """The module's protected guest."""

    rig: Rig
    ca: Cujud
    cb: Cujud

    @property
    def ram(self) -> Path:
        return self.rig.a.ram_files(NAME)[0]

    def running(self) -> None:
        """Resume the guest if an earlier row left it paused (a failed libvirt job may)."""
        if "paused" in self.rig.a.virsh("domstate", NAME):
            self.rig.a.virsh("resume", NAME, check=False)

    def standby(self) -> int:
        """The pid of the standby's QEMU on host b, once the guest is protected."""
        self.ca.wait_domain(NAME, "protected", timeout=120)
        self.cb.wait_domain(NAME, "standby", timeout=60)
        pid = self.rig.b.qemu_pid(NAME)
        assert pid is not None
        return pid

    def log_since(self, offset: int) -> str:
        return self.ca.log_path.read_text(errors="replace")[offset:]

    def log_size(self) -> int:
        return self.ca.log_path.stat().st_size

    def repaired(self, old_standby: int, offset: int, *causes: str) -> None:
        """cujud ended protection naming one of ``causes`` (libvirt's event, or the device
        sections of the blob, whichever came first) and protects the VM with a new standby."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pid = self.rig.b.qemu_pid(NAME)
            if pid not in (None, old_standby) and (self.ca.domain(NAME) or {}).get("state") == "protected":
                break
            time.sleep(0.1)
        text = self.log_since(offset)
        assert self.rig.b.qemu_pid(NAME) not in (None, old_standby), \
            f"no standby of the new configuration: {text[-3000:]}"
        assert any(cause in text for cause in causes), text[-3000:]
        assert " ERROR " not in text, text[-3000:]
        self.standby()

    def unchanged(self, standby: int, offset: int) -> None:
        """Protection went on with the same standby, and nothing was logged as an error."""
        time.sleep(1.0)
        assert self.rig.b.qemu_pid(NAME) == standby, "the standby was replaced"
        entry = self.ca.domain(NAME)
        assert entry is not None and entry["state"] == "protected", entry
        assert " ERROR " not in self.log_since(offset)


def two_vcpus_one_online(root: etree._Element) -> None:
    """Room for ``virsh setvcpus --live 2``."""
    vcpu = root.find("vcpu")
    assert vcpu is not None
    vcpu.text, vcpu.attrib["current"] = "2", "1"


@pytest.fixture(scope="module")
def row(ft_rig: Rig, counter_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Row]:
    with cujud_pair(ft_rig, logs=tmp_path_factory.mktemp("lc-rows-logs")) as (ca, cb):
        try:
            protect(ft_rig, counter_image, ca, cb, NAME, edit=two_vcpus_one_online)
            yield Row(ft_rig, ca, cb)
        finally:
            cleanup_protected(ft_rig, NAME)


def image(rig: Rig, name: str, size: int = 1 << 20) -> Path:
    """A raw image on the rig's tmpfs (both hosts see it at this path)."""
    path = rig.root / "images" / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    os.chmod(path, 0o666)
    return path


# -- protection goes on ---------------------------------------------------------------------------


def test_virsh_reset_is_replicated_and_protection_goes_on(row: Row) -> None:
    standby, offset = row.standby(), row.log_size()
    assert advancing(row.ram)
    before = read_counter(row.ram)
    row.rig.a.virsh("reset", NAME)
    deadline = time.monotonic() + 30
    while not 0 < read_counter(row.ram) < before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 < read_counter(row.ram) < before, "the guest did not start again from its boot sector"
    row.unchanged(standby, offset)
    assert "the guest was reset" in row.log_since(offset)


def test_virsh_reboot_is_the_guests_business_and_protection_goes_on(row: Row) -> None:
    """libvirt asks the guest over ACPI; the counter guest ignores it. Like `shutdown`,
    libvirt may refuse it while it sees an epoch's pause."""
    standby, offset = row.standby(), row.log_size()
    for _ in range(20):
        try:
            row.rig.a.virsh("reboot", NAME)
            break
        except RigError as err:
            assert "not running" in str(err), err
    else:
        pytest.fail("virsh reboot refused 20 times in a row")
    assert advancing(row.ram)
    row.unchanged(standby, offset)


@pytest.mark.parametrize(("args", "words"), [
    (("setmem", NAME, "32M", "--live"), "balloon"),
    (("domrename", NAME, "lc-renamed"), "active"),
    (("dompmsuspend", NAME, "mem"), "agent"),
    (("snapshot-create-as", NAME, "internal"), "internal"),
])
def test_operations_libvirt_refuses_leave_protection_alone(row: Row, args: tuple[str, ...],
                                                           words: str) -> None:
    """No balloon device (the rig's guests have none), no renaming of a running domain, no
    guest agent for S3, no internal snapshot of a raw disk: libvirt itself says no."""
    standby, offset = row.standby(), row.log_size()
    for _ in range(20):  # some of them, like shutdown, are refused during an epoch's pause too
        with pytest.raises(RigError) as refused:
            row.rig.a.virsh(*args)
        if "domain is not running" not in str(refused.value):
            break
    print(f"virsh {args[0]}: {refused.value}")
    assert words in str(refused.value).lower(), refused.value
    assert advancing(row.ram)
    row.unchanged(standby, offset)


# -- the guest's own reset and poweroff (a guest of its own that obeys a command word) ----------------


def test_the_guest_resets_and_powers_off_itself_under_protection(row: Row) -> None:
    """A reset from inside the guest is replicated like `virsh reset`; its poweroff (ACPI S5)
    ends protection as a deliberate stop: the standby is dropped, one INFO line, no ERROR."""
    name = "lc-power"
    try:
        ram = protect(row.rig, boot_image(power=True), row.ca, row.cb, name)
        standby, offset = row.rig.b.qemu_pid(name), row.log_size()
        assert advancing(ram)
        before = read_counter(ram)
        command_guest(ram, RESET)
        deadline = time.monotonic() + 30
        while not 0 < read_counter(ram) < before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < read_counter(ram) < before, "the guest did not reset itself"
        time.sleep(1.0)
        assert row.rig.b.qemu_pid(name) == standby, "the standby was replaced"
        assert (row.ca.domain(name) or {}).get("state") == "protected"
        assert "the guest was reset" in row.log_since(offset)
        command_guest(ram, POWER_OFF)
        deadline = time.monotonic() + 30
        while (row.rig.a.qemu_pid(name) or row.rig.b.qemu_pid(name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert row.rig.a.qemu_pid(name) is None, "the guest did not power off"
        assert row.rig.b.qemu_pid(name) is None, "the standby must be dropped"
        text = row.log_since(offset)
        deadline = time.monotonic() + 10
        while "the VM ended (deliberate" not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            text = row.log_since(offset)
        print("\n".join(line for line in text.splitlines() if name in line and "DEBUG" not in line))
        assert "the VM ended (deliberate" in text, text[-3000:]
        assert " ERROR " not in text, text[-3000:]
        deadline = time.monotonic() + 15  # libvirt says "in shutdown" until it has reaped QEMU
        while "shut off" not in row.rig.a.virsh("domstate", name) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "shut off" in row.rig.a.virsh("domstate", name)
    finally:
        cleanup_protected(row.rig, name)


# -- protection ends and is established again with the new configuration ---------------------------


def test_setvcpus_hot_plug_pairs_again_with_a_standby_of_two_vcpus(row: Row) -> None:
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("setvcpus", NAME, "2", "--live")
    row.repaired(standby, offset, DEVICES_CHANGED)
    assert row.rig.b.virsh("vcpucount", NAME, "--live", "--active").strip() == "2"
    assert advancing(row.ram)


SCSI_CONTROLLER = "<controller type='scsi' index='0' model='virtio-scsi'/>"
SCSI_DISK = """<disk type='file' device='disk'>
  <driver name='qemu' type='raw'/>
  <source file='{path}'/>
  <target dev='sdb' bus='scsi'/>
</disk>
"""


def test_a_scsi_disk_plugged_and_unplugged_pairs_again_each_time(row: Row) -> None:
    """SCSI unplug needs no help from the guest (a PCI NIC's would: the counter guest
    ignores ACPI), so libvirt's device-removed event comes."""
    xml = row.rig.root / "lc-scsi.xml"
    xml.write_text(SCSI_CONTROLLER)
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("attach-device", NAME, str(xml), "--live")
    row.repaired(standby, offset, "was hot-plugged", DEVICES_CHANGED)
    xml.write_text(SCSI_DISK.format(path=image(row.rig, "lc-scsi.img")))
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("attach-device", NAME, str(xml), "--live")
    row.repaired(standby, offset, "was hot-plugged", DEVICES_CHANGED)
    assert "lc-scsi.img" in row.rig.b.virsh("dumpxml", NAME)
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("detach-device", NAME, str(xml), "--live")
    row.repaired(standby, offset, "was unplugged (virsh detach-device)", DEVICES_CHANGED)
    assert "lc-scsi.img" not in row.rig.b.virsh("dumpxml", NAME)


def test_blockcopy_with_pivot_pairs_again_with_the_standby_on_the_copy(row: Row) -> None:
    copy = row.rig.root / "images" / "lc-copy.img"
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("blockcopy", NAME, "hda", str(copy), "--wait", "--pivot", "--transient-job", timeout=120)
    row.repaired(standby, offset, "virsh blockcopy of disk hda finished")
    assert str(copy) in row.rig.b.virsh("dumpxml", NAME)
    assert advancing(row.ram)


def test_blockresize_pairs_again_with_a_standby_of_the_new_size(row: Row) -> None:
    """libvirt and QEMU send no event for a resize: before, the standby kept the old size,
    and after a failover the guest would have seen its disk shrink back."""
    standby, offset = row.standby(), row.log_size()
    old = capacity(row.rig.a, NAME)
    assert capacity(row.rig.b, NAME) == old
    new = old + (1 << 20)
    row.rig.a.virsh("blockresize", NAME, "hda", f"{new}B")
    assert capacity(row.rig.a, NAME) == new
    row.repaired(standby, offset, "disk hda was resized")
    assert capacity(row.rig.b, NAME) == new, "the standby opened the disk at its old size"
    assert advancing(row.ram)


def snapshot(row: Row, name: str, stem: str, *args: str) -> Path:
    """``virsh snapshot-create-as`` of hda onto a new overlay; its path. Seen in 2 of ~8 runs
    (cause not found, docs/failover.md): libvirt's own "failed to format image: 'Could not
    resize image: Failed to grow the L1 table: Bad file descriptor'", after which a live
    snapshot leaves the VM paused; one more try then."""
    for attempt in range(2):
        overlay = row.rig.root / "images" / f"{stem}{attempt}.qcow2"
        try:
            row.rig.a.virsh("snapshot-create-as", NAME, name, "--no-metadata", *args,
                            "--diskspec", f"hda,file={overlay}", timeout=180)
            return overlay
        except RigError as err:
            if attempt or "failed to format image" not in str(err):
                raise
            print(f"snapshot-create-as failed, trying once more: {err}")
            row.running()
            row.standby()
    raise AssertionError("unreachable")


def test_external_disk_snapshot_pairs_again_with_the_standby_on_the_overlay(row: Row) -> None:
    standby, offset = row.standby(), row.log_size()
    overlay = snapshot(row, "ext", "lc-overlay", "--disk-only")
    row.repaired(standby, offset, "snapshot")
    assert str(overlay) in row.rig.b.virsh("dumpxml", NAME)
    assert advancing(row.ram)


def test_external_live_snapshot_with_memory_pairs_again(row: Row) -> None:
    memory = row.rig.root / "images" / "lc-live.mem"
    standby, offset = row.standby(), row.log_size()
    overlay = snapshot(row, "live", "lc-live", "--live", "--memspec", f"file={memory},snapshot=external")
    # libvirt's own job stops the VM after the RAM save and resumes it after the disks: an
    # epoch that meets that resume is discarded (before the fix: ERROR "epoch loop failed")
    row.repaired(standby, offset, "snapshot", "resumed by someone else")
    assert memory.stat().st_size > 0
    # a pairing that read the XML before libvirt moved the disks is caught by the disk watch
    deadline = time.monotonic() + 90
    while str(overlay) not in row.rig.b.virsh("dumpxml", NAME, check=False) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert str(overlay) in row.rig.b.virsh("dumpxml", NAME)
    row.standby()
    assert advancing(row.ram)


def test_managedsave_ends_protection_and_the_next_start_continues_protected(row: Row) -> None:
    row.standby()
    offset = row.log_size()
    row.rig.a.virsh("managedsave", NAME, timeout=120)
    deadline = time.monotonic() + 30
    while row.rig.b.qemu_pid(NAME) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert row.rig.b.qemu_pid(NAME) is None, "the standby must be dropped"
    assert "the VM ended (deliberate" in row.log_since(offset)
    row.rig.a.virsh("start", NAME)  # from the managed save image
    row.standby()
    assert read_counter(row.ram) > 0, "the VM started from scratch, not from its managed save"
    assert advancing(row.ram)
    assert " ERROR " not in row.log_since(offset)


def test_undefine_pairs_again_and_a_failover_then_leaves_the_vm_transient(row: Row) -> None:
    """The standby defined the old persistent XML after a failover: an undefined VM came
    back persistent on host b. Last test of the module: the guest ends up on host b."""
    standby, offset = row.standby(), row.log_size()
    row.rig.a.virsh("undefine", NAME)
    row.repaired(standby, offset, "virsh undefine")
    committed = row.ca.committed_checkpoint(NAME, lambda: read_counter(row.ram))
    os.kill(row.rig.a.qemu_pid(NAME) or 0, signal.SIGKILL)
    row.cb.wait_failed_over(NAME, timeout=60)
    ram_b = row.rig.b.ram_files(NAME)[0]
    # the counter guest has no output: what it must keep is what a committed epoch held
    assert read_counter(ram_b) >= committed, (read_counter(ram_b), committed)
    assert advancing(ram_b), "the VM does not run on host b after the failover"
    info = row.rig.b.virsh("dominfo", NAME)
    assert any(line.split() == ["Persistent:", "no"] for line in info.splitlines()), info
