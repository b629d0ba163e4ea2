"""``cuju-libvirt enable|disable|show DOMAIN [-c URI]``: the element on a defined domain.

Uses libvirt's metadata API (``virDomainSetMetadata`` / ``virDomainGetMetadata`` with
``VIR_DOMAIN_METADATA_ELEMENT``, key ``cuju``, the element's namespace URI): the persistent
configuration always, the running instance too when the domain runs and can be protected
as it runs. libvirt errors are classified by (error domain, error code), never by text.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

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
    FT_NAMESPACE,
    FT_PREFIX,
    FTSpec,
    chardevs_from_element,
    disks_from_element,
    find_ft,
    libvirt_metadata_xml,
    load_domain,
    parse_domain,
    parse_libvirt_metadata,
    remove_ft_in,
    restore_records_in,
    set_ft_in,
    spec_from_element,
)
from cuju_libvirt.errors import FTElementError, LibvirtError
from cuju_libvirt.fitness import Problem, check_fitness, check_fitness_in, errors, prepare_in

LOG = logging.getLogger(__name__)

#: Errors that mean "DOMAIN or URI not found / not reachable": exit 2, like a missing FILE.
_NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_DOMAIN}
_NO_CONNECTION = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_NO_SUPPORT,
}


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


def _libvirt_error(err: libvirt.libvirtError, doing: str) -> LibvirtError:
    return LibvirtError(f"{doing}: {err.get_error_message()}", err.get_error_domain(), err.get_error_code())


_event_loop_registered = False


def _register_event_loop() -> None:
    """libvirt's embedded drivers (``qemu:///embed?root=DIR``) refuse to open without one."""
    global _event_loop_registered  # noqa: PLW0603  (once per process, as libvirt requires)
    if not _event_loop_registered:
        libvirt.virEventRegisterDefaultImpl()
        _event_loop_registered = True


@contextmanager
def connect(uri: str | None, readonly: bool = False) -> Iterator[Any]:
    libvirt.registerErrorHandler(_quiet_libvirt, None)
    if uri is not None and "/embed" in uri:
        _register_event_loop()
    shown = uri or "the default libvirt URI"
    try:
        conn = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise CLIError(f"cannot connect to {shown}: {err.get_error_message()}", EXIT_UNREADABLE) from err
    LOG.debug("connected to %s", conn.getURI())
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            LOG.debug("closing the libvirt connection failed", exc_info=True)


def lookup(conn: Any, name: str) -> Any:
    """The domain by name, else UUID, else numeric ID (as virsh does)."""
    attempts = [conn.lookupByName]
    try:
        uuid.UUID(name)
    except ValueError:
        pass
    else:
        attempts.append(conn.lookupByUUIDString)
    if name.isdigit():
        attempts.append(lambda text: conn.lookupByID(int(text)))
    for attempt in attempts:
        try:
            return attempt(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() not in _NOT_FOUND:
                raise _libvirt_error(err, f"cannot look up domain '{name}'") from err
    raise CLIError(f"no domain '{name}' on {conn.getURI()}", EXIT_UNREADABLE)


def read_metadata(dom: Any, flags: int) -> FTSpec | None:
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, FT_NAMESPACE, flags)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise _libvirt_error(err, f"cannot read the metadata of '{dom.name()}'") from err
    return parse_libvirt_metadata(text)


def _set_metadata(dom: Any, spec: FTSpec | None, flags: int) -> None:
    text = libvirt_metadata_xml(spec) if spec is not None else None
    key = FT_PREFIX if spec is not None else None
    LOG.debug("setMetadata(%s, %r, flags=%#x)", dom.name(), text, flags)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, key, FT_NAMESPACE, flags)
    except libvirt.libvirtError as err:
        raise _libvirt_error(err, f"cannot change the metadata of '{dom.name()}'") from err


