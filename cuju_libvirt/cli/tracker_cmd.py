"""``cuju-libvirt tracker check``: which dirty tracker this host can run, and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cuju_libvirt import _cuju
from cuju_libvirt.cli import EXIT_OK, EXIT_REFUSED, CLIError
from cuju_libvirt.ft_engine import trackers

DEFAULT_RAM_DIR = Path("/var/lib/libvirt/qemu/ram")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tracker",
        help="check the dirty trackers on this host",
        description="Inspect the dirty trackers cujud can use on this host.",
    )
    sub = parser.add_subparsers(dest="tracker_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the uffd self-test and say which tracker tracker='auto' would pick",
        description=(
            "Probe the kernel's userfaultfd features and PAGEMAP_SCAN, run the uffd tracker's\n"
            "self-test (a scratch mapping of this process: CPU writes from two threads, read()\n"
            "and O_DIRECT into the mapping, madvise REMOVE/DONTNEED; ~10 ms) and check where\n"
            "guest RAM files live (tmpfs or hugetlbfs, no swap). Prints which tracker a domain\n"
            "with tracker='auto' would get, and why. Attaching to a QEMU needs ptrace rights\n"
            "(root); that part is checked only when a domain starts."
        ),
        epilog=(
            "EXIT STATUS\n"
            "  0  uffd can be used here\n"
            "  1  only scan can be used here (the reason is printed)\n"
            "  2  RAM_DIR does not exist"
        ),
    )
    check.add_argument("--ram-dir", type=Path, default=DEFAULT_RAM_DIR, metavar="RAM_DIR",
                       help=f"libvirt's memory_backing_dir (default {DEFAULT_RAM_DIR})")
    check.add_argument("--json", action="store_true", help="one JSON object instead of text")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    if not args.ram_dir.exists():
        raise CLIError(f"--ram-dir {args.ram_dir} does not exist (libvirt's memory_backing_dir)", exit_code=2)
    probe = _cuju.uffd_probe(True)
    result = trackers.self_test()
    host = trackers.host_unfit_reason(args.ram_dir)
    reason = None if result.ok else result.reason
    reason = reason or host
    report = {
        "tracker": "uffd" if reason is None else "scan",
        "reason": reason or result.reason,
        "uffd_features": probe["features"],
        "uffd_missing": probe["missing"],
        "pagemap_scan": probe["pagemap_scan"],
        "self_test_ok": result.ok,
        "self_test_checks": list(result.checks),
        "ram_dir": str(args.ram_dir),
        "ram_dir_problem": host,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"tracker='auto' would use: {report['tracker']} ({report['reason']})")
        print(f"userfaultfd features: {', '.join(probe['features']) or 'none'}"
              + (f"; missing: {', '.join(probe['missing'])}" if probe["missing"] else ""))
        print(f"PAGEMAP_SCAN: {'yes' if probe['pagemap_scan'] else 'no'}")
        verdict = "passed" if result.ok else "FAILED"
        print(f"self-test: {verdict}: {', '.join(result.checks) or result.reason}")
        print(f"guest RAM in {args.ram_dir}: {host or 'fit (tmpfs/hugetlbfs, no swap)'}")
    return EXIT_OK if reason is None else EXIT_REFUSED
