"""Write cost of a replicated disk against a raw local file and QEMU's write-blocking mirror."""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cuju_libvirt import disk_server
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk, prepare_replica
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender, page_indexes
from cuju_libvirt.qmp import QMPClient

DESCRIPTION = (
    "fio 4 KiB random writes at queue depth 1 and 16 and 1 MiB sequential writes on (a) a raw local "
    "file (io_uring, buffered), (b) the protected disk: our block server over NBD, its journal sealed "
    "every epoch and shipped to a receiver that applies it to a replica (TCP loopback), (c) QEMU's "
    "blockdev-mirror copy-mode=write-blocking in qemu-storage-daemon to a qemu-nbd replica over TCP "
    "loopback (the anchor). The same 4 KiB writes also through QEMU's own block layer (qemu-img "
    "bench: the raw file with QEMU's default aio=threads, as a VM's disk, against its NBD client on "
    "(b) and (c)), and nbdkit's own file plugin under fio (the NBD framework's ceiling, no journal). "
    "Also the disks' share of the epoch pause (seal + stage with 2 busy disks minus stage without)."
)

TARGETS = {"randwrite_qd16_ratio_vs_raw": 0.5, "randwrite_qd16_ratio_vs_raw_qemu": 0.5,
           "randwrite_qd16_ratio_vs_mirror": 1.5, "write_qd1_added_us": 100.0, "pause_added_ms": 0.5}
#: qemu-img bench's offset step: 255 pages, coprime with any power-of-two page count, so the
#: writes visit every page of the image in a scattered order before one repeats.
BENCH_STEP = 255 * 4096
PAGE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mib", type=int, default=512, help="disk size (default 512)")
    parser.add_argument("--runtime", type=int, default=4, help="seconds per fio job (default 4)")
    parser.add_argument("--epoch-ms", type=int, default=20, help="epoch length of (b) (default 20)")
    parser.add_argument("--dir", default="/dev/shm", help="where images live (default /dev/shm)")
    parser.add_argument("--qemu-writes", type=int, default=100_000,
                        help="4 KiB writes per qemu-img bench run at QD16 (default 100000; QD1 runs 1/8)")


def _fio(target: dict[str, str], name: str, *, rw: str, bs: str, depth: int, runtime: int,
         size: int) -> dict[str, float]:
    argv = ["fio", "--name", name, "--rw", rw, "--bs", bs, "--iodepth", str(depth), "--size", str(size),
            "--runtime", str(runtime), "--time_based", "--output-format=json", "--randrepeat=1",
            "--norandommap", "--group_reporting"]
    argv += [f"--{k}={v}" for k, v in target.items()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fio {name} failed: {done.stderr.strip() or done.stdout[-500:]}")
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]["write"]
    return {"iops": round(job["iops"], 1), "mb_s": round(job["bw_bytes"] / 1e6, 1),
            "clat_median_us": round(job["clat_ns"]["percentile"]["50.000000"] / 1e3, 1),
            "clat_mean_us": round(job["clat_ns"]["mean"] / 1e3, 1)}


def _suite(target: dict[str, str], runtime: int, size: int) -> dict[str, Any]:
    return {
        "randwrite_qd1": _fio(target, "rw1", rw="randwrite", bs="4k", depth=1, runtime=runtime, size=size),
        "randwrite_qd16": _fio(target, "rw16", rw="randwrite", bs="4k", depth=16, runtime=runtime, size=size),
        "seqwrite_1m": _fio(target, "seq", rw="write", bs="1m", depth=4, runtime=runtime, size=size),
    }


def _qemu_bench(filename: str, *, depth: int, count: int, aio: str | None = None) -> dict[str, float]:
    """4 KiB writes through QEMU's block layer (qemu-img bench), scattered over the image."""
    argv = ["qemu-img", "bench", "-w", "-f", "raw", "-d", str(depth), "-s", "4k", "-S", str(BENCH_STEP),
            "-c", str(count), "--pattern=165"]
    if aio is not None:
        argv += ["-t", "writeback", "-i", aio]
    done = subprocess.run([*argv, filename], capture_output=True, text=True, timeout=600, check=False)
    match = re.search(r"Run completed in ([0-9.]+) seconds", done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"qemu-img bench {filename} failed: {done.stderr.strip() or done.stdout[-500:]}")
    secs = float(match.group(1))
    return {"iops": round(count / secs, 1), "mean_us": round(secs / count * 1e6 * depth, 1)}


