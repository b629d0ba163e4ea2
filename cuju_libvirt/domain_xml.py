"""The ``<cuju:ft>`` element: domain XML in, typed :class:`FTSpec` out, and back.

Pure: no libvirt calls. The element lives inside the domain's ``<metadata>``::

    <domain type='kvm'>
      <metadata>
        <cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostb" epoch-ms="20"/>
      </metadata>
      ...

Every attribute is described once, in :data:`ATTRIBUTES` (name, default, bounds, meaning);
parsing, emitting, the CLI options and docs/ft-element.md follow that table. The element is
checked twice: by typed checks here (messages name the attribute and the fix) and by the
RELAX NG schema shipped in ``cuju_libvirt/schema/cuju-ft.rng``.

Editing functions (:func:`set_ft`, :func:`remove_ft`) touch nothing outside the element:
other metadata namespaces, comments, processing instructions, ``<qemu:commandline>``,
attribute order and whitespace are kept; a ``<metadata>`` created by :func:`set_ft` is
removed again by :func:`remove_ft` once it is empty.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import AnyStr, Literal, NamedTuple, cast

from lxml import etree

from cuju_libvirt import FT_NAMESPACE as _PACKAGE_FT_NAMESPACE
from cuju_libvirt import chardev_xml
from cuju_libvirt._xml import Document, close_indent, indent_of, insert_child, is_empty, remove_child
from cuju_libvirt.chardev_xml import FTChardev as FTChardev  # noqa: PLC0414  (re-exported: FTSpec.chardevs)
from cuju_libvirt.disk_xml import (
    NBD_SOCKET_DIR,
    TARGET_PATTERN,
    record_element,
    record_text,
    replica_problem,
    target_of,
)
from cuju_libvirt.disk_xml import FTDisk as FTDisk  # noqa: PLC0414  (re-exported: FTSpec.disks)
from cuju_libvirt.errors import FTElementError, NotADomainXMLError

#: XML namespace of the element (also exported as ``cuju_libvirt.FT_NAMESPACE``).
FT_NAMESPACE = _PACKAGE_FT_NAMESPACE
#: Every version of the namespace starts with this; other versions are refused by name.
FT_NAMESPACE_BASE = "https://cuju-ft.github.io/libvirt/ft/"
#: Prefix used when the element is written (and libvirt's metadata key).
FT_PREFIX = "cuju"
FT_TAG = f"{{{FT_NAMESPACE}}}ft"
FT_DISK_TAG = f"{{{FT_NAMESPACE}}}disk"
FT_CHARDEV_TAG = f"{{{FT_NAMESPACE}}}chardev"

DEFAULT_PEER_PORT = 7790
DEFAULT_LINK_PORT = 7791

Tracker = Literal["auto", "uffd", "scan"]
Failover = Literal["auto", "manual"]
PeerUnavailable = Literal["start-unprotected", "refuse-start"]
EpochPolicy = Literal["output", "fixed"]

_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# Element names libvirt puts before <metadata>; a new <metadata> goes after the last of them.
_BEFORE_METADATA = ("name", "uuid", "genid", "title", "description")


class Endpoint(NamedTuple):
    """A host (name, IPv4 or IPv6 address without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str, default_port: int) -> Endpoint:
    """Parse ``HOST[:PORT]`` (host name, IPv4, or ``[IPv6]``); raises ValueError with the reason."""
    if text != text.strip() or not text:
        raise ValueError("must be HOST or HOST:PORT without spaces")
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("an IPv6 address needs a closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("only ':PORT' may follow ']'")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as err:
            raise ValueError(f"'{host}' is not an IPv6 address") from err
    else:
        if text.count(":") > 1:
            raise ValueError("write an IPv6 address in brackets, e.g. [2001:db8::1]:7790")
        host, _, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if ":" in text else None
        _check_host(host)
    port = default_port
    if port_text is not None:
        if not _DIGITS.match(port_text):
            raise ValueError(f"port '{port_text}' is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1..65535")
    return Endpoint(host, port)


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as err:
            raise ValueError(f"'{host}' is not an IPv4 address") from err
        return
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"'{host}' is not a valid host name (letters, digits, '-' and '.')")


@dataclass(frozen=True)
class Attribute:
    """One attribute of ``<cuju:ft>``: the single source of truth for parser, CLI and docs."""

    name: str  # XML attribute name (also the JSON key and the CLI option name)
    field: str  # FTSpec field
    kind: Literal["endpoint", "int", "choice", "onoff", "ports"]
    default: str | int | bool | None
    doc: str
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()


