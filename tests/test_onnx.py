"""The cross-encoder on ONNX Runtime (``RERANKQ_BACKEND=onnx-int8``): real export, real sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from rerankq.tasks import Result, rerank
from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.onnx_ranker import OnnxCrossEncoderRanker
from rerankq.worker.rankers import load_ranker
from rerankq.worker.torch_rankers import CrossEncoderRanker
from tests.conftest import StartWorker

PAIRS = [("river bank", "a bank by the river"), ("loan", "interest rates rose " * 40), ("x", "y " * 600),
         ("empty doc", "")]


@pytest.mark.parametrize("model_name", ["tiny_model", "xlmr_model"])
def test_the_onnx_export_scores_as_torch_does(model_name: str, request: pytest.FixtureRequest) -> None:
    """BERT and the default model's architecture (XLM-RoBERTa, with its sigmoid), truncation included: the
    same logits, and after the activation predict's scores."""
    model = str(request.getfixturevalue(model_name))
    onnx = OnnxCrossEncoderRanker(model, "cpu")
    np.testing.assert_allclose(onnx.activate(onnx.score(PAIRS)), CrossEncoder(model, device="cpu").predict(PAIRS),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(onnx.score(PAIRS), CrossEncoderRanker(model, "cpu").score(PAIRS), rtol=0, atol=1e-5)
    np.testing.assert_allclose(onnx.score(PAIRS), [onnx.score([p])[0] for p in PAIRS], rtol=0, atol=1e-5)
    assert onnx.encode("x", ["y " * 600]).costs[0] == onnx.max_length == 512


def test_the_int8_backend_quantizes_and_stays_close_to_torch(tiny_model: Path) -> None:
    want = np.array(CrossEncoderRanker(str(tiny_model), "cpu").score(PAIRS))
    got = np.array(OnnxCrossEncoderRanker(str(tiny_model), "cpu", int8=True).score(PAIRS))
    assert 0 < np.abs(got - want).max() < 0.1


def test_an_onnx_backend_is_refused_for_a_gpu_worker(tiny_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="onnx-int8 runs the cross-encoder on a CPU, not on cuda:0"):
        load_ranker("cross-encoder", str(tiny_model), "cuda:0", backend="onnx-int8")


@pytest.mark.integration
def test_a_worker_on_the_int8_backend_serves_jobs(start_worker: StartWorker, tiny_model: Path) -> None:
    worker = start_worker("--model", str(tiny_model), RERANKQ_BACKEND="onnx-int8")
    handles = [rerank.apply_async((q, [d, "bread"]), queue=worker.queue) for q, d in PAIRS]
    want = CrossEncoder(str(tiny_model), device="cpu").predict([(q, x) for q, d in PAIRS for x in (d, "bread")])
    got = np.array([s for h in handles for s in Result.from_dict(h.get(timeout=60)).scores])
    assert 0 < np.abs(got - want).max() < 0.1  # int8: close to torch, not the same
