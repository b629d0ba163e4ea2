"""UDP echo round trip to the guest, unprotected and in FT mode (the real engine), same run."""

from __future__ import annotations

import argparse
import os
import socket
import struct
import time

from benchmarks._engine import NETNS, SUBNET, add_epoch_ms_argument, config, linux_pair, summary
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair, scratch_counter_dir
from cuju_libvirt.rig.guest_net import socket_in

DESCRIPTION = (
    "UDP echo round trip from the guest's network namespace to the Linux test guest (TCG), first "
    "unprotected, then with PrimaryEngine running epochs with output commit against a BackupEngine "
    "on loopback. A reply waits for the end of its epoch and for that epoch's acknowledgement."
)
ECHO_PORT = 7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pings", type=int, default=200, help="round trips per phase (default 200)")
    parser.add_argument("--epoch-policy", choices=("output", "fixed"), default="output",
                        help="the engine's epoch policy (default output: a reply ends its epoch)")
    add_epoch_ms_argument(parser)


def pings(netns: str, target: tuple[str, int], count: int) -> tuple[list[float], int]:
    sock = socket_in(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.settimeout(1.0)
    rtts: list[float] = []
    lost = 0
    with sock:
        for n in range(count):
            payload = struct.pack(">Q", n) + os.urandom(8)
            sent = time.monotonic()
            sock.sendto(payload, target)
            try:
                while sock.recv(2048) != payload:
                    pass
            except TimeoutError:
                lost += 1
                continue
            rtts.append((time.monotonic() - sent) * 1e3)
            time.sleep(0.003 + (n * 7919 % 17) / 1000.0)  # land at varied phases of the epoch
    return rtts, lost


def run(args: argparse.Namespace) -> dict[str, object]:
    with (
        scratch_counter_dir() as counters,
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, "echo", port=ECHO_PORT) as (p, s),
    ):
        assert s is not None
        p.wait_serial(rf"cuju-echo: listening port={ECHO_PORT}", timeout=60)
        target = (net.guest_ip, ECHO_PORT)
        pings(net.name, target, 10)  # ARP, warm-up
        plain, lost_plain = pings(net.name, target, args.pings)
        cfg = config(p, args.epoch_ms, counters)
        cfg.epoch_policy = args.epoch_policy
        with protected_pair(p, s, cfg) as pair:
            ft, lost_ft = pings(net.name, target, args.pings)
            pause_ms = pair.engine.times.median_ms()
            epochs = pair.engine.epochs
    med_plain, p99_plain = summary(plain)
    med_ft, p99_ft = summary(ft)
    return {
        "rtt_ms_median_unprotected": med_plain,
        "rtt_ms_p99_unprotected": p99_plain,
        "rtt_ms_median_ft": med_ft,
        "rtt_ms_p99_ft": p99_ft,
        "epoch_ms": args.epoch_ms,
        "lost_unprotected": lost_plain,
        "lost_ft": lost_ft,
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "epoch_policy": args.epoch_policy,
        "target": {"rtt_ms_median_ft": f"<= epoch_ms / 2 + 5 = {args.epoch_ms / 2 + 5}"},
        "meets_target": med_ft is not None and med_ft <= args.epoch_ms / 2 + 5,
    }
