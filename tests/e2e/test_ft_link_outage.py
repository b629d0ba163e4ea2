"""The FT link on the two-host rig: an outage of the link alone (issue 13 item 9), and
hundreds of idle connections to the backup's FT-link listener (item 8).

An outage of the FT link alone (the LAN, and with it the peer channel, stays up):
No takeover may happen (the peer channel shows the primary alive); the primary gets the
peer's promise, runs on unprotected, and retries pairing with back-off. While the link is
down a retry must not make the peer start (and destroy again) a standby domain each time.
When the link is back the VM is protected again; the observer sees no gap and no repeat.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import Cujud, cleanup_protected
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.nodes import FT_IFACE
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from tests.e2e.test_cujud_restarts import (
    PPS,
    make_observer,
    standbys_created,
    start_protected,
    still_counting,
)

#: How long the link stays down: several back-off rounds (1, 2, 4 s).
OUTAGE_S = 9.0
IDLE = 400


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with make_observer(ft_rig) as obs:
        yield obs


@pytest.mark.timeout(300)
def test_an_ft_link_outage_neither_fails_over_nor_churns_standbys(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    rig, (ca, cb) = ft_rig, cujuds
    name = "ft-linkdown"
    try:
        start_protected(rig, linux_guest, observer, name, cujuds)
        created = standbys_created(cb)
        rig.a.set_links(up=False, links=(FT_IFACE,))
        ca.wait_domain(name, "degraded", timeout=30)  # the peer promised; the VM runs unprotected
        time.sleep(OUTAGE_S)
        assert cb.domain(name) is None and rig.b.qemu_pid(name) is None, "host b still holds a copy"
        assert standbys_created(cb) == created, (
            f"host b started {standbys_created(cb) - created} standby domains during the outage")
        said = ca.log_path.read_text(errors="replace")
        assert "FT link" in said and "is down" in said, said[-2000:]
        still_counting(observer, time.monotonic(), PPS)

        rig.a.set_links(up=True, links=(FT_IFACE,))
        ca.wait_domain(name, "protected", timeout=90)
        cb.wait_domain(name, "standby", timeout=30)
        rec = still_counting(observer, time.monotonic(), PPS)
        verdict = judge_run(rec, Rules())  # never a takeover: no gap, no repeat
        assert verdict.ok, verdict.as_dict()
    finally:
        rig.a.set_links(up=True, links=(FT_IFACE,))
        cleanup_protected(rig, name)


#: Opens N connections to HOST:PORT and holds them idle for S seconds (what a port scanner or a
#: misconfigured client does); it does not open new ones for those the listener closes.
HOLDER = """
import socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held = []
for _ in range(n):
    try:
        held.append(socket.create_connection((host, port), timeout=1))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(seconds)
"""


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for pid {pid}")


def _rate(cujud: Cujud, name: str, seconds: float) -> float:
    """Epochs per second over ``seconds``, from the epochs the primary's status counts."""
    first = cujud.domain(name)
    t0 = time.monotonic()
    time.sleep(seconds)
    last = cujud.domain(name)
    assert first is not None and last is not None
    return (last["last_acked_epoch"] - first["last_acked_epoch"]) / (time.monotonic() - t0)


@pytest.mark.timeout(300)
def test_idle_connections_to_the_ft_listener_cost_neither_threads_nor_epochs(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """400 idle connections gave the backup's cujud 415 threads and halved the epoch rate."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "ft-idle"
    holder = None
    try:
        start_protected(rig, linux_guest, observer, name, cujuds)
        pid_b = int(cb.call("ping")["pid"])
        threads_before = _threads(pid_b)
        rate_before = _rate(ca, name, 5.0)
        holder = rig.a.popen([sys.executable, "-c", HOLDER, rig.b.ft_address, "7791", str(IDLE), "30"],
                             stdout=subprocess.PIPE, text=True)
        time.sleep(3.0)
        threads_during = _threads(pid_b)
        rate_during = _rate(ca, name, 5.0)
        print(f"backup cujud: {threads_before} threads before, {threads_during} with {IDLE} idle "
              f"connections; epochs/s {rate_before:.1f} before, {rate_during:.1f} during")
        assert threads_during <= threads_before + 4, (threads_before, threads_during)
        assert rate_during >= 0.75 * rate_before, (rate_before, rate_during)
        assert ca.domain(name)["state"] == "protected"  # type: ignore[index]
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(10)
        cleanup_protected(rig, name)
