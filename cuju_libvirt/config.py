"""cujud configuration: a declarative table of settings read from YAML files.

The effective configuration is built from, in order (later wins, key by key):

1. the defaults in :data:`SETTINGS`;
2. the main file, ``/etc/cuju-libvirt/cujud.yaml`` (optional);
3. every ``*.yaml`` file in the drop-in directory ``/etc/cuju-libvirt/cujud.d/``,
   in sorted file-name order (optional).

A key set in a later file replaces the whole value of an earlier one (``peers``
included: a drop-in that sets ``peers`` sets the complete list). Nothing is read
from the environment. Files are parsed with the safe YAML loader; duplicate keys,
unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the file, the key and the fix. Every value remembers where it came from,
which ``cujud --print-config`` and ``cuju-libvirt config show`` print.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import yaml

from cuju_libvirt.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/cuju-libvirt/cujud.yaml")
DEFAULT_DROPIN_DIR = Path("/etc/cuju-libvirt/cujud.d")

#: TCP port of the authenticated peer control channel between two cujud.
PEER_PORT = 7790
#: TCP port of the FT data plane (epochs) on the FT link.
FT_PORT = 7791
#: TCP port of the Prometheus exporter. Next to the two ports above and outside
#: 9100-9999, where the exporters of the Prometheus port-allocation list live
#: (9177 is the libvirt exporter's).
METRICS_PORT = 7792

#: Largest configuration file accepted (a sane cujud.yaml is a few hundred bytes).
MAX_FILE_BYTES = 1 << 20
#: Largest pre-shared key file accepted.
MAX_PSK_BYTES = 4096
#: Fewest bytes of key material accepted in the pre-shared key file.
MIN_PSK_BYTES = 32

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

T = TypeVar("T")


class Address(NamedTuple):
    """A TCP endpoint: host name or IP literal, and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _Invalid(Exception):
    """A value failed validation; the message says what is wrong and how to fix it."""


# --- value types -------------------------------------------------------------------------------


class Kind(Generic[T]):
    """How one setting is parsed from YAML and written back for display."""

    #: A short description for the docs table.
    name = "value"

    def parse(self, raw: object) -> T:
        raise NotImplementedError

    def render(self, value: T) -> object:
        """The value as plain YAML data (what a user would write)."""
        return value


class Text(Kind[str]):
    name = "string"

    def __init__(self, choices: Sequence[str] = (), upper: bool = False) -> None:
        self.choices = tuple(choices)
        self.upper = upper
        if choices:
            self.name = "one of " + ", ".join(choices)

    def parse(self, raw: object) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise _Invalid(f"expected a non-empty string, got {_show(raw)}")
        value = raw.strip().upper() if self.upper else raw.strip()
        if self.choices and value not in self.choices:
            raise _Invalid(f"{raw!r} is not one of {', '.join(self.choices)}")
        return value


class NodeName(Kind[str]):
    name = "name ([A-Za-z0-9._-], 1-63)"

    def __init__(self, what: str = "a node name") -> None:
        self.what = what

    def parse(self, raw: object) -> str:
        if not isinstance(raw, str) or not _is_node_name(raw):
            raise _Invalid(
                f"{_show(raw)} is not {self.what}: use 1-63 characters from A-Z a-z 0-9 . _ -"
            )
        return raw


class AbsPath(Kind[Path]):
    name = "absolute path"

    def parse(self, raw: object) -> Path:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise _Invalid(f"expected an absolute path, got {_show(raw)}")
        if "\0" in raw:
            raise _Invalid("the path contains a NUL byte")
        return Path(os.path.normpath(raw))

    def render(self, value: Path) -> object:
        return str(value)


class Number(Kind[float]):
    name = "number"

    def __init__(self, low: float, high: float, unit: str = "") -> None:
        self.low, self.high, self.unit = low, high, unit
        self.name = f"number {low:g}..{high:g}" + (f" {unit}" if unit else "")

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Invalid(f"expected a number, got {_show(raw)}")
        value = float(raw)
        if not self.low <= value <= self.high:
            raise _Invalid(
                f"{raw} is out of range: use a value from {self.low:g} to {self.high:g} {self.unit}".rstrip()
            )
        return value


