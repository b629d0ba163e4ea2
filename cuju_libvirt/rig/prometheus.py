"""A throw-away Prometheus server (Debian's ``prometheus``) that scrapes given targets.

Own temporary config and data directory, its own port on 127.0.0.1, a short scrape
interval; the process group is killed and the directory removed on exit, also when the
body fails. Queries go through Prometheus' HTTP API::

    with PrometheusServer(workdir, ["127.0.0.1:7792"], name="exporter-prometheus") as prom:
        prom.wait_for("cuju_epochs_committed_total", lambda r: len(r) == 1, timeout=20)
        rows = prom.query('rate(cuju_wire_bytes_total[5s])')
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cuju_libvirt.errors import RigError

Result = list[dict[str, Any]]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """One Prometheus process; ``name`` becomes its process name (a symlink to the binary).

    ``rule_files`` (alerting/recording rules) are evaluated every ``scrape_interval``.
    """

    def __init__(self, parent: Path, targets: Sequence[str], *, name: str = "prometheus",
                 job: str = "cujud", scrape_interval: float = 1.0, rule_files: Sequence[Path] = ()) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RigError("prometheus is not installed (Debian package 'prometheus')")
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        interval = f"{int(scrape_interval * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
            "rule_files": [str(p.resolve()) for p in rule_files],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self._exe = self.dir / name
        self._exe.symlink_to(binary)
        self.log = self.dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        try:
            with self.log.open("wb") as log:
                self._proc = subprocess.Popen(
                    [str(self._exe), f"--config.file={self.dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir,
                )
            end = time.monotonic() + timeout
            while True:
                if self._proc.poll() is not None:
                    raise RigError(f"prometheus exited with {self._proc.returncode}: {self._tail()}")
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > end:
                    raise RigError(f"prometheus not ready after {timeout:g} s: {self._tail()}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def query(self, expr: str) -> Result:
        """Instant query; the ``result`` list of the API's answer (RigError on an API error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            raise RigError(f"prometheus refused {expr!r}: {err.read().decode(errors='replace')}") from err
        if body.get("status") != "success":
            raise RigError(f"prometheus query {expr!r} failed: {body}")
        result: Result = body["data"]["result"]
        return result

    def wait_for(self, expr: str, ok: Callable[[Result], bool], timeout: float) -> Result:
        """Query ``expr`` until ``ok(result)``; RigError with the last result after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > end:
                raise RigError(f"{expr!r} after {timeout:g} s: {result}")
            time.sleep(0.25)

    def targets(self) -> Result:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            active: Result = json.load(r)["data"]["activeTargets"]
        return active

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
