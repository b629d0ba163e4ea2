"""The C extension builds, imports and names its wire version and features."""

from __future__ import annotations

from cuju_libvirt import _cuju


def test_extension_exports_versions() -> None:
    assert _cuju.__version__.count(".") == 2
    assert isinstance(_cuju.WIRE_VERSION, int) and _cuju.WIRE_VERSION >= 1
    assert isinstance(_cuju.features, frozenset)
