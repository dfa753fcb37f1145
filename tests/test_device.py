"""GPU pinning: which GPU a worker process sees is decided before torch loads."""

from __future__ import annotations

import os
import sys
import types

import pytest

from rerankq.tasks.errors import ConfigError
from rerankq.worker import device


@pytest.fixture(autouse=True)
def torch_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # pin() refuses to run once torch is imported; the test process has torch loaded for other tests.
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    # Set first, so that undoing restores the variable as it was even when pin() set it from nothing.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


def test_cuda_n_makes_gpu_n_the_only_visible_one() -> None:
    assert device.pin("cuda:3") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_cuda_n_counts_within_the_gpus_already_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert device.pin("cuda:1") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ConfigError, match="only 1 GPU"):
        device.pin("cuda:1")


def test_cpu_changes_nothing() -> None:
    assert device.pin("cpu") == "cpu"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_device_name_torch_would_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="not 'cpu', 'cuda' or 'cuda:N'"):
        device.pin("gpu0")


def test_pinning_after_torch_loaded_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    with pytest.raises(ConfigError, match="before torch is imported"):
        device.pin("cuda:0")
