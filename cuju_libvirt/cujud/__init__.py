"""cujud, the companion daemon on each host: everything that runs inside it.

The pure library (``domain_xml``, ``fitness``, ``config``, the ``ft_engine`` and the C data
plane) sits below this package and never imports it. Inside, dependencies point one way:

* ``daemon`` wires the parts together and owns the process (control socket, peers, exporter);
* ``orchestrator`` (the primary's side) and ``standby`` (the backup's side) protect domains;
* ``peer`` (the authenticated channel to other hosts), ``control`` (the local UNIX socket the
  hook and the CLI talk to), ``virt`` (libvirt connection and events), ``records`` (facts kept
  across restarts), ``coord`` (the etcd witness: client and ownership records),
  ``qemu_process`` (what ``/proc`` says of a QEMU) and ``exporter``
  (Prometheus) are the leaves they use.
"""
