"""GPU pinning: one worker process per GPU, chosen before torch (and CUDA) loads."""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

from rerankq.tasks.errors import ConfigError

#: torch's allocator settings: the name since torch 2.9, and the one before (still read, with a warning).
ALLOC_CONF = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def _alloc_conf_name() -> str:
    try:
        major, minor = (int(part) for part in re.findall(r"\d+", version("torch"))[:2])
    except (PackageNotFoundError, ValueError):
        return ALLOC_CONF[0]
    return ALLOC_CONF[0] if (major, minor) >= (2, 9) else ALLOC_CONF[1]


def visible() -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (indices, ``GPU-`` UUIDs, ``MIG-`` instances), or None when it is not
    set (every GPU visible). Set and empty, it hides every GPU: an empty list."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def pin(device: str) -> str:
    """Make ``cuda:N`` the only GPU this process sees; return the device name torch should use.

    ``N`` counts within an existing ``CUDA_VISIBLE_DEVICES`` (as in a container given some GPUs, or MIG
    instances), and without one in ``nvidia-smi``'s order: CUDA's own (fastest first) numbers the GPUs of a
    mixed host differently, so ``cuda:1`` was not ``nvidia-smi``'s GPU 1, nor the card the NVML gauge read.
    """
    if device == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ConfigError(f"--device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if "torch" in sys.modules:
        raise ConfigError("pin the GPU before torch is imported: CUDA_VISIBLE_DEVICES is read once")
    index = int(match.group(1) or 0)
    given = visible()
    if given == []:
        raise ConfigError(f"--device {device}: CUDA_VISIBLE_DEVICES is set and empty, which hides every GPU; use "
                          "--device cpu, or name the GPUs this worker may use")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if not any(os.environ.get(name) for name in ALLOC_CONF):
        # Forward batches change shape all the time: growable segments keep the fragments of one shape from
        # adding up to an out-of-memory error at another.
        os.environ[_alloc_conf_name()] = "expandable_segments:True"
    if given is not None:
        if index >= len(given):
            raise ConfigError(f"--device {device}: only {len(given)} GPU(s) visible "
                              f"(CUDA_VISIBLE_DEVICES={','.join(given)})")
        os.environ["CUDA_VISIBLE_DEVICES"] = given[index]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda:0"
