"""Guest workload throughput in FT mode over unprotected: the Linux guest's memory stress."""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks._engine import NETNS, SUBNET, config, linux_pair
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair
from cuju_libvirt.rig.linux_guest import parse_serial
from cuju_libvirt.rig.qemu_direct import DirectGuest

DESCRIPTION = (
    "The Linux test guest's `stress` workload (writes one word per 4 KiB page over --stress-mb MiB, "
    "reports pages/s every 500 ms), unprotected and then protected by the engine (no output commit: "
    "the workload sends nothing), same run. Key ratio_ft_vs_unprotected."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per phase (default 8)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")
    parser.add_argument("--stress-mb", type=int, default=32, help="MiB the guest writes over (default 32)")


def rates(guest: DirectGuest, seconds: float) -> list[float]:
    start = len(parse_serial(guest.serial_text(), "stress"))
    time.sleep(seconds)
    reports = parse_serial(guest.serial_text(), "stress")[start + 1:]  # skip a report spanning the switch
    return [float(r["pages_per_s"]) for r in reports if "pages_per_s" in r]


def run(args: argparse.Namespace) -> dict[str, object]:
    with (
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, "stress", stress_mb=args.stress_mb, report_ms=500) as (p, s),
    ):
        assert s is not None
        p.wait_serial(r"cuju-stress: pass=", timeout=60)
        plain = rates(p, args.seconds)
        with protected_pair(p, s, config(p, args.epoch_ms, None, output=False)) as pair:
            ft = rates(p, args.seconds)
            pause_ms = pair.engine.times.median_ms()
            dirty = pair.pstats.snapshot().dirty_pages
            epochs = pair.engine.epochs
    med_plain = statistics.median(plain) if plain else None
    med_ft = statistics.median(ft) if ft else None
    ratio = round(med_ft / med_plain, 3) if med_plain and med_ft is not None else None
    return {
        "ratio_ft_vs_unprotected": ratio,
        "pages_per_s_unprotected": med_plain,
        "pages_per_s_ft": med_ft,
        "reports": {"unprotected": len(plain), "ft": len(ft)},
        "epoch_ms": args.epoch_ms,
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "dirty_pages_mean": round(dirty.total / dirty.count) if dirty.count else None,
        "stress_mb": args.stress_mb,
    }
