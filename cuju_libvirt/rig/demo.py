"""The demo behind ``scripts/demo.sh`` (``python -m cuju_libvirt.rig demo``), as a list of steps.

Build the boot-sector guest, bring up the two hosts, mark a plain domain XML (boot disk plus
an ext4 data disk) for protection with ``cuju-libvirt xml enable --prepare`` (peer: host b; both
disks served and replicated), validate it, define it on host a with ``virsh define``, show its
``<cuju:ft>`` settings, start it, watch it count, kill its QEMU, see it run on host b with the
data disk's file system clean and its file intact on host b's copy, tear everything down.
Each step prints the commands a person would type; the steps are :data:`STEPS`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cuju_libvirt import FT_NAMESPACE
from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.cujud import CONTROL_SOCKET, HOOK_NAME, METRICS_PORT, Cujud, cujud_pair, write_hook_shim
from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.guests import boot_image, read_counter, serial_counts
from cuju_libvirt.rig.hosts import LAN_BRIDGE, Host, Rig
from cuju_libvirt.rig.sandbox import tool

DOMAIN = "demo-vm"
#: The file the demo puts on the VM's data disk (ext4), and reads back from host b's copy.
NOTE = "notes.txt"
NOTE_TEXT = "This file lives on the demo VM's ext4 data disk, replicated to host b at every epoch.\n"
MAC = "52:54:00:19:00:64"
#: The series the demo shows from cujud's /metrics while the VM is protected.
METRICS_SHOWN = (
    "cuju_replication_lag_seconds",
    "cuju_protected",
    "cuju_ft_state",
    "cuju_epochs_committed_total",
    "cuju_epoch_length_seconds",
    "cuju_tracker_info",
)


@dataclass
class Demo:
    """What the steps share."""

    base: Path | None
    keep: bool
    out: Callable[[str], None] = field(default=functools.partial(print, flush=True))
    rig: Rig | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    cujuds: tuple[Cujud, Cujud] | None = None
    killed_at: float = 0.0
    image: Path | None = None
    data_disk: Path | None = None
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

    @property
    def the_cujuds(self) -> tuple[Cujud, Cujud]:
        if self.cujuds is None:
            raise RigError("cujud does not run")
        return self.cujuds

    def status(self, host: Host) -> None:
        """``cuju-libvirt status`` on ``host`` (its control socket seen from outside)."""
        sock = host.outside(CONTROL_SOCKET)
        argv = [sys.executable, "-m", "cuju_libvirt.cli", "status", "--socket", str(sock)]
        self.out(f"  [host {host.name}]")
        self.sh(argv, shown=["cuju-libvirt", "status"])

    def metrics(self, host: Host, prefixes: Sequence[str] = METRICS_SHOWN) -> None:
        """Scrape cujud's Prometheus endpoint on ``host`` (from inside it) and show some series."""
        url = f"http://{host.lan_address}:{METRICS_PORT}/metrics"
        fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
        text = host.run([sys.executable, "-c", fetch], timeout=30).stdout
        self.out(f"  [host {host.name}] $ curl -s {url}")
        def wanted(line: str) -> bool:  # of the one-per-state series, only the state it is in
            inactive_state = line.startswith("cuju_ft_state") and line.endswith(" 0.0")
            return line.startswith(tuple(prefixes)) and not inactive_state

        shown = [line for line in text.splitlines() if wanted(line)]
        if not any(line.startswith("cuju_replication_lag_seconds") for line in shown):
            raise RigError(f"cujud on host {host.name} exports no cuju_replication_lag_seconds")
        for line in shown:
            self.out(f"    {line}")

    def virsh(self, host: Host, *args: str) -> str:
        return self.sh([tool("virsh"), "-c", host.uri, *args], shown=["virsh", "-c", host.uri, *args])


def build_guest(demo: Demo) -> None:
    demo.image = boot_image()
    demo.out(f"  boot-sector counter guest: {demo.image} (built once, then cached)")


