"""GPU pinning: which GPU a worker process sees is decided before torch loads."""

from __future__ import annotations

import os
import sys
import types

import pytest

from rerankq.supervisor import visible_gpus
from rerankq.tasks.errors import ConfigError
from rerankq.worker import device


@pytest.fixture(autouse=True)
def torch_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # pin() refuses to run once torch is imported; the test process has torch loaded for other tests.
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    # Set first, so that undoing restores the variable as it was even when pin() set it from nothing.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for name in ("CUDA_DEVICE_ORDER", *device.ALLOC_CONF):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


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


def test_an_empty_cuda_visible_devices_hides_every_gpu_and_is_not_replaced_by_gpu_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="set and empty, which hides every GPU"):
        device.pin("cuda:0")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ConfigError, match="set and empty"):
        visible_gpus("all")


@pytest.mark.parametrize("entries", [
    ["GPU-5b1c3e2a-0f4d-4c1e-9d7e-3a2b1c0d9e8f", "GPU-0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b"],
    ["MIG-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718", "MIG-2a3b4c5d-6e7f-8091-a2b3-c4d5e6f70819",
     "MIG-3b4c5d6e-7f80-91a2-b3c4-d5e6f708192a"]])
def test_gpus_named_by_uuid_or_mig_instance_are_pinned_and_counted_by_entry(monkeypatch: pytest.MonkeyPatch,
                                                                              entries: list[str]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(entries))
    assert visible_gpus("all") == list(range(len(entries)))  # torch counts one MIG instance only
    assert device.pin("cuda:1") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == entries[1]


def test_gpus_are_numbered_in_nvidia_smis_order_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    device.pin("cuda:1")
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    device.pin("cuda:1")
    assert os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_the_allocator_grows_its_segments_for_changing_batch_shapes_unless_the_user_set_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    device.pin("cuda:0")
    name = device._alloc_conf_name()  # PYTORCH_ALLOC_CONF from torch 2.9
    assert os.environ[name] == "expandable_segments:True"
    monkeypatch.delenv(name)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the older name, set by the user
    device.pin("cuda:0")
    assert name not in os.environ or name == "PYTORCH_CUDA_ALLOC_CONF"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