class Endpoint(Kind[Address]):
    """``HOST:PORT``, ``HOST`` (default port), ``[V6]:PORT`` or ``[V6]``."""

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port
        self.name = f"HOST[:PORT] (port {default_port} if left out)"

    def parse(self, raw: object) -> Address:
        if not isinstance(raw, str) or not raw.strip():
            raise _Invalid(f"expected 'HOST:PORT' as a string, got {_show(raw)}")
        return parse_address(raw.strip(), self.default_port)

    def render(self, value: Address) -> object:
        return str(value)


class PeerMap(Kind[dict[str, Address]]):
    name = f"mapping NAME: HOST[:PORT] (port {PEER_PORT} if left out)"

    def parse(self, raw: object) -> dict[str, Address]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise _Invalid(f"expected a mapping of peer name to 'HOST:PORT', got {_show(raw)}")
        peers: dict[str, Address] = {}
        for name, addr in raw.items():
            if not isinstance(name, str) or not _is_node_name(name):
                raise _Invalid(f"peer name {_show(name)} is not a node name (A-Z a-z 0-9 . _ -)")
            if not isinstance(addr, str):
                raise _Invalid(f"peer {name!r}: expected 'HOST:PORT' as a string, got {_show(addr)}")
            try:
                peers[name] = parse_address(addr, PEER_PORT)
            except _Invalid as err:
                raise _Invalid(f"peer {name!r}: {err}") from None
        return peers

    def render(self, value: dict[str, Address]) -> object:
        return {name: str(addr) for name, addr in value.items()}