#: ``peer='auto'``: cujud chooses the backup (with etcd the cluster's placer, as for an
#: element without ``peer``; without etcd this host's cujud, among its peers).
AUTO_PEER = "auto"
#: ``FTSpec.peer`` of an element without ``peer``: the cluster (etcd) places the standby.
PLACED = ""

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "peer", "peer", "endpoint", None,
        "the peer host's cujud, HOST[:PORT] (host name, IPv4 or [IPv6]); "
        f"port {DEFAULT_PEER_PORT} if omitted; 'auto': placed by the cluster with etcd, else chosen by "
        "this host's cujud; absent: "
        "placed by the cluster (needs etcd_endpoints)",
    ),
    Attribute(
        "link", "link", "endpoint", None,
        f"FT-link data endpoint on the peer, ADDR[:PORT]; default: the peer's host, port {DEFAULT_LINK_PORT}",
    ),
    Attribute("epoch-ms", "epoch_ms", "int", 20, "epoch length in milliseconds with epoch-policy='fixed'",
              bounds=(5, 1000)),
    Attribute(
        "epoch-policy", "epoch_policy", "choice", "output",
        "when an epoch ends: output (as soon as held network output waits for it, at the latest "
        "after max-epoch-ms) or fixed (every epoch-ms)",
        choices=("output", "fixed"),
    ),
    Attribute(
        "max-epoch-ms", "max_epoch_ms", "int", 100,
        "with epoch-policy='output': the longest an epoch lasts (bounds the replication lag and the "
        "replay of a guest that sends nothing)",
        bounds=(5, 10000),
    ),
    Attribute(
        "tracker", "tracker", "choice", "auto",
        "dirty-page tracker: uffd (userfaultfd write-protect), scan (compare with a shadow copy), "
        "auto (uffd if the host supports it, else scan)",
        choices=("auto", "uffd", "scan"),
    ),
    Attribute(
        "output-commit", "output_commit", "onoff", True,
        "hold the VM's network output until the peer acknowledged the epoch that produced it; "
        "off is unsafe (the outside world may see state that a failover loses)",
        choices=("on", "off"),
    ),
    Attribute(
        "serial-commit", "serial_commit", "ports", "auto",
        "with --prepare, which <serial>/<console> ports have their output held per epoch like network "
        "output (a chardev server per domain writes it to the original target): auto (every file, "
        "unix and tcp (raw) port; a pty stays libvirt's, so virsh console works, unheld), on (also "
        "ptys), off (none), or the ports themselves, e.g. 'serial0 console1'. An unheld port is "
        "at-least-once: the standby prints again the lines of the epoch a failover loses",
        choices=("auto", "on", "off"),
    ),
    Attribute(
        "max-epoch-packets", "max_epoch_packets", "int", 5000,
        "end an epoch early once this many outgoing packets are held (QEMU's filter-buffer "
        "drops packets beyond 10,000)",
        bounds=(100, 9000),
    ),
    Attribute(
        "failover", "failover", "choice", "auto",
        "auto: the standby takes over when the primary is declared dead; manual: an operator decides",
        choices=("auto", "manual"),
    ),
    Attribute(
        "heartbeat-timeout-ms", "heartbeat_timeout_ms", "int", 500,
        "declare the peer dead after this long without heartbeats on both paths",
        bounds=(50, 60000),
    ),
    Attribute(
        "on-peer-unavailable", "on_peer_unavailable", "choice", "start-unprotected",
        "what the hook does at start when protection cannot be established: start the VM "
        "unprotected (and say so) or refuse the start",
        choices=("start-unprotected", "refuse-start"),
    ),
)
ATTRIBUTE_BY_NAME: Mapping[str, Attribute] = {a.name: a for a in ATTRIBUTES}


def _allowed(attr: Attribute) -> str:
    if attr.bounds:
        return f"an integer from {attr.bounds[0]} to {attr.bounds[1]}"
    if attr.kind == "ports":
        return " or ".join(repr(c) for c in attr.choices) + " or port names (e.g. 'serial0 console1')"
    if attr.choices:
        return " or ".join(repr(c) for c in attr.choices)
    return "HOST or HOST:PORT (host name, IPv4 address, or [IPv6 address])"


def _default_text(attr: Attribute) -> str:
    if attr.name == "peer":
        return "default: placed by the cluster (needs etcd_endpoints in cujud.yaml)"
    if attr.name == "link":
        return f"default: the peer's host, port {DEFAULT_LINK_PORT}"
    if attr.kind == "onoff":
        return f"default {'on' if attr.default else 'off'}"
    return f"default {attr.default}"


def _value_problem(attr: Attribute, value: object, reason: str = "") -> str:
    why = f" ({reason})" if reason else ""
    remedy = "set it to a valid value or remove it to use the default"
    return (
        f"<cuju:ft> attribute {attr.name}={str(value)!r} is invalid{why}: it must be {_allowed(attr)}, "
        f"{_default_text(attr)}; fix: {remedy}"
    )


