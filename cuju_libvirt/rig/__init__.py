"""The test rig: locally built test guests, QEMU started directly, libvirt domain XML for them.

* :mod:`cuju_libvirt.rig.guests` builds (and caches) the test guest images.
* :mod:`cuju_libvirt.rig.qemu_direct` runs one QEMU with a QMP socket and a file-backed RAM
  file, without libvirt (for tracker tests and benchmarks).
* :mod:`cuju_libvirt.rig.domains` writes libvirt domain XML for those guests.
* :mod:`cuju_libvirt.rig.replication_load` runs a real replication session on loopback (a
  writer process paused per epoch, the scan tracker, sender and receiver) that feeds
  ``DomainStats`` the way the engine will, for the exporter's tests and benchmark.
* :mod:`cuju_libvirt.rig.prometheus` runs a throw-away Debian ``prometheus`` and queries it.
* :mod:`cuju_libvirt.rig.hosts` brings up two isolated libvirtd "hosts" with an FT link and a
  LAN on this machine (:class:`~cuju_libvirt.rig.hosts.Rig`, its nodes in
  :mod:`~cuju_libvirt.rig.nodes`); :mod:`~cuju_libvirt.rig.sandbox` and
  :mod:`~cuju_libvirt.rig.teardown` contain and remove them; ``python -m cuju_libvirt.rig``
  is its command line and :mod:`~cuju_libvirt.rig.demo` the demo.

Nothing here is used by cujud in production; tests, benchmarks and the demo use it.
"""
