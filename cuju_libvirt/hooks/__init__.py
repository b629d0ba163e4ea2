"""libvirt hook glue (installed to /etc/libvirt/hooks/qemu.d/). Never calls libvirt.

:func:`shim_text` is the file ``cuju-libvirt install-hooks`` writes: it reads the domain
XML from stdin and exits at once unless it carries the ``<cuju:ft>`` namespace; only then
does it import :mod:`cuju_libvirt.hooks.qemu`.
"""

from __future__ import annotations

HOOK_NAME = "cuju"

_SHIM = '''#!{python} -S
# cuju-libvirt's libvirt QEMU hook (written by 'cuju-libvirt install-hooks'; see
# cuju_libvirt/hooks/qemu.py). Domains without <cuju:ft> exit here, before any import
# (-S: not even the site module; it is loaded only for a protected domain).
import sys
xml = sys.stdin.buffer.read()
if b"https://cuju-ft.github.io/libvirt/ft/1.0" not in xml:
    sys.exit(0)
import site
site.main()
from cuju_libvirt.hooks.qemu import run
sys.exit(run(sys.argv[1:], xml))
'''


def shim_text(python: str) -> str:
    """The hook file for the interpreter ``python`` (one that can import cuju_libvirt)."""
    return _SHIM.format(python=python)