class UrlList(Kind[tuple[str, ...]]):
    """A list of ``http://HOST:PORT`` URLs (etcd client endpoints)."""

    name = "list of http://HOST:PORT"

    def parse(self, raw: object) -> tuple[str, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise _Invalid(f"expected a list of 'http://HOST:PORT' URLs, got {_show(raw)}")
        urls: list[str] = []
        for item in raw:
            if not isinstance(item, str) or not item.startswith("http://"):
                hint = " (TLS is not supported yet: use http:// on a trusted network)" \
                    if isinstance(item, str) and item.startswith("https://") else ""
                raise _Invalid(f"{_show(item)} is not an http://HOST:PORT URL{hint}")
            try:
                parse_address(item[len("http://"):].rstrip("/"), 2379)
            except _Invalid as err:
                raise _Invalid(f"{item!r}: {err}") from None
            urls.append(item.rstrip("/"))
        return tuple(urls)

    def render(self, value: tuple[str, ...]) -> object:
        return list(value)


def parse_address(text: str, default_port: int) -> Address:
    """Parse ``HOST[:PORT]`` / ``[V6][:PORT]``; raise a validation error naming the fix."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"{text!r}: unbalanced '[': write IPv6 addresses as [ADDR]:PORT")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _Invalid(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise _Invalid(f"{text!r}: write IPv6 addresses in brackets, e.g. [{text}]:{default_port}")
    if not host or any(c.isspace() for c in host):
        raise _Invalid(f"{text!r}: missing or malformed host")
    if port_text == "":
        return Address(host, default_port)
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _Invalid(f"{text!r}: port must be a number from 1 to 65535")
    return Address(host, int(port_text))


def _is_node_name(text: str) -> bool:
    return 0 < len(text) <= 63 and all((c.isalnum() and c.isascii()) or c in "._-" for c in text)


def _show(raw: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "nothing (null)"}.get(type(raw), type(raw).__name__)
    text = repr(raw)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})" if raw is not None else kind


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One row of the configuration table."""

    key: str
    kind: Kind[T]
    default: T | Callable[[], T]
    doc: str
    #: How the default is shown in docs when it is computed at run time.
    default_doc: str = ""

    def default_value(self) -> T:
        if callable(self.default):
            return self.default()
        return self.default


SETTINGS: tuple[Setting[Any], ...] = (
    Setting("node_name", NodeName(), lambda: socket.gethostname().split(".")[0][:63] or "localhost",
            "This host's name among its peers; the peer's `peers` entry must use the same name.",
            default_doc="the short host name"),
    Setting("listen", Endpoint(PEER_PORT), Address("0.0.0.0", PEER_PORT),
            "Address the authenticated peer control channel listens on."),
    Setting("ft_listen", Endpoint(FT_PORT), Address("0.0.0.0", FT_PORT),
            "Address the FT data plane (epoch stream from a primary) listens on; "
            "put it on the dedicated FT link."),
    Setting("peers", PeerMap(), lambda: {},
            "Peer hosts: node name to control address. Both hosts list each other.",
            default_doc="{} (no peer)"),
    Setting("peer_tls", Text(("on", "off")), "off",
            "on: the peer channel runs inside mutual TLS 1.3, hosts authorised by certificate "
            "(tls_* keys; docs/security.md); off: pre-shared key (psk_file), authenticated but "
            "not encrypted. A host with TLS on refuses a peer without it."),
    Setting("tls_ca_file", AbsPath(), Path("/etc/pki/cuju-libvirt/ca-cert.pem"),
            "CA certificate that signs every host of the cluster (peer_tls: on)."),
    Setting("tls_cert_file", AbsPath(), Path("/etc/pki/cuju-libvirt/host-cert.pem"),
            "This host's certificate; its subjectAltName DNS entry is node_name (peer_tls: on)."),
    Setting("tls_key_file", AbsPath(), Path("/etc/pki/cuju-libvirt/private/host-key.pem"),
            "This host's private key (mode 0600, root; peer_tls: on)."),
    Setting("psk_file", AbsPath(), Path("/etc/cuju-libvirt/psk"),
            "Pre-shared key for the peer channel when peer_tls is off (the same file on both "
            f"hosts, at least {MIN_PSK_BYTES} bytes, owned by root, mode 0600 or stricter)."),
    Setting("libvirt_uri", Text(), "qemu:///system", "The local libvirt daemon cujud manages."),
    Setting("control_socket", AbsPath(), Path("/run/cuju-libvirt/cujud.sock"),
            "UNIX socket for the hook and the CLI (mode 0600, root only)."),
    Setting("run_dir", AbsPath(), Path("/run/cuju-libvirt"), "Run-time files (sockets)."),
    Setting("state_dir", AbsPath(), Path("/var/lib/cuju-libvirt"), "Persistent state."),
    Setting("disk_replica_dir", AbsPath(), Path("/var/lib/cuju-libvirt/replicas"),
            "Where this host keeps, as the backup, the copies of protected disks: "
            "`DIR/UUID/DEV.FORMAT`, unless the disk's `<cuju:disk replica>` names a path "
            "(docs/ft-element.md). Needs room for every protected disk of the peer."),
    Setting("metrics_listen", Endpoint(METRICS_PORT), Address("0.0.0.0", METRICS_PORT),
            "Address of the Prometheus exporter."),
    Setting("log_level", Text(LOG_LEVELS, upper=True), "INFO", "Least severe level logged."),
    Setting("heartbeat_interval", Number(0.01, 60.0, "s"), 0.5,
            "Seconds between heartbeats to each connected peer."),
    Setting("peer_timeout", Number(0.05, 600.0, "s"), 3.0,
            "Seconds of silence after which a peer connection is declared lost "
            "(must exceed heartbeat_interval)."),
    Setting("request_timeout", Number(0.05, 600.0, "s"), 10.0,
            "Seconds to wait for the answer to a request to a peer."),
    Setting("reconnect_min", Number(0.01, 600.0, "s"), 0.5,
            "First delay before reconnecting to a lost peer or libvirt; doubles on each failure."),
    Setting("reconnect_max", Number(0.01, 3600.0, "s"), 30.0,
            "Longest delay between reconnection attempts."),
    Setting("etcd_endpoints", UrlList(), (),
            "Client URLs of the etcd cluster that witnesses ownership (docs/cluster.md); "
            "empty: no witness, two-host rules (a backup-host crash fences the primary).",
            default_doc="[] (no witness)"),
    Setting("etcd_timeout", Number(0.05, 60.0, "s"), 1.0,
            "Seconds one etcd call may take over all endpoints before it counts as no answer."),
    Setting("etcd_prefix", Text(), "/cuju/v1",
            "Key prefix of this cluster's records in etcd (one prefix per cuju-libvirt cluster)."),
    Setting("failure_domain", NodeName("a failure-domain label"), "",
            "This host's failure domain (rack, power feed, chassis; with etcd_endpoints): the "
            "cluster's placer never puts a standby in its primary's failure domain while a "
            "host of another one can hold it (docs/cluster.md).",
            default_doc="the node name (each host a failure domain of its own)"),
    Setting("host_lease_ttl", Number(2, 300, "s"), 5.0,
            "Seconds of the etcd lease this host is registered under (with etcd_endpoints): a "
            "host whose cujud stops renewing it leaves the cluster, and its placer role, that "
            "long after (whole seconds; at least etcd's 1.5 x election timeout)."),
)

SETTINGS_BY_KEY: Mapping[str, Setting[Any]] = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """The effective cujud configuration. ``sources[key]`` says where each value came from."""

    node_name: str
    listen: Address
    ft_listen: Address
    peers: Mapping[str, Address]
    psk_file: Path
    libvirt_uri: str
    control_socket: Path
    run_dir: Path
    state_dir: Path
    metrics_listen: Address
    log_level: str
    heartbeat_interval: float
    peer_timeout: float
    request_timeout: float
    reconnect_min: float
    reconnect_max: float
    etcd_endpoints: tuple[str, ...] = ()
    etcd_timeout: float = 1.0
    etcd_prefix: str = "/cuju/v1"
    failure_domain: str = ""
    host_lease_ttl: float = 5.0
    peer_tls: str = "off"
    tls_ca_file: Path = Path("/etc/pki/cuju-libvirt/ca-cert.pem")
    tls_cert_file: Path = Path("/etc/pki/cuju-libvirt/host-cert.pem")
    tls_key_file: Path = Path("/etc/pki/cuju-libvirt/private/host-key.pem")
    disk_replica_dir: Path = Path("/var/lib/cuju-libvirt/replicas")
    sources: Mapping[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """The values as plain YAML data, keyed in table order."""
        return {s.key: s.kind.render(getattr(self, s.key)) for s in SETTINGS}


# --- loading -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys (silently taking the last one hides mistakes)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}: keep only one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def config_files(config_file: Path | None = None, dropin_dir: Path | None = None) -> list[Path]:
    """The files that make up the configuration, in the order they apply (existing ones only)."""
    main = DEFAULT_CONFIG_FILE if config_file is None else config_file
    dropins = DEFAULT_DROPIN_DIR if dropin_dir is None else dropin_dir
    files = [main] if main.exists() else []
    if dropins.is_dir():
        files += sorted(p for p in dropins.glob("*.yaml") if p.is_file())
    return files


def read_file(path: Path) -> dict[str, object]:
    """Parse one configuration file into a mapping (no validation of the keys yet)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; is this the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1} column {mark.column + 1}:"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where} not valid YAML: {problem}") from err
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of 'key: value' lines at the top level")
    return doc


def load(config_file: Path | None = None, dropin_dir: Path | None = None) -> Config:
    """Build the effective configuration from the defaults, the main file and the drop-ins.

    A missing main file or drop-in directory is not an error (the defaults apply); a
    ``config_file`` named explicitly by the user should be checked by the caller.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    files = config_files(config_file, dropin_dir)
    for path in files:
        for key, raw in read_file(path).items():
            setting = SETTINGS_BY_KEY.get(key) if isinstance(key, str) else None
            if setting is None:
                raise ConfigError(f"{path}: unknown key {key!r}: {_suggest(key)}")
            try:
                values[key] = setting.kind.parse(raw)
            except _Invalid as err:
                raise ConfigError(f"{path}: {key}: {err}") from None
            sources[key] = str(path)
    for setting in SETTINGS:
        if setting.key not in values:
            values[setting.key] = setting.default_value()
            sources[setting.key] = "default"
    if not values["failure_domain"]:  # each host a failure domain of its own
        values["failure_domain"] = values["node_name"]
    config = Config(**values, sources=sources, files=tuple(files))
    _check_consistency(config)
    return config


def _suggest(key: object) -> str:
    if isinstance(key, str):
        close = [s.key for s in SETTINGS if _similar(key, s.key)]
        if close:
            return f"did you mean {close[0]!r}?"
    return "known keys are " + ", ".join(s.key for s in SETTINGS)


def _similar(a: str, b: str) -> bool:
    a, b = a.lower().replace("-", "_"), b.lower()
    if a == b or a in b or b in a:
        return True
    # one edit apart (substitution, insertion or deletion)
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[i + 1 :] == b[i + 1 :] or a[i:] == b[i + 1 :] or a[i + 1 :] == b[i:]


def _check_consistency(config: Config) -> None:
    def where(key: str) -> str:
        return config.sources[key]

    if config.peer_timeout <= config.heartbeat_interval:
        raise ConfigError(
            f"{where('peer_timeout')}: peer_timeout ({config.peer_timeout:g} s) must exceed "
            f"heartbeat_interval ({config.heartbeat_interval:g} s, from {where('heartbeat_interval')}); "
            "use at least 3 heartbeats per timeout"
        )
    if config.reconnect_min > config.reconnect_max:
        raise ConfigError(
            f"{where('reconnect_min')}: reconnect_min ({config.reconnect_min:g} s) exceeds "
            f"reconnect_max ({config.reconnect_max:g} s, from {where('reconnect_max')}); lower it"
        )
    if config.node_name in config.peers:
        raise ConfigError(
            f"{where('peers')}: peers: lists this host's own node_name {config.node_name!r}; "
            "list only the other host(s)"
        )
    listeners = ("listen", "ft_listen", "metrics_listen")
    for i, first in enumerate(listeners):
        for second in listeners[i + 1 :]:
            a, b = getattr(config, first), getattr(config, second)
            wildcard = bool({a.host, b.host} & {"0.0.0.0", "::"})
            if a.port == b.port and (a.host == b.host or wildcard):
                raise ConfigError(
                    f"{first} ({a}, from {where(first)}) and {second} ({b}, from {where(second)}) "
                    "would listen on the same port; give one of them another port"
                )


def read_psk(path: Path) -> bytes:
    """Read the pre-shared key, refusing a file others could read or that is too short."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"psk_file {path} does not exist; create it on both hosts with "
            f"'umask 077; head -c 32 /dev/urandom | base64 > {path}' and copy it to the peer"
        ) from None
    except OSError as err:
        raise ConfigError(f"psk_file {path}: cannot open: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"psk_file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"psk_file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others can read the key; "
                f"run 'chmod 600 {path}'"
            )
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"psk_file {path} is owned by uid {info.st_uid}; run 'chown root: {path}'"
            )
        data = os.read(fd, MAX_PSK_BYTES + 1)
    finally:
        os.close(fd)
    key = data.strip()
    if len(data) > MAX_PSK_BYTES:
        raise ConfigError(f"psk_file {path} is larger than {MAX_PSK_BYTES} bytes; is it the right file?")
    if len(key) < MIN_PSK_BYTES:
        raise ConfigError(
            f"psk_file {path} holds {len(key)} bytes; use at least {MIN_PSK_BYTES}: "
            f"'head -c 32 /dev/urandom | base64 > {path}'"
        )
    return key


# --- presentation ------------------------------------------------------------------------------


def render(config: Config) -> str:
    """The effective configuration as YAML, each line annotated with its source."""
    lines = []
    if config.files:
        lines.append("# files read, in order: " + ", ".join(str(p) for p in config.files))
    else:
        lines.append("# no configuration file found: all values are defaults")
    for setting in SETTINGS:
        shown = setting.kind.render(getattr(config, setting.key))
        text = yaml.safe_dump({setting.key: shown}, default_flow_style=True, width=10_000).strip()
        lines.append(f"{text[1:-1]}  # {config.sources[setting.key]}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The settings table for docs/cujud.md (a test keeps the two in step)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if s.default_doc:
            default = s.default_doc
        else:
            shown = s.kind.render(s.default_value())
            default = f"`{shown}`"
        rows.append(f"| `{s.key}` | {s.kind.name} | {default} | {s.doc} |")
    return "\n".join(rows) + "\n"