def _xml(dom: Any, inactive: bool) -> str:
    flags = libvirt.VIR_DOMAIN_XML_SECURE | (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    try:
        return str(dom.XMLDesc(flags))
    except libvirt.libvirtError as err:
        raise _libvirt_error(err, f"cannot read the XML of '{dom.name()}'") from err


def _existing_spec(xml: str, replacing: bool) -> FTSpec | None:
    try:
        return parse_domain(xml)
    except FTElementError:
        if not replacing:
            raise
        LOG.warning("replacing an invalid <cuju:ft> element")
        return None


def _prepare_and_define(
    conn: Any, dom: Any, xml: str, spec: FTSpec, *, force: bool, serve_disks: bool
) -> tuple[list[Problem], FTSpec]:
    """Redefine the domain with the safe changes; returns the problems of what libvirt kept
    and the element to set (with the records of the disks prepare rewrote).

    Two steps: the changes outside the disks first, judged on what libvirt kept; the disks
    only once that is fit (or forced), defined together with the element that records their
    originals, so that a defined domain never has a rewritten disk without its record.
    """
    doc = load_domain(xml)
    remove_ft_in(doc.root, restore_disks=False)  # the element is set through the metadata API afterwards
    changes = prepare_in(doc.root)
    remaining = errors(check_fitness_in(doc.root, spec))
    if remaining and not force:
        report_problems(remaining)
        raise CLIError(f"'{dom.name()}' cannot be protected even after --prepare: nothing changed")
    if changes:
        _define(conn, dom, doc.to_str(), changes)
    # Judge what libvirt actually kept (drivers may drop what they do not support).
    problems = check_fitness(_xml(dom, inactive=True), spec)
    if errors(problems) and not force:
        return problems, spec
    doc = load_domain(_xml(dom, inactive=True))
    set_ft_in(doc.root, spec)
    disk_changes = prepare_in(doc.root, disks=serve_disks)
    if disk_changes:
        element = find_ft(doc.root)
        assert element is not None
        spec = spec_from_element(element)
        _define(conn, dom, doc.to_str(), disk_changes)
        problems = check_fitness(_xml(dom, inactive=True), spec)
    return problems, spec


def _define(conn: Any, dom: Any, xml: str, changes: list[str]) -> None:
    LOG.info("redefining %s with %d prepared change(s)", dom.name(), len(changes))
    try:
        conn.defineXML(xml)
    except libvirt.libvirtError as err:
        raise _libvirt_error(err, f"cannot redefine '{dom.name()}' with the prepared XML") from err
    print_lines([f"changed: {change}" for change in changes])


def cmd_enable(args: argparse.Namespace) -> int:
    with connect(args.connect) as conn:
        dom = lookup(conn, args.domain)
        persistent, active = bool(dom.isPersistent()), bool(dom.isActive())
        base = _xml(dom, inactive=persistent)
        spec = spec_from_args(args, _existing_spec(base, replacing=args.peer is not None))
        if args.prepare:
            if not persistent:
                raise CLIError(f"--prepare needs a persistent domain; '{dom.name()}' is transient")
            problems, spec = _prepare_and_define(
                conn, dom, base, spec, force=args.force, serve_disks=args.serve_disks
            )
        else:
            problems = check_fitness(base, spec)
        if args.disk_replica:
            spec = apply_disk_options(spec, args.disk_replica)
        report_problems(problems)
        if errors(problems) and not args.force:
            fixable = any(p.preparable for p in errors(problems))
            hint = " ('--prepare' fixes some of them)" if fixable and not args.prepare else ""
            print_lines([f"'{dom.name()}' cannot be protected as defined: <cuju:ft> not set{hint}"])
            return EXIT_REFUSED
        if persistent:
            _set_metadata(dom, spec, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if active:
            live = errors(check_fitness(_xml(dom, inactive=False), spec))
            if live and not args.force:
                report_problems(live)
                print_lines(
                    [f"'{dom.name()}' runs with a configuration that cannot be protected: the element "
                     "is set in the persistent configuration and applies from the next start"]
                )
            else:
                _set_metadata(dom, spec, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        where = "persistent configuration" if persistent else "running domain"
        print(f"'{dom.name()}': <cuju:ft> set in the {where} ({peer_text(spec)})")
    return EXIT_OK


def cmd_disable(args: argparse.Namespace) -> int:
    with connect(args.connect) as conn:
        dom = lookup(conn, args.domain)
        removed = []
        scopes = []
        if dom.isPersistent():
            scopes.append((libvirt.VIR_DOMAIN_AFFECT_CONFIG, "persistent configuration"))
        if dom.isActive():
            scopes.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, "running domain"))
        for flags, label in scopes:
            if not read_metadata_raw(dom, flags):
                continue
            if flags == libvirt.VIR_DOMAIN_AFFECT_CONFIG and _restore_disks(conn, dom):
                removed.append(label)
                continue
            _set_metadata(dom, None, flags)
            removed.append(label)
        if removed:
            print(f"'{dom.name()}': <cuju:ft> removed from the {' and the '.join(removed)}")
        else:
            print(f"'{dom.name()}': no <cuju:ft>: nothing to do")
    return EXIT_OK


def _restore_disks(conn: Any, dom: Any) -> bool:
    """Redefine the domain without the element and with its prepared disks given back.

    False (nothing done) when the persistent element records no disk. A running domain
    keeps its NBD disks until it is restarted: the block server must keep serving them.
    """
    doc = load_domain(_xml(dom, inactive=True))
    element = find_ft(doc.root)
    if element is None or not (disks_from_element(element) or chardevs_from_element(element)):
        return False
    restored = restore_records_in(doc.root, element)
    remove_ft_in(doc.root, restore_disks=False)
    _define(conn, dom, doc.to_str(), restored)
    if dom.isActive():
        print_lines([f"'{dom.name()}' runs with its disks served over NBD until it is restarted"])
    return True


def read_metadata_raw(dom: Any, flags: int) -> bool:
    """Whether the element is present (even if invalid, so that disable can remove it)."""
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, FT_NAMESPACE, flags)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return False
        raise _libvirt_error(err, f"cannot read the metadata of '{dom.name()}'") from err
    return True