@dataclass(frozen=True)
class FTSpec:
    """The settings of one ``<cuju:ft>`` element, validated on construction."""

    #: The backup's cujud; ``PLACED`` (the attribute is absent): the cluster places the standby.
    peer: str = ""
    link: str | None = None
    epoch_ms: int = 20
    epoch_policy: EpochPolicy = "output"
    max_epoch_ms: int = 100
    tracker: Tracker = "auto"
    output_commit: bool = True
    #: ``auto``, ``on``, ``off`` or the held ports' keys, space-separated (:meth:`holds_port`).
    serial_commit: str = "auto"
    max_epoch_packets: int = 5000
    failover: Failover = "auto"
    heartbeat_timeout_ms: int = 500
    on_peer_unavailable: PeerUnavailable = "start-unprotected"
    #: The prepared disks (``<cuju:disk>`` children), in document order.
    disks: tuple[FTDisk, ...] = ()
    #: The held serial ports and consoles (``<cuju:chardev>`` children), in document order.
    chardevs: tuple[FTChardev, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        for attr in ATTRIBUTES:
            value = getattr(self, attr.field)
            reason = _check_value(attr, value)
            if reason is not None:
                problems.append(_value_problem(attr, value, reason))
        if self.link is not None and self.peer == PLACED:
            problems.append(
                f"<cuju:ft> attribute link={self.link!r} names the FT link on the peer, but there is no "
                "peer attribute (the cluster places the standby and its cujud tells its FT-link address); "
                "fix: remove link, or add peer='HOST[:PORT]'"
            )
        if not isinstance(self.disks, tuple) or not all(isinstance(d, FTDisk) for d in self.disks):
            problems.append("FTSpec.disks must be a tuple of FTDisk")
        else:
            targets = [d.target for d in self.disks]
            for target in sorted({t for t in targets if targets.count(t) > 1}):
                problems.append(
                    f"<cuju:ft> records disk '{target}' {targets.count(target)} times; "
                    "fix: keep one <cuju:disk> per target"
                )
        if not isinstance(self.chardevs, tuple) or not all(isinstance(c, FTChardev) for c in self.chardevs):
            problems.append("FTSpec.chardevs must be a tuple of FTChardev")
        else:
            seen = [(c.device, c.index) for c in self.chardevs]
            for device, index in sorted({x for x in seen if seen.count(x) > 1}):
                problems.append(f"<cuju:ft> records <{device}> {index} more than once; fix: keep one "
                                "<cuju:chardev> per element")
        if problems:
            raise FTElementError(problems)

    @classmethod
    def defaults(cls, peer: str = "") -> FTSpec:
        """All defaults, with ``peer`` (none: placed by the cluster)."""
        return cls(peer=peer)

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str]) -> FTSpec:
        """Build from XML attribute strings (names as in the element); all problems at once."""
        problems: list[str] = []
        values: dict[str, object] = {}
        for name in attributes:
            if name not in ATTRIBUTE_BY_NAME:
                problems.append(_unknown_attribute(name))
        for name, text in attributes.items():
            attr = ATTRIBUTE_BY_NAME.get(name)
            if attr is None:
                continue
            try:
                value = _from_text(attr, text)
            except ValueError as err:
                problems.append(_value_problem(attr, text, str(err)))
                continue
            reason = _check_value(attr, value)
            if reason is not None:
                problems.append(_value_problem(attr, text, reason))
            values[attr.field] = value
        if problems:
            raise FTElementError(problems)
        return cls(**values)  # type: ignore[arg-type]  # fields checked in __post_init__

    def holds_port(self, names: Iterable[str], kind: str) -> bool:
        """Whether ``serial-commit`` selects a holdable port: ``names`` are its own name
        (``console0``) and its key (``serial0`` for the console that mirrors COM1), ``kind``
        its original type (``auto`` leaves ptys alone: they are interactive consoles)."""
        if self.serial_commit in ("auto", "on", "off"):
            return self.serial_commit == "on" or (self.serial_commit == "auto" and kind != "pty")
        return not set(self.serial_commit.split()).isdisjoint(names)

    def disk(self, target: str) -> FTDisk | None:
        """The record of the prepared disk ``target``, or None."""
        return next((d for d in self.disks if d.target == target), None)

    def replace(self, **changes: object) -> FTSpec:
        """A copy with some fields changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def placed(self) -> bool:
        """No ``peer`` attribute: the cluster's placer chooses the backup."""
        return self.peer == PLACED

    @property
    def peer_endpoint(self) -> Endpoint:
        """The peer's cujud; host ``auto`` when cujud chooses it (``peer='auto'`` or placed)."""
        return parse_endpoint(self.peer or AUTO_PEER, DEFAULT_PEER_PORT)

    @property
    def link_endpoint(self) -> Endpoint:
        if self.link is None:
            return Endpoint(self.peer_endpoint.host, DEFAULT_LINK_PORT)
        return parse_endpoint(self.link, DEFAULT_LINK_PORT)

    @property
    def peer_host(self) -> str:
        return self.peer_endpoint.host

    @property
    def peer_port(self) -> int:
        return self.peer_endpoint.port

    @property
    def link_host(self) -> str:
        return self.link_endpoint.host

    @property
    def link_port(self) -> int:
        return self.link_endpoint.port

    def to_dict(self) -> dict[str, str | int]:
        """Effective settings, defaults filled in; keys are the XML attribute names.

        Integers stay integers; enumerations and on/off are their XML words; ``peer`` is
        as written and ``link`` is the effective ``HOST:PORT``.
        """
        result: dict[str, str | int] = {}
        for attr in ATTRIBUTES:
            if attr.name == "link":
                result["link"] = str(self.link_endpoint)
            else:
                result[attr.name] = _to_json(attr, getattr(self, attr.field))
        return result

    def to_attributes(self) -> dict[str, str]:
        """The attributes to write: ``peer`` and every setting that differs from its default."""
        result: dict[str, str] = {}
        for attr in ATTRIBUTES:
            value = getattr(self, attr.field)
            if attr.name == "peer" and value == PLACED:
                continue
            if attr.name == "peer" or (value is not None and value != attr.default):
                result[attr.name] = _to_text(attr, value)
        return result


