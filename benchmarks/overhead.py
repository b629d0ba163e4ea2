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
    "The Linux test guest's `stress` workload (one word per 4 KiB page over --stress-mb MiB; progress "
    "read every second by the host's clock) in three phases of one run: before FT, protected by the "
    "engine (no output commit: the workload sends nothing), and unprotected again after engine.stop(). "
    "ratio_ft_vs_unprotected compares with the phase after FT (see benchmarks/README.md for why)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per phase (default 8)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")
    parser.add_argument("--stress-mb", type=int, default=32, help="MiB the guest writes over (default 32)")


def last_pass(guest: DirectGuest) -> int:
    reports = [r for r in parse_serial(guest.serial_text(), "stress") if "pass" in r]
    return int(reports[-1]["pass"]) if reports else 0


def rates(guest: DirectGuest, seconds: float, pages_per_pass: int) -> list[float]:
    """Pages/s by the host's clock, per second: the guest's own clock stops while the VM is
    paused, so its self-reported rate overstates the rate under FT (it counts run time only)."""
    out = []
    t0, p0 = time.monotonic(), last_pass(guest)
    end = t0 + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        t1, p1 = time.monotonic(), last_pass(guest)
        out.append((p1 - p0) * pages_per_pass / (t1 - t0))
        t0, p0 = t1, p1
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    with (
        BridgedNetwork(NETNS, SUBNET) as net,
        linux_pair(net, "stress", stress_mb=args.stress_mb, report_ms=50) as (p, s),
    ):
        assert s is not None
        p.wait_serial(r"cuju-stress: pass=", timeout=60)
        pages = args.stress_mb * 256
        plain = rates(p, args.seconds, pages)
        with protected_pair(p, s, config(p, args.epoch_ms, None, output=False)) as pair:
            ft = rates(p, args.seconds, pages)
            pause_ms = pair.engine.times.median_ms()
            dirty = pair.pstats.snapshot().dirty_pages
            epochs = pair.engine.epochs
        after = rates(p, args.seconds, pages)
    med_plain = statistics.median(plain) if plain else None
    med_ft = statistics.median(ft) if ft else None
    med_after = statistics.median(after) if after else None
    ratio = round(med_ft / med_after, 3) if med_after and med_ft is not None else None
    return {
        "ratio_ft_vs_unprotected": ratio,
        "pages_per_s_unprotected": med_after,
        "pages_per_s_ft": med_ft,
        "pages_per_s_before_any_save": med_plain,
        "ratio_ft_vs_before_any_save": round(med_ft / med_plain, 3) if med_plain and med_ft else None,
        "samples": {"before": len(plain), "ft": len(ft), "unprotected": len(after)},
        "epoch_ms": args.epoch_ms,
        "epochs": epochs,
        "pause_ms_median": None if pause_ms is None else round(pause_ms, 2),
        "dirty_pages_mean": round(dirty.total / dirty.count) if dirty.count else None,
        "stress_mb": args.stress_mb,
    }
