"""The demo behind ``scripts/demo.sh`` (``python -m cuju_libvirt.rig demo``), as a list of steps.

Today: build the boot-sector guest, bring up the two hosts, mark a plain domain XML for
protection with ``cuju-libvirt xml enable --prepare`` (peer: host b), validate it, define it on
host a with ``virsh define``, show its ``<cuju:ft>`` settings, start it, watch it count, tear
everything down. Each step prints the commands a person would type.
Later steps (pairing, replication lag, killing the primary, the VM running on host b) are
appended to :data:`STEPS`.
"""

from __future__ import annotations

import functools
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cuju_libvirt import FT_NAMESPACE
from cuju_libvirt.errors import RigError
from cuju_libvirt.fitness import QMP_SOCKET_DIR
from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.guests import boot_image, read_counter, serial_counts
from cuju_libvirt.rig.hosts import LAN_BRIDGE, Host, Rig
from cuju_libvirt.rig.sandbox import tool

DOMAIN = "demo-vm"
MAC = "52:54:00:19:00:64"


@dataclass
class Demo:
    """What the steps share."""

    base: Path | None
    keep: bool
    out: Callable[[str], None] = field(default=functools.partial(print, flush=True))
    rig: Rig | None = None
    image: Path | None = None
    xml_file: Path | None = None
    counters: list[int] = field(default_factory=list)

    @property
    def the_rig(self) -> Rig:
        if self.rig is None:
            raise RigError("the rig is not up")
        return self.rig

    def sh(self, argv: Sequence[str], *, shown: Sequence[str] | None = None, into: Path | None = None) -> str:
        """Run a command as a person would, echoing it (as ``shown``) and its output
        (stdout goes to file ``into`` instead, shown as ``> into``)."""
        line = shlex.join(shown or argv) + (f" > {shlex.quote(str(into))}" if into else "")
        self.out(f"  $ {line}")
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120,
                              stdin=subprocess.DEVNULL)
        if into is not None:
            into.write_text(proc.stdout)
        for text in ((proc.stdout if into is None else "") + proc.stderr).rstrip().splitlines():
            self.out(f"    {text}")
        if proc.returncode != 0:
            raise RigError(f"{line} failed (exit {proc.returncode})")
        return proc.stdout

    def cuju_libvirt(self, *args: str, into: Path | None = None) -> str:
        """``cuju-libvirt ARGS`` (run from this Python, shown under its installed name)."""
        argv = [sys.executable, "-m", "cuju_libvirt.cli", *args]
        return self.sh(argv, shown=["cuju-libvirt", *args], into=into)

    def virsh(self, host: Host, *args: str) -> str:
        return self.sh([tool("virsh"), "-c", host.uri, *args], shown=["virsh", "-c", host.uri, *args])


def build_guest(demo: Demo) -> None:
    demo.image = boot_image()
    demo.out(f"  boot-sector counter guest: {demo.image} (built once, then cached)")


def bring_up(demo: Demo) -> None:
    demo.rig = Rig(base=demo.base, owned=not demo.keep).up()
    for host in demo.rig.hosts.values():
        demo.out(f"  host {host.name}: {host.hostname}, FT link {host.ft_address}, LAN {host.lan_address}")
        demo.out(f"    URI {host.uri}")


def define(demo: Demo) -> None:
    rig = demo.the_rig
    if demo.image is None:
        raise RigError("no guest image: the build step did not run")
    disk = rig.stage_file(demo.image, f"{DOMAIN}.img")  # its own copy: QEMU locks images it writes
    plain = rig.root / f"{DOMAIN}.plain.xml"
    plain.write_text(domain_xml(
        DOMAIN, memory_mib=64, disk=disk, serial_log=f"/var/log/libvirt/qemu/{DOMAIN}-serial.log",
        bridge=LAN_BRIDGE, mac=MAC,
    ))
    demo.xml_file = rig.root / f"{DOMAIN}.xml"
    demo.out(f"  {plain}: an ordinary TCG domain (file-backed RAM, virtio NIC on br-lan)")
    demo.cuju_libvirt("xml", "enable", str(plain), "--peer", rig.b.ft_address, "--link", rig.b.ft_address,
                      "--prepare", into=demo.xml_file)
    demo.cuju_libvirt("xml", "validate", str(demo.xml_file))
    demo.virsh(rig.a, "define", str(demo.xml_file))


def show_ft(demo: Demo) -> None:
    rig = demo.the_rig
    demo.virsh(rig.a, "metadata", DOMAIN, "--uri", FT_NAMESPACE)
    demo.cuju_libvirt("show", DOMAIN, "-c", rig.a.uri)


def start(demo: Demo) -> None:
    rig = demo.the_rig
    # The direct QMP socket that 'xml enable --prepare' added lives in cujud's run directory.
    # cujud does not run in this demo yet, so make the directory as it will.
    demo.out(f"  on host a: install -d -o libvirt-qemu -g libvirt-qemu -m 0750 {QMP_SOCKET_DIR}")
    rig.a.run(["install", "-d", "-o", "libvirt-qemu", "-g", "libvirt-qemu", "-m", "0750", QMP_SOCKET_DIR])
    demo.virsh(rig.a, "start", DOMAIN)
    demo.virsh(rig.a, "list")


def watch(demo: Demo, samples: int = 5, interval: float = 0.5) -> None:
    rig = demo.the_rig
    ram = rig.a.ram_files(DOMAIN)[0]
    serial = rig.a.outside(f"/var/log/libvirt/qemu/{DOMAIN}-serial.log")
    demo.out(f"  guest RAM file: {ram}")
    demo.out(f"  COM1 log:       {serial}")
    deadline = time.monotonic() + 30
    while read_counter(ram) == 0:
        if time.monotonic() > deadline:
            raise RigError(f"the guest did not start counting within 30 s (see {rig.a.log_file(DOMAIN)})")
        time.sleep(0.1)
    for _ in range(samples):
        counts = serial_counts(serial.read_text(errors="replace"))
        value = read_counter(ram)
        demo.counters.append(value)
        last = counts[-1] if counts else "-"
        demo.out(f"  counter in guest RAM: {value:>8}   last value on COM1: {last:>8}")
        time.sleep(interval)
    if demo.counters[-1] <= demo.counters[0]:
        raise RigError(f"the counter did not advance: {demo.counters}")


#: The demo, in order: (title, step).
STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("Build the test guest", build_guest),
    ("Bring up two libvirt hosts (cuju-a, cuju-b) on this machine", bring_up),
    ("Mark a VM for protection and define it on host a with virsh", define),
    ("Show its <cuju:ft> settings", show_ft),
    ("Start it", start),
    ("Watch it count", watch),
]


def run_demo(base: Path | None = None, keep: bool = False) -> int:
    """Run every step; tear the rig down at the end (also on failure) unless ``keep``."""
    demo = Demo(base=base, keep=keep)
    t0 = time.monotonic()
    try:
        for number, (title, step) in enumerate(STEPS, 1):
            demo.out(f"\n== {number}/{len(STEPS)} {title}")
            step(demo)
    finally:
        if demo.rig is not None and not keep:
            demo.out("\n== Tear everything down")
            demo.rig.down()
            demo.out(f"  rig {demo.rig.id} removed: no daemons, guests, namespaces or mounts left")
        elif demo.rig is not None:
            demo.out(f"\n== The rig stays up: python -m cuju_libvirt.rig down {demo.rig.id}")
    demo.out(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
    return 0
