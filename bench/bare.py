"""Bare ``CrossEncoder.predict`` (batch 32), the in-process ceiling, timed in a process of its own; in the
spec's ``dtype`` (fp16 on CUDA, fp32 on a CPU, unless it says otherwise).

    python -m bench.bare MODEL '{"device": "cpu", "saturation": {"seed": 1, "requests": 30, ...}, ...}'

prints ``{"saturation_s": ..., "forward_s": ..., "single_ms": [...], "padding": ..., "forward_padding": ...}``:
all pairs in one ``predict`` call; the model's forward alone over the same pairs (tokenised and padded
beforehand, in batches sorted by length of at most ``forward_tokens`` padded tokens, 2048 by default as a
rerankq CPU worker's): the floor of any server of this model here; then each request of the light workload
alone; and real over padded tokens of the saturation run, read from the batches ``predict`` ran
(sentence-transformers sorts pairs by length before batching them), and of the forward alone.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.workload import workload


class Padding:
    """Real and padded tokens of every batch ``module`` (a sentence-transformers input module, called with the
    tokenised features) takes while counting: a forward pre-hook."""

    def __init__(self, module: Any) -> None:
        self.real = self.padded = 0
        self.counting = False
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        features = args[0] if args else kwargs.get("features", {})
        mask = features.get("attention_mask")
        if self.counting and mask is not None:
            self.real += int(mask.sum())
            self.padded += mask.numel()

    def share(self) -> float:
        return self.real / self.padded if self.padded else 1.0  # 1.0: flattened, no padding at all


def forward_batches(ce: Any, pairs: list[tuple[str, str]], budget: int) -> list[dict[str, Any]]:
    """The pairs tokenised and padded into tensors on the model's device, in batches sorted by length of at most
    ``budget`` padded tokens (as a rerankq worker forms them from a backlog)."""
    encoded = ce.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True,
                           max_length=ce.max_length)
    rows = sorted(({k: v[i] for k, v in encoded.items()} for i in range(len(pairs))),
                  key=lambda row: len(row["input_ids"]))
    batches: list[list[dict[str, Any]]] = []
    batch: list[dict[str, Any]] = []
    for row in rows:
        if batch and (len(batch) + 1) * len(row["input_ids"]) > budget:
            batches.append(batch)
            batch = []
        batch.append(row)
    batches.append(batch)
    return [{k: v.to(ce.device) for k, v in ce.tokenizer.pad(b, return_tensors="pt").items()} for b in batches]


def main() -> None:
    from sentence_transformers import CrossEncoder

    model, spec = sys.argv[1], json.loads(sys.argv[2])
    requests = workload(**spec["saturation"])
    light = workload(**spec["light"])
    import torch

    dtype = spec.get("dtype") or ("fp16" if spec["device"].startswith("cuda") else "fp32")
    loaded = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "fp16": {"dtype": torch.float16}}[dtype]
    ce = CrossEncoder(model, device=spec["device"], model_kwargs=loaded)
    padding = Padding(ce[0])
    pairs = [(r.query, d) for r in requests for d in r.docs]
    ce.predict(pairs[:len(requests[0].docs)], show_progress_bar=False)  # warm-up
    padding.counting = True
    start = time.perf_counter()
    ce.predict(pairs, batch_size=32, show_progress_bar=False)
    saturation_s = time.perf_counter() - start
    padding.counting = False
    batches = forward_batches(ce, pairs, int(spec.get("forward_tokens") or 2048))
    start = time.perf_counter()
    with torch.inference_mode():
        for features in batches:
            ce.model(**features)
        if ce.device.type == "cuda":
            torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    forward_padding = sum(int(f["attention_mask"].sum()) for f in batches) / sum(f["attention_mask"].numel()
                                                                                 for f in batches)
    single_ms = []
    for request in light:
        start = time.perf_counter()
        ce.predict([(request.query, d) for d in request.docs], batch_size=32, show_progress_bar=False)
        single_ms.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"saturation_s": saturation_s, "forward_s": forward_s, "single_ms": single_ms,
                      "padding": padding.share(), "forward_padding": forward_padding}))


if __name__ == "__main__":
    main()
