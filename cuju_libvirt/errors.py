"""The exception tree of cuju-libvirt.

Every error the package raises on purpose derives from :class:`CujuError`::

    CujuError
     +-- ConfigError         bad cujud configuration (file, drop-in, key, value)
     +-- DomainXMLError      a domain XML or <cuju:ft> element that is malformed or invalid
     |    +-- NotADomainXMLError    unreadable: too large, not well-formed, DOCTYPE, not a <domain>
     |    +-- FTElementError        the <cuju:ft> element is invalid (attribute, value, place)
     |    +-- DomainUnfitError      well-formed, but the domain cannot be protected as written
     +-- HookError           the libvirt hook could not do its job
     +-- StateError          an FT state-machine transition that is not allowed now
     +-- ReplicationError    the data plane failed (link, peer, tracker, codec)
     |    +-- LinkError          the FT link broke or was closed
     |    |    +-- LinkTimeout       no progress within the timeout
     |    +-- ProtocolError      the peer broke the wire format (magic, version,
     |    |    |                 geometry, frame, page index, sequence)
     |    |    +-- ChecksumError     an epoch arrived corrupted
     |    |         +-- LinkAuthError an encrypted FT-link record failed authentication
     |    +-- PeerAbortError     the FT-link peer reported an error and closed the link
     |    +-- ApplyError         the backup could not write the replica
     |    +-- JournalError       the backup's journal is unusable: full resync needed
     |    +-- TrackerError           a dirty tracker failed while in use
     |    |    +-- TrackerUnavailableError  the host or the domain cannot run the tracker asked for
     |    +-- DeviceStateError      a device-state save/load failed (QEMU's words)  [ft_engine/vmstate.py]
     |         +-- BlobFormatError       a blob is malformed, truncated or holds RAM [ft_engine/vmstate.py]
     |         +-- StandbyMismatchError  the standby differs from the primary      [ft_engine/devstate.py]
     +-- LibvirtError        a libvirt call failed; carries (domain, code) of the cause
     |    +-- LibvirtConnectionError  the connection is gone or cannot be opened (retry later)
     |    +-- LibvirtNotFoundError    no such domain / object / metadata
     |    +-- LibvirtStateError       the object is not in a state that allows the call
     |    +-- LibvirtUnsupportedError the driver does not implement the call
     +-- ControlError        the local control socket (cujud not running, bad request, timeout)
     +-- PeerError           the control channel to the peer host's cujud failed
     |    +-- PeerAuthError      the peer failed authentication or sent a forged/replayed message
     +-- MonitorError        a QEMU monitor (QMP) connection failed or a command was refused
     |    +-- QMPError            QEMU refused a command (error class, desc)   [qmp.py]
     |    +-- QMPConnectionError  the monitor cannot be reached or went away   [qmp.py]
     |    +-- QMPTimeoutError     no answer within the deadline                [qmp.py]
     +-- CoordError          the coordination store (etcd) refused a request or returned nonsense
     |    +-- CoordUnavailable    no answer from any etcd member in time: decide nothing from it
     +-- RigError            the test rig could not build a guest or start QEMU/libvirtd

Causes are kept with ``raise ... from err``. libvirt errors are classified by
``(get_error_domain(), get_error_code())``, never by message text.
"""

from __future__ import annotations


class CujuError(Exception):
    """Root of every error cuju-libvirt raises on purpose."""


class ConfigError(CujuError):
    """The cujud configuration is invalid; the message names the key and the file."""


class DomainXMLError(CujuError):
    """A domain XML document or its <cuju:ft> element is malformed or invalid."""


class NotADomainXMLError(DomainXMLError):
    """The input cannot be read as a domain XML at all (the CLI exits 2 for it)."""


