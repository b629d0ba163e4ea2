"""``cuju-libvirt status``'s table for people, from status answers with known values."""

from __future__ import annotations

from typing import Any

from cuju_libvirt.cli.status_cmd import render

NOW = 1_800_000_000.0


def domain(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "domain": "web", "uuid": "u-1", "role": "primary", "peer": "hostb", "state": "protected",
        "protected": True, "epochs_per_s": 41.66, "lag_s": 0.0123, "initial_sync_ratio": 1.0,
        "failovers": 0, "last_failover_timestamp": None, "last_failover_duration_s": None,
    }
    d.update(over)
    return d


def test_table_has_one_row_per_domain_with_rate_lag_and_failover() -> None:
    status = {
        "node": "hosta", "version": "0.1.0", "metrics": "http://127.0.0.1:7792/metrics",
        "domains": [
            domain(),
            domain(domain="db", uuid="u-2", state="degraded", protected=False, epochs_per_s=None, lag_s=None,
                   failovers=2, last_failover_timestamp=NOW - 90, last_failover_duration_s=0.4),
        ],
        "peers": [{"node": "hostb", "connected": True, "rtt_last_ms": 0.21, "last_seen_s_ago": 0.1,
                   "security": "TLS (TLSv1.3, certificates)"},
                  {"node": "hostc", "connected": False, "last_error": "connection refused"}],
    }
    lines = render(status, NOW).splitlines()
    assert lines[0] == "cujud on hosta (version 0.1.0), metrics at http://127.0.0.1:7792/metrics"
    header = next(i for i, line in enumerate(lines) if line.startswith("DOMAIN"))
    web, db = lines[header + 1].split(), lines[header + 2]
    assert web[:6] == ["web", "primary", "hostb", "protected", "41.7", "12.3"] and "never" in web
    assert "degraded (UNPROTECTED)" in db and "90.0 s ago, took 400.0 ms (2 total)" in db
    assert "peer hostb: connected, heartbeat rtt 0.21 ms" in lines[-2]
    assert lines[-2].endswith("s ago, TLS (TLSv1.3, certificates)")
    assert lines[-1] == "peer hostc: NOT CONNECTED (connection refused)"


def test_initial_sync_progress_bar() -> None:
    status = {"node": "a", "domains": [domain(state="syncing", protected=False, initial_sync_ratio=0.5)]}
    text = render(status, NOW)
    assert "[##########..........]  50%" in text


def test_no_domains_says_so() -> None:
    assert "no protected domains on this host" in render({"node": "a", "domains": []}, NOW)


def test_disks_still_syncing_get_a_line_each() -> None:
    disks = [
        {"target": "vda", "synced_bytes": 512 * 2**20, "total_bytes": 2 * 2**30},
        {"target": "sdb", "synced_bytes": 2**20, "total_bytes": 2**20},  # in sync: no line
    ]
    text = render({"node": "a", "domains": [domain(disk_sync=disks)]}, NOW)
    lines = [line for line in text.splitlines() if " disk " in line]
    assert lines == ["  web disk vda: syncing [#####...............]  25% (512.0 MiB of 2.0 GiB)"]
    assert " disk " not in render({"node": "a", "domains": [domain()]}, NOW)


def test_a_resync_of_changed_blocks_says_so() -> None:
    disks = [{"target": "vda", "synced_bytes": 2**20, "total_bytes": 4 * 2**20, "mode": "changed"}]
    text = render({"node": "a", "domains": [domain(disk_sync=disks)]}, NOW)
    assert "web disk vda: resyncing changed blocks [#####...............]  25% (1.0 MiB of 4.0 MiB)" in text


def test_a_content_compare_and_a_full_copy_after_a_failover_say_so_and_why() -> None:
    why = ("full sparse copy (the backup's own image cannot be the replica: this host holds no durable "
           "record that its image was paired with the replica the primary took over (unknown lineage))")
    disks = [{"target": "vda", "synced_bytes": 2**20, "total_bytes": 4 * 2**20, "mode": "compare"},
             {"target": "vdb", "synced_bytes": 2**20, "total_bytes": 4 * 2**20, "mode": "full", "why": why}]
    text = render({"node": "a", "domains": [domain(disk_sync=disks)]}, NOW)
    assert "web disk vda: comparing, resending what differs [#####" in text
    assert ("web disk vdb: syncing in full (the backup's own image cannot be the replica: this host holds no "
            "durable record that its image was paired with the replica the primary took over (unknown "
            "lineage)) [#####") in text


def test_the_witness_generation_shows_next_to_the_peer_only_with_a_witness() -> None:
    with_witness = render({"node": "a", "domains": [domain(peer="cuju-c", generation=4)]}, NOW)
    assert "cuju-c (generation 4)" in with_witness
    assert "generation" not in render({"node": "a", "domains": [domain(peer="cuju-b", generation=0)]}, NOW)


def test_the_cluster_records_are_shown_only_under_the_witness() -> None:
    base = {"node": "hosta", "domains": [], "peers": []}
    assert "cluster" not in render({**base, "cluster": None}, 0.0)
    text = render({**base, "cluster": {"vms": [
        {"uuid": "u1", "name": "web", "owner": "hosta", "backup": "hostc", "mode": "protected",
         "generation": 3},
        {"uuid": "u2", "name": "db", "owner": "hostb", "backup": None, "mode": "unprotected",
         "generation": 7},
    ]}}, 0.0)
    assert "cluster (etcd): 2 VM record(s)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")]
    assert rows == [["VM", "OWNER", "BACKUP", "MODE", "GENERATION"],
                    ["web", "hosta", "hostc", "protected", "3"], ["db", "hostb", "-", "unprotected", "7"]]
    down = render({**base, "cluster": {"error": "no etcd member answered", "vms": []}}, 0.0)
    assert "cluster (etcd): NO ANSWER (no etcd member answered)" in down


def test_the_cluster_hosts_show_lease_failure_domain_free_memory_and_vms() -> None:
    hosts = [
        {"name": "hosta", "lease_alive": True, "failure_domain": "rack1", "mem_free_kib": 2 << 20,
         "cpus": 4, "load1": 1.5, "primaries": 2, "backups": 0},
        {"name": "hostc", "lease_alive": False, "failure_domain": None, "mem_free_kib": None,
         "cpus": None, "load1": None, "primaries": 0, "backups": 1},
    ]
    text = render({"node": "hosta", "domains": [], "peers": [], "cluster": {
        "hosts": hosts, "placer": "hosta",
        "vms": [{"uuid": "u3", "name": "new", "owner": "hosta", "backup": None, "mode": "unprotected",
                 "generation": 1, "placement": "hostb"}]}}, 0.0)
    assert "cluster (etcd): 1 of 2 host(s) alive, placer hosta" in text
    rows = [line.split("  ") for line in text.splitlines() if line.startswith("  ")]
    cells = [[c.strip() for c in r if c.strip()] for r in rows]
    header = ["HOST", "LEASE", "FAILURE DOMAIN", "FREE MEM", "CPUS (LOAD)", "VMS (PRIMARY/BACKUP)"]
    assert cells[:3] == [header,
                         ["hosta", "alive", "rack1", "2.0 GiB", "4 (1.50)", "2/0"],
                         ["hostc", "GONE", "-", "-", "-", "0/1"]]
    assert ["new", "hosta", "placed on hostb", "unprotected", "1"] in cells
    assert "placer NONE ELECTED" in render({"node": "a", "cluster": {"hosts": [], "vms": []}}, 0.0)
