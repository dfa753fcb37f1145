"""Worker processes started from Python: for the demo, the test suite and the benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from rerankq.tasks.errors import RerankError


class RerankqProcess:
    """A real ``rerankq <command>`` subprocess, its output in ``log_path`` (or this process's own, if None).

    ``supervised``: in a session of its own (a Ctrl-C reaches only its supervisor, which stops the children
    in order), and sent ``death_signal`` by the kernel if the supervisor dies without stopping it: SIGTERM
    for a process with work to hand back (a worker), SIGKILL for one with none whose SIGTERM can wait on a
    broker that died with the supervisor (Flower).
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path | None,
                 supervised: bool = False, prefix: Sequence[str] = (), python: str = sys.executable,
                 cwd: Path | None = None, death_signal: signal.Signals = signal.SIGTERM) -> None:
        """``prefix``: a command the process runs under (e.g. ``datefudge <date>``, another clock); ``python``:
        the interpreter (another environment's), ``cwd``: where it runs."""
        self.log_path = log_path
        self._log: IO[bytes] | None = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed in stop()
        # No metrics port unless asked: several processes share this host.
        env = {**os.environ, "RERANKQ_METRICS_PORT": "0", **env}
        self.proc = subprocess.Popen([*prefix, python, "-m", "rerankq", *args], env=env, cwd=cwd,
                                     stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                     **(supervised_options(death_signal) if supervised else {}))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``. A worker shuts down warm: the running forward batch finishes,
        unstarted jobs go back to the queue."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a machine dies."""
        self.proc.kill()
        self.proc.wait()


class WorkerProcess(RerankqProcess):
    """A real ``rerankq worker`` serving ``queue`` as node ``node``."""

    def __init__(self, queue: str, args: Sequence[str], env: Mapping[str, str], log_path: Path,
                 node: str, prefix: Sequence[str] = (), python: str = sys.executable, cwd: Path | None = None) -> None:
        self.queue = queue
        self.node = node
        super().__init__(["worker", "--hostname", node, "--queue", queue, *args], env, log_path, prefix=prefix,
                         python=python, cwd=cwd)

    def wait_ready(self, app: Any, timeout: float = 120.0) -> None:
        """Return once the worker answers a ping; raise with its log if it exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RerankError(f"worker {self.node} exited with {self.proc.returncode}:\n{self.log()}")
            if app.control.ping(destination=[self.node], timeout=0.5):
                return
        raise RerankError(f"worker {self.node} did not answer within {timeout:.0f}s:\n{self.log()}")


class ServerProcess(RerankqProcess):
    """A real ``rerankq serve`` on ``127.0.0.1:port``."""

    def __init__(self, port: int, env: Mapping[str, str], log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(["serve", "--port", str(port)], env, log_path)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once it answers HTTP; raise with its log if it exits or never answers."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RerankError(f"rerankq serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RerankError(f"rerankq serve did not answer at {self.url} within {timeout:.0f}s:\n{self.log()}")


def rss_mb(pid: int) -> float:
    """Resident memory of a live process (Linux ``/proc``), in MB."""
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    if match is None:
        raise RerankError(f"process {pid} has no resident memory to read: has it exited?")
    return int(match[1]) / 1024


def supervised_options(death_signal: signal.Signals = signal.SIGTERM) -> dict[str, Any]:
    """``Popen`` options for a child that must not outlive its parent: the kernel sends it ``death_signal``
    when the parent dies (Linux: ``PR_SET_PDEATHSIG``)."""
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, only called after it
        options["preexec_fn"] = lambda: prctl(1, death_signal)  # 1: PR_SET_PDEATHSIG
    return options
