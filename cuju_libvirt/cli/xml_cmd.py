"""``cuju-libvirt xml validate|enable|disable|show FILE``: the element in domain XML files."""

from __future__ import annotations

import argparse
import logging
import sys

from cuju_libvirt._xml import MAX_XML_BYTES
from cuju_libvirt.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREADABLE, CLIError
from cuju_libvirt.cli._common import (
    add_disk_options,
    add_ft_options,
    apply_disk_options,
    handle_xml_errors,
    peer_text,
    print_lines,
    report_problems,
    show_spec,
    spec_from_args,
)
from cuju_libvirt.domain_xml import (
    find_ft,
    load_domain,
    remove_ft_in,
    restore_records_in,
    set_ft_in,
    spec_from_element,
)
from cuju_libvirt.errors import FTElementError
from cuju_libvirt.fitness import check_fitness_in, errors, prepare_in

LOG = logging.getLogger(__name__)

_FILE_HELP = "domain XML file (as written by 'virsh dumpxml'); '-' reads standard input"

_XML_DESCRIPTION = """\
Edit and check the <cuju:ft> element in libvirt domain XML files, without libvirt.

A domain is protected when its <metadata> holds one element
  <cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="HOST[:PORT]" .../>
These commands read FILE (or standard input for '-'), never change it in place, and
write results to standard output: pipe them into 'virsh define /dev/stdin' or a file.
Everything in the document outside the element is kept as it is."""

_XML_EPILOG = """\
examples:
  cuju-libvirt xml validate vm.xml
  cuju-libvirt xml enable vm.xml --peer hostb --prepare > vm-ft.xml
  virsh dumpxml vm | cuju-libvirt xml show - --json
  cuju-libvirt xml disable vm-ft.xml > vm.xml

exit status:
  0  success
  1  the element is invalid, or the domain cannot be protected (one line per problem on stderr)
  2  FILE missing, unreadable, too large, not well-formed, has a DOCTYPE, or not a <domain>

See docs/ft-element.md for every attribute and fitness rule."""


def read_input(path: str) -> bytes:
    """The bytes of FILE or of standard input for '-', at most MAX_XML_BYTES (+1 to detect more)."""
    limit = MAX_XML_BYTES + 1
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit)
    except OSError as err:
        raise CLIError(f"cannot read {path}: {err.strerror or err}", EXIT_UNREADABLE) from err
    if len(data) > MAX_XML_BYTES:
        raise CLIError(
            f"{path} is larger than {MAX_XML_BYTES // (1024 * 1024)} MiB: not a domain XML", EXIT_UNREADABLE
        )
    return data


def _label(path: str) -> str:
    return "standard input" if path == "-" else path


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@handle_xml_errors
def cmd_validate(args: argparse.Namespace) -> int:
    doc = load_domain(read_input(args.file), _label(args.file))
    name = doc.root.findtext("name") or "?"
    element = find_ft(doc.root)
    if element is None:
        print(f"{_label(args.file)}: domain '{name}' has no <cuju:ft>: not protected")
        return EXIT_OK
    spec = spec_from_element(element)
    problems = check_fitness_in(doc.root, spec)
    report_problems(problems)
    if errors(problems):
        fixable = sum(1 for p in errors(problems) if p.preparable)
        hint = f"; 'cuju-libvirt xml enable --prepare' fixes {fixable} of them" if fixable else ""
        count = len(errors(problems))
        print_lines([f"domain '{name}' cannot be protected as written ({count} errors{hint})"])
        return EXIT_REFUSED
    warnings = len(problems)
    suffix = f" ({warnings} warning{'s' if warnings != 1 else ''} on stderr)" if warnings else ""
    print(f"{_label(args.file)}: domain '{name}' can be protected ({peer_text(spec)}){suffix}")
    return EXIT_OK


@handle_xml_errors
def cmd_enable(args: argparse.Namespace) -> int:
    doc = load_domain(read_input(args.file), _label(args.file))
    existing = find_ft(doc.root)
    current = None
    if existing is not None:
        try:
            current = spec_from_element(existing)
        except FTElementError:
            if args.peer is None:
                raise
            LOG.warning("replacing an invalid <cuju:ft> element")
    spec = spec_from_args(args, current)
    set_ft_in(doc.root, spec)
    if args.prepare:
        changes = prepare_in(doc.root, disks=args.serve_disks)
        if args.disk_replica:
            element = find_ft(doc.root)
            assert element is not None
            set_ft_in(doc.root, apply_disk_options(spec_from_element(element), args.disk_replica))
        problems = check_fitness_in(doc.root)  # the element now also records the prepared disks
        print_lines([f"changed: {change}" for change in changes])
        report_problems(problems)
        if errors(problems):
            print_lines(["not written: the domain cannot be protected; fix the errors above by hand"])
            return EXIT_REFUSED
    else:
        if args.disk_replica:
            spec = apply_disk_options(spec, args.disk_replica)
            set_ft_in(doc.root, spec)
        problems = check_fitness_in(doc.root, spec)
        report_problems(problems)
        if errors(problems):
            print_lines(
                ["the domain cannot be protected as written: the element is set, nothing else was "
                 "changed; '--prepare' makes the safe changes"]
            )
    _write(doc.to_bytes())
    return EXIT_OK


@handle_xml_errors
def cmd_disable(args: argparse.Namespace) -> int:
    doc = load_domain(read_input(args.file), _label(args.file))
    element = find_ft(doc.root)
    restored = restore_records_in(doc.root, element) if element is not None else []
    if not remove_ft_in(doc.root, restore_disks=False):
        print_lines(["no <cuju:ft> element: document unchanged"])
    print_lines([f"changed: {change}" for change in restored])
    _write(doc.to_bytes())
    return EXIT_OK