def _check_value(attr: Attribute, value: object) -> str | None:
    """Why ``value`` is not valid for ``attr``, or None when it is."""
    if attr.kind == "endpoint":
        if (value is None and attr.name == "link") or (value == PLACED and attr.name == "peer"):
            return None
        if not isinstance(value, str):
            return "not a string"
        try:
            parse_endpoint(value, DEFAULT_PEER_PORT)
        except ValueError as err:
            return str(err)
        return None
    if attr.kind == "int":
        assert attr.bounds is not None
        if not isinstance(value, int) or isinstance(value, bool):
            return "not an integer"
        lo, hi = attr.bounds
        return None if lo <= value <= hi else f"outside {lo}..{hi}"
    if attr.kind == "onoff":
        return None if isinstance(value, bool) else "not on/off"
    if attr.kind == "ports":
        return None if isinstance(value, str) and (value in attr.choices or _port_list(value)) else \
            "not auto, on, off or a list of ports such as 'serial0 console1'"
    return None if value in attr.choices else "not one of the choices"


_PORT_NAME = re.compile(r"(serial|console)[0-9]{1,4}")


def _port_list(text: str) -> bool:
    """``text`` names ports, each once: ``serial0 console1``."""
    words = text.split()
    return bool(words) and len(set(words)) == len(words) and all(_PORT_NAME.fullmatch(w) for w in words)


def _from_text(attr: Attribute, text: str) -> object:
    if attr.kind == "endpoint":
        parse_endpoint(text, DEFAULT_PEER_PORT)
        return text
    if attr.kind == "int":
        if not _DIGITS.match(text):
            raise ValueError("not a decimal integer")
        if len(text) > 9:
            raise ValueError("too many digits")
        return int(text)
    if attr.kind == "ports" and text not in attr.choices:
        if not _port_list(text):
            raise ValueError("not auto, on, off or port names such as 'serial0 console1', each once")
        return " ".join(text.split())
    if text not in attr.choices:
        raise ValueError("unknown value")
    if attr.kind == "onoff":
        return text == "on"
    return text


def _to_text(attr: Attribute, value: object) -> str:
    if attr.kind == "onoff":
        return "on" if value else "off"
    return str(value)


def _to_json(attr: Attribute, value: object) -> str | int:
    if attr.kind == "int":
        return cast(int, value)
    return _to_text(attr, value)


def _unknown_attribute(name: str) -> str:
    shown = name
    if name.startswith("{"):
        uri, _, local = name[1:].partition("}")
        shown = f"{local} (namespace {uri})"
    close = difflib.get_close_matches(name, list(ATTRIBUTE_BY_NAME), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"<cuju:ft> has an unknown attribute '{shown}'; fix: {hint}remove it "
        f"(known attributes: {', '.join(ATTRIBUTE_BY_NAME)})"
    )


# --- the RELAX NG schema ------------------------------------------------------------------


@cache
def schema() -> etree.RelaxNG:
    """The RELAX NG schema of the element, loaded once from the package."""
    text = resources.files("cuju_libvirt").joinpath("schema/cuju-ft.rng").read_bytes()
    return etree.RelaxNG(etree.fromstring(text, etree.XMLParser(resolve_entities=False, no_network=True)))


