"""GPU pinning: one worker process per GPU, chosen before torch (and CUDA) loads."""

from __future__ import annotations

import os
import re
import sys

from rerankq.tasks.errors import ConfigError


def pin(device: str) -> str:
    """Make ``cuda:N`` the only GPU this process sees; return the device name torch should use.

    ``N`` counts within an existing ``CUDA_VISIBLE_DEVICES`` (as in a container given some GPUs).
    """
    if device == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ConfigError(f"--device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if "torch" in sys.modules:
        raise ConfigError("pin the GPU before torch is imported: CUDA_VISIBLE_DEVICES is read once")
    index = int(match.group(1) or 0)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:
        if index >= len(visible):
            raise ConfigError(f"--device {device}: only {len(visible)} GPU(s) visible "
                              f"(CUDA_VISIBLE_DEVICES={','.join(visible)})")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda:0"
