"""The libvirt QEMU hook: ``/etc/libvirt/hooks/qemu.d/cuju DOMAIN OPERATION SUB-OPERATION -``.

libvirt runs it with the domain XML on stdin while it holds the domain's job, so it never
calls libvirt (that would deadlock) and never leaves a child process; it only talks to the
local cujud over its control socket, with a short timeout. Domains without ``<cuju:ft>``
cost one read of stdin and one ``bytes in`` test (the shim does it before importing this).

==============  ============================================================================
operation       what the hook does
==============  ============================================================================
prepare begin   validate ``<cuju:ft>`` and the domain's fitness, create the direct-QMP socket
                directory for QEMU's user, start the chardev server of the held serial
                ports (also for a standby: its QEMU connects to it too), start the block
                server of every prepared disk
                (``<cuju:disk>``: QEMU reaches it over NBD; the hook starts it itself, so
                that the VM starts whether cujud runs or not, and the server is nbdkit's
                own daemon, no child of the hook, cujud or libvirtd), ask cujud whether the
                domain may start here (not while the peer holds it after a failover) and can
                be protected now (cujud runs, the peer is connected). If not:
                ``on-peer-unavailable`` decides — ``refuse-start`` exits 1 with a one-line
                reason (``virsh start`` shows it), ``start-unprotected`` exits 0 and says so
                in the log.
started begin   ask cujud to protect the domain (cujud does the work on its own threads)
stopped end     tell cujud; cujud tells a deliberate stop from a crash itself
release end     stop the disks' block servers (their journals stay for a later resync); tell
                the chardev server to exit once it holds nothing
reconnect begin ask cujud to (re-)protect the domain after a libvirtd restart
migrate begin   (on the destination of ``virsh migrate``) refuse: the VM's standby and
                replication stay with the source; say what to do instead
==============  ============================================================================

A standby (its XML carries ``-incoming``) is cujud's own creation: the hook only prepares
its socket directory. Lines go to stderr (libvirt's log; shown by ``virsh start`` when
the hook refuses) and to ``/var/log/cuju-libvirt/hook.log``.
"""

from __future__ import annotations

import os
import pwd
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lxml import etree

from cuju_libvirt import chardev_server, disk_server
from cuju_libvirt.chardev_xml import holdable_targets
from cuju_libvirt.cujud import records
from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.cujud.standby import is_standby_xml
from cuju_libvirt.disk_xml import FTDisk
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CujuError
from cuju_libvirt.fitness import QMP_SOCKET_DIR, check_fitness, errors

FT_NAMESPACE_BYTES = b"https://cuju-ft.github.io/libvirt/ft/1.0"
CONTROL_SOCKET = Path("/run/cuju-libvirt/cujud.sock")
LOG_FILE = Path("/var/log/cuju-libvirt/hook.log")
QEMU_USER = "libvirt-qemu"
CONTROL_TIMEOUT = 5.0


def _log(domain: str, message: str, *, stderr: bool = False) -> None:
    line = f"cuju hook: {domain}: {message}"
    if stderr:
        print(line, file=sys.stderr)
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOG_FILE, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
    except OSError:
        pass


def _call(method: str, params: dict[str, object]) -> dict[str, object]:
    with ControlClient(CONTROL_SOCKET, timeout=CONTROL_TIMEOUT) as client:
        return client.call(method, params)


def make_qmp_dir() -> None:
    """``/run/cuju-libvirt/qmp``, owned by QEMU's user so that QEMU can create its socket there."""
    path = Path(QMP_SOCKET_DIR)
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        user = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return  # QEMU runs as root here
    st = path.stat()
    if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
        os.chown(path, user.pw_uid, user.pw_gid)


def start_disk_servers(uuid: str, disks: Sequence[FTDisk]) -> None:
    """The block server of each prepared disk, serving the primary's image (idempotent)."""
    for d in disks:
        disk_server.start(disk_server.ServerPaths.of(uuid, d.target), d.source, target=d.target,
                          export_size=disk_server.export_size_for(d.source, d.format),
                          owner=disk_server.qemu_owner())


def stop_disk_servers(uuid: str, disks: Sequence[FTDisk]) -> None:
    for d in disks:
        disk_server.stop(disk_server.ServerPaths.of(uuid, d.target))


def start_chardev_server(uuid: str, xml: bytes) -> None:
    """The chardev server of the held serial ports (primary and standby alike: both QEMUs
    connect to it at start); idempotent."""
    spec = parse_domain(xml)
    if spec is None or not spec.chardevs:
        return
    targets = holdable_targets(spec.chardevs, etree.fromstring(xml))
    chardev_server.start(chardev_server.ServerPaths.of(uuid), targets, owner=disk_server.qemu_owner())


def finish_chardev_server(uuid: str, xml: bytes) -> None:
    spec = parse_domain(xml)
    if spec is not None and spec.chardevs:
        chardev_server.finish(chardev_server.ServerPaths.of(uuid))


def _uuid(xml: bytes) -> str:
    root = etree.fromstring(xml)
    return (root.findtext("uuid") or "").strip()


