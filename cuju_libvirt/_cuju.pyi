"""Type stub for the C extension cuju_libvirt._cuju (hand-written; keep in step with c_ext/)."""

__version__: str
WIRE_VERSION: int
features: frozenset[str]
