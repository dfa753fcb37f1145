"""The first GPU run, in one command (issue #33): what a lent GPU says about rerankq's CUDA path in about ten
minutes.

    python bench/gpu_check.py --out bench/results/gpu-check.json             # on the GPU, then the rows:
    python bench/gpu_check.py --rows --out bench/results/gpu-check.json

It prints the device and versions; checks that a worker pinned by GPU UUID sees that GPU alone; for forward-batch
budgets of 1k-32k padded tokens, prints tokenise ms (the preparer's, off the critical path), pad ms (the next
batch's, made while one runs), device ms (CUDA events), wall ms (launch to scores read) and peak memory; the
first (cold) batch's time; the memory held by a retry inside an out-of-memory handler and after it; and the
budget the warm-up derives from free memory. ``--rows`` then runs the GPU rows of BENCHMARKS.md ("Not measured
yet") with ``nvidia-smi dmon`` sampling SM use beside them. ``--device cpu --model xlmr-tiny`` runs the same
code on any machine (the test suite does, with small budgets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402

#: The GPU rows of BENCHMARKS.md, run by ``--rows`` (each under ``nvidia-smi dmon``).
ROWS = (
    ["bench/peers.py", "--model", "bge-reranker-v2-m3", "--device", "cuda:0", "--requests", "400", "--loads", ""],
    ["bench/peers.py", "--model", "bge-reranker-v2-m3", "--device", "cuda:0", "--requests", "400",
     "--min-docs", "10", "--max-docs", "10", "--loads", ""],
    ["bench/queue_wait.py", "--real", "bge-reranker-v2-m3", "--device", "cuda:0"],
)
#: Words per doc of the budget runs: about 256 tokens a pair with the bundled tokenizer.
WORDS = 240
REPEATS = 5


def versions() -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
             "sentence-transformers": sentence_transformers.__version__}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["memory_gib"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    if shutil.which("nvidia-smi"):
        found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip()
    return found


def pinning() -> dict[str, Any]:
    """A worker's pinning given the GPU's UUID (as Kubernetes' device plugin gives it): torch then sees that GPU
    alone, as cuda:0."""
    if not shutil.which("nvidia-smi"):
        return {"checked": False, "why": "no nvidia-smi"}
    uuids = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split()
    probe = ("from rerankq.worker.device import pin; print(pin('cuda:0')); import torch;"
             "print(torch.cuda.device_count(), 'GPU-' + str(torch.cuda.get_device_properties(0).uuid))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": uuids[-1]})
    lines = result.stdout.split("\n")
    seen = lines[1].split() if len(lines) > 1 else []
    return {"checked": True, "uuid": uuids[-1], "ok": seen == ["1", uuids[-1]], "seen": seen,
            "error": result.stderr.strip().splitlines()[-1:] if result.returncode else []}


def budgets(ranker: Any, sizes: list[int]) -> list[dict[str, Any]]:
    """Per budget: one batch of ~256-token pairs filling it, timed ``REPEATS`` times (medians)."""
    import torch

    cuda = ranker.device.startswith("cuda")
    rows = []
    for size in sizes:
        doc = " ".join(["passage"] * WORDS)
        per_pair = ranker.encode("what a query asks", [doc]).costs[0]
        n = max(1, size // per_pair)
        timings: dict[str, list[float]] = {"tokenise_ms": [], "pad_ms": [], "device_ms": [], "wall_ms": []}
        peak = 0
        for _ in range(REPEATS):
            began = time.perf_counter()
            encoded = ranker.encode("what a query asks", [doc] * n)
            timings["tokenise_ms"].append(1000 * (time.perf_counter() - began))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            prepared = ranker.prepare([(encoded, i) for i in range(n)])
            timings["pad_ms"].append(1000 * (time.perf_counter() - began))
            began = time.perf_counter()
            launched = ranker.launch(prepared)
            ranker.read(launched)
            timings["wall_ms"].append(1000 * (time.perf_counter() - began))
            if launched.device_s is not None:
                timings["device_ms"].append(1000 * launched.device_s)
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated())
        row: dict[str, Any] = {"budget": size, "pairs": n, "padded_tokens": n * per_pair}
        row |= {name: round(statistics.median(values), 2) if values else None for name, values in timings.items()}
        row["peak_memory_mib"] = round(peak / 2**20) if cuda else None
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def out_of_memory(ranker: Any) -> dict[str, Any]:
    """Memory allocated when a batch that ran out of memory is retried inside the ``except`` (as before) and after
    it (worker/model.py): the first holds the failed forward's activations (pytorch#18853)."""
    import torch

    from rerankq.worker.rankers import is_out_of_memory

    if not ranker.device.startswith("cuda"):
        return {"checked": False, "why": "not a GPU"}
    doc = " ".join(["passage"] * 500)
    encoded = ranker.encode("q", [doc] * 64)
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free * 0.97), dtype=torch.uint8, device=ranker.device)  # leave ~3% for the batch
    found: dict[str, Any] = {"checked": True, "baseline_mib": round(torch.cuda.memory_allocated() / 2**20)}
    n = 64
    try:
        while n >= 1:
            try:
                ranker.read(ranker.launch(ranker.prepare([(encoded, i) for i in range(n)])))
                found["fits_pairs"] = n
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                found.setdefault("ran_out_at_pairs", n)
                found.setdefault("inside_handler_mib", round(torch.cuda.memory_allocated() / 2**20))
            found.setdefault("after_handler_mib", round(torch.cuda.memory_allocated() / 2**20))
            n //= 2
    finally:
        del ballast
        torch.cuda.empty_cache()
    return found


