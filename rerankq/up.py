"""``rerankq up``: the compose stack on one machine, without Docker.

A Redis (embedded unless ``--redis-url``), one pinned cross-encoder worker per visible GPU (or one on the
CPU), a fast-ranker worker, the watchdog, the HTTP API (``rerankq serve``) and Flower, each restarted if it
dies. Ctrl-C stops the workers
(each finishing its forward batch), then the rest, then the embedded Redis.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import tempfile
from pathlib import Path

from rerankq.redis_server import RedisServer
from rerankq.supervisor import Child, Supervisor, stop_on_signals, visible_gpus, worker_children
from rerankq.tasks.errors import ConfigError
from rerankq.tasks.models import short_name
from rerankq.tasks.secrets import masked_url


def run_up(redis_url: str, model: str, cpu: bool, flower_port: int, serve_port: int, metrics_port: int,
           log_dir: Path | None) -> int:
    stop = stop_on_signals()
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rerankq-up-")))
        log_dir.mkdir(parents=True, exist_ok=True)
        embedded = ""
        if not redis_url:
            # A password all the same: any local user could otherwise read the jobs or put messages on the queues.
            redis = stack.enter_context(RedisServer(password=secrets.token_urlsafe(24), supervised=True))
            redis_url = redis.url
            embedded = f"  (embedded, pid {redis.pid}; its data goes when it stops)"
        env = {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url}
        env_file = _env_file(log_dir, env)
        print(f"redis        {masked_url(redis_url)}{embedded}")
        print(f"             for other rerankq commands on this stack: set -a; . {env_file}; set +a")
        if ":" not in os.environ.get("FLOWER_BASIC_AUTH", ""):
            env["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(12)}"  # made here: shown below, once
        children = _children(env, model, cpu, flower_port, serve_port, metrics_port, log_dir)
        supervisor = Supervisor(children)
        supervisor.start()
        for child in children:
            assert child.process is not None
            print(f"{child.name:<12} pid {child.process.proc.pid:<8} log {child.log_path}{_where(child, env)}")
        print("rerankq up: running; Ctrl-C stops everything", flush=True)
        try:
            supervisor.run(stop)
        finally:
            print("rerankq up: stopping (workers finish their forward batch)", flush=True)
            supervisor.stop()
    return 0


def _children(env: dict[str, str], model: str, cpu: bool, flower_port: int, serve_port: int, metrics_port: int,
              log_dir: Path) -> list[Child]:
    from rerankq.celeryconfig import settings

    served = settings.served
    if model and len(served) > 1:
        raise ConfigError(f"--model {model!r} with RERANKQ_MODELS listing {len(served)} models: up starts each of "
                          "them; leave out --model")
    # One model: the one given (a path or hub id), which every process then knows as the model
    # (RERANKQ_MODEL), so that serve lists it and callers may name it. Several: each by its served name.
    if model:
        env["RERANKQ_MODEL"] = model
    names = [model] if model or len(served) == 1 else list(served.names)
    gpus = [] if cpu else _gpus_or_none()
    if gpus:
        workers = worker_children(gpus, [], env, log_dir, metrics_port, None, [n for n in names if n])
    else:
        workers = [Child(f"worker cpu{f' {name}' if len(names) > 1 else ''}",
                         ["worker", "--device", "cpu", *(["--model", name] if name else []), "--metrics-port",
                          str(metrics_port + i if metrics_port else 0)], dict(env),
                         log_dir / f"worker-cpu{f'-{short_name(name)}' if len(names) > 1 else ''}.log")
                   for i, name in enumerate(names)]
    fallbacks = served.fallbacks
    ports = iter(range(metrics_port + len(workers), metrics_port + len(workers) + len(fallbacks) + 1)
                 if metrics_port else [0] * (len(fallbacks) + 1))
    fast = [Child(f"fast worker{f' {queue}' if len(fallbacks) > 1 else ''}",
                  ["worker", "--ranker", "fast", "--device", "cpu", "--queue", queue,
                   "--metrics-port", str(next(ports))],
                  dict(env), log_dir / (f"worker-fast-{queue}.log" if len(fallbacks) > 1 else "worker-fast.log"))
            for queue in fallbacks]
    return [
        *workers,
        *fast,
        Child("watchdog", ["watchdog", "--metrics-port", str(next(ports))], dict(env), log_dir / "watchdog.log"),
        Child("api", ["serve", "--port", str(serve_port)], dict(env), log_dir / "serve.log"),
        # SIGKILL if up dies: Flower holds no jobs, and its SIGTERM can wait on the Redis that died with up.
        Child("flower", ["flower", "--port", str(flower_port), "--address", "127.0.0.1"], dict(env),
              log_dir / "flower.log", death_signal=signal.SIGKILL),
    ]


def _env_file(log_dir: Path, env: dict[str, str]) -> Path:
    """The stack's Redis URLs, password included, in a file only this user reads (the terminal and the logs
    show them masked)."""
    path = log_dir / "rerankq.env"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in env.items()))
    return path


def _gpus_or_none() -> list[int]:
    try:
        return visible_gpus("all")
    except ConfigError:
        return []


def _where(child: Child, env: dict[str, str]) -> str:
    args = child.args
    if args[0] == "flower":
        port = args[args.index("--port") + 1]
        made = env.get("FLOWER_BASIC_AUTH")
        return f"  http://127.0.0.1:{port}  (user:password {made or 'from your FLOWER_BASIC_AUTH'})"
    if args[0] == "serve":
        return f"  http://127.0.0.1:{args[args.index('--port') + 1]}/v1/rerank"
    port = args[args.index("--metrics-port") + 1]
    return f"  metrics http://127.0.0.1:{port}/metrics" if port != "0" else ""
