"""``python -m cuju_libvirt.rig``: the two-host test rig for people (up, down, status, demo)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from cuju_libvirt.errors import CujuError, RigError
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.teardown import (
    PREFIX,
    discover,
    down_all,
    process_matches,
    read_state,
    remove_rig,
    traces_of,
)

log = logging.getLogger("cuju_libvirt.rig")

PROG = "python -m cuju_libvirt.rig"

DESCRIPTION = """\
Two real libvirt hosts on this one machine, for tests and demos of cuju-libvirt.

Each host ("a", hostname cuju-a; "b", hostname cuju-b) is a mount + UTS + network
namespace running its own virtlogd and libvirtd with its own configuration
(host_uuid), state, logs and sockets; no system libvirtd is used or touched. An FT
link joins the hosts (198.18.0.1 - 198.18.0.2), and a LAN joins both hosts' br-lan
bridges (198.19.0.11, 198.19.0.12) with an observer address (198.19.0.1) in a third
namespace. Reach a host from outside with its URI:

    virsh -c 'qemu+unix:///system?socket=ROOT/a/run/libvirt/libvirt-sock' list

Must run as root. See docs/rig.md."""

EPILOG = f"""\
FILES
  $CUJU_RIG_BASE/{PREFIX}ID/  the rig root, a tmpfs (default base: /tmp)
      rig.json              state: owner, keepers, URIs
      a/, b/                per-host /etc/libvirt (etc), /run (run), /var/lib/libvirt (lib),
                            /var/log/libvirt (log), /var/cache/libvirt (cache)
  CGROUP2/{PREFIX}ID          the cgroup v2 group holding every process of the rig
  $CUJU_CACHE_DIR/libvirt-qemu-capabilities/
                            QEMU capabilities probed once, reused by later rigs

EXIT STATUS
  0  success
  1  the rig could not be brought up or removed, or this machine cannot run it
  2  bad usage

