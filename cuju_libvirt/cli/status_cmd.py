"""``cuju-libvirt status``: every protected domain on this host, from the running cujud."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cuju_libvirt import config
from cuju_libvirt.cli import EXIT_OK
from cuju_libvirt.cujud.control import ControlClient

DEFAULT_SOCKET: Path = config.SETTINGS_BY_KEY["control_socket"].default_value()
BAR_WIDTH = 20
COLUMNS = ("DOMAIN", "ROLE", "PEER", "STATE", "EPOCHS/S", "LAG", "LAST FAILOVER", "SYNC")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show the protected domains on this host (role, peer, state, epoch rate, lag)",
        description=(
            "Ask the local cujud for every domain it protects or stands by for, and show\n"
            "its role on this host (primary or backup), the peer host, the FT state, epochs\n"
            "committed per second (over the last few seconds), the replication lag (age of\n"
            "the newest epoch the backup acknowledged), the last failover, and the progress\n"
            "of an initial synchronisation. Then the peer hosts with their heartbeat, and,\n"
            "when cujud uses etcd (etcd_endpoints), the cluster: every host (its lease alive\n"
            "or gone, failure domain, free memory, CPUs and load average, VMs as\n"
            "primary/backup), the elected placer, and the witness's record of every VM: owner,\n"
            "backup (or the host its standby is placed on), mode and generation.\n\n"
            "A domain whose state is not 'protected' (primary) or 'standby' (backup) has no\n"
            "backup that could take over right now: its lag shows '-'."
        ),
        epilog=(
            "EXIT STATUS\n"
            "  0  cujud answered (whatever the domains' states)\n"
            "  1  cujud is not running, or its control socket cannot be used (message says why)\n\n"
            "The same figures, with history, are on cujud's Prometheus exporter\n"
            "(metrics_listen, port 7792 by default; see docs/metrics.md)."
        ),
    )
    parser.add_argument("--json", action="store_true",
                        help="print cujud's answer as one JSON object (for scripts): node, peers, domains, "
                             "cluster (hosts, placer, vms)")
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"cujud's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 1) until interrupted; with a progress bar "
                             "for initial synchronisations")
    parser.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    with ControlClient(args.socket, timeout=5.0) as client:
        while True:
            status = client.call("status")
            if args.json:
                print(json.dumps(status, sort_keys=True), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    sys.stdout.write("\033[H\033[2J")  # home + clear, as watch(1) does
                sys.stdout.write(render(status, time.time()))
                sys.stdout.flush()
            if args.watch is None:
                return EXIT_OK
            time.sleep(max(0.1, args.watch))
            if not args.json:
                print()


def render(status: Mapping[str, Any], now: float) -> str:
    """The table for people: one line per domain, then one per peer."""
    lines = [f"cujud on {status.get('node', '?')} (version {status.get('version', '?')})"
             + (f", metrics at {status['metrics']}" if status.get("metrics") else "")]
    if status.get("protection"):
        lines.append(f"note: {status['protection']}")
    domains: Sequence[Mapping[str, Any]] = status.get("domains") or []
    if not domains:
        lines.append("no protected domains on this host")
    else:
        rows = [list(COLUMNS)] + [_row(d, now) for d in domains]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        for d in domains:
            lines.extend(_disk_lines(d))
    peers: Sequence[Mapping[str, Any]] = status.get("peers") or []
    for p in peers:
        if p.get("connected"):
            rtt = p.get("rtt_last_ms")
            rtt_text = "-" if rtt is None else f"{rtt:.2f} ms"
            security = f", {p['security']}" if p.get("security") else ""
            lines.append(f"peer {p.get('node')}: connected, heartbeat rtt {rtt_text}, "
                         f"last seen {p.get('last_seen_s_ago')} s ago{security}")
        else:
            why = f" ({p['last_error']})" if p.get("last_error") else ""
            lines.append(f"peer {p.get('node')}: NOT CONNECTED{why}")
    lines.extend(_cluster_lines(status.get("cluster")))
    return "\n".join(lines) + "\n"


def _cluster_lines(cluster: Mapping[str, Any] | None) -> list[str]:
    """The witness's records of every VM in the cluster (only when cujud uses etcd)."""
    if cluster is None:
        return []
    if cluster.get("error"):
        return [f"cluster (etcd): NO ANSWER ({cluster['error']})"]
    hosts: Sequence[Mapping[str, Any]] = cluster.get("hosts") or []
    alive = sum(1 for h in hosts if h.get("lease_alive"))
    lines = [f"cluster (etcd): {alive} of {len(hosts)} host(s) alive, placer "
             f"{cluster.get('placer') or 'NONE ELECTED'}"]
    lines += _table(["HOST", "LEASE", "FAILURE DOMAIN", "FREE MEM", "CPUS (LOAD)", "VMS (PRIMARY/BACKUP)"], [
        [str(h.get("name")), "alive" if h.get("lease_alive") else "GONE", str(h.get("failure_domain") or "-"),
         "-" if h.get("mem_free_kib") is None else _size(int(h["mem_free_kib"]) * 1024), _cpus(h),
         f"{h.get('primaries', 0)}/{h.get('backups', 0)}"] for h in hosts])
    vms: Sequence[Mapping[str, Any]] = cluster.get("vms") or []
    lines.append(f"cluster (etcd): {len(vms)} VM record(s)")
    lines += _table(["VM", "OWNER", "BACKUP", "MODE", "GENERATION"], [
        [str(v.get("name") or v.get("uuid")), str(v.get("owner")),
         str(v.get("backup") or (f"placed on {v['placement']}" if v.get("placement") else "-")),
         str(v.get("mode")), str(v.get("generation"))] for v in vms])
    return lines


