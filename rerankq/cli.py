"""The ``rerankq`` console script. Heavy imports (torch, the models) happen inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def main() -> None:
    """Entry point: a ``RerankError`` (bad setting, unloadable model) ends with its message, no traceback."""
    from rerankq.tasks.errors import RerankError

    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RerankError as exc:
        click.echo(f"rerankq: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rerankq")
def cli() -> None:
    """Distributed cross-encoder reranking on Celery + Redis."""


@cli.command()
@click.option("--device", default="cpu", show_default=True,
              help="'cpu', or 'cuda:N' to pin this process to GPU N (set before torch loads).")
@click.option("--queue", "queues", multiple=True,
              help="Queue to serve (repeatable), with its bulk lane. Default: the model's (RERANKQ_GPU_QUEUE for "
                   "the default model), or RERANKQ_CPU_QUEUE with --ranker fast.")
@click.option("--ranker", type=click.Choice(["cross-encoder", "llm", "fast", "simulated"]), default="cross-encoder",
              show_default=True, help="Model kind: the cross-encoder (an LLM reranker when its config names a "
                                      "causal LM), an LLM reranker said outright, the bi-encoder fast ranker, or a "
                                      "simulated GPU for benchmarks and tests (sleeps; --model "
                                      "'latency_ms=10,token_us=5').")
@click.option("--model", "models", multiple=True,
              help="A served model's name (RERANKQ_MODELS), or a hub id or local path; default: the default model "
                   "(RERANKQ_FAST_MODEL with --ranker fast). Repeat it with --gpus to split the GPUs among models.")
@click.option("--served-name", default=None,
              help="Serve --model (a path or hub id) as this served model: its queue, its name in answers.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Celery node name (default names ranker, device, pid).")
@click.option("--metrics-port", type=click.IntRange(min=0), default=None,
              help="Prometheus /metrics port (the next free one if taken); default RERANKQ_METRICS_PORT, +10 for "
                   "--ranker fast; 0 for none.")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="One worker per GPU, each pinned (--device cuda:N), restarted if it dies; metrics on "
                   "consecutive ports from --metrics-port. With several models (several --model, or none "
                   "named and RERANKQ_MODELS listing several), each gets an even share of the GPUs, in order "
                   "(printed at start).")
def worker(device: str, queues: tuple[str, ...], ranker: str, models: tuple[str, ...], served_name: str | None,
           loglevel: str, hostname: str | None, metrics_port: int | None, gpus: str | None) -> None:
    """Serve rerank jobs: load the model once, then score many jobs' pairs together in forward batches."""
    _refuse_unusable()
    from rerankq.celeryconfig import settings

    if len(models) > 1 and (gpus is None or served_name is not None):
        raise click.UsageError("several --model need --gpus (the GPUs are split among them) and no --served-name; "
                               "or start one `rerankq worker` per model")
    if gpus is not None:
        from rerankq.supervisor import run_per_gpu

        if device != "cpu":
            raise click.UsageError("--gpus picks each worker's device itself: leave out --device")

        if not models and served_name is None and not queues and ranker != "fast" and len(settings.served) > 1:
            models = settings.served.names  # every served model, as `rerankq up` does
        if len(models) > 1 and queues:
            raise click.UsageError("--queue with several models would put them all on one queue: leave it out (each "
                                   "model serves its own)")
        args = ["--ranker", ranker, "--loglevel", loglevel]
        args += ["--served-name", served_name] if served_name else []
        for queue in queues:
            args += ["--queue", queue]
        sys.exit(run_per_gpu(gpus, args, _metrics_port(metrics_port, ranker), hostname, list(models)))

    from rerankq.worker.main import run_worker

    model = models[0] if models else ""
    if ranker == "fast":
        sys.exit(run_worker(list(queues) or [settings.cpu_queue], ranker, device, model, model, loglevel,
                            hostname, _metrics_port(metrics_port, ranker), ""))
    served = settings.served.for_worker(model, served_name, queues)
    name, path = served.name, served.path
    if ranker == "simulated":  # it reads --model as its timings, not as weights: a stand-in for a served model
        path = "" if model and settings.served.find(model) is not None else model
        if not model and served_name is None and not queues:
            name = ""  # a plain simulated worker answers as itself
    elif settings.served.find(served.name) is None:
        print(f"rerankq worker: {served.name!r} is none of the served models ({', '.join(settings.served.names)}): it "
              f"answers as itself on {', '.join(queues) or served.queue}", file=sys.stderr, flush=True)
    if ranker == "cross-encoder" and served.kind:
        ranker = served.kind
    sys.exit(run_worker(list(queues) or [served.queue], ranker, device, path, name, loglevel, hostname,
                        _metrics_port(metrics_port, ranker), served.instruction))


@cli.command()
@click.option("--model", default="",
              help="Cross-encoder to serve with (hub id or path). Default: RERANKQ_MODEL if it is in the "
                   "local cache, else the bundled fast ranker.")
@click.option("--redis-url", default="", help="Use this Redis instead of starting an embedded one.")
def demo(model: str, redis_url: str) -> None:
    """Start a Redis and a worker, rerank a bundled sample set, and print the rankings."""
    from rerankq.demo import run_demo

    sys.exit(run_demo(model, redis_url))


@cli.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--metrics-port", type=click.IntRange(min=0), default=None,
              help="Prometheus /metrics port (the next free one if taken); default RERANKQ_METRICS_PORT + 20; 0 "
                   "for none.")