def _schema_check(element: etree._Element) -> None:
    # Validate a detached copy so that the check does not depend on the rest of the document.
    copy = etree.fromstring(etree.tostring(element, with_tail=False))
    rng = schema()
    if not rng.validate(copy):
        messages = [f"<cuju:ft> fails the schema cuju-ft.rng: {e.message}" for e in rng.error_log]
        raise FTElementError(messages or ["<cuju:ft> fails the schema cuju-ft.rng"])


# --- reading ------------------------------------------------------------------------------


def _line(element: etree._Element) -> str:
    return f" (line {element.sourceline})" if element.sourceline else ""


def find_ft(root: etree._Element) -> etree._Element | None:
    """The ``<cuju:ft>`` element of a ``<domain>`` tree, or None.

    Raises :class:`FTElementError` for an element of another namespace version, an unknown
    element in the namespace, an element outside ``<metadata>``, or two elements.
    """
    found: list[etree._Element] = []
    problems: list[str] = []
    for element in root.iter(etree.Element):
        qname = etree.QName(element)
        uri = qname.namespace or ""
        if not uri.startswith(FT_NAMESPACE_BASE):
            continue
        if uri != FT_NAMESPACE:
            problems.append(
                f"<{qname.localname}>{_line(element)} uses namespace {uri}, which this cuju-libvirt "
                f"does not support; fix: use {FT_NAMESPACE}"
            )
            continue
        parent = element.getparent()
        if qname.localname != "ft":
            if parent is None or etree.QName(parent).namespace != FT_NAMESPACE:
                problems.append(
                    f"unknown element <{qname.localname}>{_line(element)} in the cuju namespace; "
                    "fix: remove it (the only element is <cuju:ft>)"
                )
            continue
        if parent is None or parent.tag != "metadata" or parent.getparent() is not root:
            where = "the document root" if parent is None else f"<{parent.tag}>"
            problems.append(
                f"<cuju:ft>{_line(element)} is inside {where}; libvirt keeps it only directly inside "
                "the domain's <metadata>; fix: move it there"
            )
            continue
        found.append(element)
    if len(found) > 1:
        lines = ", ".join(str(e.sourceline) for e in found)
        problems.append(
            f"{len(found)} <cuju:ft> elements (lines {lines}); libvirt allows one element per "
            "namespace in <metadata>; fix: keep exactly one"
        )
    if problems:
        raise FTElementError(problems)
    return found[0] if found else None


def _is_disk_record(node: etree._Element) -> bool:
    return node.tag == FT_DISK_TAG


def disk_from_element(record: etree._Element) -> FTDisk:
    """One ``<cuju:disk target='..' [replica='..']>`` record holding the original ``<disk>``."""
    target = record.get("target")
    where = f"<cuju:disk target='{target}'>" if target is not None else "<cuju:disk>"
    problems: list[str] = []
    for name in record.attrib:
        if name not in ("target", "replica"):
            problems.append(
                f"{where} has an unknown attribute '{name!s}'; fix: remove it (known: target, replica)"
            )
    if target is None:
        problems.append(
            f"{where}{_line(record)} has no target attribute; fix: add target='DEV' (the disk's <target dev>)"
        )
    elif TARGET_PATTERN.match(target) is None:
        problems.append(
            f"{where} target is not a disk's <target dev> (lower-case letters and digits, e.g. vda); "
            "fix: set it to the dev of the recorded <disk>"
        )
    replica = record.get("replica")
    if replica is not None and replica_problem(replica) is not None:
        problems.append(
            f"{where} attribute replica={replica!r} is invalid ({replica_problem(replica)}): it must be an "
            "absolute path on the backup host, default: under replica_dir of cujud.yaml; fix: set it to "
            "a valid path or remove it"
        )
    children = [c for c in record if isinstance(c.tag, str)]
    originals = [
        c for c in children
        if etree.QName(c).localname == "disk" and etree.QName(c).namespace in (None, FT_NAMESPACE)
    ]
    texts = [record.text, *(c.tail for c in record)]
    if len(children) != 1 or len(originals) != 1 or any(t and t.strip() for t in texts):
        problems.append(
            f"{where}{_line(record)} must hold exactly one element, the <disk> as it was before prepare; "
            "fix: restore the disk by hand and run 'cuju-libvirt xml enable --prepare' again"
        )
    if problems:
        raise FTElementError(problems)
    assert target is not None
    return FTDisk(target, record_text(originals[0], indent_of(originals[0])), replica)


def _is_chardev_record(node: etree._Element) -> bool:
    return node.tag == FT_CHARDEV_TAG