def bring_up(demo: Demo) -> None:
    hooks = Path(demo.stack.enter_context(tempfile.TemporaryDirectory(prefix="cuju-demo-hook.")))
    shim = write_hook_shim(hooks)
    demo.out(f"  cuju-libvirt install-hooks   (the hook {HOOK_NAME!r} goes into both hosts' "
             "/etc/libvirt/hooks/qemu.d/ before libvirtd starts)")
    demo.rig = Rig(base=demo.base, owned=not demo.keep, hooks={HOOK_NAME: shim}).up()
    for host in demo.rig.hosts.values():
        demo.out(f"  host {host.name}: {host.hostname}, FT link {host.ft_address}, LAN {host.lan_address}")
        demo.out(f"    URI {host.uri}")


def start_cujud(demo: Demo) -> None:
    rig = demo.the_rig
    demo.cujuds = demo.stack.enter_context(cujud_pair(rig))
    for c in demo.cujuds:
        demo.out(f"  host {c.host.name}: cujud --config /etc/cuju-libvirt/cujud.yaml   (log: {c.log_path})")
    demo.status(rig.a)


def define(demo: Demo) -> None:
    rig = demo.the_rig
    if demo.image is None:
        raise RigError("no guest image: the build step did not run")
    disk = rig.stage_file(demo.image, f"{DOMAIN}.img")  # its own copy: QEMU locks images it writes
    demo.data_disk = make_data_disk(demo, rig.root / "images" / f"{DOMAIN}-data.img")
    plain = rig.root / f"{DOMAIN}.plain.xml"
    plain.write_text(domain_xml(
        DOMAIN, memory_mib=64, disk=disk, data_disk=demo.data_disk,
        serial_log=f"/var/log/libvirt/qemu/{DOMAIN}-serial.log", bridge=LAN_BRIDGE, mac=MAC,
    ))
    demo.xml_file = rig.root / f"{DOMAIN}.xml"
    demo.out(f"  {plain}: an ordinary TCG domain (file-backed RAM, virtio NIC on br-lan, boot disk hda, "
             "data disk vda)")
    demo.out("  --prepare serves both writable disks through the replicating block server (NBD over a "
             "UNIX socket); host b keeps a copy of each as of the last committed epoch")
    demo.cuju_libvirt("xml", "enable", str(plain), "--peer", rig.b.hostname, "--link", f"{rig.b.hostname}-ft",
                      "--prepare", into=demo.xml_file)
    demo.cuju_libvirt("xml", "validate", str(demo.xml_file))
    demo.virsh(rig.a, "define", str(demo.xml_file))


def make_data_disk(demo: Demo, path: Path) -> Path:
    """A 16 MiB raw image holding an ext4 file system with :data:`NOTE` on it."""
    with tempfile.TemporaryDirectory(prefix="cuju-demo-data.") as tmp:
        (Path(tmp) / NOTE).write_text(NOTE_TEXT)
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(16 << 20)
        demo.sh([tool("mkfs.ext4"), "-q", "-F", "-d", tmp, str(path)], shown=["mkfs.ext4", "-q", "-d", "DIR",
                                                                              str(path)])
    demo.out(f"  {path}: ext4 with /{NOTE}")
    return path


def data_disk_on_host_b(demo: Demo) -> None:
    """Host b's copy of the data disk (served to the VM there): a clean ext4 with the note intact."""
    rig = demo.the_rig
    uuid = rig.b.virsh("domuuid", DOMAIN).strip()
    replica = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
    demo.out(f"  host b's copy of the data disk: {replica}")
    demo.sh([tool("e2fsck"), "-fn", str(replica)], shown=["e2fsck", "-fn", str(replica)])
    text = demo.sh([tool("debugfs"), "-R", f"cat /{NOTE}", str(replica)],
                   shown=["debugfs", "-R", f"cat /{NOTE}", str(replica)])
    if NOTE_TEXT.strip() not in text:
        raise RigError(f"/{NOTE} on host b's copy of the data disk does not hold what was written: {text!r}")
    demo.out(f"  /{NOTE} is intact on host b's copy, and its file system is clean")


