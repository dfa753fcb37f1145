"""Which number format a worker's model computes in (``RERANKQ_DTYPE``), and why: a pure choice, then the torch
dtype it names.

``auto`` is fp16 on CUDA, bf16 on a CPU that computes it natively (``avx512_bf16``, or AMX on 4th-gen Xeon and
later: about twice fp32's speed on this project's CPU, BENCHMARKS.md), fp32 on any other CPU, where bf16 is
emulated and slower than fp32.
"""

from __future__ import annotations

import torch

from rerankq.tasks.errors import ModelLoadError

NAMES = ("auto", "fp32", "bf16", "fp16")
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose(asked: str, device: str, native_bf16: bool, llm: bool = False) -> tuple[str, str]:
    """The dtype a model on ``device`` computes in when ``asked`` (a ``NAMES`` entry), and why. ``native_bf16``: on
    a CPU, whether it computes bf16 natively; on CUDA, whether the GPU has bf16, which an LLM reranker (``llm``)
    then takes: Qwen3 is trained in bf16 and overflows in fp16."""
    cuda = device.startswith("cuda")
    if asked == "fp16" and not cuda:
        raise ModelLoadError(f"RERANKQ_DTYPE=fp16 runs on CUDA, not on {device} (torch computes fp16 slowly on a "
                             "CPU): use bf16 on a CPU that has it, or fp32")
    if asked != "auto":
        return asked, "RERANKQ_DTYPE"
    if cuda and llm and native_bf16:
        return "bf16", "auto: CUDA with bf16, an LLM reranker (fp16 overflows where bf16 was trained)"
    if cuda:
        return "fp16", "auto: CUDA"
    if native_bf16:
        return "bf16", "auto: this CPU computes bf16 natively"
    return "fp32", "auto: this CPU has no native bf16 (avx512_bf16 or AMX)"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware, as torch's CPU kernels see it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def for_device(asked: str, device: str, llm: bool = False) -> tuple[str, str]:
    """``choose`` for this machine."""
    if device.startswith("cuda"):
        return choose(asked, device, llm and torch.cuda.is_available()
                      # emulated bf16 (a T4, a V100) is slower than fp16: native only
                      and torch.cuda.is_bf16_supported(including_emulation=False), llm)
    return choose(asked, device, cpu_has_native_bf16(), llm)
