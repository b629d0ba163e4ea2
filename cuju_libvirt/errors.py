"""The exception tree of cuju-libvirt.

Every error the package raises on purpose derives from :class:`CujuError`::

    CujuError
     +-- ConfigError         bad cujud configuration (file, drop-in, key, value)
     +-- DomainXMLError      a domain XML or <cuju:ft> element that is malformed or invalid
     |    +-- DomainUnfitError   well-formed, but the domain cannot be protected as written
     +-- HookError           the libvirt hook could not do its job
     +-- StateError          an FT state-machine transition that is not allowed now
     +-- ReplicationError    the data plane failed (link, peer, tracker, codec)
     |    +-- LinkError          the FT link broke or was closed
     |    |    +-- LinkTimeout       no progress within the timeout
     |    +-- ProtocolError      the peer broke the wire format (magic, version,
     |    |    |                 geometry, frame, page index, sequence)
     |    |    +-- ChecksumError     an epoch arrived corrupted
     |    +-- PeerError          the peer reported an error and closed the link
     |    +-- ApplyError         the backup could not write the replica
     |    +-- JournalError       the backup's journal is unusable: full resync needed
     +-- LibvirtError        a libvirt call failed; carries (domain, code) of the cause

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


class PeerError(ReplicationError):
    """The peer reported an error (``peer_code``) and closed the link."""


class ApplyError(ReplicationError):
    """The backup could not write the replica (region or device-state file)."""


class JournalError(ReplicationError):
    """The backup's journal is unusable or corrupt; the replica needs a full resync."""


class LibvirtError(CujuError):
    """A libvirt call failed. ``domain`` and ``code`` are libvirt's error domain and code."""

    def __init__(self, message: str, domain: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.domain = domain
        self.code = code
