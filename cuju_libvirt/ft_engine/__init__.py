"""The epoch engine: policy in Python over the mechanism in cuju_libvirt._cuju."""