class FTElementError(DomainXMLError):
    """The <cuju:ft> element is invalid.

    ``problems`` holds one line per problem, each naming the attribute and the fix.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class DomainUnfitError(DomainXMLError):
    """The domain is well-formed but cannot be protected as written.

    ``problems`` holds one human-readable line per problem, each naming the
    attribute or device and the fix.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class HookError(CujuError):
    """The libvirt hook could not do its job."""


class StateError(CujuError):
    """A fault-tolerance state transition was requested that is not allowed now."""


class ReplicationError(CujuError):
    """The replication data plane failed (FT link, peer, tracker or codec).

    Errors raised by the C data plane carry ``code`` (a ``CUJU_E_*`` value of
    c_ext/wire.h), ``peer_code`` (the code the peer sent in an ERROR frame, or
    0) and ``os_errno`` (0 when no system call failed).
    """

    def __init__(self, message: str, *, code: int = 0, peer_code: int = 0, os_errno: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.peer_code = peer_code
        self.os_errno = os_errno


class LinkError(ReplicationError):
    """The FT link broke, was closed, or the peer went away."""


class LinkTimeout(LinkError):
    """The FT link made no progress within the timeout."""


class ProtocolError(ReplicationError):
    """The peer broke the wire format: magic, version, geometry, frame, page index or sequence."""


class ChecksumError(ProtocolError):
    """An epoch's checksum did not match: it was corrupted in transit; it was not applied."""


class LinkAuthError(ChecksumError):
    """An encrypted FT-link record failed authentication (tampered, replayed, reordered,
    injected or not from our peer): the connection ended, nothing of it was applied."""


class PeerAbortError(ReplicationError):
    """The FT-link peer reported an error (``peer_code``, message) and closed the link."""


class ApplyError(ReplicationError):
    """The backup could not write the replica (region or device-state file)."""


class JournalError(ReplicationError):
    """The backup's journal is unusable or corrupt; the replica needs a full resync."""


class TrackerError(ReplicationError):
    """A dirty tracker failed while in use; the next epoch must copy all of guest RAM."""


class TrackerUnavailableError(TrackerError):
    """The tracker asked for cannot run here; the message names the missing capability and the fix."""


class LibvirtError(CujuError):
    """A libvirt call failed. ``domain`` and ``code`` are libvirt's error domain and code."""

    def __init__(self, message: str, domain: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.domain = domain
        self.code = code


class LibvirtConnectionError(LibvirtError):
    """The libvirt connection is gone or cannot be opened; retrying later may help."""


class LibvirtNotFoundError(LibvirtError):
    """The domain (or other object, or metadata) does not exist."""


class LibvirtStateError(LibvirtError):
    """The object is not in a state that allows the operation (e.g. domain not running)."""


class LibvirtUnsupportedError(LibvirtError):
    """The libvirt driver does not implement the operation."""


class ControlError(CujuError):
    """The local control socket failed: cujud not running, refused request, timeout.

    ``code`` is the protocol's error code when cujud answered with an error
    (e.g. ``unknown-method``), empty otherwise.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class PeerError(CujuError):
    """The control channel to the peer host's cujud failed (connection, protocol, timeout)."""


class PeerAuthError(PeerError):
    """The peer failed mutual authentication, or sent a forged, replayed or reordered message."""


class MonitorError(CujuError):
    """A QEMU monitor (QMP) connection failed or QEMU refused a command.

    The concrete classes live next to the client in :mod:`cuju_libvirt.qmp`.
    """


class CoordError(CujuError):
    """The coordination store (etcd) refused a request, or its answer makes no sense."""


class CoordUnavailable(CoordError):
    """No etcd member answered in time. The outcome of a write is then unknown: it may have
    been applied. Never decide anything from this; ask again."""


class RigError(CujuError):
    """The test rig could not build a test guest or start a QEMU or libvirtd for it."""


def caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``err`` or any error in its chain of causes (``raise ... from``) is a ``kind``."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return True
        seen.add(id(cause))
        cause = cause.__cause__
    return False