def chardev_from_element(record: etree._Element) -> FTChardev:
    """One ``<cuju:chardev device='serial' index='0'>`` record holding the original element."""
    device, index = record.get("device"), record.get("index")
    where = f"<cuju:chardev device='{device}' index='{index}'>"
    problems: list[str] = []
    for name in record.attrib:
        if name not in ("device", "index"):
            problems.append(f"{where} has an unknown attribute '{name!s}'; fix: remove it "
                            "(known: device, index)")
    if device not in chardev_xml.DEVICES:
        problems.append(f"{where}{_line(record)}: device must be 'serial' or 'console'")
    if index is None or _DIGITS.match(index) is None:
        problems.append(f"{where}{_line(record)}: index must be the element's position among its kind "
                        "(0, 1, ...)")
    children = [c for c in record if isinstance(c.tag, str)]
    texts = [record.text, *(c.tail for c in record)]
    if (len(children) != 1 or etree.QName(children[0]).localname != device
            or any(t and t.strip() for t in texts)):
        problems.append(
            f"{where}{_line(record)} must hold exactly one element, the <{device}> as it was before prepare; "
            "fix: restore it by hand and run 'cuju-libvirt xml enable --prepare' again"
        )
    if problems:
        raise FTElementError(problems)
    assert device is not None and index is not None
    return FTChardev(cast(chardev_xml.ChardevDevice, device), int(index),
                     record_text(children[0], indent_of(children[0])))


def chardevs_from_element(element: etree._Element) -> tuple[FTChardev, ...]:
    """The chardev records of a ``<cuju:ft>`` element, all problems at once."""
    found: list[FTChardev] = []
    problems: list[str] = []
    for child in element:
        if isinstance(child.tag, str) and _is_chardev_record(child):
            try:
                found.append(chardev_from_element(child))
            except FTElementError as err:
                problems.extend(err.problems)
    if problems:
        raise FTElementError(problems)
    return tuple(found)


def disks_from_element(element: etree._Element) -> tuple[FTDisk, ...]:
    """The disk records of a ``<cuju:ft>`` element, all problems at once."""
    disks: list[FTDisk] = []
    problems: list[str] = []
    for child in element:
        if isinstance(child.tag, str) and _is_disk_record(child):
            try:
                disks.append(disk_from_element(child))
            except FTElementError as err:
                problems.extend(err.problems)
    if problems:
        raise FTElementError(problems)
    return tuple(disks)


def spec_from_element(element: etree._Element) -> FTSpec:
    """Validate one ``<cuju:ft>`` element (typed checks, then the schema) and return its settings."""
    problems: list[str] = []
    for child in element:
        if isinstance(child.tag, str) and not _is_disk_record(child) and not _is_chardev_record(child):
            problems.append(
                f"<cuju:ft> has a child element <{etree.QName(child).localname}>; it takes attributes "
                "and <cuju:disk>/<cuju:chardev> records only; fix: remove the child"
            )
    texts = [element.text, *(c.tail for c in element)]
    if any(t and t.strip() for t in texts):
        problems.append(
            "<cuju:ft> contains text; it takes attributes and <cuju:disk> records only; fix: remove the text"
        )
    disks: tuple[FTDisk, ...] = ()
    chardevs: tuple[FTChardev, ...] = ()
    try:
        disks = disks_from_element(element)
    except FTElementError as err:
        problems.extend(err.problems)
    try:
        chardevs = chardevs_from_element(element)
    except FTElementError as err:
        problems.extend(err.problems)
    try:
        spec = FTSpec.from_attributes({str(k): str(v) for k, v in element.attrib.items()})
    except FTElementError as err:
        raise FTElementError(problems + err.problems) from err
    if problems:
        raise FTElementError(problems)
    _schema_check(element)
    return spec.replace(disks=disks, chardevs=chardevs)


def check_domain_root(root: etree._Element) -> None:
    """Raise :class:`NotADomainXMLError` unless ``root`` is a libvirt ``<domain>``."""
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise NotADomainXMLError(
            f"the root element is <{tag}>, not <domain>: this is not a libvirt domain XML"
        )


def load_domain(xml: str | bytes, what: str = "domain XML") -> Document:
    """Parse a domain XML safely (see :mod:`cuju_libvirt._xml`) and check that it is a ``<domain>``."""
    doc = Document.parse(xml, what)
    check_domain_root(doc.root)
    return doc


def parse_domain(xml: str | bytes) -> FTSpec | None:
    """The settings of the domain's ``<cuju:ft>`` element, or None when it has none."""
    element = find_ft(load_domain(xml).root)
    return None if element is None else spec_from_element(element)


def parse_element(xml: str | bytes) -> FTSpec:
    """The settings of a bare ``<cuju:ft xmlns:cuju=...>`` element given as XML text."""
    doc = Document.parse(xml, "<cuju:ft> element")
    root = doc.root
    if root.tag != FT_TAG:
        qname = etree.QName(root)
        if (qname.namespace or "").startswith(FT_NAMESPACE_BASE) and qname.localname == "ft":
            raise FTElementError(
                [f"<ft> uses namespace {qname.namespace}, which is not supported; fix: use {FT_NAMESPACE}"]
            )
        raise FTElementError([f"expected <cuju:ft> in namespace {FT_NAMESPACE}, got <{qname.localname}>"])
    return spec_from_element(root)


