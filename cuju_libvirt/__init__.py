"""cuju-libvirt: epoch-based fault tolerance for libvirt/QEMU virtual machines.

The public surface is deliberately thin; everything else is private to the package.
"""

from cuju_libvirt.errors import (
    ConfigError,
    CujuError,
    DomainXMLError,
    HookError,
    ReplicationError,
    StateError,
)

__version__ = "0.1.0"

#: XML namespace of the ``<cuju:ft>`` element inside a domain's ``<metadata>``.
FT_NAMESPACE = "https://cuju-ft.github.io/libvirt/ft/1.0"

__all__ = [
    "FT_NAMESPACE",
    "ConfigError",
    "CujuError",
    "DomainXMLError",
    "HookError",
    "ReplicationError",
    "StateError",
    "__version__",
]
