"""Epoch replication throughput over loopback TCP against a raw socket push of the same bytes."""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cuju_libvirt import _cuju
from cuju_libvirt.ft_engine.replicator import (
    PAGE_SIZE,
    EpochReceiver,
    EpochSender,
    accept_link,
    connect_link,
    page_indexes,
)

DESCRIPTION = (
    "Replicate epochs of 100, 1,000 and 10,000 dirty 4 KiB pages (random and sequential) "
    "over loopback TCP with the C data plane, and push the same bytes through a plain socket "
    "in the same run."
)

SIZES = (100, 1000, 10000)
PATTERNS = ("random", "sequential")
FRAME_OVERHEAD = 16 + 40 + 24  # frame header + epoch header + trailer (c_ext/wire.h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region-mib", type=int, default=128, help="guest RAM size replicated (default 128)")
    parser.add_argument(
        "--pages-per-case", type=int, default=200_000, help="dirty pages shipped per case (default 200000)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported (3)")
    parser.add_argument(
        "--device-state-kib", type=int, default=0, help="device-state blob per epoch in KiB (default 0)"
    )


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = connect_link(listener.getsockname(), timeout=5)
        server = accept_link(listener, timeout=5)
    return client, server


def _dirty_sets(
    size: int, pattern: str, epochs: int, region_pages: int, rng: random.Random
) -> list[list[int]]:
    sets = []
    for e in range(epochs):
        if pattern == "random":
            sets.append(rng.sample(range(region_pages), size))
        else:
            start = (e * size) % (region_pages - size)
            sets.append(list(range(start, start + size)))
    return sets


def _replicate_case(
    region: mmap.mmap, workdir: Path, dirty: list[list[int]], device_state: bytes
) -> dict[str, float]:
    standby = mmap.mmap(-1, len(region))
    client, server = _pair()
    state = workdir / "state"
    for stale in workdir.iterdir():
        stale.unlink()
    rx = EpochReceiver(standby, str(state))
    try:
        rx.start(server)
        with EpochSender(client, region) as tx:
            tx.handshake(timeout=5)
            indexes = [page_indexes(d) for d in dirty]
            t0 = time.perf_counter()
            for epoch, idx in enumerate(indexes, start=1):
                tx.stage(epoch, idx, device_state)
                tx.ship()
                if epoch > 1 and not tx.wait_ack(epoch - 1, timeout=30):
                    raise RuntimeError(f"epoch {epoch - 1} not acknowledged within 30 s")
            if not tx.wait_ack(len(indexes), timeout=30):
                raise RuntimeError("last epoch not acknowledged within 30 s")
            elapsed = time.perf_counter() - t0
            tc = tx.counters()
            tx.close(orderly=True, timeout=30)
        rx.wait(timeout=30)
        rc = rx.counters()
    finally:
        rx.close()
        client.close()
        server.close()
    epochs = len(dirty)
    return {
        "seconds": elapsed,
        "wire_bytes": float(tc["wire_bytes"]),
        "stage_ms_mean": tc["stage_ns"] / epochs / 1e6,
        "send_ms_mean": tc["send_ns"] / epochs / 1e6,
        "ack_wait_ms_mean": tc["ack_wait_ns"] / epochs / 1e6,
        "receive_ms_mean": rc["receive_ns"] / epochs / 1e6,
        "verify_ms_mean": rc["verify_ns"] / epochs / 1e6,
        "apply_ms_mean": rc["apply_ns"] / epochs / 1e6,
    }


def _raw_case(payload: memoryview, frame_len: int, epochs: int) -> float:
    """The same bytes, epoch by epoch, through a plain socket with the same C write/read loop."""
    client, server = _pair()
    sink = bytearray(frame_len)
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            for _ in range(epochs):
                _cuju.raw_recv(server.fileno(), sink, 30)
        except BaseException as err:  # reported by the main thread
            failure.append(err)

    try:
        reader = threading.Thread(target=drain, name="dataplane-raw-sink")
        t0 = time.perf_counter()
        reader.start()
        for _ in range(epochs):
            _cuju.raw_send(client.fileno(), payload[:frame_len], 30)
        reader.join()
        elapsed = time.perf_counter() - t0
    finally:
        client.close()
        server.close()
    if failure:
        raise failure[0]
    return elapsed


def run(args: argparse.Namespace) -> dict[str, object]:
    region_pages = args.region_mib * 1024 * 1024 // PAGE_SIZE
    if region_pages < 2 * max(SIZES):
        raise SystemExit("--region-mib must hold at least 20,000 pages (80 MiB)")
    rng = random.Random(1)
    region = mmap.mmap(-1, region_pages * PAGE_SIZE)
    # Incompressible, non-zero guest RAM: the encoder's zero-page path never triggers,
    # so every page travels in full (the headline is the worst case for the encoder).
    chunk = 16 << 20
    for off in range(0, len(region), chunk):
        region[off : off + chunk] = os.urandom(min(chunk, len(region) - off))
    device_state = os.urandom(args.device_state_kib * 1024)
    workdir = Path(tempfile.mkdtemp(prefix="dataplane-bench-", dir="/dev/shm"))
    cases: dict[str, dict[str, float]] = {}
    try:
        for size in SIZES:
            epochs = max(20, args.pages_per_case // size)
            frame_len = FRAME_OVERHEAD + size * (8 + PAGE_SIZE) + len(device_state)
            # Raw baseline source: the same amount of the same random data, one frame's worth.
            payload = memoryview(bytes(region[: min(frame_len, len(region))]).ljust(frame_len, b"\x01"))
            for pattern in PATTERNS:
                runs = []
                raws = []
                for _ in range(args.repeats):
                    dirty = _dirty_sets(size, pattern, epochs, region_pages, rng)
                    runs.append(_replicate_case(region, workdir, dirty, device_state))
                    raws.append(_raw_case(payload, frame_len, epochs))
                best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                raw_s = statistics.median(raws)
                pages = size * epochs
                case = {k: round(v, 3) for k, v in best.items() if k != "seconds"}
                case.update(
                    {
                        "epochs": epochs,
                        "pages_per_s": round(pages / best["seconds"]),
                        "raw_pages_per_s": round(pages / raw_s),
                        "ratio_vs_raw": round(raw_s / best["seconds"], 3),
                        "epochs_per_s": round(epochs / best["seconds"], 1),
                        "wire_bytes_per_epoch": int(best["wire_bytes"] / epochs),
                    }
                )
                del case["wire_bytes"]
                cases[f"{pattern}_{size}"] = case
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        region.close()
    head = cases["random_10000"]
    return {
        "pages_per_s": head["pages_per_s"],
        "raw_pages_per_s": head["raw_pages_per_s"],
        "ratio_vs_raw": head["ratio_vs_raw"],
        "headline_case": "random_10000",
        "page_data": "os.urandom (incompressible, no zero pages)",
        "device_state_bytes": len(device_state),
        "region_mib": args.region_mib,
        "repeats": args.repeats,
        "cases": cases,
    }
