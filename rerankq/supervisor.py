"""Keep rerankq child processes running: restart one that dies, stop all of them on SIGTERM or Ctrl-C.

``rerankq worker --gpus all`` runs one pinned worker per visible GPU under it, and ``rerankq up`` the whole
stack. Children run in sessions of their own and die with the supervisor even when it is SIGKILLed
(``rerankq.local.supervised_options``), so no worker is left orphaned.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rerankq.local import RerankqProcess
from rerankq.tasks.errors import ConfigError

#: Longest pause before restarting a child that keeps dying (the pause doubles from one second).
MAX_BACKOFF_S = 30.0
#: A child that ran this long before dying is restarted at once, its backoff reset.
HEALTHY_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path | None
    process: RerankqProcess | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    #: What the kernel sends it if the supervisor dies without stopping it (``RerankqProcess``).
    death_signal: signal.Signals = signal.SIGTERM

    def start(self) -> None:
        self.process = RerankqProcess(self.args, self.env, self.log_path, supervised=True,
                                      death_signal=self.death_signal)
        self.started = time.monotonic()


class Supervisor:
    def __init__(self, children: Sequence[Child], out: object = sys.stderr) -> None:
        self.children = list(children)
        self._out = out

    def say(self, line: str) -> None:
        print(f"rerankq: {line}", file=self._out, flush=True)  # type: ignore[call-overload]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def run(self, stop: threading.Event) -> None:
        """Watch the children until ``stop`` is set, restarting each that exits, with a growing pause."""
        while not stop.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                assert child.process is not None
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.restart_at = None
                        child.start()
                        assert child.process is not None
                        self.say(f"{child.name}: pid {child.process.proc.pid} (restarted)")
                    continue
                code = child.process.proc.poll()
                if code is None:
                    continue
                child.process.stop()
                child.failures = 0 if now - child.started >= HEALTHY_AFTER_S else child.failures + 1
                pause = min(MAX_BACKOFF_S, 2.0 ** (child.failures - 1)) if child.failures else 0.0
                child.restart_at = now + pause
                where = f" (log: {child.log_path})" if child.log_path else ""
                self.say(f"{child.name} exited with {code}{where}; restarting in {pause:.0f}s")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to every child at once (workers finish their forward batch), SIGKILL to any still up after
        ``timeout``."""
        running = [c.process for c in self.children if c.process is not None and c.process.proc.poll() is None]
        for process in running:
            process.proc.send_signal(signal.SIGTERM)
        for process in running:
            process.stop(timeout)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def visible_gpus(spec: str) -> list[int]:
    """``all`` or a list like ``0,2``. ``all`` is each entry of ``CUDA_VISIBLE_DEVICES`` where it is set (a MIG
    instance is one: CUDA shows a process only the first MIG instance it is given, so torch counted one), or
    every GPU torch sees."""
    if spec != "all":
        try:
            gpus = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"--gpus {spec!r}: give 'all' or GPU indices like 0,1") from None
        if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
            raise ConfigError(f"--gpus {spec!r}: give 'all' or distinct GPU indices like 0,1")
        return gpus
    from rerankq.worker.device import visible

    given = visible()
    if given == []:
        raise ConfigError("--gpus all: CUDA_VISIBLE_DEVICES is set and empty, which hides every GPU; use --device "
                          "cpu, or unset it")
    if given is not None:
        return list(range(len(given)))
    import torch

    count = torch.cuda.device_count()
    if not count:
        raise ConfigError(f"--gpus all: torch {torch.__version__} sees no GPU; use --device cpu, or install a CUDA "
                          "build of torch")
    return list(range(count))


def split_gpus(gpus: Sequence[int], models: Sequence[str]) -> list[tuple[int, str]]:
    """Each GPU with the model it serves: every model an even share, in order (the first models take one more
    each when they do not divide evenly); no models: each GPU serves the worker's default. With fewer GPUs than
    models, models share them, one process each, in turn (each model's memory must fit beside the others')."""
    if not models:
        return [(gpu, "") for gpu in gpus]
    if not gpus:
        raise ConfigError("no GPU to split among the models")
    if len(gpus) < len(models):
        return [(gpus[i % len(gpus)], model) for i, model in enumerate(models)]
    share, extra = divmod(len(gpus), len(models))
    split: list[tuple[int, str]] = []
    for i, model in enumerate(models):
        taken = len(split)
        split += [(gpu, model) for gpu in gpus[taken:taken + share + (i < extra)]]
    return split


def worker_children(gpus: Sequence[int], args: Sequence[str], env: Mapping[str, str], log_dir: Path | None,
                    metrics_port: int, hostname: str | None, models: Sequence[str] = ()) -> list[Child]:
    """One ``rerankq worker --device cuda:N`` per GPU (with ``models``, each serving its share: ``split_gpus``);
    metrics on consecutive ports from ``metrics_port``."""
    children = []
    for i, (gpu, model) in enumerate(split_gpus(gpus, models)):
        child_args = ["worker", "--device", f"cuda:{gpu}", *args, *(["--model", model] if model else []),
                      "--metrics-port", str(metrics_port + i if metrics_port else 0)]
        if hostname:
            child_args += ["--hostname", f"cuda{gpu}.{hostname}"]
        several = len(models) > 1
        log_path = (log_dir / f"worker-cuda{gpu}{f'-{i}' if several else ''}.log") if log_dir else None
        children.append(Child(f"worker cuda:{gpu}" + (f" {model}" if several else ""), child_args, dict(env),
                              log_path))
    return children


def run_per_gpu(gpus_spec: str, args: Sequence[str], metrics_port: int, hostname: str | None,
                models: Sequence[str] = ()) -> int:
    """``rerankq worker --gpus``: one pinned worker per GPU (its model's, with several ``models``), restarted
    when it dies, until SIGTERM/Ctrl-C. The workers write to this process's output, each line naming its node."""
    stop = stop_on_signals()
    supervisor = Supervisor(worker_children(visible_gpus(gpus_spec), args, {}, None, metrics_port, hostname, models))
    supervisor.start()
    for child in supervisor.children:
        assert child.process is not None
        supervisor.say(f"{child.name}: pid {child.process.proc.pid}")
    supervisor.run(stop)
    supervisor.say("stopping the workers (each finishes its forward batch)")
    supervisor.stop()
    return 0
