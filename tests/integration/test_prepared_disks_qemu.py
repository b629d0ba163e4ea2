"""A domain prepared by ``xml enable --prepare``, started by libvirt's real QEMU driver.

The XML side of replicated disks checked on the real stack: libvirt 9.0's QEMU driver
(embedded, ``qemu:///embed?root=DIR``: no daemon, all state under DIR) turns the prepared
disks into NBD block nodes on the UNIX sockets, the hook's launcher starts the block servers
(nbdkit with the journaling plugin) on exactly those sockets, and writes on three
buses (virtio-blk, virtio-scsi, SATA), raw and qcow2, go through them into the images. Then
``xml disable`` gives back disks that QEMU opens as plain files again. Opt-in (CUJU_SLOW=1):
the embedded driver's first capability probe takes about a minute here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cuju_libvirt import disk_server
from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from cuju_libvirt.hooks.qemu import start_disk_servers, stop_disk_servers

libvirt = pytest.importorskip("libvirt")
libvirt_qemu = pytest.importorskip("libvirt_qemu")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver runs QEMU as root here"),
    pytest.mark.skipif(
        not (shutil.which("nbdkit") and shutil.which("qemu-img") and disk_server.PLUGIN.is_file()),
        reason="needs nbdkit, qemu-img and the plugin (scripts/setup.sh)",
    ),
]

Disk = tuple[str, str, str, str]  # target, bus, format, the qdev path of its block backend (HMP qemu-io)
VIRTIO: Disk = ("vda", "virtio", "raw", "/machine/peripheral/virtio-disk0/virtio-backend")
SCSI: Disk = ("sda", "scsi", "raw", "scsi0-0-0-0")
SATA: Disk = ("sdb", "sata", "raw", "sata0-0-1")
SIZE = 16 << 20


def domain(name: str, uuid: str, images: dict[str, Path], disks_: tuple[Disk, ...]) -> str:
    disks = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{images[target]}'/>
      <target dev='{target}' bus='{bus}'/>
    </disk>"""
        for target, bus, fmt, _ in disks_
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>{disks}
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='sata' index='0'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def embedded() -> Iterator[Any]:
    """A connection to an embedded QEMU driver in a fresh directory, with its event loop running
    (one per process: libvirt refuses a second embedded root)."""
    # a short path: the driver's monitor socket lives under it (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="cuju-dx-", dir="/tmp"))
    (root / "etc").mkdir(parents=True)
    # no virtlogd here; QEMU as root so that it reaches the sockets without a relabel
    (root / "etc" / "qemu.conf").write_text('stdio_handler = "file"\nuser = "root"\ngroup = "root"\n')
    libvirt.virEventRegisterDefaultImpl()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            libvirt.virEventRunDefaultImpl()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    conn = None
    try:
        conn = libvirt.open(f"qemu:///embed?root={root}")
        yield conn
    finally:
        for dom in conn.listAllDomains() if conn is not None else []:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        if conn is not None:
            conn.close()
        stop.set()
        thread.join(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


def hmp(dom: Any, command: str) -> str:
    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    return str(libvirt_qemu.qemuMonitorCommand(dom, command, flags))


def block_nodes(dom: Any) -> dict[str, str]:
    """Each format node's image: the NBD export for a served disk, the file otherwise."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    nodes = {}
    for device in reply["return"]:
        inserted = device.get("inserted")
        if inserted:
            nodes[device["qdev"]] = inserted["image"]["filename"]
    return nodes


def read_back(image: Path, fmt: str, offset: int, pattern: int) -> bool:
    """Whether the image holds ``pattern`` at ``offset`` (4 KiB), read by QEMU's own qemu-io."""
    done = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, str(image), "-c", f"read -P {pattern:#x} {offset} 4k"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def write_through_block_servers(embedded: Any, tmp_path: Path, disks: tuple[Disk, ...]) -> None:
    uuid = str(uuid_module.uuid4())
    name = f"dxnbd-{uuid[:8]}"
    images = {}
    for target, _, fmt, _ in disks:
        images[target] = tmp_path / f"{target}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(images[target]), str(SIZE)], check=True)
    original = domain(name, uuid, images, disks)
    prepared = ft.prepare(dx.set_ft(original, dx.FTSpec.defaults("hostb")), disks=True)
    # only the disks: this test is about them (the direct QMP socket would need /run/cuju-libvirt/qmp)
    doc = dx.load_domain(prepared.xml)
    qemu = doc.root.find(f"{{{ft.QEMU_NAMESPACE}}}commandline")
    assert qemu is not None
    doc.root.remove(qemu)
    spec = dx.parse_domain(doc.to_str())
    assert spec is not None and [d.target for d in spec.disks] == [t for t, *_ in disks]
    socket_dir = Path(ft.nbd_socket_path(uuid, "x")).parent
    offsets = {target: 4096 * (i + 1) for i, (target, *_) in enumerate(disks)}
    try:
        start_disk_servers(uuid, spec.disks)
        dom = embedded.defineXML(doc.to_str())
        # libvirt kept the disks as prepared and the records with them
        assert dx.parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == spec
        dom.create()
        nodes = block_nodes(dom)
        for target, _, _, qdev in disks:
            socket = ft.nbd_socket_path(uuid, target)
            assert any(socket in image for image in nodes.values()), (target, nodes)
            out = hmp(dom, f'qemu-io -d {qdev} "write -P 0xab {offsets[target]} 4k"')
            assert "error" not in out.lower(), (target, out)
            # a qcow2 keeps its new mappings in QEMU's cache until a flush, as on a local file
            assert "error" not in hmp(dom, f'qemu-io -d {qdev} "flush"').lower()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # no I/O error paused it
        dom.destroy()
        for target, _, fmt, _ in disks:
            assert read_back(images[target], fmt, offsets[target], 0xAB), target
        # disable gives back the original disks; QEMU opens them as files again
        restored = dx.remove_ft(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        dom = embedded.defineXML(restored)
        dom.create()
        assert sorted(block_nodes(dom).values()) == sorted(str(p) for p in images.values())
        dom.destroy()
    finally:
        stop_disk_servers(uuid, spec.disks)
        for d in spec.disks:
            disk_server.forget(disk_server.ServerPaths.of(uuid, d.target))
        with contextlib.suppress(FileNotFoundError, OSError):
            for leftover in socket_dir.iterdir():
                leftover.unlink()
            socket_dir.rmdir()


@pytest.mark.timeout(600)
def test_a_prepared_domain_writes_through_its_block_servers_on_three_buses(
    embedded: Any, tmp_path: Path
) -> None:
    write_through_block_servers(embedded, tmp_path, (VIRTIO, SCSI, SATA))


@pytest.mark.timeout(600)
def test_a_prepared_qcow2_disk_can_allocate(embedded: Any, tmp_path: Path) -> None:
    """The server exports more than the qcow2 file holds, so that new clusters can be allocated."""
    write_through_block_servers(embedded, tmp_path, (("vda", "virtio", "qcow2", VIRTIO[3]),))
