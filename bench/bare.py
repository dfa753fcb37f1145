"""Bare ``CrossEncoder.predict`` (batch 32), the in-process ceiling, timed in a process of its own; in the
spec's ``dtype`` (fp16 on CUDA, fp32 on a CPU, unless it says otherwise).

    python -m bench.bare MODEL '{"device": "cpu", "saturation": {"seed": 1, "requests": 30, ...}, ...}'

prints ``{"saturation_s": ..., "single_ms": [...], "padding": ...}``: all pairs in one ``predict`` call, then
each request of the light workload alone, and real over padded tokens of the saturation run.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.workload import Request, workload


def padding(model: Any, requests: list[Request], batch: int = 32) -> float:
    """Real over padded tokens of ``predict`` in batches of ``batch``, in arrival order."""
    counts = [len(ids) for r in requests for ids in
              model.tokenizer([r.query] * len(r.docs), r.docs, truncation=True, max_length=512)["input_ids"]]
    padded = sum(len(counts[i:i + batch]) * max(counts[i:i + batch]) for i in range(0, len(counts), batch))
    return sum(counts) / padded


def main() -> None:
    from sentence_transformers import CrossEncoder

    model, spec = sys.argv[1], json.loads(sys.argv[2])
    requests = workload(**spec["saturation"])
    light = workload(**spec["light"])
    import torch

    dtype = spec.get("dtype") or ("fp16" if spec["device"].startswith("cuda") else "fp32")
    loaded = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "fp16": {"dtype": torch.float16}}[dtype]
    ce = CrossEncoder(model, device=spec["device"], model_kwargs=loaded)
    ce.predict([(requests[0].query, d) for d in requests[0].docs], show_progress_bar=False)  # warm-up
    start = time.perf_counter()
    ce.predict([(r.query, d) for r in requests for d in r.docs], batch_size=32, show_progress_bar=False)
    saturation_s = time.perf_counter() - start
    single_ms = []
    for request in light:
        start = time.perf_counter()
        ce.predict([(request.query, d) for d in request.docs], batch_size=32, show_progress_bar=False)
        single_ms.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"saturation_s": saturation_s, "single_ms": single_ms, "padding": padding(ce, requests)}))


if __name__ == "__main__":
    main()
