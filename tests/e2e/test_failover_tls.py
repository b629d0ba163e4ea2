"""The product path with peer_tls: on: a protected VM whose peer channel is mutual TLS and
whose FT link runs encrypted (docs/security.md), killed and failed over like in
test_failover.py, judged by the observer's stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import Cujud, cujud_pair
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest
from cuju_libvirt.rig.observer import Observer
from tests.e2e.conftest import cleanup_protected
from tests.e2e.test_failover import _start_protected, kill_primary_and_judge, linux_guest, observer

__all__ = ["linux_guest", "observer"]  # fixtures shared with test_failover


@pytest.fixture
def tls_cujuds(ft_rig: Rig, tmp_path: Path) -> Iterator[tuple[Cujud, Cujud]]:
    with cujud_pair(ft_rig, logs=tmp_path / "logs", tls=True) as pair:
        yield pair


@pytest.mark.timeout(300)
def test_encrypted_ft_link_protects_and_fails_over(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, tls_cujuds: tuple[Cujud, Cujud]
) -> None:
    rig, (ca, cb) = ft_rig, tls_cujuds
    name = "ft-tls"
    try:
        peers = ca.call("peers")["peers"]
        assert peers[0]["security"].startswith("TLS (TLSv1.3, certificates)"), peers
        _start_protected(rig, linux_guest, observer, name, tls_cujuds)
        log = ca.log_path.read_text()
        assert "AES-256-GCM" in log and "NOT encrypted" not in log, log[-2000:]
        time.sleep(1.0)
        kill_primary_and_judge(rig, observer, ca, name)
        after = cb.domain(name)
        # host b runs the VM now (and may already be re-protecting it onto host a)
        assert after is not None and after["role"] == "primary" and after["failovers"] == 1, after
    finally:
        cleanup_protected(rig, name)