def watchdog(loglevel: str, metrics_port: int | None) -> None:
    """Measure the GPU queue's backlog and route new jobs to the CPU queue while it is too long."""
    _refuse_unusable()
    from rerankq.worker.watchdog import run_watchdog

    sys.exit(run_watchdog(loglevel, _metrics_port(metrics_port, "watchdog")))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def status(as_json: bool) -> None:
    """Print queues, backlogs, estimated waits, the route state and live workers."""
    _refuse_unusable()
    from rerankq.status import run_status

    sys.exit(run_status(as_json))


@cli.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file of results, one line per input id, written as they complete.")
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where bad input lines go (default: OUTPUT.errors.jsonl).")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most jobs sent and not yet answered: bounds what the run puts in Redis.")
@click.option("--resume", is_flag=True, help="Skip the ids OUTPUT already holds, and append to it.")
@click.option("--queue", default=None, help="Queue to send to (default: the model's; never shed).")
@click.option("--model", default=None, help="Served model for lines that name none (default: the deployment's "
                                            "default model).")
@click.option("--lane", type=click.Choice(["bulk", "interactive"]), default="bulk", show_default=True,
              help="bulk: served with what interactive traffic leaves; interactive: beside web traffic.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def submit(source: Path, output: Path, errors: Path | None, max_in_flight: int, resume: bool, queue: str | None,
           model: str | None, lane: str, progress: bool | None) -> None:
    """Rerank every job of a JSONL file ({"id", "query", "docs"[, "top_k", "long_docs", "model", "instruction"]}
    per line)."""
    _refuse_unusable()
    from rerankq.producer.runner import run_submit

    sys.exit(run_submit(source, output, errors, max_in_flight, resume, queue, progress, lane, model))


@cli.command()
@click.option("--port", type=click.IntRange(min=1), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every one: set RERANKQ_SERVE_API_KEY then).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def serve(port: int, host: str, loglevel: str) -> None:
    """The rerank HTTP API: Cohere's and Jina's POST /v1/rerank, TEI's POST /rerank, /health, /metrics."""
    _refuse_unusable()
    from rerankq.server.main import run_serve

    sys.exit(run_serve(host, port, loglevel))


@cli.command()
@click.option("--port", type=click.IntRange(min=1), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0: every one, for others to reach).")
@click.option("--no-auth", is_flag=True, help="Serve without a password (only on a machine nobody else reaches).")
def flower(port: int, address: str, no_auth: bool) -> None:
    """Flower, the Celery monitor, on rerankq's app: every job as a task, every worker with its queue.

    Basic auth comes from FLOWER_BASIC_AUTH (user:password[,user2:password2]); without it Flower does not
    start unless --no-auth is given.
    """
    import os

    from rerankq.tasks.errors import ConfigError

    if not no_auth and ":" not in os.environ.get("FLOWER_BASIC_AUTH", ""):
        raise ConfigError("Flower shows every job's arguments: set FLOWER_BASIC_AUTH=user:password (or pass "
                          "--no-auth on a machine nobody else reaches)")
    _refuse_unusable()
    env = {k: v for k, v in os.environ.items() if not (no_auth and k == "FLOWER_BASIC_AUTH")}
    # Flower is a Celery sub-command: exec it, so signals reach it directly.
    os.execve(sys.executable, [sys.executable, "-m", "celery", "-A", "rerankq.tasks.app", "--quiet", "flower",
                               f"--port={port}", f"--address={address}"], env)


@cli.command()
@click.option("--redis-url", default="", help="Use this Redis instead of starting an embedded one.")
@click.option("--model", default="", help="Cross-encoder for the workers (default RERANKQ_MODEL).")
@click.option("--cpu", is_flag=True, help="One cross-encoder worker on the CPU even when GPUs are visible.")
@click.option("--flower-port", type=click.IntRange(min=1), default=5555, show_default=True)
@click.option("--serve-port", type=click.IntRange(min=1), default=8000, show_default=True,
              help="Port of the HTTP API (`rerankq serve`, on 127.0.0.1).")
@click.option("--metrics-port", type=click.IntRange(min=0), default=None,
              help="First of the consecutive metrics ports (default RERANKQ_METRICS_PORT); 0 for none.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where each process logs (default: a temporary directory, removed at the end).")
def up(redis_url: str, model: str, cpu: bool, flower_port: int, serve_port: int, metrics_port: int | None,
       log_dir: Path | None) -> None:
    """The whole stack on this machine: Redis, workers per GPU (or CPU), fast ranker, watchdog, HTTP API, Flower."""
    from rerankq.up import run_up

    sys.exit(run_up(redis_url, model, cpu, flower_port, serve_port, _metrics_port(metrics_port, "up"), log_dir))


def _refuse_unusable() -> None:
    from rerankq.tasks import app
    from rerankq.tasks.connections import refuse_unusable

    refuse_unusable(app)


def _metrics_port(option: int | None, kind: str) -> int:
    """``--metrics-port`` if given, else where a process of ``kind`` starts from RERANKQ_METRICS_PORT."""
    from rerankq.celeryconfig import settings
    from rerankq.worker.metrics import default_port

    return default_port(kind, settings.metrics_port) if option is None else option


@cli.command()
def config() -> None:
    """Print every setting with its environment variable and default (the README's table)."""
    from rerankq.celeryconfig import settings_table

    click.echo(settings_table())