def _qemu_suite(filename: str, count: int, aio: str | None = None) -> dict[str, Any]:
    return {"randwrite_qd16": _qemu_bench(filename, depth=16, count=count, aio=aio),
            "randwrite_qd1": _qemu_bench(filename, depth=1, count=count // 8, aio=aio)}


def _image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


class _Replication:
    """The epochs of (b): seal the journals, ship them, the receiver applies them to replicas."""

    def __init__(self, work: Path, disks: list[ProtectedDisk], sizes: list[int], epoch_ms: int) -> None:
        self.ds = DiskSet(disks)
        reps = []
        for d, size in zip(disks, sizes, strict=True):
            path = str(work / f"{d.target}.replica")
            prepare_replica(path, size)
            reps.append((path, size))
        listener = socket.create_server(("127.0.0.1", 0))
        self._region, self._standby = mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE)
        conn = socket.create_connection(listener.getsockname(), timeout=5)
        peer, _ = listener.accept()
        listener.close()
        self.rx = EpochReceiver(self._standby, str(work / "state"), disks=reps)
        self.rx.start(peer)
        self.tx = EpochSender(conn, self._region, disk_sizes=self.ds.sizes)
        conn.close()
        peer.close()
        self.tx.handshake(5)
        self.epoch_ms = epoch_ms
        self.with_disks: list[float] = []
        self.without: list[float] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        none = page_indexes([])
        epoch = 0
        while not self._stop.is_set():
            time.sleep(self.epoch_ms / 1e3)
            # The pause's disk share: seal + stage with the records, against a stage of an
            # epoch without disks (alternating, same thread, same link).
            epoch += 1
            t0 = time.perf_counter()
            parts = self.ds.seal(epoch)
            self.tx.stage(epoch, none, b"", disks=parts)
            self.with_disks.append(time.perf_counter() - t0)
            self.bytes += sum(len(part[1]) for part in parts)
            self.tx.ship()
            if not self.tx.wait_ack(epoch, 30):
                raise RuntimeError(f"epoch {epoch} not acknowledged")
            self.ds.acked(epoch)
            epoch += 1
            t0 = time.perf_counter()
            self.tx.stage(epoch, none, b"")
            self.without.append(time.perf_counter() - t0)
            self.tx.ship()
            self.tx.wait_ack(epoch, 30)

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(30)
        self.tx.close(orderly=True, timeout=10)
        self.rx.wait(10)
        counters = self.rx.counters()
        self.rx.close()
        self.ds.close()
        return {"epochs": counters["epochs_applied"], "disk_records_applied": counters["disk_records"],
                "disk_bytes_shipped": self.bytes}


@contextlib.contextmanager
def _mirror(work: Path, size: int) -> Iterator[str]:
    """qemu-storage-daemon exporting a file over NBD, mirrored write-blocking to qemu-nbd."""
    src = _image(work / "mirror-src.img", size)
    dst = _image(work / "mirror-dst.img", size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    qnbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "dst",
                             "--cache=writeback", str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp_path, export = work / "qsd.qmp", work / "qsd.sock"
    qsd = None
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not listen")
            time.sleep(0.02)
        qsd = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=srcfile,filename={src}",
            "--blockdev", "driver=raw,node-name=src,file=srcfile",
            "--blockdev", f"driver=nbd,node-name=dst,server.type=inet,server.host=127.0.0.1,"
                          f"server.port={port},export=dst",
            "--nbd-server", f"addr.type=unix,addr.path={export}",
            "--export", "type=nbd,id=e,node-name=src,name=vda,writable=on",
            "--chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not qmp_path.exists():
            if time.monotonic() > deadline or qsd.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.02)
        with QMPClient(qmp_path) as qmp:
            qmp.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst", "sync": "full",
                                            "copy-mode": "write-blocking"})
            deadline = time.monotonic() + 60
            while True:
                jobs = qmp.execute("query-block-jobs")
                if jobs and jobs[0].get("ready"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the mirror never became ready: {jobs}")
                time.sleep(0.05)
            yield f"nbd+unix:///vda?socket={export}"
            qmp.execute("block-job-cancel", {"device": "m", "force": True})
    finally:
        for proc in (qsd, qnbd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)


def _nbd_file_plugin(work: Path, image: Path, runtime: int, size: int) -> dict[str, float]:
    """fio 4 KiB QD16 random writes through nbdkit's own file plugin: the framework, no journal."""
    sock, pidfile = work / "plain.sock", work / "plain.pid"
    subprocess.run(["nbdkit", "--unix", str(sock), "--pidfile", str(pidfile), "file", str(image)],
                   check=True, timeout=30, capture_output=True)
    try:
        return _fio({"ioengine": "nbd", "uri": f"nbd+unix:///?socket={sock}"}, "plain", rw="randwrite",
                    bs="4k", depth=16, runtime=runtime, size=size)
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def _ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 4) if xs else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("fio", "nbdkit", "qemu-storage-daemon", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"disk benchmark: {tool} not found (scripts/setup.sh installs it)")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="cuju-bench-disk-", dir=args.dir))
    out: dict[str, Any] = {"size_mib": args.size_mib, "runtime_s": args.runtime, "epoch_ms": args.epoch_ms}
    servers: list[disk_server.ServerPaths] = []
    try:
        raw = _image(work / "raw.img", size)
        out["raw"] = _suite({"ioengine": "io_uring", "filename": str(raw)}, args.runtime, size)
        # What a VM's disk on that file gets: QEMU's file driver, aio=threads (QEMU's default).
        out["qemu_raw"] = _qemu_suite(str(raw), args.qemu_writes, aio="threads")
        out["nbd_file_plugin"] = _nbd_file_plugin(work, raw, args.runtime, size)

        # (b) two protected disks: fio writes one, a second one is kept busy by another fio.
        disks, sizes = [], []
        for target in ("vda", "vdb"):
            paths = disk_server.ServerPaths.under(work, target)
            image = _image(work / f"{target}.img", size)
            disk_server.start(paths, str(image), target=target)
            servers.append(paths)
            disks.append(ProtectedDisk(target, str(image), paths.journal))
            sizes.append(size)
        rep = _Replication(work, disks, sizes, args.epoch_ms)
        try:
            nbd = {"ioengine": "nbd", "uri": f"nbd+unix:///vda?socket={servers[0].socket}"}
            # The pause share first, both disks busy (4 KiB random writes, QD16).
            busy = [subprocess.Popen(["fio", "--name", f"busy{i}", "--rw", "randwrite", "--bs", "4k",
                                      "--iodepth", "16", "--size", str(size), "--runtime", str(args.runtime),
                                      "--time_based", "--ioengine=nbd", "--norandommap",
                                      f"--uri=nbd+unix:///{d.target}?socket={p.socket}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for i, (d, p) in enumerate(zip(disks, servers, strict=True))]
            for proc in busy:
                proc.wait(args.runtime + 60)
            start_with, start_without = len(rep.with_disks), len(rep.without)
            busy_with, busy_without = rep.with_disks[:start_with], rep.without[:start_without]
            out["protected"] = _suite(nbd, args.runtime, size)
            out["qemu_protected"] = _qemu_suite(f"nbd+unix:///vda?socket={servers[0].socket}",
                                                args.qemu_writes)
        finally:
            out["replication"] = rep.close()
        out["pause_with_2_busy_disks_ms"] = _ms(busy_with)
        out["pause_without_disks_ms"] = _ms(busy_without)
        out["pause_added_ms"] = round(out["pause_with_2_busy_disks_ms"] - out["pause_without_disks_ms"], 4)
        for p in servers:
            disk_server.stop(p)
        servers.clear()

        with _mirror(work, size) as uri:
            out["mirror"] = _suite({"ioengine": "nbd", "uri": uri}, args.runtime, size)
            out["qemu_mirror"] = _qemu_suite(uri, args.qemu_writes)
    finally:
        for p in servers:
            disk_server.stop(p)
        shutil.rmtree(work, ignore_errors=True)
    raw16, prot16 = out["raw"]["randwrite_qd16"]["iops"], out["protected"]["randwrite_qd16"]["iops"]
    out["randwrite_qd16_iops"] = prot16
    out["randwrite_qd16_ratio_vs_raw"] = round(prot16 / raw16, 3)
    out["randwrite_qd16_ratio_vs_mirror"] = round(prot16 / out["mirror"]["randwrite_qd16"]["iops"], 3)
    out["write_qd1_added_us"] = round(out["protected"]["randwrite_qd1"]["clat_median_us"]
                                      - out["raw"]["randwrite_qd1"]["clat_median_us"], 1)
    out["nbd_file_plugin_ratio_vs_raw"] = round(out["nbd_file_plugin"]["iops"] / raw16, 3)
    q_raw, q_prot = out["qemu_raw"]["randwrite_qd16"]["iops"], out["qemu_protected"]["randwrite_qd16"]["iops"]
    out["randwrite_qd16_ratio_vs_raw_qemu"] = round(q_prot / q_raw, 3)
    q_mirror = out["qemu_mirror"]["randwrite_qd16"]["iops"]
    out["randwrite_qd16_ratio_vs_mirror_qemu"] = round(q_prot / q_mirror, 3)
    out["seqwrite_mb_s"] = out["protected"]["seqwrite_1m"]["mb_s"]
    out["seqwrite_ratio_vs_raw"] = round(out["seqwrite_mb_s"] / out["raw"]["seqwrite_1m"]["mb_s"], 3)
    out["targets"] = TARGETS
    at_least = ("randwrite_qd16_ratio_vs_raw", "randwrite_qd16_ratio_vs_raw_qemu",
                "randwrite_qd16_ratio_vs_mirror")
    out["meets_targets"] = {
        key: (out[key] >= goal if key in at_least else out[key] <= goal) for key, goal in TARGETS.items()
    }
    return out
