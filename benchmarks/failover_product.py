"""Product-level failover: ``virsh start`` of a protected domain on rig host a (hook + cujud on
both hosts), SIGKILL of its QEMU at a random moment in FT mode, failover through cujud: --runs times.

``--witness etcd`` adds a 3-member etcd cluster (in namespaces of its own on the rig's LAN) and
runs the same judged runs twice in one invocation: first two-host mode (the baseline), then
with cujud's ``etcd_endpoints`` set, so every takeover wins the ownership record first."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import time

from benchmarks._engine import failover_report
from cuju_libvirt.rig.cujud import (
    Cujud,
    cleanup_protected,
    cujud_pair,
    hooked_rig,
    protected_linux_xml,
)
from cuju_libvirt.rig.etcd import in_rig
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer, Rules, judge_run

DESCRIPTION = (
    "Failover through the whole product on the two-host rig: the Linux test guest (TCG, virtio-net on the "
    "LAN) defined with virsh, started with virsh start on host a (hook -> cujud -> standby on host b), "
    "numbered UDP + TCP stream to an observer; SIGKILL of the primary QEMU at a random moment in FT mode. "
    "Time from the kill to the first datagram of the resumed guest on host b, failure detection included "
    "(cujud's fast path: the primary's cujud reports the dead QEMU). Each run judged by the e2e rules."
)
PPS = 300
MAC = "52:54:00:19:05:00"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=20, help="kill/failover runs (default 20)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")
    parser.add_argument("--witness", choices=("none", "etcd"), default="none",
                        help="etcd: also measure with the cluster witness, next to the two-host baseline")


def one_run(rig: Rig, cujuds: tuple[Cujud, Cujud], guest: LinuxGuest, index: int, *, epoch_ms: int,
            rng: random.Random) -> dict[str, object]:
    ca, cb = cujuds
    name = f"bench-fo{index}"
    try:
        with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs:
            xml = protected_linux_xml(rig, guest, name, obs, mac=MAC, pps=PPS, epoch_ms=epoch_ms)
            rig.a.virsh("define", str(xml))
            rig.a.virsh("start", name)
            ca.wait_domain(name, "protected", timeout=120)
            cb.wait_domain(name, "standby", timeout=30)
            obs.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, 90)
            time.sleep(rng.uniform(0.5, 3.0))
            # the claim: at most one epoch's datagrams, for the epochs as they ran just before the kill
            max_gap = ca.one_epoch_gap(name, PPS, epoch_ms)
            pid = rig.a.qemu_pid(name)
            if pid is None:
                raise RuntimeError("the primary QEMU is gone before the kill")
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            obs.wait_for(lambda r: sum(1 for _, t in r.udp if t > killed + 0.2) >= PPS
                         and any(t > killed for _, t in r.tcp_chunks), 60)
            verdict = judge_run(obs.recording(), Rules(max_gap=max_gap, failover_at=killed))
            taken = cb.domain(name)
            ok = verdict.ok and taken is not None and taken["role"] == "primary" and taken["failovers"] == 1
            return {"ok": ok, "failover_ms": verdict.failover_ms, "problems": list(verdict.problems),
                    "gap": max((g.missing for g in verdict.gaps), default=0), "max_gap": max_gap,
                    "standby_ms": None if taken is None or taken["last_failover_duration_s"] is None
                    else taken["last_failover_duration_s"] * 1e3}
    except Exception as err:  # a broken run is a failed run, reported, not the end of the benchmark
        return {"ok": False, "failover_ms": None, "problems": [f"{type(err).__name__}: {err}"]}
    finally:
        with contextlib.suppress(Exception):
            cleanup_protected(rig, name)


def _report(runs: list[dict[str, object]], epoch_ms: int) -> dict[str, object]:
    return {
        **failover_report(runs, epoch_ms),
        "largest_gap_packets": max((int(r.get("gap", 0)) for r in runs), default=0),  # type: ignore[call-overload]
        "detection_ms_included": True,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random()
    guest = build_linux_guest()
    with hooked_rig() as rig:
        with cujud_pair(rig) as cujuds:
            runs = [one_run(rig, cujuds, guest, i, epoch_ms=args.epoch_ms, rng=rng)
                    for i in range(args.runs)]
        if args.witness == "none":
            return _report(runs, args.epoch_ms)
        with in_rig(rig, 3) as etcd, cujud_pair(rig, etcd_endpoints=etcd.endpoints) as cujuds:
            witnessed = [one_run(rig, cujuds, guest, args.runs + i, epoch_ms=args.epoch_ms, rng=rng)
                         for i in range(args.runs)]  # names of their own: staged files stay
    report, baseline = _report(witnessed, args.epoch_ms), _report(runs, args.epoch_ms)
    med, base = report["failover_ms_median"], baseline["failover_ms_median"]
    both = isinstance(med, float | int) and isinstance(base, float | int)
    cost = round(float(med) - float(base), 1) if both else None  # type: ignore[arg-type]
    return {
        **report,
        "witness": "etcd",
        "two_host": baseline,
        "witness_cost_ms": cost,
        "target": {"passed": "all", "failover_ms_median": "<= two_host.failover_ms_median + 20"},
    }
