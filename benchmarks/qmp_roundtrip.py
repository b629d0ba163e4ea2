"""stop+cont round trip on a direct QMP socket of a running TCG guest (the per-epoch monitor cost)."""

from __future__ import annotations

import argparse
import statistics
import time

from cuju_libvirt.rig.guests import boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "Time QMP stop, cont and stop+cont on a direct QMP socket of a running boot-sector guest "
    "(TCG), against query-status (a no-op command) on the same socket as the baseline."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=500, help="stop+cont cycles to time (default 500)")
    parser.add_argument("--memory-mib", type=int, default=64, help="guest RAM in MiB (default 64)")


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 4),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 4),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    clock = time.perf_counter
    stops: list[float] = []
    conts: list[float] = []
    pairs: list[float] = []
    noops: list[float] = []
    with DirectGuest(name="bench-qmp", memory_mib=args.memory_mib, disk=boot_image()) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=30)
        qmp = guest.qmp
        for _ in range(args.rounds):
            t0 = clock()
            qmp.execute("query-status")
            t1 = clock()
            qmp.execute("stop")
            t2 = clock()
            qmp.execute("cont")
            t3 = clock()
            noops.append(t1 - t0)
            stops.append(t2 - t1)
            conts.append(t3 - t2)
            pairs.append(t3 - t1)
            qmp.events()  # keep the STOP/RESUME events from piling up, as the engine would
            time.sleep(0.002)  # let the guest run between cycles, as between epochs
        running_after = guest.status() == "running"
    pair = _summary(pairs)
    noop = _summary(noops)
    return {
        "rounds": args.rounds,
        "stop": _summary(stops),
        "cont": _summary(conts),
        "stop_cont_median_ms": pair["median_ms"],
        "stop_cont_p99_ms": pair["p99_ms"],
        "noop_median_ms": noop["median_ms"],
        "ratio_vs_noop": round(pair["median_ms"] / noop["median_ms"], 2) if noop["median_ms"] else None,
        "guest_running_after": running_after,
    }
