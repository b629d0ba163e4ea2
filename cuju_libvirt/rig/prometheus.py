"""A throw-away Prometheus server (Debian's ``prometheus``) that scrapes given targets.

Own temporary config and data directory, its own port on 127.0.0.1, a short scrape
interval; the process group is killed and the directory removed on exit, also when the
body fails. Queries go through Prometheus' HTTP API::

    with PrometheusServer(workdir, ["127.0.0.1:7792"], name="exporter-prometheus") as prom:
        prom.wait_for("cuju_epochs_committed_total", lambda r: len(r) == 1, timeout=20)
        rows = prom.query('rate(cuju_wire_bytes_total[5s])')

With ``node=`` (a rig node, e.g. ``rig.lan``) the server runs inside that node's network
namespace (and the rig's cgroup), where it reaches the rig hosts' addresses; its API is
then reached over sockets made in that namespace, so this process never moves.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.guest_net import socket_in
from cuju_libvirt.rig.nodes import NamespaceNode

Result = list[dict[str, Any]]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NetnsConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is made inside network namespace ``netns``."""

    def __init__(self, host: str, port: int, netns: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        address, timeout = (self.host, self.port), self.timeout
        self.sock = socket_in(self._netns, lambda: socket.create_connection(address, timeout))


class PrometheusServer:
    """One Prometheus process; ``name`` becomes its process name (a symlink to the binary).

    ``rule_files`` (alerting/recording rules) are evaluated every ``scrape_interval``.
    ``node``: run inside this rig node's network namespace instead of this process's.
    """

    def __init__(self, parent: Path, targets: Sequence[str], *, name: str = "prometheus",
                 job: str = "cujud", scrape_interval: float = 1.0, rule_files: Sequence[Path] = (),
                 node: NamespaceNode | None = None) -> None:
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
        self._node = node

    def start(self, timeout: float = 30.0) -> None:
        try:
            argv = [str(self._exe), f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
            with self.log.open("wb") as log:
                # a new session: close() kills the whole group (inside a node, the wrappers
                # exec into prometheus, so the group is prometheus alone)
                self._proc = subprocess.Popen(
                    argv if self._node is None else self._node.command(argv),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd=self.dir,
                )
            end = time.monotonic() + timeout
            while True:
                if self._proc.poll() is not None:
                    raise RigError(f"prometheus exited with {self._proc.returncode}: {self._tail()}")
                try:
                    if self._get("/-/ready", timeout=2)[0] == 200:
                        return
                except OSError:
                    pass
                if time.monotonic() > end:
                    raise RigError(f"prometheus not ready after {timeout:g} s: {self._tail()}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """``GET path`` of the API: (status, body)."""
        conn = (http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout) if self._node is None
                else _NetnsConnection("127.0.0.1", self.port, self._node.netns_path, timeout))
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def query(self, expr: str) -> Result:
        """Instant query; the ``result`` list of the API's answer (RigError on an API error)."""
        status, raw = self._get(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        if status != 200:
            raise RigError(f"prometheus refused {expr!r} (HTTP {status}): {raw.decode(errors='replace')}")
        body = json.loads(raw)
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
        status, raw = self._get("/api/v1/targets")
        if status != 200:
            raise RigError(f"prometheus /api/v1/targets: HTTP {status}")
        active: Result = json.loads(raw)["data"]["activeTargets"]
        return active

    def rules(self) -> Result:
        """The loaded rule groups (``/api/v1/rules``), each rule with its ``health`` and ``lastError``."""
        status, raw = self._get("/api/v1/rules")
        if status != 200:
            raise RigError(f"prometheus /api/v1/rules: HTTP {status}")
        groups: Result = json.loads(raw)["data"]["groups"]
        return groups

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
