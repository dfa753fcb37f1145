"""RERANKQ_DTYPE: the choice (pure), and real workers computing in what it chose, saying so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from rerankq.celeryconfig import Settings
from rerankq.producer import rerank
from rerankq.tasks.errors import ConfigError, ModelLoadError
from rerankq.worker.dtype import choose, for_device
from tests.conftest import StartWorker, eventually, rerankq

DOCS = ["a loan at a low rate", "the river bank", "flour and yeast", "bank rate", "a dog by the river"]


@pytest.mark.parametrize(("asked", "device", "native", "chosen"), [
    ("auto", "cuda:0", False, "fp16"), ("auto", "cpu", True, "bf16"), ("auto", "cpu", False, "fp32"),
    ("fp32", "cuda:1", False, "fp32"), ("bf16", "cpu", False, "bf16"), ("bf16", "cuda:0", False, "bf16"),
    ("fp16", "cuda:0", True, "fp16")])
def test_the_dtype_follows_the_setting_then_the_device_and_the_cpus_bf16(asked: str, device: str, native: bool,
                                                                          chosen: str) -> None:
    dtype, why = choose(asked, device, native)
    assert dtype == chosen and why.startswith("auto" if asked == "auto" else "RERANKQ_DTYPE")


def test_an_llm_reranker_takes_bf16_on_a_gpu_that_has_it() -> None:
    assert choose("auto", "cuda:0", True, llm=True)[0] == "bf16"
    assert choose("auto", "cuda:0", False, llm=True)[0] == "fp16"  # a GPU without bf16
    assert choose("fp16", "cuda:0", True, llm=True)[0] == "fp16"  # as asked
    assert choose("auto", "cpu", True, llm=True)[0] == "bf16" and choose("auto", "cpu", False, llm=True)[0] == "fp32"


def test_fp16_on_a_cpu_is_refused_saying_what_to_use() -> None:
    with pytest.raises(ModelLoadError, match="use bf16 on a CPU that has it, or fp32"):
        choose("fp16", "cpu", True)


def test_an_unknown_dtype_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="RERANKQ_DTYPE='int4': use 'auto', 'fp32', 'bf16' or 'fp16'"):
        Settings.from_env({"RERANKQ_DTYPE": "int4"})


@pytest.mark.integration
@pytest.mark.parametrize("asked", ["bf16", "auto"])
def test_a_worker_computes_in_the_dtype_chosen_and_shows_it(start_worker: StartWorker, xlmr_model: Path,
                                                           celery_app: Any, redis_url: str, asked: str) -> None:
    """bf16 asked for runs anywhere (emulated where the CPU lacks it); auto is bf16 on a CPU with native bf16
    (this machine's, as torch sees it), fp32 elsewhere. Scores stay within bf16's rounding of fp32's."""
    expected, why = for_device(asked, "cpu")
    worker = start_worker("--model", str(xlmr_model), "--metrics-port", "0", RERANKQ_DTYPE=asked,
                          RERANKQ_POLL_MS="200")
    assert f"in {expected} ({why})" in worker.log()
    assert worker.log().index("warmed up in") < worker.log().index(" ready.")  # before any job
    stats = celery_app.control.inspect([worker.node], timeout=5).stats() or {}
    assert stats[worker.node]["rerankq"]["dtype"] == expected
    eventually(lambda: f"cpu {expected}" in rerankq("status", env={"RERANKQ_BROKER_URL": redis_url,
                                                                   "RERANKQ_GPU_QUEUE": worker.queue}).stdout,
               30, "rerankq status shows the dtype")

    scores = rerank("bank loan", DOCS, queue=worker.queue, timeout=60).scores
    fp32 = CrossEncoder(str(xlmr_model), device="cpu").predict([("bank loan", d) for d in DOCS])
    np.testing.assert_allclose(scores, fp32, atol=0.02)
    if expected == "bf16":
        assert not np.allclose(scores, fp32, atol=1e-6)  # computed in bf16 indeed, not fp32
