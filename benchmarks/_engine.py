"""Shared set-up of the engine benchmarks: a Linux guest pair on a bridge, protected by the engine."""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Iterator
from typing import Any

from cuju_libvirt.ft_engine.epoch import PrimaryConfig
from cuju_libvirt.rig.engine_pair import BridgedNetwork
from cuju_libvirt.rig.linux_guest import build_linux_guest, kernel_cmdline
from cuju_libvirt.rig.qemu_direct import DirectGuest

NETNS = "eng-bench"
SUBNET = 132


def add_epoch_ms_argument(parser: argparse.ArgumentParser) -> None:
    """``--epoch-ms``: the engine's epoch length, the same option in every engine benchmark."""
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")


def summary(samples: list[float]) -> tuple[float | None, float | None]:
    """(median, p99) rounded to 0.1, None for no samples."""
    if not samples:
        return None, None
    s = sorted(samples)
    return round(statistics.median(s), 1), round(s[min(len(s) - 1, -(-len(s) * 99 // 100) - 1)], 1)


def failover_report(runs: list[dict[str, Any]], epoch_ms: int) -> dict[str, Any]:
    """The keys every failover benchmark reports, from its judged runs (each a dict with ``ok``,
    ``failover_ms``, optionally ``standby_ms``, and ``problems`` when not ok)."""
    fo = [float(r["failover_ms"]) for r in runs if r["ok"] and r["failover_ms"] is not None]
    standby = [float(r["standby_ms"]) for r in runs if r.get("standby_ms") is not None]
    med, p99 = summary(fo)
    return {
        "runs": len(runs),
        "passed": sum(1 for r in runs if r["ok"]),
        "failover_ms_median": med,
        "failover_ms_p99": p99,
        "standby_resume_ms_median": summary(standby)[0],
        "epoch_ms": epoch_ms,
        "failures": [r["problems"] for r in runs if not r["ok"]],
        "target": {"passed": "all", "failover_ms_median": 1000},
    }


@contextlib.contextmanager
def linux_pair(
    net: BridgedNetwork, mode: str, memory_mib: int = 128, standby: bool = True, **params: Any
) -> Iterator[tuple[DirectGuest, DirectGuest | None]]:
    """Primary (booted to the agent) and, if ``standby``, an ``-incoming defer`` standby."""
    linux = build_linux_guest()
    append = kernel_cmdline(mode, ip=f"{net.guest_ip}/{net.prefix}", mac=net.mac, **params)
    p = DirectGuest(name="eng-bp", memory_mib=memory_mib, kernel=linux.kernel, initrd=linux.initrd,
                    append=append, extra_args=net.qemu_args(net.taps[0]))
    s = None
    if standby:
        s = DirectGuest(name="eng-bs", memory_mib=memory_mib, kernel=linux.kernel, initrd=linux.initrd,
                        append=append, extra_args=net.qemu_args(net.taps[1]), incoming=True)
    try:
        with net.entered():
            p.start()
            if s is not None:
                s.start()
        p.wait_serial(r"cuju-init: ready", timeout=120)
        yield p, s
    finally:
        p.close()
        if s is not None:
            s.close()


def config(guest: DirectGuest, epoch_ms: int, counters: str | None, output: bool = True,
           tracker: str = "uffd") -> PrimaryConfig:
    return PrimaryConfig(ram_path=str(guest.ram_path), ram_size=guest.ram_size, tracker=tracker,
                         epoch_ms=epoch_ms, output_commit=output, netdevs=["hostnet0"] if output else None,
                         counter_dir=counters, tag="eng-bench")