def _cpus(host: Mapping[str, Any]) -> str:
    """A host's CPU count and 1-minute load average as its lease last registered them."""
    if not host.get("cpus"):
        return "-"
    load = host.get("load1")
    return f"{host['cpus']}" + ("" if load is None else f" ({float(load):.2f})")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Indented, aligned columns; nothing without rows."""
    if not rows:
        return []
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _row(d: Mapping[str, Any], now: float) -> list[str]:
    rate = d.get("epochs_per_s")
    lag = d.get("lag_s")
    return [
        str(d.get("domain", "?")), str(d.get("role", "?")),
        str(d.get("peer") or "-") + (f" (generation {d['generation']})" if d.get("generation") else ""),
        str(d.get("state", "?")) + ("" if d.get("protected") else " (UNPROTECTED)"),
        "-" if rate is None else f"{rate:.1f}",
        "-" if lag is None or not d.get("protected") else _duration(lag),
        _failover(d, now),
        _sync(d),
    ]


def _duration(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def _failover(d: Mapping[str, Any], now: float) -> str:
    count = d.get("failovers") or 0
    at = d.get("last_failover_timestamp")
    if not count or at is None:
        return "never"
    took = d.get("last_failover_duration_s")
    took_text = "" if took is None else f", took {_duration(took)}"
    return f"{_duration(max(0.0, now - at))} ago{took_text} ({count} total)"


_SYNC_WORDS = {"changed": "resyncing changed blocks", "compare": "comparing, resending what differs"}


def _why_full(why: str) -> str:
    """The reason inside DiskSet's "full sparse copy (...)"."""
    inner = why.removeprefix("full sparse copy (").removesuffix(")")
    return inner or why


def _disk_lines(d: Mapping[str, Any]) -> list[str]:
    """One line per disk still being copied to the backup (nothing once every disk is in sync)."""
    lines = []
    for disk in d.get("disk_sync") or []:
        synced, total = int(disk.get("synced_bytes") or 0), int(disk.get("total_bytes") or 0)
        if synced >= total:
            continue
        ratio = synced / total
        filled = int(ratio * BAR_WIDTH)
        what = _SYNC_WORDS.get(str(disk.get("mode")), "syncing")
        if disk.get("mode") not in ("changed", "compare") and disk.get("why"):
            what = f"syncing in full ({_why_full(str(disk['why']))})"  # say why not only what changed
        lines.append(
            f"  {d.get('domain', '?')} disk {disk.get('target', '?')}: {what} "
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {ratio * 100:3.0f}% "
            f"({_size(synced)} of {_size(total)})"
        )
    return lines


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _sync(d: Mapping[str, Any]) -> str:
    ratio = float(d.get("initial_sync_ratio") or 0.0)
    if d.get("state") not in ("pairing", "syncing", "standby_starting"):
        return "done" if ratio >= 1.0 else "-"
    filled = int(ratio * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {ratio * 100:3.0f}%"
