"""The authenticated peer control channel over loopback: handshake and request round trip,
next to a plain TCP ping-pong of the same payload measured in the same run."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cuju_libvirt.cujud import peer

DESCRIPTION = __doc__.strip().splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=2000, help="request/response round trips")
    parser.add_argument("--handshakes", type=int, default=50, help="connections to open")


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 4),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 4)}


def _raw_pingpong(rounds: int, payload: bytes) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            start = time.perf_counter()
            c.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(c.recv(65536))
            samples.append(time.perf_counter() - start)
    t.join(2)
    listener.close()
    return samples


def run(args: argparse.Namespace) -> dict[str, object]:
    key = os.urandom(32).hex().encode()
    opts = peer.PeerOptions(heartbeat_interval=3600, idle_timeout=60)
    handlers = peer.Handlers(requests={"ping": lambda c, b: {"echo": b.get("echo")}})
    with ThreadPoolExecutor(4) as pool:
        server = peer.PeerServer("127.0.0.1", 0, node="b", psk=key, peers=None, handlers=handlers,
                                 options=opts, executor=pool, on_connection=lambda c: None)
        try:
            handshakes = []
            for _ in range(args.handshakes):
                start = time.perf_counter()
                conn = peer.connect("127.0.0.1", server.port, node="a", psk=key, expect_peer="b",
                                    handlers=peer.Handlers(), options=opts, executor=pool)
                handshakes.append(time.perf_counter() - start)
                conn.close()
            conn = peer.connect("127.0.0.1", server.port, node="a", psk=key, expect_peer="b",
                                handlers=peer.Handlers(), options=opts, executor=pool)
            rtts = []
            for i in range(args.requests):
                start = time.perf_counter()
                conn.request("ping", {"echo": i}, timeout=5)
                rtts.append(time.perf_counter() - start)
            conn.close()
        finally:
            server.close()
    # the same bytes a request and its answer put on the wire, as a plain TCP ping-pong
    body = b'{"k":"req","id":1000,"t":"ping","b":{"echo":1000}}'
    frame_bytes = 4 + peer.SEQ_BYTES + peer.MAC_BYTES + len(body)
    raw = _raw_pingpong(args.requests, b"x" * frame_bytes)
    request, baseline = _stats(rtts), _stats(raw)
    return {
        "handshake": _stats(handshakes),
        "request": request,
        "raw_tcp_pingpong": baseline,
        "ratio_vs_raw": round(request["median_ms"] / baseline["median_ms"], 2),
        "requests": args.requests,
        "handshakes": args.handshakes,
    }
