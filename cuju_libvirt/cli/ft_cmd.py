"""``cuju-libvirt install-hooks`` and ``cuju-libvirt epoch``: the hook on disk, and the
epoch length of a protected domain changed at run time through cujud."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cuju_libvirt import config
from cuju_libvirt.cli import EXIT_OK, CLIError
from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.hooks import HOOK_NAME, shim_text

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DEFAULT_SOCKET: Path = config.SETTINGS_BY_KEY["control_socket"].default_value()


def register(subparsers: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "install-hooks", formatter_class=raw,
        help="install the libvirt QEMU hook that hands domains to cujud",
        description=(
            f"Write DIR/qemu.d/{HOOK_NAME}, the libvirt QEMU hook of cuju-libvirt (libvirt >= 6.5\n"
            "runs every executable in qemu.d/). It runs this Python interpreter; domains\n"
            "without <cuju:ft> leave it at once. libvirtd reads its hooks only when it\n"
            "starts: restart libvirtd afterwards. An existing file is replaced atomically."
        ),
        epilog="exit status:\n  0  installed\n  1  the directory cannot be written",
    )
    p.add_argument("--hooks-dir", type=Path, default=DEFAULT_HOOKS_DIR, metavar="DIR",
                   help=f"libvirt's hooks directory (default {DEFAULT_HOOKS_DIR})")
    p.add_argument("--python", default=sys.executable, metavar="PATH",
                   help="interpreter the hook runs with (default: this one)")
    p.set_defaults(handler=cmd_install_hooks)

    p = subparsers.add_parser(
        "epoch", formatter_class=raw, help="change the epoch length of a protected domain now",
        description=(
            "Ask the local cujud to change the epoch length of DOMAIN (a domain it\n"
            "protects as primary) to MS milliseconds, from the next epoch on. The\n"
            "<cuju:ft epoch-ms> of the domain's XML is not changed: the next start uses it."
        ),
        epilog=("exit status:\n  0  changed\n"
                "  1  cujud refused (not protected here, out of range) or is not running"),
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("ms", metavar="MS", type=int, help="epoch length in milliseconds")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"cujud's control socket (default {DEFAULT_SOCKET})")
    p.set_defaults(handler=cmd_epoch)
    register_takeover(subparsers)


def register_takeover(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "takeover", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="make the standby of a domain on this host take over now (manual failover)",
        description=(
            "Ask the local cujud to resume the standby of DOMAIN from its last committed\n"
            "epoch, as an automatic failover would: for <cuju:ft failover='manual'>, or\n"
            "when you know the primary is dead. Make sure it is: if the primary still runs,\n"
            "its own cujud fences it (VM stopped, output held) and destroys it once it\n"
            "learns of the takeover, but the two copies may both have written to disks."
        ),
        epilog="exit status:\n  0  taken over\n  1  no standby of DOMAIN here, or cujud refused",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"cujud's control socket (default {DEFAULT_SOCKET})")
    p.set_defaults(handler=cmd_takeover)


def cmd_takeover(args: argparse.Namespace) -> int:
    with ControlClient(args.socket, timeout=60.0) as client:
        reply = client.call("takeover", {"domain": args.domain})
    if not reply.get("taken_over"):
        raise CLIError(f"{args.domain}: not taken over: {reply.get('reason', 'see the cujud log')}")
    print(f"{args.domain}: running here from epoch {reply.get('epoch', '?')}")
    return EXIT_OK


def cmd_install_hooks(args: argparse.Namespace) -> int:
    target_dir = args.hooks_dir / "qemu.d"
    target = target_dir / HOOK_NAME
    try:
        target_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = target.with_name(f".{HOOK_NAME}.tmp")
        tmp.write_text(shim_text(args.python))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except OSError as err:
        raise CLIError(f"cannot install the hook in {target_dir}: {err.strerror}; fix: run as root or "
                       "pass --hooks-dir") from err
    print(f"installed {target}; restart libvirtd to make it read the hook")
    return EXIT_OK


def cmd_epoch(args: argparse.Namespace) -> int:
    with ControlClient(args.socket, timeout=5.0) as client:
        reply = client.call("set-epoch", {"domain": args.domain, "epoch_ms": args.ms})
    print(f"{reply['domain']}: epochs of {reply['epoch_ms']} ms from now on")
    return EXIT_OK
