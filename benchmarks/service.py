"""A TCP request/response service in the guest, driven from the observer: FT against unprotected."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import Any

from benchmarks._engine import NETNS, SUBNET, add_epoch_ms_argument, config, linux_pair, summary
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair, scratch_counter_dir
from cuju_libvirt.rig.guest_net import socket_in

DESCRIPTION = (
    "The Linux test guest's `service` mode (TCP; each 64-byte request answered by 64 bytes) driven "
    "from the guest's network namespace by --connections closed-loop clients, first unprotected, then "
    "protected by the engine with output commit (same guest, same run): requests per second and "
    "request latency. Under FT a reply leaves only once the epoch that produced it is acknowledged."
)
PORT = 7070
REQ = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per phase (default 8)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--epoch-policy", choices=("output", "fixed"), default="output",
                        help="the engine's epoch policy (default output)")
    add_epoch_ms_argument(parser)


def _client(sock: socket.socket, until: float, lat: list[float], errors: list[str]) -> None:
    n = 0
    try:
        while time.monotonic() < until:
            req = bytes([n % 200]) + os.urandom(REQ - 1)
            t0 = time.monotonic()
            sock.sendall(req)
            got = b""
            while len(got) < REQ:
                chunk = sock.recv(REQ - len(got))
                if not chunk:
                    raise ConnectionError("the service closed the connection")
                got += chunk
            if got[0] != req[0] + 1 or got[1:] != req[1:]:
                raise ValueError(f"wrong reply to request {n}")
            lat.append((time.monotonic() - t0) * 1e3)
            n += 1
    except (OSError, ValueError) as err:
        errors.append(str(err))


def phase(netns: str, target: tuple[str, int], connections: int, seconds: float) -> dict[str, Any]:
    socks = []
    for _ in range(connections):
        s = socket_in(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        s.settimeout(5.0)
        s.connect(target)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    lat: list[list[float]] = [[] for _ in socks]
    errors: list[str] = []
    t0 = time.monotonic()
    until = t0 + seconds
    threads = [threading.Thread(target=_client, args=(s, until, lat[i], errors)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    all_lat = [x for xs in lat for x in xs]
    med, p99 = summary(all_lat)
    return {"rps": round(len(all_lat) / elapsed, 1), "latency_ms_median": med, "latency_ms_p99": p99,
            "requests": len(all_lat), "errors": errors[:3]}


def run(args: argparse.Namespace) -> dict[str, object]:
    with (
        scratch_counter_dir() as counters,
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, "service", port=PORT, req_bytes=REQ) as (p, s),
    ):
        assert s is not None
        p.wait_serial(rf"cuju-service: listening port={PORT}", timeout=60)
        target = (net.guest_ip, PORT)
        phase(net.name, target, 1, 1.0)  # ARP, warm-up
        plain = phase(net.name, target, args.connections, args.seconds)
        cfg = config(p, args.epoch_ms, counters)
        cfg.epoch_policy = args.epoch_policy
        with protected_pair(p, s, cfg) as pair:
            ft = phase(net.name, target, args.connections, args.seconds)
            pause_ms = pair.engine.times.median_ms()
            epochs = pair.engine.epochs
    target_ms = args.epoch_ms / 2 + 5
    med_ft = ft["latency_ms_median"]
    return {
        "rps_ratio": round(ft["rps"] / plain["rps"], 3) if plain["rps"] else None,
        "latency_ms_median_ft": med_ft,
        "latency_ms_median_unprotected": plain["latency_ms_median"],
        "latency_ms_p99_ft": ft["latency_ms_p99"],
        "latency_ms_p99_unprotected": plain["latency_ms_p99"],
        "rps_ft": ft["rps"],
        "rps_unprotected": plain["rps"],
        "errors": {"ft": ft["errors"], "unprotected": plain["errors"]},
        "epoch_ms": args.epoch_ms,
        "epoch_policy": args.epoch_policy,
        "connections": args.connections,
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "target": {"latency_ms_median_ft": f"<= epoch_ms / 2 + 5 = {target_ms}"},
        "meets_target": med_ft is not None and med_ft <= target_ms,
    }
