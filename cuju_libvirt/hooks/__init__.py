"""libvirt hook glue (installed to /etc/libvirt/hooks/qemu.d/). Never calls libvirt."""
