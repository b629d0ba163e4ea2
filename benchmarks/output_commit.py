"""Round trip to the guest's UDP echo with output commit, against the same guest unprotected."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

from cuju_libvirt.ft_engine.output import OutputCommit
from cuju_libvirt.rig.guest_net import GuestNetwork, socket_in
from cuju_libvirt.rig.linux_guest import build_linux_guest, kernel_cmdline
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Round trip to the Linux test guest's UDP echo (TCG, tap in a network namespace) in three "
    "phases of the same run: unprotected; with stop/cont epochs but no filters; and with output "
    "commit (epochs, boundary, ack after --ack-ms, release). Also the filters' toggle costs."
)

ECHO_PORT = 7
NETNS = "outputcommit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pings", type=int, default=200, help="echo round trips per phase (default 200)")
    parser.add_argument("--epoch-ms", type=float, default=20.0, help="running time per epoch (default 20)")
    parser.add_argument("--ack-ms", type=float, default=5.0, help="cont to acknowledgement (default 5)")


def _summary(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"median": None, "p99": None}
    ordered = sorted(samples)
    return {
        "median": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


class _Pinger(threading.Thread):
    """Sends numbered echo requests from the namespace at random phases; records RTTs (ms)."""

    def __init__(self, net: GuestNetwork, count: int) -> None:
        super().__init__(name="outputcommit-pinger", daemon=True)
        self.sock = socket_in(net.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.settimeout(1.0)
        self.target = (net.guest_ip, ECHO_PORT)
        self.count = count
        self.rtts: list[float] = []
        self.lost = 0

    def run(self) -> None:
        with self.sock:
            for n in range(self.count):
                payload = struct.pack(">Q", n) + os.urandom(8)
                sent = time.monotonic()
                self.sock.sendto(payload, self.target)
                try:
                    while True:
                        data = self.sock.recv(2048)
                        if data == payload:
                            break
                except TimeoutError:
                    self.lost += 1
                    continue
                self.rtts.append((time.monotonic() - sent) * 1e3)
                time.sleep(0.005 + (n * 7919 % 13) / 1000.0)  # spread over the epoch's phases


def _phase(
    guest: DirectGuest, net: GuestNetwork, args: argparse.Namespace, oc: OutputCommit | None, epochs: bool
) -> tuple[_Pinger, int]:
    pinger = _Pinger(net, args.pings)
    pinger.start()
    cycles = 0
    run_s = max(args.epoch_ms - args.ack_ms, 0.0) / 1e3
    while pinger.is_alive():
        if not epochs:
            time.sleep(0.05)
            continue
        time.sleep(run_s)
        guest.stop()
        epoch = oc.boundary() if oc is not None else cycles
        guest.cont()
        time.sleep(args.ack_ms / 1e3)
        if oc is not None:
            oc.release(epoch)
        cycles += 1
    pinger.join()
    return pinger, cycles


def run(args: argparse.Namespace) -> dict[str, object]:
    linux = build_linux_guest()
    shm = Path(tempfile.mkdtemp(prefix="outputcommit.", dir="/dev/shm"))
    try:
        with GuestNetwork(NETNS, subnet=94, tap="outputcommit") as net:
            guest = DirectGuest(
                name="outputcommit-bench",
                memory_mib=256,
                kernel=linux.kernel,
                initrd=linux.initrd,
                append=kernel_cmdline("echo", ip=f"{net.guest_ip}/{net.prefix}", mac=net.mac, port=ECHO_PORT),
                extra_args=net.qemu_args("hostnet0"),
            )
            try:
                with net.entered():
                    guest.start()
                guest.wait_serial(rf"cuju-echo: listening port={ECHO_PORT}", timeout=120)
                plain, _ = _phase(guest, net, args, None, epochs=False)
                bare, bare_epochs = _phase(guest, net, args, None, epochs=True)
                oc = OutputCommit(guest.qmp, tag="bench", counter_dir=shm)
                oc.install()
                try:
                    held, held_epochs = _phase(guest, net, args, oc, epochs=True)
                finally:
                    oc.remove()
            finally:
                guest.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    st = oc.stats
    boundary = _summary(st.recent_boundary_ms)
    release = _summary(st.recent_release_ms)
    unprotected = _summary(plain.rtts)
    epochs_only = _summary(bare.rtts)
    protected = _summary(held.rtts)
    return {
        "pings": args.pings,
        "epoch_ms": args.epoch_ms,
        "ack_ms": args.ack_ms,
        "rtt_ms_median_unprotected": unprotected["median"],
        "rtt_ms_p99_unprotected": unprotected["p99"],
        "rtt_ms_median_epochs_only": epochs_only["median"],
        "rtt_ms_p99_epochs_only": epochs_only["p99"],
        "rtt_ms_median_held": protected["median"],
        "rtt_ms_p99_held": protected["p99"],
        "lost": {"unprotected": plain.lost, "epochs_only": bare.lost, "held": held.lost},
        "epochs": {"epochs_only": bare_epochs, "held": held_epochs},
        "boundary_toggle_ms_median": boundary["median"],
        "boundary_toggle_ms_p99": boundary["p99"],
        "release_toggle_ms_median": release["median"],
        "release_toggle_ms_p99": release["p99"],
        "packets_per_epoch_max": st.epoch_packets_max,
        "packets_released": st.packets_released,
    }
