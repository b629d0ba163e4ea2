"""Held serial ports in domain XML: the ``<serial>``/``<console>`` as it was, and as QEMU reaches it.

Pure: lxml only, no libvirt calls. A ``<serial>`` (or ``<console>``) of type file, pty,
unix or tcp (raw) of a protected domain is *prepared* by rewriting it to a UNIX socket that
QEMU connects to, served by the domain's chardev server
(:mod:`cuju_libvirt.chardev_server`), which holds the output per epoch::

    <serial type='unix'>
      <source mode='connect' path='/run/cuju-libvirt/chardev/UUID/serial0.sock'/>
      <target port='0'/>                 <!-- everything but type, <source>, <protocol>, <log> kept -->
    </serial>

The element as it was is recorded inside ``<cuju:ft>`` (one ``<cuju:chardev>`` per element,
by device and index among the ``<devices>`` children of its kind), so that removing
``<cuju:ft>`` gives it back exactly, as :mod:`cuju_libvirt.disk_xml` does for disks. The
console libvirt derives from the first serial port (``<console>`` with a serial target)
shares that port's socket: it *is* that port. The key of a chardev (``serial0``,
``console1``) names its socket and, for a pty, the server's pty link ``<key>.pty``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lxml import etree

from cuju_libvirt._xml import indent_of, safe_parser
from cuju_libvirt.disk_xml import record_element, record_text
from cuju_libvirt.errors import FTElementError

#: Directory of the per-domain chardev servers on both hosts: CHARDEV_SOCKET_DIR/<uuid>/<key>.sock.
CHARDEV_SOCKET_DIR = "/run/cuju-libvirt/chardev"
#: Chardev types whose output the server holds and writes to the same place.
HOLDABLE = ("file", "pty", "unix", "tcp")
ChardevDevice = Literal["serial", "console"]
DEVICES: tuple[ChardevDevice, ...] = ("serial", "console")


def chardev_socket_path(uuid: str, key: str) -> str:
    return f"{CHARDEV_SOCKET_DIR}/{uuid.lower()}/{key}.sock"


@dataclass(frozen=True)
class ChardevTarget:
    """Where the released bytes of one chardev go: the original element's source."""

    kind: str  # file | pty | unix | tcp
    path: str | None = None  # file, unix
    append: bool = False  # file: <source append='on'>
    mode: str = "connect"  # unix, tcp: bind (wait for the user) or connect
    host: str | None = None  # tcp
    service: str | None = None  # tcp
    log: str | None = None  # <log file=...>
    log_append: bool = False

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "pty":
            return "a pty"
        where = self.path if self.kind == "unix" else f"{self.host or '*'}:{self.service}"
        return f"{self.kind} {self.mode} {where}"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("kind", "path", "append", "mode", "host", "service", "log", "log_append")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChardevTarget:
        return cls(**data)


def unholdable(element: etree._Element) -> str | None:
    """Why the output of a ``<serial>``/``<console>`` cannot be held, or None if it can."""
    kind = element.get("type", "pty")
    if kind not in HOLDABLE:
        return f"type '{kind}' (held: {', '.join(HOLDABLE)})"
    protocol = element.find("protocol")
    if kind == "tcp" and protocol is not None and protocol.get("type", "raw") != "raw":
        return f"tcp with protocol '{protocol.get('type')}' (held: raw)"
    source = element.find("source")
    if kind in ("file", "unix") and (source is None or not source.get("path")):
        return f"type '{kind}' without <source path>"
    if kind == "tcp" and (source is None or not source.get("service")):
        return "type 'tcp' without <source service>"
    return None


def target_of(element: etree._Element) -> ChardevTarget:
    """The :class:`ChardevTarget` of a holdable original element."""
    kind = element.get("type", "pty")
    source = element.find("source")
    src: dict[str, str] = {str(k): str(v) for k, v in source.attrib.items()} if source is not None else {}
    log = element.find("log")
    return ChardevTarget(
        kind=kind,
        path=str(src["path"]) if "path" in src else None,
        append=src.get("append") == "on",
        mode=str(src.get("mode", "connect" if kind == "tcp" else "bind")),
        host=str(src["host"]) if "host" in src else None,
        service=str(src["service"]) if "service" in src else None,
        log=str(log.get("file")) if log is not None and log.get("file") else None,
        log_append=log is not None and log.get("append") == "on",
    )


def _console_port(console: etree._Element) -> str | None:
    """The serial port a ``<console>`` mirrors (libvirt's compat console), or None."""
    target = console.find("target")
    if target is not None and target.get("type", "serial") != "serial":
        return None
    return target.get("port", "0") if target is not None else "0"


def _serial_port(serial: etree._Element, index: int) -> str:
    target = serial.find("target")
    return str(target.get("port", index)) if target is not None else str(index)


def key_of(devices: etree._Element, device: str, index: int) -> str:
    """The key of the ``index``-th ``<device>`` child of ``<devices>`` (a compat console: its serial's)."""
    if device == "console":
        console = devices.findall("console")[index]
        port = _console_port(console)
        serials = devices.findall("serial")
        for i, serial in enumerate(serials):
            if port is not None and _serial_port(serial, i) == port:
                return f"serial{i}"
    return f"{device}{index}"