def parse_libvirt_metadata(xml: str) -> FTSpec:
    """Parse the element as libvirt's ``virDomainGetMetadata`` returns it (no namespace)."""
    doc = Document.parse(xml, "libvirt metadata")
    root = doc.root
    if root.tag not in ("ft", FT_TAG):
        raise FTElementError([f"libvirt returned <{root.tag}> for the cuju namespace, expected <ft>"])
    element = etree.Element(FT_TAG, nsmap={FT_PREFIX: FT_NAMESPACE})
    for name, value in root.attrib.items():
        element.set(name, value)
    for child in root:
        # libvirt hands the records back without namespace (or with the cuju one on every
        # descendant, depending on how they were set): records are the element's children.
        if isinstance(child.tag, str) and etree.QName(child).namespace is None:
            child.tag = f"{{{FT_NAMESPACE}}}{child.tag}"
        element.append(child)
    element.text = root.text
    return spec_from_element(element)


# --- writing ------------------------------------------------------------------------------


def ft_element(
    spec: FTSpec, prefix: str = FT_PREFIX, indent: str | None = "", step: str = "  "
) -> etree._Element:
    """A new ``<cuju:ft>`` element for ``spec`` (peer, every non-default setting, the disk records).

    ``indent`` is that of the line the element starts on (None: no whitespace at all).
    """
    element = etree.Element(FT_TAG, nsmap={prefix: FT_NAMESPACE})
    for name, value in spec.to_attributes().items():
        element.set(name, value)
    for disk in spec.disks:
        record = etree.SubElement(element, FT_DISK_TAG)
        record.set("target", disk.target)
        if disk.replica is not None:
            record.set("replica", disk.replica)
        record.append(record_element(disk.original, None if indent is None else indent + 2 * step))
    for chardev in spec.chardevs:
        record = etree.SubElement(element, FT_CHARDEV_TAG)
        record.set("device", chardev.device)
        record.set("index", str(chardev.index))
        record.append(record_element(chardev.original, None if indent is None else indent + 2 * step))
    if indent is not None and len(element):
        _layout(element, indent, step)
    return element


def _layout(element: etree._Element, indent: str, step: str) -> None:
    """Indent the records of a freshly built element that starts on a line indented by ``indent``."""
    element.text = "\n" + indent + step
    for i, record in enumerate(element):
        record.text = "\n" + indent + 2 * step
        record[0].tail = "\n" + indent + step
        record.tail = "\n" + indent + (step if i < len(element) - 1 else "")


def libvirt_metadata_xml(spec: FTSpec) -> str:
    """The element as ``virDomainSetMetadata`` wants it: no namespace (libvirt adds key and URI).

    The records keep their namespace (declared as the default namespace on each) and the
    recorded ``<disk>`` none, so that libvirt stores them as a defined domain XML has them.
    """
    element = etree.Element("ft")
    for name, value in spec.to_attributes().items():
        element.set(name, value)
    for disk in spec.disks:
        record = etree.SubElement(element, FT_DISK_TAG, nsmap={None: FT_NAMESPACE})  # type: ignore[dict-item]
        record.set("target", disk.target)
        if disk.replica is not None:
            record.set("replica", disk.replica)
        record.append(record_element(disk.original, "    "))
    for chardev in spec.chardevs:
        record = etree.SubElement(element, FT_CHARDEV_TAG, nsmap={None: FT_NAMESPACE})  # type: ignore[dict-item]
        record.set("device", chardev.device)
        record.set("index", str(chardev.index))
        record.append(record_element(chardev.original, "    "))
    if len(element):
        _layout(element, "", "  ")
    return etree.tostring(element, encoding="unicode")


def element_xml(spec: FTSpec) -> str:
    """The bare element as text, with its namespace declaration."""
    return etree.tostring(ft_element(spec), encoding="unicode")


def set_ft_in(root: etree._Element, spec: FTSpec) -> bool:
    """Add or replace the element in a ``<domain>`` tree; True if ``<metadata>`` was created."""
    existing = find_ft(root)
    if existing is not None:
        prefix = existing.prefix or FT_PREFIX
        indent, step = _placement(existing)
        new = ft_element(spec, prefix, indent, step)
        new.tail = existing.tail
        parent = existing.getparent()
        assert parent is not None
        parent.replace(existing, new)
        return False
    metadata = root.find("metadata")
    created = metadata is None
    if metadata is None:
        metadata = etree.Element("metadata")
        index = 0
        for i, child in enumerate(root):
            if child.tag in _BEFORE_METADATA:
                index = i + 1
        insert_child(root, metadata, index)
    new = ft_element(spec, indent=None)
    insert_child(metadata, new)
    if created:
        close_indent(metadata)
    if spec.disks or spec.chardevs:
        indent, step = _placement(new)
        laid_out = ft_element(spec, new.prefix or FT_PREFIX, indent, step)
        laid_out.tail = new.tail
        metadata.replace(new, laid_out)
    return created


