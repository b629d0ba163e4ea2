"""``cuju-libvirt doctor``: can this host protect VMs? One row per requirement, a fix for each failure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cuju_libvirt import config
from cuju_libvirt.cli import EXIT_OK, EXIT_REFUSED, CLIError
from cuju_libvirt.cli.doctor import Host, Result, Status, failed, run
from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.domain_xml import Endpoint, parse_endpoint
from cuju_libvirt.errors import CujuError

DEFAULT_SOCKET: Path = config.SETTINGS_BY_KEY["control_socket"].default_value()


def _ft_peer(text: str) -> Endpoint:
    try:
        return parse_endpoint(text, config.FT_PORT)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check that this host can protect VMs (preflight), with a fix for each failure",
        description=(
            "Check, on this host, everything protection depends on, and print one row per\n"
            "requirement: the configuration and key, userfaultfd WP_ASYNC and PAGEMAP_SCAN (the\n"
            "uffd tracker's self-test), the page size, ptrace rights over QEMU (Yama), swap and\n"
            "the RAM backing directory, libvirt and its hooks directory (and that libvirtd was\n"
            "restarted after the hook was installed), the QEMU features used (QMP commands,\n"
            "filter-buffer: asked from QEMU itself), AppArmor/SELinux, cujud,\n"
            "each peer on the control channel (an authenticated ping through cujud when it\n"
            "runs, else a TCP connect) and on the FT link (the links of the protected domains\n"
            "defined here, and --ft-peer), whether both channels are encrypted (peer_tls and\n"
            "the certificates), the clock, and etcd when etcd_endpoints is set.\n"
            "Run it as root, like cujud."
        ),
        epilog=(
            "STATUS\n"
            "  ok    the requirement is met\n"
            "  warn  protection works with a limitation (for example tracker='scan' only)\n"
            "  FAIL  protection cannot work as configured: the fix line says what to do\n"
            "  skip  does not apply here (AppArmor off, no etcd configured)\n\n"
            "EXIT STATUS\n"
            "  0  no check failed\n"
            "  1  at least one check failed\n"
            "  2  bad usage"
        ),
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"cujud's configuration (default {config.DEFAULT_CONFIG_FILE})",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="drop-in directory (default: cujud.d next to the main file)",
    )
    p.add_argument(
        "--hooks-dir",
        type=Path,
        default=Host.hooks_dir,
        metavar="DIR",
        help=f"libvirt's hooks directory (default {Host.hooks_dir})",
    )
    p.add_argument(
        "--qemu-conf",
        type=Path,
        default=Host.qemu_conf,
        metavar="FILE",
        help=f"libvirt's qemu.conf, for memory_backing_dir (default {Host.qemu_conf})",
    )
    p.add_argument(
        "--ram-dir",
        type=Path,
        metavar="DIR",
        help="the RAM backing directory to check (default: memory_backing_dir of qemu.conf)",
    )
    p.add_argument(
        "--ft-peer",
        type=_ft_peer,
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help=f"also check this FT link address (port {config.FT_PORT} if left out); repeatable",
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"cujud's control socket (default {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds to wait for each network probe (default 3)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: {'ok': BOOL, 'checks': [{check, status, detail, fix}, ...]}",
    )
    p.set_defaults(handler=cmd_doctor)


def _config_rows(args: argparse.Namespace) -> tuple[list[Result], config.Config | None]:
    if args.config is not None and not args.config.exists():
        raise CLIError(f"configuration file {args.config} does not exist", exit_code=2)
    main_file: Path = args.config if args.config is not None else config.DEFAULT_CONFIG_FILE
    dropins: Path = args.config_dir if args.config_dir is not None else main_file.parent / "cujud.d"
    try:
        cfg = config.load(main_file, dropins)
    except CujuError as err:
        return [Result("config", Status.FAIL, str(err), "correct the file the message names")], None
    files = ", ".join(map(str, cfg.files)) or f"defaults only ({main_file} absent)"
    rows = [Result("config", Status.OK, f"{files}; node {cfg.node_name!r}")]
    try:
        config.read_psk(cfg.psk_file)
        rows.append(Result("psk", Status.OK, f"{cfg.psk_file}: root-only, long enough"))
    except CujuError as err:
        rows.append(
            Result(
                "psk",
                Status.FAIL,
                str(err),
                f"umask 077; head -c 32 /dev/urandom | base64 > {cfg.psk_file}; copy it to the peer",
            )
        )
    return rows, cfg


def cmd_doctor(args: argparse.Namespace) -> int:
    rows, cfg = _config_rows(args)
    if cfg is not None:
        host = Host(
            cfg=cfg,
            hooks_dir=args.hooks_dir,
            qemu_conf=args.qemu_conf,
            ram_dir=args.ram_dir,
            ft_peers=list(args.ft_peer),
            timeout=args.timeout,
        )
        cujud = None
        try:
            with ControlClient(args.socket, timeout=args.timeout) as client:
                client.call("ping", {})
            rows.append(Result("cujud", Status.OK, f"running (control socket {args.socket})"))

            def cujud(method: str, params: dict[str, Any]) -> dict[str, Any]:
                with ControlClient(args.socket, timeout=args.timeout + cfg.request_timeout) as c:
                    return c.call(method, params)
        except (CujuError, OSError) as err:
            rows.append(
                Result(
                    "cujud",
                    Status.WARN,
                    f"not reachable at {args.socket}: {err}",
                    "systemctl enable --now cujud (it waits for /etc/cuju-libvirt/psk)",
                )
            )
        rows += run(host, cujud)
    if args.json:
        print(json.dumps({"ok": not failed(rows), "checks": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(render(rows), end="")
    return EXIT_REFUSED if failed(rows) else EXIT_OK


def render(rows: list[Result]) -> str:
    """A table people read: check, status, what was found; a 'fix:' line under anything not ok."""
    width = max(len(r.check) for r in rows)
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    for r in rows:
        status = "FAIL" if r.status is Status.FAIL else r.status.value
        lines.append(f"{r.check:<{width}}  {status:<6}  {r.detail}")
        if r.fix and r.status is not Status.OK:
            lines.append(f"{'':<{width}}          fix: {r.fix}")
    bad = [r.check for r in rows if r.status is Status.FAIL]
    warn = sum(r.status is Status.WARN for r in rows)
    lines.append("")
    lines.append(
        f"{len(bad)} failed ({', '.join(bad)}), {warn} warning(s)"
        if bad
        else f"all checks passed ({warn} warning(s)): this host can protect VMs"
    )
    return "\n".join(lines) + "\n"