def is_held_socket(element: etree._Element, key: str) -> bool:
    """Whether an element is a prepared one: a UNIX client socket ``<key>.sock`` in CHARDEV_SOCKET_DIR."""
    source = element.find("source")
    path = str(source.get("path", "")) if source is not None else ""
    return (element.get("type") == "unix" and source is not None and source.get("mode") == "connect"
            and path.startswith(CHARDEV_SOCKET_DIR + "/") and path.endswith(f"/{key}.sock"))


def hold_over_socket(element: etree._Element, socket_path: str) -> None:
    """Rewrite a holdable ``<serial>``/``<console>`` in place to the chardev server's socket.

    ``type``, every ``<source>``, ``<protocol>`` and ``<log>`` go (the server writes to
    the source and the log); everything else (``<target>``, ``<alias>``, ``<address>``)
    stays where it was.
    """
    old = [c for c in element if isinstance(c.tag, str) and c.tag in ("source", "protocol", "log")]
    new = etree.Element("source")
    new.set("mode", "connect")
    new.set("path", socket_path)
    if old:
        first = old[0]
        new.tail = first.tail
        element.replace(first, new)
        for child in old[1:]:
            _remove_keep_layout(child)
    else:
        new.tail = element.text
        element.insert(0, new)
    element.set("type", "unix")


def _remove_keep_layout(child: etree._Element) -> None:
    parent = child.getparent()
    assert parent is not None
    index = parent.index(child)
    if index > 0:
        parent[index - 1].tail = child.tail
    else:
        parent.text = child.tail
    parent.remove(child)


@dataclass(frozen=True)
class FTChardev:
    """One prepared chardev: its ``<cuju:chardev device='serial' index='0'>`` record.

    ``original`` is the element as it was (XML text without namespace, indented from
    column 0); ``target`` is read from it.
    """

    device: ChardevDevice
    index: int
    original: str
    target: ChardevTarget = field(init=False)

    def __post_init__(self) -> None:
        where = f"<cuju:chardev device='{self.device}' index='{self.index}'>"
        if self.device not in DEVICES:
            raise FTElementError([f"{where}: device must be serial or console; fix: restore the element by "
                                  "hand and run 'cuju-libvirt xml enable --prepare' again"])
        if not isinstance(self.index, int) or self.index < 0:
            raise FTElementError([f"{where}: index must be a number from 0"])
        try:
            element = etree.fromstring(self.original, safe_parser())
        except etree.XMLSyntaxError as err:
            raise FTElementError([f"{where}: the recorded element is not well-formed XML ({err})"]) from err
        if element.tag != self.device:
            raise FTElementError([f"{where} records <{element.tag}>, not a <{self.device}>; fix: restore it "
                                  "by hand and run 'cuju-libvirt xml enable --prepare' again"])
        why = unholdable(element)
        if why is not None:
            raise FTElementError([f"{where}: the recorded element cannot be held ({why})"])
        object.__setattr__(self, "target", target_of(element))

    @classmethod
    def from_element(cls, element: etree._Element, device: ChardevDevice, index: int,
                     indent: str | None) -> FTChardev:
        return cls(device, index, record_text(element, indent))


def chardevs_in(root: etree._Element) -> list[tuple[ChardevDevice, int, etree._Element]]:
    """Every ``<serial>`` and ``<console>`` of ``<devices>``, with its kind and index."""
    devices = root.find("devices")
    if devices is None:
        return []
    found: list[tuple[ChardevDevice, int, etree._Element]] = []
    for device in DEVICES:
        for i, element in enumerate(devices.findall(device)):
            found.append((device, i, element))
    return found


def restore_chardevs_in(root: etree._Element, records: tuple[FTChardev, ...]) -> list[str]:
    """Put the recorded elements back in place of their sockets; what was restored.

    A recorded chardev no longer there is skipped; one that is there but is no longer the
    prepared socket (edited since) is refused, as for disks.
    """
    devices = root.find("devices")
    if devices is None or not records:
        return []
    current = {(d, i): e for d, i, e in chardevs_in(root)}
    problems = []
    for record in records:
        element = current.get((record.device, record.index))
        key = key_of(devices, record.device, record.index) if element is not None else ""
        if element is not None and not is_held_socket(element, key):
            problems.append(
                f"<{record.device}> {record.index} is no longer the socket that prepare made, so its record "
                f"in <cuju:ft> ({record.target.describe()}) cannot be put back; fix: remove "
                f"<cuju:chardev device='{record.device}' index='{record.index}'> by hand if the current "
                "element is what you want")
    if problems:
        raise FTElementError(problems)
    restored = []
    for record in records:
        element = current.get((record.device, record.index))
        if element is None:
            continue
        original = record_element(record.original, indent_of(element))
        original.tail = element.tail
        devices.replace(element, original)
        restored.append(f"restored <{record.device}> {record.index} ({record.target.describe()}) from its "
                        "record in <cuju:ft>")
    return restored


def holdable_targets(records: tuple[FTChardev, ...], root: etree._Element) -> dict[str, ChardevTarget]:
    """The server's chardevs: key -> target (a compat console shares its serial's key)."""
    devices = root.find("devices")
    out: dict[str, ChardevTarget] = {}
    for record in records:
        key = key_of(devices, record.device, record.index) if devices is not None else \
            f"{record.device}{record.index}"
        out.setdefault(key, record.target)
    return out
