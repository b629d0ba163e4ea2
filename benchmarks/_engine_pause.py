"""``epoch_pause --engine``: the VM's pause per epoch as the real engine runs it."""

from __future__ import annotations

import argparse
import statistics
import time

from cuju_libvirt.ft_engine.epoch import PrimaryConfig
from cuju_libvirt.rig.engine_pair import protected_pair
from cuju_libvirt.rig.guests import WriterConfig, boot_image
from cuju_libvirt.rig.qemu_direct import DirectGuest


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "median_ms": round(statistics.median(s) * 1e3, 3),
        "p99_ms": round(s[max(0, -(-len(s) * 99 // 100) - 1)] * 1e3, 3),
    }


def run_engine(args: argparse.Namespace, targets: dict[str, dict[str, float]]) -> dict[str, object]:
    cfg = WriterConfig()
    mib = max(args.memory_mib, cfg.min_memory_mib + 1)
    img = boot_image(cfg)
    with (
        DirectGuest(name="eng-pp", memory_mib=mib, disk=img) as p,
        DirectGuest(name="eng-ps", memory_mib=mib, disk=img, incoming=True) as s,
    ):
        p.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=30)
        pc = PrimaryConfig(ram_path=str(p.ram_path), ram_size=p.ram_size, tracker=args.tracker,
                           epoch_ms=max(1, round(args.run_ms)), output_commit=False, tag="eng-pause")
        with protected_pair(p, s, pc) as pair:
            eng = pair.engine
            while eng.epochs < args.epochs + 5 and eng.running:
                time.sleep(0.05)
            times = eng.times
            tracker = pair.pstats.snapshot().tracker
            dirty = pair.pstats.snapshot().dirty_pages
            counters = eng.counters()
    pauses = times.pause[5:]  # the first epochs after the sync carry its tail
    total = _stats(pauses)
    return {
        "tracker": tracker,
        "engine": True,
        "epochs": len(pauses),
        "memory_mib": mib,
        "epoch_ms": pc.epoch_ms,
        "median_ms": total["median_ms"],
        "p99_ms": total["p99_ms"],
        "phases": {name: _stats(v[5:]) for name, v in times.phases.items()},
        "dirty_pages_mean": round(dirty.total / dirty.count) if dirty.count else None,
        "stage_ms_mean": round(counters.get("stage_ns", 0) / max(1, counters.get("epochs_staged", 1)) / 1e6,
                               3),
        "gather": "C (EpochSender.stage), pipelined shipping",
        "targets": targets,
    }