def cmd_show(args: argparse.Namespace) -> int:
    with connect(args.connect, readonly=True) as conn:
        dom = lookup(conn, args.domain)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if args.config else libvirt.VIR_DOMAIN_AFFECT_CURRENT
        spec = read_metadata(dom, flags)
        show_spec(spec, args.json, f"domain '{dom.name()}'")
    return EXIT_OK


_EXIT = (
    "exit status:\n  0  success\n  1  refused: invalid setting, domain cannot be protected, or libvirt\n"
    "     refused the change\n  2  DOMAIN not found, or cannot connect to URI, or bad usage"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or ID")
        p.add_argument("-c", "--connect", metavar="URI", help="libvirt connection URI (default: libvirt's)")

    p = subparsers.add_parser(
        "enable", help="protect a defined domain (sets <cuju:ft> through libvirt)", formatter_class=raw,
        description=(
            "Set <cuju:ft> on a domain defined in libvirt, through libvirt's metadata API\n"
            "(key 'cuju', namespace https://cuju-ft.github.io/libvirt/ft/1.0). The domain's\n"
            "persistent configuration is checked first and a domain that cannot be protected\n"
            "is refused, listing the problems. Options given replace those settings; the\n"
            "others keep their current values (or defaults).\n\n"
            "The element goes into the persistent configuration and, when the domain runs and\n"
            "its running configuration can be protected, into the running domain too (cujud\n"
            "then picks it up); otherwise it applies from the next start.\n\n"
            "--prepare first redefines the domain with the safe changes that 'xml enable\n"
            "--prepare' makes (memory backing, NIC driver, direct QMP socket), then checks what\n"
            "libvirt kept; once that is fit, it redefines it again with every writable disk\n"
            "that can be served rewritten to the replicating block server's NBD export,\n"
            "recording the originals in <cuju:ft>. Running domains see those changes at their\n"
            "next start."
        ),
        epilog=(
            "examples:\n  cuju-libvirt enable vm1 --peer hostb\n"
            "  cuju-libvirt enable vm1 --peer hostb --link 198.18.0.2 --prepare -c qemu:///system\n"
            "  cuju-libvirt enable vm1 --epoch-ms 10     # change one setting\n\n" + _EXIT
        ),
    )
    common(p)
    add_ft_options(p)
    p.add_argument("--prepare", action="store_true", help="redefine the domain with the safe changes first")
    add_disk_options(p)
    p.add_argument(
        "--force", action="store_true",
        help="set the element even if the domain cannot be protected (cujud will not protect it "
        "until the problems are fixed)",
    )
    p.set_defaults(handler=handle_xml_errors(cmd_enable))

    p = subparsers.add_parser(
        "disable", help="stop protecting a defined domain (removes <cuju:ft>)", formatter_class=raw,
        description=(
            "Remove <cuju:ft> from a defined domain's persistent configuration and, if it runs,\n"
            "from the running domain. Disks that --prepare served over NBD get their recorded\n"
            "<disk> back in the persistent configuration (a running domain keeps its NBD disks\n"
            "until it is restarted); the other changes made by --prepare stay. Idempotent."
        ),
        epilog="examples:\n  cuju-libvirt disable vm1\n\n" + _EXIT,
    )
    common(p)
    p.set_defaults(handler=handle_xml_errors(cmd_disable))

    p = subparsers.add_parser(
        "show", help="print a defined domain's <cuju:ft> settings", formatter_class=raw,
        description=(
            "Print the effective <cuju:ft> settings of a domain (defaults filled in): of the\n"
            "running domain if it runs, else of its persistent configuration (--config: always\n"
            "the persistent one). --json prints one JSON object keyed by attribute name, or null."
        ),
        epilog=(
            "examples:\n  cuju-libvirt show vm1\n  cuju-libvirt show vm1 --json -c qemu:///system\n\n" + _EXIT
        ),
    )
    common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.add_argument("--config", action="store_true", help="read the persistent configuration")
    p.set_defaults(handler=handle_xml_errors(cmd_show))