def cold_and_budget(model: str, device: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    from rerankq.worker.model import warm_up
    from rerankq.worker.rankers import load_ranker

    began = time.perf_counter()
    ranker = load_ranker("cross-encoder", model, device, 512, "torch", dtype)
    loaded = time.perf_counter() - began
    began = time.perf_counter()
    ranker.score([("cold", "the first forward batch of a process")])
    cold = time.perf_counter() - began
    warm = warm_up(ranker)
    began = time.perf_counter()
    ranker.score([("warm", "the same batch once warm")])
    return ranker, {"load_s": round(loaded, 2), "cold_batch_ms": round(1000 * cold, 1), "warm_up_s": round(warm, 2),
                    "warm_batch_ms": round(1000 * (time.perf_counter() - began), 1),
                    "fits_tokens": ranker.fits_tokens}


def rows(out_dir: Path) -> list[dict[str, Any]]:
    """The GPU rows of BENCHMARKS.md, each with ``nvidia-smi dmon`` sampling SM use once a second."""
    done = []
    for n, row in enumerate(ROWS):
        log = out_dir / f"dmon-{n}.txt"
        dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=log.open("w"),
                                stderr=subprocess.STDOUT) if shutil.which("nvidia-smi") else None
        result_file = out_dir / f"row-{n}.json"
        began = time.perf_counter()
        status = subprocess.run([sys.executable, *row, "--out", str(result_file)], cwd=ROOT).returncode
        if dmon is not None:
            dmon.terminate()
            dmon.wait()
        sm = [int(line.split()[1]) for line in log.read_text().splitlines()
              if dmon is not None and line.strip() and not line.startswith("#") and line.split()[1].isdigit()]
        done.append({"command": " ".join(["python", *row]), "status": status,
                     "seconds": round(time.perf_counter() - began, 1),
                     "sm_percent_mean": round(statistics.mean(sm), 1) if sm else None,
                     "result": json.loads(result_file.read_text()) if result_file.exists() else None})
        print(f"{done[-1]['command']}: exit {status}, SM {done[-1]['sm_percent_mean']}%", flush=True)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--model", default="bge-reranker-v2-m3", help="a shape bench/peers.py builds")
    parser.add_argument("--dtype", default="auto", help="RERANKQ_DTYPE's values")
    parser.add_argument("--budgets", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--rows", action="store_true", help="also run BENCHMARKS.md's GPU rows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from rerankq.worker.device import pin

    device = pin(args.device)  # as a worker does: before torch loads
    from rerankq.worker.dtype import for_device
    from tests.tiny_models import build_model

    found: dict[str, Any] = {"build": provenance.describe(), "versions": versions(), "pinning": pinning()}
    print(json.dumps(found["versions"]), json.dumps(found["pinning"]), sep="\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="rerankq-gpu-check-") as tmp:
        model = build_model(args.model, Path(tmp) / "model")
        dtype, why = for_device(args.dtype, device)
        ranker, found["start"] = cold_and_budget(str(model), device, dtype)
        found["start"]["dtype"] = f"{dtype} ({why})"
        print(json.dumps(found["start"]), flush=True)
        found["budgets"] = budgets(ranker, [int(b) for b in args.budgets.split(",")])
        found["out_of_memory"] = out_of_memory(ranker)
        print(json.dumps(found["out_of_memory"]), flush=True)
        del ranker
        if args.rows:
            found["rows"] = rows(Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