EXAMPLES
  {PROG} up                  start a rig and leave it running; prints its URIs
  {PROG} status              list rigs, their owners and hosts
  {PROG} down 3fa9c1         remove one rig
  {PROG} down --all          remove every rig whose owner is gone (e.g. a killed test run)
  {PROG} demo                build a guest, start it protected on host a, show it, clean up"""


def _parse_hook(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"hook file {path!r} does not exist")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--debug", action="store_true", help="log at DEBUG level, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "up", help="bring a rig up and leave it running",
        description="Bring a rig up, print its URIs and how to enter its namespaces, and leave it running "
        "until 'down'. Progress goes to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--id", dest="rig_id", help="rig id (1-12 lower-case letters/digits; default random)")
    up.add_argument("--base", type=Path, help="directory for the rig root (default $CUJU_RIG_BASE or /tmp)")
    up.add_argument(
        "--hook", action="append", type=_parse_hook, default=[], metavar="NAME=FILE",
        help="install FILE as /etc/libvirt/hooks/qemu.d/NAME in both hosts before libvirtd starts "
        "(repeatable)",
    )
    up.add_argument("--hosts", type=int, default=2, metavar="N",
                    help="number of libvirt hosts a, b, c, ... (2-8, default 2; from 3 on, the FT link "
                         "is a bridge)")
    up.add_argument("--json", action="store_true", help="print the rig's state as JSON instead of text")
    up.set_defaults(handler=cmd_up)

    down = sub.add_parser(
        "down", help="remove rigs",
        description="Remove rigs: guests, daemons, namespaces, mounts, cgroup and files. Rigs are named "
        "by id or root directory. With --all, every rig whose owner has died (or that 'up' left running) is "
        "removed; rigs owned by a live process (a running test session) are kept unless --force.",
    )
    down.add_argument("rigs", nargs="*", metavar="RIG", help="rig id or root directory")
    down.add_argument("--all", action="store_true", help="every rig found by its name prefix")
    down.add_argument("--force", action="store_true", help="also rigs whose owner is still alive")
    down.set_defaults(handler=cmd_down)

    status = sub.add_parser(
        "status", help="list rigs", description="List every rig found, with its owner and hosts."
    )
    status.add_argument("--json", action="store_true", help="one JSON object per rig id")
    status.set_defaults(handler=cmd_status)

    demo = sub.add_parser(
        "demo", help="run the demo",
        description="Build the test guest, bring up the two hosts, define and start a protected VM on host a "
        "with virsh, show its <cuju:ft> settings and its counter, then remove everything.",
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave the rig running at the end (remove it with 'down')"
    )
    demo.add_argument("--base", type=Path, help="directory for the rig root (default $CUJU_RIG_BASE or /tmp)")
    demo.set_defaults(handler=cmd_demo)

    return parser


def _describe(rig: Rig) -> str:
    lines = [f"rig {rig.id} is up (root {rig.root})"]
    for host in rig.hosts.values():
        pid = host.keeper.pid if host.keeper else "?"
        lines += [
            f"  host {host.name}: hostname {host.hostname}, FT {host.ft_address}, LAN {host.lan_address}",
            f"    virsh -c {shlex.quote(host.uri)} list --all",
            f"    shell inside: nsenter --target {pid} --mount --uts --net",
        ]
    lan_pid = rig.lan.keeper.pid if rig.lan.keeper else "?"
    lines += [
        f"  LAN observer {OBSERVER_ADDRESS}: nsenter --target {lan_pid} --net",
        f"remove it with: {PROG} down {rig.id}",
    ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    rig = Rig(base=args.base, rig_id=args.rig_id, hooks=dict(args.hook), owned=False, host_count=args.hosts)
    rig.up()
    if args.json:
        print(json.dumps(read_state(rig.root), indent=2))
    else:
        print(_describe(rig))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        results = down_all(force=args.force)
        if not results:
            print("no rigs found")
        for rig_id, what in results:
            print(f"rig {rig_id}: {what}")
        return 1 if any(what.startswith("FAILED") for _, what in results) else 0
    if not args.rigs:
        raise RigError(f"name the rigs to remove (ids from '{PROG} status') or use --all")
    found = discover()
    failed = False
    for name in args.rigs:
        rig_id = Path(name).name.removeprefix(PREFIX) if "/" in name else name
        traces = found.get(rig_id)
        if traces is None:
            print(f"rig {rig_id}: not found", file=sys.stderr)
            failed = True
            continue
        if traces.owner_alive and not args.force:
            owner = (traces.state or {}).get("owner") or {}
            pid = owner.get("pid")
            print(f"rig {rig_id}: in use by pid {pid}; not removed (use --force)", file=sys.stderr)
            failed = True
            continue
        remove_rig(traces)
        print(f"rig {rig_id}: removed")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    found = discover()
    report: dict[str, dict[str, object]] = {}
    for rig_id, t in sorted(found.items()):
        state = t.state or {}
        owner = state.get("owner")
        if t.state is None:
            owner_text = "unknown (no state file): stale"
        elif owner is None:
            owner_text = "none (started by 'up')"
        else:
            owner_text = f"pid {owner.get('pid')} " + ("alive" if process_matches(owner) else "gone: stale")
        hosts = {}
        for name, info in (state.get("hosts") or {}).items():
            sock = str(info.get("uri", "")).partition("socket=")[2]
            hosts[name] = {**info, "libvirtd_listening": bool(sock) and os.path.exists(sock)}
        report[rig_id] = {
            "root": str(t.root) if t.root else None, "mounted": t.mounted, "owner": owner_text,
            "processes": len(t.pids), "cgroup": str(t.cgroup) if t.cgroup else None, "hosts": hosts,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report:
        print("no rigs")
    for rig_id, r in report.items():
        print(f"rig {rig_id}: root {r['root']}, owner {r['owner']}, {r['processes']} processes")
        for name, info in r["hosts"].items():  # type: ignore[attr-defined]
            print(f"  host {name} ({info.get('hostname')}): {info.get('uri')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cuju_libvirt.rig.demo import run_demo  # noqa: PLC0415 (only the demo needs the guest builders)

    return run_demo(base=args.base, keep=args.keep)


def reap(root: Path, attempts: int = 3) -> int:
    """The reaper (``_reap ROOT``, started by an owned :class:`Rig`, not for people): wait for
    the owner's pipe on stdin to close; unless the owner disarmed it first, remove the rig.

    Its stderr is the owner's, often gone with it: when removal fails for good, the reason is
    written next to the rig root as ``cuju-rig-ID.reaper.log`` (``down --all`` still works).
    """
    data = sys.stdin.buffer.read()
    if data.startswith(b"disarm"):
        return 0
    rig_id = root.name.removeprefix(PREFIX)
    log.warning("rig %s: its owner exited without tearing it down; removing it", rig_id)
    for attempt in range(1, attempts + 1):
        try:
            remove_rig(traces_of(root), graceful=False)
            return 0
        except Exception:  # nobody else will clean up: retry, then leave a note
            if attempt == attempts:
                note = root.parent / f"{root.name}.reaper.log"
                note.write_text(traceback.format_exc())
                log.error("rig %s: removal failed; see %s", rig_id, note)
                return 1
            time.sleep(1)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_reap"] and len(argv) == 2:
        logging.basicConfig(level=logging.INFO, format="[rig reaper] %(message)s", stream=sys.stderr)
        try:
            return reap(Path(argv[1]))
        except CujuError as err:
            print(f"cuju_libvirt.rig reaper: {err}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="[rig] %(message)s" if not args.debug else "[rig] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
    except CujuError as err:
        log.debug("failed", exc_info=True)
        print(f"cuju_libvirt.rig: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `status | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
