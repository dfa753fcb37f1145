"""The cross-encoder on ONNX Runtime with int8 weights, for CPU workers (``RERANKQ_BACKEND=onnx-int8``).

At load the model is exported from its torch weights to ONNX, its weights quantized to int8 (dynamic
quantization), in a temporary directory, and read into an ONNX Runtime session: no exported file has to be
made or kept beforehand. Tokens, truncation and the score's activation (``activate``) are the torch cross-encoder's own,
so only the forward pass changes. Without ``int8`` the export scores as torch does (what the tests check)
but no faster on a CPU, so it is no setting of its own. BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.rankers import Launched, Row
from rerankq.worker.tokens import pad
from rerankq.worker.torch_rankers import CrossEncoderRanker


class OnnxCrossEncoderRanker(CrossEncoderRanker):
    def __init__(self, model: str, device: str, max_length: int = 0, int8: bool = False) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelLoadError("RERANKQ_BACKEND=onnx-int8 needs ONNX Runtime: pip install 'rerankq[onnx]'") from None
        super().__init__(model, device, max_length)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="rerankq-onnx-") as tmp:
            path = self._export(Path(tmp) / "model.onnx")
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(path, Path(tmp) / "model-int8.onnx", weight_type=QuantType.QInt8,
                                 use_external_data_format=True)
                path = Path(tmp) / "model-int8.onnx"
            # The session holds the weights in memory: the files may go.
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._session_inputs = [i.name for i in self._session.get_inputs()]
        self.dtype = "int8" if int8 else "fp32"  # RERANKQ_DTYPE is the torch models'
        self._ce.model.to("meta")  # the torch weights are not used again: free them

    def _export(self, path: Path) -> Path:
        example = self._ce.tokenizer(["query"] * 2, ["a doc", "another doc"], padding=True, return_tensors="pt")
        # The graph's inputs come in the order of forward's parameters, whatever the tokenizer's order.
        names = [n for n in inspect.signature(self._ce.model.forward).parameters if n in example]
        # Export with the pre-dynamo exporter: it needs no onnxscript and takes ``dynamic_axes``; models over
        # 2 GB (bge-reranker-v2-m3 in fp32) have their weights written beside the graph.
        torch.onnx.export(self._ce.model.eval(), (), str(path), kwargs={n: example[n] for n in names},
                          input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "pairs", 1: "tokens"} for n in names}, opset_version=17, dynamo=False)
        return path

    def prepare(self, rows: Sequence[Row]) -> Any:
        tokens = [(encoded.tokens, i) for encoded, i in rows if encoded.tokens is not None]
        arrays = pad(tokens, self._pad_id, self._left)
        return {name: arrays[name] for name in self._session_inputs}

    def launch(self, prepared: Any) -> Launched:
        return Launched(self._session.run(["logits"], prepared)[0])