def _placement(element: etree._Element) -> tuple[str | None, str]:
    """The indentation of the line ``element`` starts on and the document's indentation step."""
    own = indent_of(element)
    parent = element.getparent()
    above = indent_of(parent) if parent is not None else None
    step = "  "
    if own is not None and above is not None and own.startswith(above) and len(own) > len(above):
        step = own[len(above) :]
    return own, step


def remove_ft_in(root: etree._Element, restore_disks: bool = True) -> bool:
    """Remove the element from a ``<domain>`` tree (and ``<metadata>`` if left empty).

    The prepared disks get their recorded originals back (:func:`restore_disks_in`) unless
    ``restore_disks`` is False (the caller puts the element back later). Returns False when
    there was no element. An element in another namespace version is refused
    (:class:`FTElementError`) rather than removed silently.
    """
    element = find_ft(root)
    if element is None:
        return False
    if restore_disks:
        restore_records_in(root, element)
    metadata = element.getparent()
    assert metadata is not None
    remove_child(element)
    if is_empty(metadata):
        remove_child(metadata)
    return True


def is_nbd_export(disk: etree._Element) -> bool:
    """Whether a ``<disk>`` is a prepared one: NBD over a UNIX socket in NBD_SOCKET_DIR, export = target."""
    source = disk.find("source")
    host = source.find("host") if source is not None else None
    target = target_of(disk)
    return (
        disk.get("type") == "network"
        and source is not None
        and source.get("protocol") == "nbd"
        and target is not None
        and source.get("name") == target
        and host is not None
        and host.get("transport") == "unix"
        and str(host.get("socket", "")).startswith(NBD_SOCKET_DIR + "/")
        and str(host.get("socket", "")).endswith(f"/{target}.sock")
    )


def restore_disks_in(root: etree._Element, disks: tuple[FTDisk, ...]) -> list[str]:
    """Put the recorded ``<disk>`` elements back in place of their NBD exports; what was restored.

    A recorded disk that is no longer in ``<devices>`` is skipped (it was detached). One
    that is there but is no longer the NBD export (edited since) is refused: giving the
    record back would undo that edit, dropping the record would lose the original.
    """
    by_target: dict[str | None, etree._Element] = {}
    for disk in root.iterfind("devices/disk"):  # an export wins over a clash of target devs
        if is_nbd_export(disk) or target_of(disk) not in by_target:
            by_target[target_of(disk)] = disk
    problems: list[str] = []
    for record in disks:
        current = by_target.get(record.target)
        if current is not None and not is_nbd_export(current):
            problems.append(
                f"<disk> {record.target} is no longer the NBD export that prepare made, so its record "
                f"in <cuju:ft> (the original, {record.source}) cannot be put back; fix: remove "
                f"<cuju:disk target='{record.target}'> by hand if the current <disk> is what you want"
            )
    if problems:
        raise FTElementError(problems)
    restored: list[str] = []
    for record in disks:
        current = by_target.get(record.target)
        if current is None:
            continue
        original = record_element(record.original, indent_of(current))
        original.tail = current.tail
        parent = current.getparent()
        assert parent is not None
        parent.replace(current, original)
        restored.append(f"restored <disk> {record.target} ({record.source}) from its record in <cuju:ft>")
    return restored


def restore_records_in(root: etree._Element, element: etree._Element) -> list[str]:
    """Give back every prepared disk and chardev recorded in ``element``; what was restored.
    Nothing changes when one of them cannot be given back (:class:`FTElementError`)."""
    disks, chardevs = disks_from_element(element), chardevs_from_element(element)
    chardev_xml.restore_chardevs_in(copy_of(root), chardevs)  # refuses before anything changed
    return restore_disks_in(root, disks) + chardev_xml.restore_chardevs_in(root, chardevs)


def copy_of(root: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(root))


def set_ft(xml: AnyStr, spec: FTSpec) -> AnyStr:
    """The domain XML with the element added or replaced; nothing else changes."""
    doc = load_domain(xml)
    set_ft_in(doc.root, spec)
    return cast(AnyStr, doc.dump())


def remove_ft(xml: AnyStr) -> AnyStr:
    """The domain XML without the element (unchanged when there is none)."""
    doc = load_domain(xml)
    remove_ft_in(doc.root)
    return cast(AnyStr, doc.dump())
