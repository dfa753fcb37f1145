"""Worker processes started from Python: for the demo, the test suite and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tasks.errors import RerankError


class RerankqProcess:
    """A real ``rerankq <command>`` subprocess, its output in ``log_path``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # No metrics port unless asked: several processes share this host.
        env = {**os.environ, "RERANKQ_METRICS_PORT": "0", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "rerankq", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``. A worker shuts down warm: the running chunk finishes,
        unstarted jobs go back to the queue."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a machine dies."""
        self.proc.kill()
        self.proc.wait()


class WorkerProcess(RerankqProcess):
    """A real ``rerankq worker`` serving ``queue`` as node ``node``."""

    def __init__(self, queue: str, args: Sequence[str], env: Mapping[str, str], log_path: Path,
                 node: str) -> None:
        self.queue = queue
        self.node = node
        super().__init__(["worker", "--hostname", node, "--queue", queue, *args], env, log_path)

    def wait_ready(self, app: Any, timeout: float = 120.0) -> None:
        """Return once the worker answers a ping; raise with its log if it exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RerankError(f"worker {self.node} exited with {self.proc.returncode}:\n{self.log()}")
            if app.control.ping(destination=[self.node], timeout=0.5):
                return
        raise RerankError(f"worker {self.node} did not answer within {timeout:.0f}s:\n{self.log()}")
