"""Pieces shared by the ``xml`` and domain sub-commands: element options, reports, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps

from cuju_libvirt.cli import EXIT_REFUSED, EXIT_UNREADABLE, CLIError
from cuju_libvirt.disk_xml import FTDisk
from cuju_libvirt.domain_xml import ATTRIBUTE_BY_NAME, ATTRIBUTES, FTSpec
from cuju_libvirt.errors import DomainUnfitError, FTElementError, NotADomainXMLError
from cuju_libvirt.fitness import Problem

Handler = Callable[[argparse.Namespace], int]


def add_ft_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``<cuju:ft>`` attribute, named like the attribute (from the attribute table)."""
    group = parser.add_argument_group("element settings (attribute names of <cuju:ft>)")
    for attr in ATTRIBUTES:
        option = f"--{attr.name}"
        dest = attr.field
        if attr.name == "peer":
            note = ("left out for a new element: the cluster's placer chooses the backup, which "
                    "needs etcd_endpoints in cujud.yaml")
            group.add_argument(option, dest=dest, metavar="HOST[:PORT]", help=f"{attr.doc} ({note})")
        elif attr.name == "link":
            group.add_argument(option, dest=dest, metavar="ADDR[:PORT]", help=attr.doc)
        elif attr.kind == "int":
            assert attr.bounds is not None
            lo, hi = attr.bounds
            group.add_argument(
                option, dest=dest, metavar="N", help=f"{attr.doc}; {lo}..{hi}, default {attr.default}"
            )
        elif attr.kind == "ports":
            group.add_argument(option, dest=dest, metavar="auto|on|off|PORTS",
                               help=f"{attr.doc}; default {attr.default}")
        else:
            default = ("on" if attr.default else "off") if attr.kind == "onoff" else attr.default
            group.add_argument(
                option, dest=dest, choices=attr.choices, help=f"{attr.doc}; default {default}"
            )


def spec_from_args(args: argparse.Namespace, existing: FTSpec | None) -> FTSpec:
    """The element to write: the existing settings (if any) with the given options applied.
    Without ``--peer`` a new element has no ``peer``: the cluster places its standby."""
    given = {
        attr.name: getattr(args, attr.field)
        for attr in ATTRIBUTES
        if getattr(args, attr.field, None) is not None
    }
    merged = existing.to_attributes() if existing is not None else {}
    merged.update(given)
    # the records stay: they hold the originals of the prepared disks and chardevs
    if existing is None:
        return FTSpec.from_attributes(merged)
    return FTSpec.from_attributes(merged).replace(disks=existing.disks, chardevs=existing.chardevs)


def add_disk_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serve-disks", action=argparse.BooleanOptionalAction, default=True,
        help="with --prepare: rewrite every writable disk that can be served to the "
        "replicating block server's NBD export, recording the original in <cuju:ft>, so that "
        "the backup keeps a copy as of each committed epoch (the default); --no-serve-disks "
        "leaves the disks on their sources (not epoch-protected: docs/failover.md, \"Disks\")",
    )
    parser.add_argument(
        "--disk-replica", action="append", default=[], metavar="DEV=PATH",
        help="where the backup keeps the copy of prepared disk DEV (an absolute path on the "
        "backup host; 'DEV=' goes back to the default, disk_replica_dir/UUID/DEV.FORMAT of "
        "cujud.yaml); repeatable",
    )


def apply_disk_options(spec: FTSpec, overrides: Sequence[str]) -> FTSpec:
    """``spec`` with the ``--disk-replica DEV=PATH`` overrides applied to its disk records."""
    wanted: dict[str, str | None] = {}
    for text in overrides:
        dev, sep, path = text.partition("=")
        if not sep or not dev:
            raise CLIError(f"--disk-replica {text!r}: write DEV=PATH (e.g. vda=/srv/replicas/web.qcow2)",
                           EXIT_UNREADABLE)
        wanted[dev] = path or None
    missing = [dev for dev in wanted if spec.disk(dev) is None]
    if missing:
        prepared = ", ".join(d.target for d in spec.disks) or "none"
        raise CLIError(
            f"--disk-replica: disk {', '.join(missing)} is not prepared (no <cuju:disk> record; "
            f"prepared: {prepared}); fix: add --prepare, or name a prepared disk", EXIT_REFUSED,
        )
    disks = tuple(
        dataclasses.replace(d, replica=wanted[d.target]) if d.target in wanted else d for d in spec.disks
    )
    return spec.replace(disks=disks)


def disk_dict(disk: FTDisk) -> dict[str, str | None]:
    return {"target": disk.target, "source": disk.source, "source_type": disk.source_type,
            "format": disk.format, "bus": disk.bus, "replica": disk.replica}


def print_lines(lines: Sequence[object]) -> None:
    for line in lines:
        print(f"cuju-libvirt: {line}", file=sys.stderr)


def report_problems(problems: Sequence[Problem]) -> None:
    print_lines(problems)


def show_spec(spec: FTSpec | None, as_json: bool, what: str) -> None:
    """Print the effective settings (defaults filled in) for people or as one JSON object."""
    if as_json:
        data: dict[str, object] | None = None
        if spec is not None:
            data = dict(spec.to_dict())
            if spec.disks:
                data["disks"] = [disk_dict(d) for d in spec.disks]
        print(json.dumps(data, indent=None))
        return
    if spec is None:
        print(f"{what}: not protected (no <cuju:ft> element)")
        return
    print(f"{what}: protected by <cuju:ft>")
    explicit = spec.to_attributes()
    width = max(len(a.name) for a in ATTRIBUTES)
    for name, value in spec.to_dict().items():
        note = "" if name in explicit else "  (default)"
        print(f"  {name:<{width}}  {value}{note}")
    if spec.placed:
        print(f"  {'':<{width}}  the backup is placed by the cluster (etcd_endpoints in cujud.yaml)")
    else:
        print(f"  {'':<{width}}  cujud at {spec.peer_endpoint}, FT link to {spec.link_endpoint}")
    for d in spec.disks:
        replica = d.replica or "default (disk_replica_dir of the backup's cujud.yaml)"
        print(f"  disk {d.target}: {d.format} {d.source_type} {d.source} on {d.bus}, "
              f"served over NBD; replica {replica}")


def peer_text(spec: FTSpec) -> str:
    """``peer HOST:PORT``, or that the cluster places the standby (no ``peer``)."""
    return "backup placed by the cluster" if spec.placed else f"peer {spec.peer_endpoint}"


def handle_xml_errors(func: Handler) -> Handler:
    """Map the library's errors to the CLI's exit codes, one stderr line per problem."""

    @wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except NotADomainXMLError as err:
            raise CLIError(str(err), EXIT_UNREADABLE) from err
        except (FTElementError, DomainUnfitError) as err:
            print_lines(err.problems)
            return EXIT_REFUSED

    return wrapper


__all__ = [
    "ATTRIBUTE_BY_NAME",
    "add_disk_options",
    "add_ft_options",
    "apply_disk_options",
    "handle_xml_errors",
    "peer_text",
    "print_lines",
    "report_problems",
    "show_spec",
    "spec_from_args",
]