def prepare(domain: str, xml: bytes) -> int:
    make_qmp_dir()
    try:
        start_chardev_server(_uuid(xml), xml)
    except CujuError as err:
        _log(domain, f"refusing to start: its held serial ports cannot be served: {err}", stderr=True)
        return 1
    if is_standby_xml(xml):
        return 0
    try:
        spec = parse_domain(xml)
    except CujuError as err:
        _log(domain, f"refusing to start: {err}", stderr=True)
        return 1
    if spec is None:
        return 0
    uuid = _uuid(xml)
    ceded = records.read(records.DEFAULT_STATE_DIR, records.CEDED, uuid)
    if ceded is not None:
        _log(domain, f"refusing to start: this host ceded it to {ceded.get('peer')} after a failover "
                     f"({ceded.get('reason')}); it runs there", stderr=True)
        return 1
    if spec.disks:
        try:
            start_disk_servers(uuid, spec.disks)
        except CujuError as err:
            _log(domain, f"refusing to start: its disks cannot be served: {err}", stderr=True)
            return 1
    why = ""
    problems = errors(check_fitness(xml, spec))
    if problems:
        why = f"the domain cannot be protected: {problems[0]}"
    else:
        try:
            answer = _call("hook-prepare", {"name": domain, "uuid": uuid, "xml": xml.decode()})
        except CujuError as err:
            answer = {"start": True, "protect": False, "reason": str(err)}
            if records.read(records.DEFAULT_STATE_DIR, records.PROTECTED, uuid) is not None:
                answer = {"start": False, "reason": "the VM was protected when this host last ran it and "
                          f"cujud cannot ask the peer whether it took it over ({err})"}
        if not answer.get("start", True):
            _log(domain, f"refusing to start: {answer.get('reason')}", stderr=True)
            return 1
        if not answer.get("protect"):
            why = f"protection cannot be established: {answer.get('reason')}"
    if not why:
        return 0
    if spec.on_peer_unavailable == "refuse-start":
        _log(domain, f"refusing to start (on-peer-unavailable='refuse-start'): {why}", stderr=True)
        return 1
    _log(domain, f"starting UNPROTECTED (on-peer-unavailable='start-unprotected'): {why}")
    return 0


def notify(domain: str, method: str, xml: bytes) -> int:
    if is_standby_xml(xml):
        return 0
    try:
        answer = _call(method, {"name": domain, "uuid": _uuid(xml), "xml": xml.decode()})
    except CujuError as err:
        _log(domain, f"{method}: cujud did not take it: {err}; the domain runs UNPROTECTED")
        return 0
    _log(domain, f"{method}: {answer}")
    return 0


def release(domain: str, xml: bytes) -> int:
    """QEMU is gone: its disks' servers go too (a standby's are cujud's); its chardev server
    goes once it holds nothing (a crashed primary's holds the tail until cujud settles it)."""
    finish_chardev_server(_uuid(xml), xml)
    if is_standby_xml(xml):
        return 0
    spec = parse_domain(xml)
    if spec is not None and spec.disks:
        stop_disk_servers(_uuid(xml), spec.disks)
        _log(domain, f"stopped the block servers of {', '.join(d.target for d in spec.disks)}")
    return 0


def refuse_migration(domain: str, xml: bytes) -> int:
    """``virsh migrate`` of a protected domain: this host would get a VM whose standby and
    replication stay behind with the source (and, for the peer host, a second copy next to
    its own standby). Refused here, on the destination, before anything is started."""
    if is_standby_xml(xml):
        return 0
    _log(domain, "refusing virsh migrate of a protected domain: its standby and its replication "
         "cannot follow it. To move it to its peer host, fail over there instead (cuju-libvirt takeover "
         f"{domain} on the backup); to move it elsewhere, remove <cuju:ft> (cuju-libvirt xml disable), "
         "restart it, migrate, then protect it again", stderr=True)
    return 1


def run(argv: Sequence[str], xml: bytes) -> int:
    """The hook's work for ``argv`` = DOMAIN OPERATION SUB-OPERATION EXTRA; its exit status."""
    if len(argv) < 3 or FT_NAMESPACE_BYTES not in xml:
        return 0
    domain, operation, sub = argv[0], argv[1], argv[2]
    try:
        if (operation, sub) == ("prepare", "begin"):
            return prepare(domain, xml)
        if (operation, sub) in (("started", "begin"), ("reconnect", "begin")):
            return notify(domain, "protect", xml)
        if (operation, sub) == ("stopped", "end"):
            return notify(domain, "hook-stopped", xml)
        if (operation, sub) == ("release", "end"):
            return release(domain, xml)
        if (operation, sub) == ("migrate", "begin"):
            return refuse_migration(domain, xml)
    except Exception as err:  # never a traceback into libvirt's log; never block a start by accident
        _log(domain, f"{operation} {sub}: internal error: {err}", stderr=True)
        return 1 if operation == "prepare" else 0
    return 0


def main() -> int:
    xml = sys.stdin.buffer.read()
    return run(sys.argv[1:], xml)


if __name__ == "__main__":
    sys.exit(main())
