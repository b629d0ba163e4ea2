"""What others do to a protected VM, at the engine (issue 13): a pause somebody else asked
for (``virsh suspend``: libvirt's ``stop`` on its own monitor) must stay a pause while the
engine runs epochs, and protection must go on; a configuration change cujud learns of from
libvirt (:meth:`PrimaryEngine.reconfigure`) ends protection before another epoch ships.

Two real TCG QEMUs and the engine pair, no libvirt: a second QMP monitor on the primary
stands in for libvirt's. Before the fix the next epoch's ``cont`` resumed the VM.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from cuju_libvirt.ft_engine.epoch import PrimaryConfig, ReconfiguredError
from cuju_libvirt.ft_engine.state import FTState
from cuju_libvirt.qmp import QMPClient
from cuju_libvirt.rig.engine_pair import protected_pair
from cuju_libvirt.rig.guests import boot_image, read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace of QEMU for the uffd tracker)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
    pytest.mark.timeout(90),
]


def status(user: QMPClient) -> str:
    """The run state, asked on the user's monitor (the engine's QMP client is its own)."""
    return str(user.execute("query-status")["status"])


def user_pause(user: QMPClient) -> None:
    """``stop`` from the other monitor until it holds. A ``stop`` that lands inside an epoch's
    pause finds the VM already stopped: QEMU does nothing and says nothing (no event), so the
    engine cannot tell and its ``cont`` ends it. libvirt behaves the same (``virsh suspend``
    of a domain it sees paused is a no-op): docs/failover.md, lifecycle table."""
    for _ in range(20):
        user.execute("stop")
        time.sleep(0.1)
        if status(user) == "paused":
            return
    raise AssertionError("the VM never stayed paused after the user's stop")


def test_a_pause_by_another_monitor_survives_epochs_and_resume_works(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sock = tmp_path_factory.mktemp("fp") / "user.qmp"
    img = boot_image()
    with (
        DirectGuest(name="fp-p", memory_mib=32, disk=img,
                    extra_args=["-qmp", f"unix:{sock},server=on,wait=off"]) as p,
        DirectGuest(name="fp-s", memory_mib=32, disk=img, incoming=True) as s,
    ):
        p.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
        cfg = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker="uffd",
                            epoch_ms=20, output_commit=False, tag="fp")
        with protected_pair(p, s, cfg) as pair, QMPClient(sock) as user:
            assert pair.pmachine.state is FTState.PROTECTED
            time.sleep(0.3)
            user_pause(user)  # virsh suspend
            acked = pair.engine.last_acked
            frozen = read_counter(p.ram_path)
            time.sleep(0.6)  # ~30 epochs
            assert status(user) == "paused", "an epoch resumed a VM the user had paused"
            assert read_counter(p.ram_path) == frozen
            assert pair.engine.last_acked > acked + 5, "epochs must go on while the VM is paused"
            assert pair.pmachine.state is FTState.PROTECTED
            user.execute("cont")  # virsh resume
            deadline = time.monotonic() + 5
            while read_counter(p.ram_path) <= frozen + 50 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert read_counter(p.ram_path) > frozen + 50, "the VM does not run after the user's cont"
            acked = pair.engine.last_acked
            time.sleep(0.3)
            assert pair.engine.last_acked > acked and pair.pmachine.state is FTState.PROTECTED
            # Protection ending while the user holds the VM paused leaves it paused.
            user_pause(user)
            pair.engine.stop(10)
            assert status(user) == "paused"
            user.execute("cont")
            assert status(user) == "running"


def test_a_reconfiguration_ends_protection_before_the_epoch_it_lands_in_ships(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The call lands inside epoch N's pause (as an event about a change made before that
    pause would): epoch N is never acknowledged, the VM runs on, the machine is DEGRADED."""
    img = boot_image()
    staged: list[int] = []
    with (
        DirectGuest(name="rc-p", memory_mib=32, disk=img) as p,
        DirectGuest(name="rc-s", memory_mib=32, disk=img, incoming=True) as s,
    ):
        p.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
        cfg = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker="uffd",
                            epoch_ms=20, output_commit=False, tag="rc")

        def on_stopped(epoch: int) -> None:
            staged.append(epoch)
            if len(staged) == 30:
                pair.engine.reconfigure("device dimm0 was hot-plugged (test)")

        with protected_pair(p, s, cfg, on_stopped=on_stopped) as pair:
            deadline = time.monotonic() + 60
            while pair.engine.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pair.engine.running, "protection did not end"
            assert isinstance(pair.engine.failure, ReconfiguredError), pair.engine.failure
            assert "dimm0" in str(pair.engine.failure)
            assert pair.engine.last_acked < staged[29], "the epoch after the change was shipped"
            assert pair.pmachine.state is FTState.DEGRADED
            frozen = read_counter(p.ram_path)
            deadline = time.monotonic() + 5
            while read_counter(p.ram_path) <= frozen + 50 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert read_counter(p.ram_path) > frozen + 50, "the VM must run on, unprotected"
