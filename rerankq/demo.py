"""``rerankq demo``: the whole pipeline on one machine, with what ships offline when the hub is out of reach."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from rerankq.celeryconfig import settings
from rerankq.local import WorkerProcess
from rerankq.redis_server import RedisServer
from rerankq.tasks import Result, app, rerank
from rerankq.tasks.errors import RerankError

DEMO_QUEUE = "rerankq.demo"


def model_is_local(model: str) -> bool:
    """A local directory, or a hub id already in this machine's Hugging Face cache."""
    if Path(model).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


def pick_ranker(model: str) -> tuple[str, str, str]:
    """(ranker, model, why): the asked-for model, else the default if cached, else the bundled fast one."""
    if model:
        return "cross-encoder", model, "the model you asked for"
    if model_is_local(settings.model):
        return "cross-encoder", settings.model, "the default cross-encoder, found locally"
    return "fast", "", (f"{settings.model} is not in the local cache, so the bundled fast ranker serves; "
                        f"`rerankq demo --model {settings.model}` downloads and uses it")


def run_demo(model: str = "", redis_url: str = "") -> int:
    samples: list[dict[str, Any]] = json.loads(resources.files("rerankq").joinpath("sample.json").read_text())
    ranker, chosen, why = pick_ranker(model)
    print(f"ranker: {ranker} ({why})")
    with contextlib.ExitStack() as stack:
        if not redis_url:
            redis_url = stack.enter_context(RedisServer()).url
            print(f"redis:  embedded server at {redis_url}")
        app.conf.update(broker_url=redis_url, result_backend=redis_url)
        logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rerankq-demo-")))
        env = {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url}
        args = ["--ranker", ranker, "--model", chosen, "--loglevel", "WARNING"]
        worker = WorkerProcess(DEMO_QUEUE, args, env, logdir / "worker.log", f"demo-{os.getpid()}@localhost")
        stack.callback(worker.stop)
        print("worker: starting (loads the model once) ...", flush=True)
        try:
            worker.wait_ready(app)
            pending = [rerank.apply_async((s["query"], s["docs"]), queue=DEMO_QUEUE) for s in samples]
            try:
                results = [Result.from_dict(p.get(timeout=120)) for p in pending]
            finally:
                # Each handle unsubscribes as it is collected (they sit in reference cycles): now, while Redis is
                # up, not at exit after it stopped, with a traceback each.
                pending.clear()
                gc.collect()
        except RerankError as exc:
            print(f"demo failed: {exc}")
            return 1
        for sample, result in zip(samples, results, strict=True):
            print(f"\nquery: {sample['query']}")
            order = sorted(range(len(result.scores)), key=lambda i: -result.scores[i])
            for rank, i in enumerate(order, 1):
                print(f"  {rank}. {result.scores[i]:+.4f}  {sample['docs'][i]}")
        first = results[0]
        print(f"\nserved by: {first.ranker} ({first.model}); {len(results)} jobs in "
              f"{len({b.id for r in results for b in r.batches})} forward batch(es)")
    return 0
