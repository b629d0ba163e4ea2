"""The hook's cost for a domain without ``<cuju:ft>``: the shim against a bare interpreter."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cuju_libvirt.hooks import shim_text
from cuju_libvirt.rig.domains import domain_xml

DESCRIPTION = (
    "Time libvirt's call of the installed hook shim for a plain domain (no <cuju:ft>), which every "
    "domain on the host pays at each lifecycle phase, against `python -S -c pass` (the interpreter's "
    "own start-up) in the same run, interleaved."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=50, help="calls of each kind (default 50)")


def _time(argv: list[str], stdin: bytes) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or proc.stdout or proc.stderr:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return elapsed


def run(args: argparse.Namespace) -> dict[str, object]:
    plain = domain_xml("plain", memory_mib=64, kernel="/boot/vmlinuz").encode()
    shim_ms: list[float] = []
    bare_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cuju-bench-shim-") as tmp:
        shim = Path(tmp) / "cuju"
        shim.write_text(shim_text(sys.executable))
        shim.chmod(0o755)
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
            shim_ms.append(_time([str(shim), "plain", "prepare", "begin", "-"], plain) * 1e3)
            bare_ms.append(_time([sys.executable, "-S", "-c", "pass"], b"") * 1e3)
    shim_median = statistics.median(shim_ms)
    bare_median = statistics.median(bare_ms)
    return {
        "rounds": args.rounds,
        "shim_median_ms": round(shim_median, 3),
        "interpreter_median_ms": round(bare_median, 3),
        "added_ms": round(shim_median - bare_median, 3),
        "ratio_vs_interpreter": round(shim_median / bare_median, 3),
    }
