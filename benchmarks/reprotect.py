"""Re-protection after a failover: SIGKILL of the protected primary's QEMU on rig host a, takeover
on host b, and the time until host b's cujud has the VM protected again (a new standby on host a,
a new initial sync), next to the first protection of the same guest in the same run."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import statistics
import time

from cuju_libvirt.rig.cujud import (
    Cujud,
    cleanup_protected,
    cujud_pair,
    hooked_rig,
    protected_linux_xml,
)
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer, Rules, judge_run

DESCRIPTION = (
    "Automatic re-protection on the two-host rig: the Linux test guest (TCG, 256 MiB, virtio-net on the "
    "LAN, numbered UDP + TCP stream to an observer) started with virsh start on host a and protected by "
    "cujud (standby on host b); its QEMU is SIGKILLed at a random moment in FT mode; host b takes over and, "
    "with no operator action, protects the VM again with a new standby on host a. reprotected_s: from the "
    "kill until host b reports it protected; baseline: initial_protect_s, from virsh start until host a "
    "reported the same guest protected, in the same run. Each run judged by the e2e rules."
)
PPS = 300
MAC = "52:54:00:19:07:00"
POLL = 0.05
_SYNC_LINE = re.compile(r"PROTECTED by \S+: initial sync of (\d+) pages in ([\d.]+) s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="kill/re-protect runs (default 3)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length in ms (default 20)")


def _last_sync(cujud: Cujud, name: str) -> tuple[int, float] | None:
    """Pages and seconds of the last initial sync of ``name`` in this cujud's log."""
    found = None
    for line in cujud.log_path.read_text(errors="replace").splitlines():
        m = _SYNC_LINE.search(line)
        if m and name in line:
            found = (int(m.group(1)), float(m.group(2)))
    return found


def one_run(rig: Rig, cujuds: tuple[Cujud, Cujud], guest: LinuxGuest, index: int, *, epoch_ms: int,
            rng: random.Random) -> dict[str, object]:
    ca, cb = cujuds
    name = f"bench-rp{index}"
    try:
        with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs:
            xml = protected_linux_xml(rig, guest, name, obs, mac=MAC, pps=PPS, epoch_ms=epoch_ms)
            rig.a.virsh("define", str(xml))
            rig.a.virsh("start", name)
            started = time.monotonic()
            ca.wait_for(name, lambda e: e["state"] == "protected", "protected", 120, interval=POLL)
            initial_protect_s = time.monotonic() - started
            cb.wait_domain(name, "standby", timeout=30)
            obs.wait_for(lambda r: len(r.udp) >= PPS and len(r.tcp_data) >= 400, 90)
            time.sleep(rng.uniform(0.5, 2.0))
            # the claim: at most one epoch's datagrams, for the epochs as they ran just before the kill
            max_gap = ca.one_epoch_gap(name, PPS, epoch_ms)
            pid = rig.a.qemu_pid(name)
            if pid is None:
                raise RuntimeError("the primary QEMU is gone before the kill")
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            entry = cb.wait_for(name, lambda e: e["state"] == "protected" and e["failovers"] == 1,
                                "protected again", 180, interval=POLL)
            reprotected_s = time.monotonic() - killed
            standby = ca.wait_domain(name, "standby", timeout=30)
            after = time.monotonic()
            obs.wait_for(lambda r: sum(1 for _, t in r.udp if t > after) >= PPS
                         and any(t > after for _, t in r.tcp_chunks), 60)
            verdict = judge_run(obs.recording(), Rules(max_gap=max_gap, failover_at=killed, tolerance=0.5))
            first, again = _last_sync(ca, name), _last_sync(cb, name)
            ok = (verdict.ok and entry["peer"] == ca.host.hostname and standby["peer"] == cb.host.hostname
                  and rig.a.virsh("domstate", name).strip() == "paused")
            return {"ok": ok, "reprotected_s": reprotected_s, "initial_protect_s": initial_protect_s,
                    "initial_sync_s": None if first is None else first[1],
                    "resync_s": None if again is None else again[1],
                    "failover_ms": verdict.failover_ms, "problems": list(verdict.problems),
                    "repeated": sum(1 for p in verdict.problems if "twice" in p or "backwards" in p),
                    "lost_packets": sum(g.missing for g in verdict.gaps)}
    except Exception as err:  # a broken run is a failed run, reported, not the end of the benchmark
        return {"ok": False, "problems": [f"{type(err).__name__}: {err}"]}
    finally:
        with contextlib.suppress(Exception):
            cleanup_protected(rig, name)


def _median(runs: list[dict[str, object]], key: str) -> float | None:
    values = [float(v) for r in runs if r.get("ok") and isinstance(v := r.get(key), (int, float))]
    return round(statistics.median(values), 3) if values else None


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random()
    guest = build_linux_guest()
    with hooked_rig() as rig, cujud_pair(rig) as cujuds:
        runs = [one_run(rig, cujuds, guest, i, epoch_ms=args.epoch_ms, rng=rng) for i in range(args.runs)]
    reprotected, baseline = _median(runs, "reprotected_s"), _median(runs, "initial_protect_s")
    return {
        "runs": len(runs),
        "passed": sum(1 for r in runs if r.get("ok")),
        "epoch_ms": args.epoch_ms,
        "reprotected_s": reprotected,
        "initial_protect_s": baseline,
        "ratio": None if reprotected is None or not baseline else round(reprotected / baseline, 3),
        "initial_sync_s": _median(runs, "initial_sync_s"),
        "resync_s": _median(runs, "resync_s"),
        "failover_ms": _median(runs, "failover_ms"),
        "repeated": sum(int(r.get("repeated", 0)) for r in runs),  # type: ignore[call-overload]
        "problems": [p for r in runs for p in r.get("problems", [])],  # type: ignore[attr-defined]
        "per_run": [{k: v for k, v in r.items() if k != "problems"} for r in runs],
    }
