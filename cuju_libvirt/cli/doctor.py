"""Host preflight: every requirement protection depends on, checked on the host it runs on.

Each check returns :class:`Result` rows (a stable ``check`` id, a :class:`Status`, what was
found, and for anything not ``ok`` the fix). Checks detect what is there (a feature probe,
a QMP query, a file), never compare version numbers. A check that raises is reported as a
failure of that check, never as a crash of the whole run. ``cuju-libvirt doctor`` (in
:mod:`cuju_libvirt.cli.doctor_cmd`) prints them.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuju_libvirt import _cuju, config
from cuju_libvirt.cujud.coord import EtcdClient
from cuju_libvirt.cujud.tls import Contexts
from cuju_libvirt.domain_xml import Endpoint, parse_domain
from cuju_libvirt.errors import CujuError
from cuju_libvirt.ft_engine import trackers
from cuju_libvirt.hooks import HOOK_NAME


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # protection works, with a limitation the operator must know
    FAIL = "fail"  # protection cannot work (or not as configured) until fixed
    SKIP = "skip"  # does not apply here (nothing configured, LSM off)


@dataclass(frozen=True)
class Result:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail, "fix": self.fix}


#: QMP commands the engine, the standby and failover send (ft_engine/, cujud/standby.py).
QMP_COMMANDS = (
    "stop",
    "cont",
    "query-status",
    "getfd",
    "migrate-incoming",
    "xen-save-devices-state",
    "object-add",
    "object-del",
    "qom-set",
    "announce-self",
)
#: Migration capabilities used (none since device state is saved with xen-save-devices-state:
#: the per-epoch save drives no migration) and QOM types used.
QMP_MIGRATION_CAPS: tuple[str, ...] = ()
QOM_TYPES = ("filter-buffer",)
#: Where libvirt's daemons write their pid (monolithic libvirtd, or the modular QEMU driver).
LIBVIRTD_PIDFILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))
AA_INCLUDE = "<abstractions/cuju-libvirt-qemu>"
DEFAULT_RAM_DIR = Path("/var/lib/libvirt/qemu/ram")
PTRACE_SEIZE = 0x4206
CAP_SYS_PTRACE = 19
TIME_ERROR = 5  # adjtimex(): the clock is not synchronised


@dataclass
class Host:
    """Where the checks look; every path can be pointed elsewhere (tests, unusual layouts)."""

    cfg: config.Config
    hooks_dir: Path = Path("/etc/libvirt/hooks")
    qemu_conf: Path = Path("/etc/libvirt/qemu.conf")
    apparmor_dir: Path = Path("/etc/apparmor.d")
    sys_dir: Path = Path("/sys")
    proc_dir: Path = Path("/proc")
    libvirtd_pidfiles: tuple[Path, ...] = LIBVIRTD_PIDFILES
    ram_dir: Path | None = None  # None: memory_backing_dir from qemu_conf
    ft_peers: list[Endpoint] = field(default_factory=list)  # FT link addresses to check as well
    timeout: float = 3.0
    #: Opens libvirt (read-only); injectable for the unit tests.
    open_libvirt: Callable[[str], Any] | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# -- kernel ----------------------------------------------------------------------------------


def check_kernel(host: Host) -> list[Result]:
    probe = _cuju.uffd_probe(True)
    out = []
    if "WP_ASYNC" in probe["features"]:
        test = trackers.self_test()
        if test.ok:
            out.append(
                Result(
                    "kernel.uffd-wp-async",
                    Status.OK,
                    f"userfaultfd WP_ASYNC; self-test passed ({', '.join(test.checks)})",
                )
            )
        else:
            out.append(
                Result(
                    "kernel.uffd-wp-async",
                    Status.WARN,
                    f"self-test failed: {test.reason}",
                    "domains get tracker='scan' (O(RAM) per epoch); 'cuju-libvirt tracker check' says more",
                )
            )
    else:
        errno = probe.get("uffd_errno", 0)
        why = os.strerror(errno) if errno else f"missing {', '.join(probe['missing'])}"
        fix = (
            "userfaultfd is refused: as root, or set vm.unprivileged_userfaultfd=1"
            if errno
            else "Linux >= 6.7 has WP_ASYNC; until then domains get tracker='scan'"
        )
        out.append(
            Result("kernel.uffd-wp-async", Status.WARN, f"userfaultfd write-protect async: {why}", fix)
        )
    if probe["pagemap_scan"]:
        out.append(Result("kernel.pagemap-scan", Status.OK, "PAGEMAP_SCAN ioctl present"))
    else:
        out.append(
            Result(
                "kernel.pagemap-scan",
                Status.WARN,
                "no PAGEMAP_SCAN ioctl on /proc/PID/pagemap",
                "Linux >= 6.7 has it; until then domains get tracker='scan'",
            )
        )
    size = os.sysconf("SC_PAGE_SIZE")
    if size & (size - 1) == 0 and 4096 <= size <= 2 << 20:
        out.append(
            Result(
                "kernel.page-size", Status.OK, f"{size} bytes (epochs carry it: the peer must have the same)"
            )
        )
    else:
        out.append(
            Result(
                "kernel.page-size",
                Status.FAIL,
                f"{size} bytes: the wire format takes 4 KiB..2 MiB",
                "run a kernel with 4 KiB pages",
            )
        )
    return out


def _cap_eff(host: Host) -> int:
    status = _read(host.proc_dir / "self" / "status") or ""
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
    return int(found.group(1), 16) if found else 0


def _ptrace_a_child() -> str | None:
    """Attach (PTRACE_SEIZE) to a child that is not our tracee yet: None, or why it failed."""
    libc = ctypes.CDLL(None, use_errno=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        if libc.ptrace(PTRACE_SEIZE, child.pid, None, None) != 0:
            return os.strerror(ctypes.get_errno())
        return None
    finally:
        child.kill()
        child.wait()


def check_ptrace(host: Host) -> list[Result]:
    scope_text = _read(host.proc_dir / "sys" / "kernel" / "yama" / "ptrace_scope")
    scope = int(scope_text) if scope_text is not None and scope_text.strip().isdigit() else None
    fix_tracker = "or give such domains tracker='scan'"
    if scope == 3:
        return [
            Result(
                "ptrace",
                Status.FAIL,
                "Yama ptrace_scope=3: no process may attach to QEMU",
                "ptrace_scope 3 cannot be lowered at run time: set kernel.yama.ptrace_scope=1 in "
                f"/etc/sysctl.d/ and reboot, {fix_tracker}",
            )
        ]
    if not _cap_eff(host) & (1 << CAP_SYS_PTRACE):
        return [
            Result(
                "ptrace",
                Status.FAIL,
                "this process lacks CAP_SYS_PTRACE (cujud runs as root)",
                f"run the doctor as root, like cujud; {fix_tracker}",
            )
        ]
    failed = _ptrace_a_child()
    scope_note = "no Yama" if scope is None else f"Yama ptrace_scope={scope}"
    if failed is not None:
        return [
            Result(
                "ptrace",
                Status.FAIL,
                f"PTRACE_SEIZE of a test process failed: {failed} ({scope_note})",
                f"an LSM refuses ptrace (SELinux deny_ptrace? AppArmor?): allow it, {fix_tracker}",
            )
        ]
    return [
        Result("ptrace", Status.OK, f"root with CAP_SYS_PTRACE, {scope_note}; attach to a test process works")
    ]


def memory_backing_dir(host: Host) -> Path:
    if host.ram_dir is not None:
        return host.ram_dir
    text = _read(host.qemu_conf) or ""
    found = re.search(r'^\s*memory_backing_dir\s*=\s*"([^"]+)"', text, re.M)
    return Path(found.group(1)) if found else DEFAULT_RAM_DIR


def check_memory(host: Host) -> list[Result]:
    out = []
    swaps = (_read(host.proc_dir / "swaps") or "").splitlines()[1:]
    if any(line.strip() for line in swaps):
        out.append(
            Result(
                "swap",
                Status.WARN,
                f"swap is active ({len(swaps)} device(s))",
                "protected domains need <memoryBacking><locked/> (the uffd tracker misses pages "
                "swapped out), or 'swapoff -a' and remove swap from /etc/fstab",
            )
        )
    else:
        out.append(Result("swap", Status.OK, "no swap"))
    ram_dir = memory_backing_dir(host)
    where = f"{ram_dir} (memory_backing_dir in {host.qemu_conf})" if host.ram_dir is None else str(ram_dir)
    if not ram_dir.is_dir():
        out.append(
            Result(
                "ram-backing-dir",
                Status.FAIL,
                f"{where} does not exist",
                f"mkdir -p {ram_dir} and mount a tmpfs there, or set memory_backing_dir in "
                f"{host.qemu_conf} and restart libvirtd",
            )
        )
        return out
    reason = trackers.host_unfit_reason(ram_dir)
    if reason is None or reason.startswith("swap is active"):
        out.append(Result("ram-backing-dir", Status.OK, f"{where} on tmpfs/hugetlbfs"))
    else:
        out.append(
            Result(
                "ram-backing-dir",
                Status.WARN,
                f"{where}: {reason}",
                f"mount -t tmpfs tmpfs {ram_dir} (and in /etc/fstab); until then tracker='scan'",
            )
        )
    return out


# -- libvirt and QEMU --------------------------------------------------------------------------


def _open_libvirt(host: Host) -> Any:
    if host.open_libvirt is not None:
        return host.open_libvirt(host.cfg.libvirt_uri)
    import libvirt  # noqa: PLC0415 - only the libvirt checks need it

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are reported in the table
    return libvirt.openReadOnly(host.cfg.libvirt_uri)


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def _start_time(host: Host, pid: int) -> float | None:
    """Wall-clock start of process ``pid``, to a clock tick: now minus its age, the age from
    /proc/uptime and its start tick (not /proc/stat's btime, which is whole seconds)."""
    stat = _read(host.proc_dir / str(pid) / "stat")
    uptime = _read(host.proc_dir / "uptime")
    if stat is None or uptime is None:
        return None
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    age = float(uptime.split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def _libvirtd(host: Host) -> tuple[int, str, float] | None:
    for pidfile in host.libvirtd_pidfiles:
        text = _read(pidfile)
        if text is None or not text.strip().isdigit():
            continue
        pid = int(text.strip())
        started = _start_time(host, pid)
        if started is not None:
            comm = (_read(host.proc_dir / str(pid) / "comm") or "?").strip()
            return pid, comm, started
    return None


def check_libvirt(host: Host) -> tuple[list[Result], Any]:
    uri = host.cfg.libvirt_uri
    try:
        conn = _open_libvirt(host)
    except Exception as err:  # libvirtError, or no bindings
        return [
            Result(
                "libvirt",
                Status.FAIL,
                f"cannot connect to {uri}: {err}",
                "start libvirtd (systemctl start libvirtd), or set libvirt_uri in cujud.yaml",
            )
        ], None
    lib = _version(conn.getLibVersion())
    return [Result("libvirt", Status.OK, f"{uri}: libvirt {lib}, hypervisor {conn.getType()}")], conn


def check_hook(host: Host) -> list[Result]:
    hook = host.hooks_dir / "qemu.d" / HOOK_NAME
    install = f"cuju-libvirt install-hooks --hooks-dir {host.hooks_dir} (or reinstall the package)"
    try:
        st = hook.stat()
    except OSError:
        return [
            Result("libvirt.hook", Status.FAIL, f"{hook} is missing", f"{install}, then restart libvirtd")
        ]
    text = _read(hook) or ""
    if "cuju_libvirt.hooks.qemu" not in text:
        return [Result("libvirt.hook", Status.FAIL, f"{hook} is not cuju-libvirt's hook", install)]
    if not st.st_mode & 0o111:
        return [
            Result(
                "libvirt.hook",
                Status.FAIL,
                f"{hook} is not executable: libvirt skips it",
                f"chmod 755 {hook}",
            )
        ]
    interpreter = text.split("\n", 1)[0].removeprefix("#!").split()[0]
    if not os.access(interpreter, os.X_OK):
        return [
            Result("libvirt.hook", Status.FAIL, f"{hook} runs {interpreter}, which does not exist", install)
        ]
    out = [Result("libvirt.hook", Status.OK, f"{hook} (runs {interpreter})")]
    daemon = _libvirtd(host)
    if daemon is None:
        out.append(
            Result(
                "libvirt.hook-loaded",
                Status.WARN,
                f"no libvirt daemon found from {', '.join(map(str, host.libvirtd_pidfiles))}: "
                "cannot tell whether it read the hook",
                "restart libvirtd after installing the hook",
            )
        )
    else:
        pid, comm, started = daemon
        installed = max(st.st_mtime, st.st_ctime)  # ctime: a package install keeps the mtime
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if installed > started + 1 / os.sysconf("SC_CLK_TCK"):  # the start is known to a tick
            out.append(
                Result(
                    "libvirt.hook-loaded",
                    Status.FAIL,
                    f"{comm} (pid {pid}) started {when}, before the hook was installed: it does not run it",
                    f"systemctl restart {comm} (running VMs keep running)",
                )
            )
        else:
            out.append(
                Result("libvirt.hook-loaded", Status.OK, f"{comm} (pid {pid}) started {when}, after it")
            )
    return out


def _qemu_binary(conn: Any) -> str | None:
    from lxml import etree  # noqa: PLC0415

    # the host's own architecture's emulator, from the capabilities (allowed read-only)
    caps = etree.fromstring(conn.getCapabilities().encode())
    arch = (caps.findtext("host/cpu/arch") or "").strip()
    for guest in caps.iterfind("guest"):
        node = guest.find("arch")
        if node is not None and node.get("name") == arch and node.findtext("emulator"):
            return (node.findtext("emulator") or "").strip()
    return None


def query_qemu(binary: str, timeout: float) -> dict[str, set[str]]:
    """Commands, migration capabilities and netfilter types of ``binary`` (QMP over stdio, no guest)."""
    requests = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-commands", "id": "commands"},
        {"execute": "query-migrate-capabilities", "id": "caps"},
        {"execute": "qom-list-types", "arguments": {"implements": "netfilter"}, "id": "types"},
        {"execute": "quit"},
    ]
    proc = subprocess.run(
        [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    answers: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "id" in message and "return" in message:
            answers[message["id"]] = message["return"]
    if "commands" not in answers:
        raise RuntimeError(f"{binary} gave no QMP answer: {proc.stderr.strip()[:200] or 'no output'}")
    return {
        "commands": {c["name"] for c in answers["commands"]},
        "caps": {c["capability"] for c in answers.get("caps", [])},
        "types": {t["name"] for t in answers.get("types", [])},
    }


def check_qemu(host: Host, conn: Any) -> list[Result]:
    if conn is None:
        return [Result("qemu.capabilities", Status.SKIP, "libvirt unreachable: QEMU not located")]
    binary = _qemu_binary(conn)
    if binary is None:
        return [
            Result(
                "qemu.capabilities",
                Status.FAIL,
                "libvirt reports no QEMU emulator",
                "install qemu-system-x86 (RHEL: qemu-kvm)",
            )
        ]
    found = query_qemu(binary, max(30.0, host.timeout * 3))  # a loaded host starts QEMU slowly
    missing = (
        [c for c in QMP_COMMANDS if c not in found["commands"]]
        + [f"migration capability {c}" for c in QMP_MIGRATION_CAPS if c not in found["caps"]]
        + [f"object type {t}" for t in QOM_TYPES if t not in found["types"]]
    )
    if missing:
        return [
            Result(
                "qemu.capabilities",
                Status.FAIL,
                f"{binary} lacks {', '.join(missing)}",
                "use a QEMU build with these (stock Debian 12 / RHEL 9 builds have them)",
            )
        ]
    return [
        Result(
            "qemu.capabilities",
            Status.OK,
            f"{binary}: {len(QMP_COMMANDS)} QMP commands, {', '.join(QOM_TYPES)}",
        )
    ]


# -- LSM ---------------------------------------------------------------------------------------


def check_lsm(host: Host) -> list[Result]:
    out = []
    enabled = (_read(host.sys_dir / "module" / "apparmor" / "parameters" / "enabled") or "").strip()
    rules = host.apparmor_dir / "abstractions" / "cuju-libvirt-qemu"
    local = host.apparmor_dir / "local" / "abstractions" / "libvirt-qemu"
    if enabled != "Y":
        out.append(Result("apparmor", Status.SKIP, "AppArmor is not enabled in this kernel"))
    elif not rules.exists():
        out.append(
            Result(
                "apparmor",
                Status.FAIL,
                f"AppArmor is on and {rules} is missing: QEMU will be refused its direct QMP socket",
                "reinstall the cuju-libvirt package",
            )
        )
    elif AA_INCLUDE not in (_read(local) or ""):
        out.append(
            Result(
                "apparmor",
                Status.FAIL,
                f"{local} does not include {AA_INCLUDE}",
                f"echo 'include if exists {AA_INCLUDE}' >> {local}; then restart the domains",
            )
        )
    else:
        out.append(Result("apparmor", Status.OK, f"enabled; libvirt's QEMU profiles include {AA_INCLUDE}"))
    enforce = (_read(host.sys_dir / "fs" / "selinux" / "enforce") or "").strip()
    if enforce == "1":
        out.append(
            Result(
                "selinux",
                Status.WARN,
                "SELinux is enforcing: QEMU (svirt_t) needs labels on /run/cuju-libvirt/*",
                "see 'SELinux' in docs/packaging.md (semanage fcontext ...)",
            )
        )
    return out


# -- peers, clock, etcd ------------------------------------------------------------------------


def _tcp(address: tuple[str, int], timeout: float) -> str | None:
    try:
        with socket.create_connection(address, timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or str(err)


def _ft_links(conn: Any) -> dict[Endpoint, set[str]]:
    """FT link endpoints named by the protected domains defined here: endpoint -> domain names."""
    links: dict[Endpoint, set[str]] = {}
    if conn is None:
        return links
    for dom in conn.listAllDomains(0):
        try:
            spec = parse_domain(dom.XMLDesc(0).encode())
        except Exception:
            continue
        if spec is not None:
            links.setdefault(spec.link_endpoint, set()).add(dom.name())
    return links


def check_peers(
    host: Host, conn: Any, cujud: Callable[[str, dict[str, Any]], dict[str, Any]] | None
) -> list[Result]:
    cfg = host.cfg
    out = []
    if not cfg.peers:
        out.append(
            Result(
                "peer.control",
                Status.FAIL,
                "no peer configured",
                f"add the other host under 'peers' in {config.DEFAULT_CONFIG_FILE}",
            )
        )
    for name, address in cfg.peers.items():
        if cujud is not None:
            try:
                reply = cujud("peer-ping", {"peer": name})
                out.append(
                    Result(
                        f"peer.control {name}",
                        Status.OK,
                        f"{address}: authenticated ping through cujud, {reply.get('rtt_ms')} ms",
                    )
                )
                continue
            except Exception as err:
                out.append(
                    Result(
                        f"peer.control {name}",
                        Status.FAIL,
                        f"{address}: cujud cannot reach it: {err}",
                        f"open TCP {address.port} on {name}, check its cujud runs and both psk files "
                        "are the same",
                    )
                )
                continue
        failed = _tcp(address, host.timeout)
        if failed is None:
            out.append(
                Result(
                    f"peer.control {name}",
                    Status.OK,
                    f"{address}: TCP connect works (cujud is not running here: key not checked)",
                )
            )
        else:
            out.append(
                Result(
                    f"peer.control {name}",
                    Status.FAIL,
                    f"{address}: {failed}",
                    f"start cujud on {name}; open TCP {address.port} from this host",
                )
            )
    links = {a: {"--ft-peer"} for a in host.ft_peers}
    for endpoint, domains in _ft_links(conn).items():
        links.setdefault(endpoint, set()).update(domains)
    if not links:
        out.append(
            Result(
                "peer.ft-link",
                Status.SKIP,
                "no protected domain defined here names an FT link",
                "pass --ft-peer ADDR[:PORT] to check one",
            )
        )
    for endpoint, users in sorted(links.items()):
        failed = _tcp(endpoint, host.timeout)
        who = ", ".join(sorted(users))
        if failed is None:
            out.append(Result(f"peer.ft-link {endpoint}", Status.OK, f"TCP connect works (for {who})"))
        else:
            out.append(
                Result(
                    f"peer.ft-link {endpoint}",
                    Status.FAIL,
                    f"{failed} (for {who})",
                    f"start cujud on the peer (ft_listen), open TCP {endpoint.port} on the FT link",
                )
            )
    return out


def check_channels(host: Host) -> list[Result]:
    """Whether the peer channel and the FT link are encrypted (docs/security.md)."""
    cfg = host.cfg
    if cfg.peer_tls != "on":
        return [Result("channels", Status.WARN,
                       "peer_tls: off: the peer channel is authenticated by the pre-shared key but "
                       "NOT encrypted, and the FT link (guest memory) travels in the clear",
                       "install host certificates and set peer_tls: 'on' on every host "
                       "(docs/security.md), or keep both paths on trusted networks")]
    try:
        Contexts.load(ca_file=cfg.tls_ca_file, cert_file=cfg.tls_cert_file, key_file=cfg.tls_key_file)
    except CujuError as err:
        return [Result("channels", Status.FAIL, f"peer_tls: on, but {err}",
                       "install this host's certificate, key and the cluster's CA (docs/security.md)")]
    return [Result("channels", Status.OK,
                   "peer channel: mutual TLS 1.3 with certificates; FT link: AES-256-GCM, keyed per "
                   "connection inside it")]


def check_clock(host: Host) -> list[Result]:
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = ctypes.CDLL(None, use_errno=True).adjtimex(buf)
    if state == TIME_ERROR:
        return [
            Result(
                "clock",
                Status.WARN,
                "the system clock is not synchronised (adjtimex: TIME_ERROR)",
                "run an NTP client on both hosts (systemd-timesyncd, chrony): logs and the "
                "lag/failover timestamps of the two hosts are compared",
            )
        ]
    if state < 0:
        return [Result("clock", Status.WARN, f"adjtimex failed: {os.strerror(ctypes.get_errno())}")]
    return [Result("clock", Status.OK, "the system clock is synchronised (NTP)")]


def check_etcd(host: Host) -> list[Result]:
    endpoints = host.cfg.etcd_endpoints
    if not endpoints:
        return [Result("etcd", Status.SKIP, "no etcd_endpoints configured (two-node mode)")]
    timeout = host.cfg.etcd_timeout
    out = []
    try:
        tls = EtcdClient.for_config(host.cfg).tls
    except CujuError as err:
        return [Result("etcd", Status.FAIL, str(err),
                       "fix etcd_ca_file, etcd_cert_file, etcd_key_file in cujud.yaml")]
    for url in endpoints:
        health = str(url).rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout, context=tls) as reply:
                body = json.loads(reply.read(4096) or b"{}")
        except Exception as err:
            out.append(
                Result(
                    f"etcd {url}",
                    Status.FAIL,
                    f"{health}: {err}",
                    "start etcd there or fix etcd_endpoints in cujud.yaml",
                )
            )
            continue
        if str(body.get("health")).lower() == "true":
            out.append(Result(f"etcd {url}", Status.OK, "healthy"))
        else:
            out.append(
                Result(f"etcd {url}", Status.FAIL, f"reports {body}", "check the etcd cluster's members")
            )
    return out


# -- all of it ---------------------------------------------------------------------------------


def _guarded(name: str, func: Callable[[], list[Result]]) -> list[Result]:
    try:
        return func()
    except Exception as err:
        return [
            Result(
                name,
                Status.FAIL,
                f"the check itself failed: {type(err).__name__}: {err}",
                "run with --debug and report it",
            )
        ]


def run(host: Host, cujud: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None) -> list[Result]:
    """Every check, in the order of the table; ``cujud`` calls the local cujud (None: not running)."""
    results = []
    results += _guarded("kernel", lambda: check_kernel(host))
    results += _guarded("ptrace", lambda: check_ptrace(host))
    results += _guarded("memory", lambda: check_memory(host))
    libvirt_rows, conn = check_libvirt(host)
    results += libvirt_rows
    results += _guarded("libvirt.hook", lambda: check_hook(host))
    results += _guarded("qemu.capabilities", lambda: check_qemu(host, conn))
    results += _guarded("lsm", lambda: check_lsm(host))
    results += _guarded("peer", lambda: check_peers(host, conn, cujud))
    results += _guarded("channels", lambda: check_channels(host))
    results += _guarded("clock", lambda: check_clock(host))
    results += _guarded("etcd", lambda: check_etcd(host))
    if conn is not None:
        conn.close()
    return results


def failed(results: Iterable[Result]) -> bool:
    return any(r.status is Status.FAIL for r in results)
