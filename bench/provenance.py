"""What a result file says about the run that wrote it: the build (commit, and whether the tree had changes besides
the result files in bench/results/), the command, the machine, the package versions and the date. Written by the
benchmark, not by a person."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: CPU flags that change what a benchmark measures (bf16 and int8 kernels).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
#: Packages whose version changes what a benchmark measures (sentence-transformers 6 sorts predict's pairs by length).
PACKAGES = ("torch", "transformers", "sentence-transformers", "celery", "kombu", "redis")


def describe() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        flags, model = [], platform.processor()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if _has("nvidia-smi") else ""
    changed = git("status", "--porcelain", "--", ".", ":!bench/results")  # results written meanwhile do not count
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(changed),
            "command": shlex.join(["python", *_args()]),
            "machine": {"cores": os.cpu_count(), "cpu": model, "flags": [f for f in FLAGS if f in flags],
                        "gpu": gpu or None},
            "packages": {name: _version(name) for name in PACKAGES},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _args() -> list[str]:
    """The command line as run from the checkout: ``-m bench.x`` for a module (no path of this machine)."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT) and script.suffix == ".py":
        return ["-m", ".".join(script.relative_to(ROOT).with_suffix("").parts), *sys.argv[1:]]
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has(command: str) -> bool:
    return any((Path(p) / command).exists() for p in os.environ.get("PATH", "").split(os.pathsep))
