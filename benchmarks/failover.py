"""Kill the primary (SIGKILL) at a random moment in FT mode, fail over, judge the run: --runs times."""

from __future__ import annotations

import argparse
import os
import random
import signal
import time

from benchmarks._engine import NETNS, SUBNET, add_epoch_ms_argument, config, failover_report, linux_pair
from cuju_libvirt.rig.engine_pair import BridgedNetwork, protected_pair, scratch_counter_dir
from cuju_libvirt.rig.observer import Observer, Rules, judge_run, one_epoch_packets

DESCRIPTION = (
    "Engine-level failover of the Linux test guest (TCG, two QEMUs on one bridge, no libvirt): numbered "
    "UDP + a TCP stream to an observer, SIGKILL of the primary at a random moment, BackupEngine.failover() "
    "at once; each run judged by the end-to-end rules. Time from the kill to the first datagram of the "
    "resumed guest. cujud's failure-detection timeout is not part of it."
)
PPS = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=20, help="kill/failover runs (default 20)")
    add_epoch_ms_argument(parser)


def one_run(epoch_ms: int, rng: random.Random) -> dict[str, object]:
    try:
        with (
            scratch_counter_dir() as counters,
            BridgedNetwork(NETNS, SUBNET) as net,
            Observer((net.host_ip, 0), (net.host_ip, 0), netns=net.name) as obs,
            linux_pair(net, "udp", peer="{}:{}".format(*obs.udp_address),
                       tcp="{}:{}".format(*obs.tcp_address), pps=PPS) as (p, s),
        ):
            assert s is not None
            obs.wait_for(lambda r: len(r.udp) >= 30 and len(r.tcp_data) >= 400, 60.0)
            with protected_pair(p, s, config(p, epoch_ms, counters)) as pair:
                pair.backup.wait_standby(10)
                out = pair.engine.output
                time.sleep(rng.uniform(0.5, 2.0))
                killed = time.monotonic()
                os.kill(p.pid, signal.SIGKILL)
                most = (out.stats.epoch_packets_max or 0) if out is not None else 0
                report = pair.backup.failover()
                obs.wait_for(lambda r: any(t > killed + 0.05 for _, t in r.udp), 20.0)
                n = len(obs.recording().tcp_data)
                obs.wait_for(lambda r: len(r.tcp_data) > n + 400, 30.0)
                time.sleep(0.5)
                # the claim: one epoch's datagrams (the most one epoch held, as counted, or
                # what the configured epoch length gives at this rate, whichever is larger)
                max_gap = max(most, one_epoch_packets(PPS, epoch_ms))
                verdict = judge_run(obs.recording(), Rules(max_gap=max_gap, failover_at=killed))
                return {"ok": verdict.ok, "failover_ms": verdict.failover_ms, "problems": verdict.problems,
                        "standby_ms": report.total_s * 1e3, "epoch": report.epoch}
    except Exception as err:  # a run that breaks is a failed run, reported, not the end of the benchmark
        return {"ok": False, "failover_ms": None, "problems": [f"{type(err).__name__}: {err}"]}


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random()
    runs = [one_run(args.epoch_ms, rng) for _ in range(args.runs)]
    return {**failover_report(runs, args.epoch_ms), "detection_ms_excluded": True}
