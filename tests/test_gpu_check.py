"""The GPU run's script (bench/gpu_check.py), dry-run on the CPU with a tiny model: the same code a lent GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--model", "xlmr-tiny", "--dtype", "fp32",
                    "--budgets", "512,1024", "--out", str(out)], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    found = json.loads(out.read_text())
    assert found["build"]["commit"] and found["versions"]["torch"]
    assert found["start"]["cold_batch_ms"] > 0 and found["start"]["fits_tokens"] is None  # measured on a GPU only
    assert [row["budget"] for row in found["budgets"]] == [512, 1024]
    for row in found["budgets"]:
        assert 0 < row["padded_tokens"] <= row["budget"] and row["pairs"] >= 1
        assert row["tokenise_ms"] > 0 and row["pad_ms"] > 0 and row["wall_ms"] > 0
        assert row["device_ms"] is None  # CUDA events only
    assert found["budgets"][1]["pairs"] == 2 * found["budgets"][0]["pairs"]
    assert found["out_of_memory"] == {"checked": False, "why": "not a GPU"}