def show_ft(demo: Demo) -> None:
    rig = demo.the_rig
    demo.virsh(rig.a, "metadata", DOMAIN, "--uri", FT_NAMESPACE)
    demo.cuju_libvirt("show", DOMAIN, "-c", rig.a.uri)


def start(demo: Demo) -> None:
    rig = demo.the_rig
    demo.virsh(rig.a, "start", DOMAIN)
    demo.virsh(rig.a, "list")


def protected(demo: Demo) -> None:
    rig = demo.the_rig
    ca, cb = demo.the_cujuds
    ca.wait_domain(DOMAIN, "protected", timeout=120)
    cb.wait_domain(DOMAIN, "standby", timeout=30)
    time.sleep(2.0)  # a couple of seconds of epochs, for the rates
    demo.status(rig.a)
    demo.status(rig.b)
    demo.metrics(rig.a)
    demo.virsh(rig.b, "list", "--all")


def kill_primary(demo: Demo) -> None:
    rig = demo.the_rig
    pid = rig.a.qemu_pid(DOMAIN)
    if pid is None:
        raise RigError("the primary QEMU is not running")
    demo.out(f"  on host a: kill -9 {pid}        (the primary's QEMU)")
    demo.killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    cb = demo.the_cujuds[1]
    entry = cb.wait_failed_over(DOMAIN, timeout=30)
    seen = time.monotonic() - demo.killed_at
    demo.out(f"  host b took over {seen * 1e3:.0f} ms after the kill (resume itself: "
             f"{(entry['last_failover_duration_s'] or 0) * 1e3:.0f} ms)")


def on_host_b(demo: Demo) -> None:
    rig = demo.the_rig
    demo.virsh(rig.b, "list")
    demo.virsh(rig.b, "dominfo", DOMAIN)
    demo.status(rig.b)
    demo.metrics(rig.b, ("cuju_replication_lag_seconds", "cuju_ft_state", "cuju_failovers_total",
                         "cuju_last_failover_duration_seconds"))
    before = max(demo.counters) if demo.counters else 0
    demo.counters = []
    watch(demo, host=rig.b, after=rig.a)
    if demo.counters[0] < before:
        raise RigError(f"the counter went back from {before} to {demo.counters[0]}")
    demo.out(f"  the counter continued on host b: {before} before the kill (last sample on a), "
             f"{demo.counters[0]} .. {demo.counters[-1]} on b")
    data_disk_on_host_b(demo)


def reprotected(demo: Demo) -> None:
    rig = demo.the_rig
    ca, cb = demo.the_cujuds
    cb.wait_domain(DOMAIN, "protected", timeout=120)
    ca.wait_domain(DOMAIN, "standby", timeout=30)
    demo.out(f"  protected again {time.monotonic() - demo.killed_at:.1f} s after the kill, "
             "nobody typed anything")
    demo.status(rig.b)
    demo.status(rig.a)
    ceded = sorted(rig.a.outside("/var/lib/cuju-libvirt/ceded").glob("*.json"))
    if not ceded:
        raise RigError("host a has no ceded record: its hook would let it start the VM on its own")
    demo.out(f"  host a keeps its ceded record ({ceded[0].name}): its hook refuses 'virsh start' of the VM "
             "while host b runs it")


def _com1_log(host: Host) -> Path:
    return host.outside(f"/var/log/libvirt/qemu/{DOMAIN}-serial.log")