@handle_xml_errors
def cmd_show(args: argparse.Namespace) -> int:
    doc = load_domain(read_input(args.file), _label(args.file))
    element = find_ft(doc.root)
    spec = spec_from_element(element) if element is not None else None
    show_spec(spec, args.json, f"domain '{doc.root.findtext('name') or '?'}'")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    xml = subparsers.add_parser(
        "xml", help="edit and check <cuju:ft> in domain XML files", description=_XML_DESCRIPTION,
        epilog=_XML_EPILOG, formatter_class=raw,
    )
    sub = xml.add_subparsers(dest="xml_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "validate", help="check the element and the domain's fitness for fault tolerance",
        formatter_class=raw,
        description=(
            "Check the <cuju:ft> element of FILE and whether the domain can be protected as\n"
            "written: guest RAM file-backed and shared, no passthrough or vhost-user devices,\n"
            "virtio NICs on <driver name='qemu'/>, the direct QMP socket, ... (docs/ft-element.md).\n"
            "Errors and warnings go to stderr, one line each, naming the device or attribute\n"
            "and the fix. A domain without the element is valid and reported as not protected."
        ),
        epilog=(
            "examples:\n  cuju-libvirt xml validate vm.xml\n"
            "  virsh dumpxml vm | cuju-libvirt xml validate -\n\n"
            "exit status:\n  0  can be protected as written (warnings allowed), or has no element\n"
            "  1  invalid element or the domain cannot be protected\n"
            "  2  FILE missing, unreadable or not a domain XML"
        ),
    )
    p.add_argument("file", metavar="FILE", help=_FILE_HELP)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser(
        "enable", help="add or update the element (optionally making the domain fit)",
        formatter_class=raw,
        description=(
            "Write FILE to standard output with <cuju:ft> added, or updated when it is already\n"
            "there: options given replace those settings, the others are kept (defaults are not\n"
            "written). Idempotent. Without --prepare nothing else in the document changes and\n"
            "fitness problems are only reported on stderr. With --prepare the changes fault\n"
            "tolerance needs that are safe to make are made and listed on stderr:\n"
            "  - guest RAM file-backed and shared (<memoryBacking><source type='file'/>\n"
            "    <access mode='shared'/>; other <memoryBacking> children are kept)\n"
            "  - <driver name='qemu'/> on virtio NICs (other driver attributes are kept)\n"
            "  - cujud's direct QMP socket in <qemu:commandline> (libvirt then reports the\n"
            "    domain as tainted: custom-argv)\n"
            "  - every writable disk that can be served (file or block, raw or qcow2) is\n"
            "    rewritten to the replicating block server's NBD export over a UNIX socket\n"
            "    (/run/cuju-libvirt/nbd/UUID/DEV.sock, error_policy='stop'); the <disk> as it\n"
            "    was is recorded in <cuju:ft> and 'disable' gives it back (--no-serve-disks:\n"
            "    disks stay on their sources, not epoch-protected; see docs/failover.md)\n"
            "If the domain still cannot be protected (a <hostdev>, vhost-user, ...), nothing is\n"
            "written and the exit status is 1."
        ),
        epilog=(
            "examples:\n  cuju-libvirt xml enable vm.xml --peer hostb > vm-ft.xml\n"
            "  cuju-libvirt xml enable vm.xml --prepare > vm-ft.xml   # no --peer: placed by the cluster\n"
            "  cuju-libvirt xml enable vm.xml --peer 192.0.2.7 --link 198.18.0.2 --epoch-ms 10 --prepare\n"
            "  virsh dumpxml vm | cuju-libvirt xml enable - --peer '[2001:db8::7]:7790' --prepare "
            "| virsh define /dev/stdin\n\n"
            "exit status:\n  0  document written\n  1  invalid setting, or (--prepare) the domain cannot "
            "be protected\n  2  FILE unreadable or not a domain XML"
        ),
    )
    p.add_argument("file", metavar="FILE", help=_FILE_HELP)
    add_ft_options(p)
    p.add_argument("--prepare", action="store_true", help="also make the safe changes FT needs (see above)")
    add_disk_options(p)
    p.set_defaults(handler=cmd_enable)

    p = sub.add_parser(
        "disable", help="remove the element", formatter_class=raw,
        description=(
            "Write FILE to standard output without <cuju:ft>. A <metadata> left empty is\n"
            "removed too, so that 'enable' then 'disable' gives back the original document.\n"
            "Disks that 'enable --prepare' served over NBD get their recorded <disk> back;\n"
            "its other changes (memory backing, NIC driver, QMP socket, <uuid>) stay."
        ),
        epilog="examples:\n  cuju-libvirt xml disable vm-ft.xml > vm.xml\n\nexit status:\n  0  written\n"
        "  1  the element is in an unsupported form (e.g. two elements)\n"
        "  2  FILE unreadable or not a domain XML",
    )
    p.add_argument("file", metavar="FILE", help=_FILE_HELP)
    p.set_defaults(handler=cmd_disable)

    p = sub.add_parser(
        "show", help="print the effective settings", formatter_class=raw,
        description=(
            "Print the settings of the <cuju:ft> element with defaults filled in. With --json,\n"
            "one JSON object whose keys are the attribute names ('link' is the effective\n"
            "HOST:PORT), or null when the domain has no element."
        ),
        epilog="examples:\n  cuju-libvirt xml show vm.xml\n"
        "  cuju-libvirt xml show vm.xml --json | jq .peer\n\n"
        "exit status:\n  0  printed (also when not protected)\n  1  invalid element\n"
        "  2  FILE unreadable or not a domain XML",
    )
    p.add_argument("file", metavar="FILE", help=_FILE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.set_defaults(handler=cmd_show)