def watch(demo: Demo, samples: int = 5, interval: float = 0.5, host: Host | None = None,
          after: Host | None = None) -> None:
    """Sample the counter in RAM and the last COM1 line. ``after``: the host the VM ran on
    before a failover; COM1 as the user sees it is that host's log, then this one's (this
    host's log starts where the checkpoint did, with no boot banner of its own)."""
    rig = demo.the_rig
    host = host or rig.a
    ram = host.ram_files(DOMAIN)[0]
    serial = _com1_log(host)
    before = _com1_log(after).read_text(errors="replace") if after is not None else ""
    demo.out(f"  guest RAM file: {ram}")
    demo.out(f"  COM1 log:       {serial}" + (f" (continuing {_com1_log(after)})" if after else ""))
    deadline = time.monotonic() + 30
    while read_counter(ram) == 0:
        if time.monotonic() > deadline:
            raise RigError(f"the guest did not start counting within 30 s (see {rig.a.log_file(DOMAIN)})")
        time.sleep(0.1)
    counts: list[int] = []
    for _ in range(samples):
        counts = serial_counts(before + (serial.read_text(errors="replace") if serial.exists() else ""))
        value = read_counter(ram)
        demo.counters.append(value)
        last = counts[-1] if counts else "-"
        demo.out(f"  counter in guest RAM: {value:>8}   last value on COM1: {last:>8}")
        time.sleep(interval)
    if demo.counters[-1] <= demo.counters[0]:
        raise RigError(f"the counter did not advance: {demo.counters}")
    if after is not None:
        if counts != list(range(1, len(counts) + 1)):
            raise RigError(f"COM1 across the failover repeats or skips a line (see {serial})")
        demo.out(f"  COM1 across the failover: {len(counts)} lines, none twice, none missing "
                 "(serial output is held per epoch like network output)")


#: The demo, in order: (title, step).
STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("Build the test guest", build_guest),
    ("Bring up two libvirt hosts (cuju-a, cuju-b) on this machine, with the cuju hook", bring_up),
    ("Start cujud on both hosts", start_cujud),
    ("Mark a VM for protection and define it on host a with virsh", define),
    ("Show its <cuju:ft> settings", show_ft),
    ("Start it with virsh: the hook hands it to cujud", start),
    ("Protected: a standby on host b, epochs, replication lag", protected),
    ("Watch it count", watch),
    ("Kill the primary's QEMU (SIGKILL)", kill_primary),
    ("The VM runs on host b, its counter continuing, its data disk intact", on_host_b),
    ("Protected again by itself: host a is the backup now", reprotected),
]


def show_logs(demo: Demo, lines: int = 25) -> None:
    """The last lines of each host's cujud log, so that a failed step can be understood."""
    for cujud in demo.cujuds or ():
        try:
            tail = cujud.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as err:
            demo.out(f"\n  (no cujud log on host {cujud.host.name}: {err})")
            continue
        demo.out(f"\n== Last {len(tail)} lines of {cujud.log_path} (host {cujud.host.name})")
        for line in tail:
            demo.out(f"  {line}")


def run_demo(base: Path | None = None, keep: bool = False) -> int:
    """Run every step; tear the rig down at the end (also on failure) unless ``keep``."""
    demo = Demo(base=base, keep=keep)
    t0 = time.monotonic()
    try:
        for number, (title, step) in enumerate(STEPS, 1):
            demo.out(f"\n== {number}/{len(STEPS)} {title}")
            step(demo)
    except BaseException:
        show_logs(demo)  # before the teardown removes them
        raise
    finally:
        demo.stack.close()  # cujud on both hosts (the rig below stays or goes as asked)
        if demo.rig is not None and not keep:
            demo.out("\n== Tear everything down")
            demo.rig.down()
            demo.out(f"  rig {demo.rig.id} removed: no daemons, guests, namespaces or mounts left")
        elif demo.rig is not None:
            demo.out(f"\n== The rig stays up: python -m cuju_libvirt.rig down {demo.rig.id}")
    demo.out(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
    return 0
