"""The compose file and the Dockerfile, checked statically (no Docker engine runs in CI)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from rerankq.celeryconfig import Settings

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
RERANKQ_SERVICES = {name: s for name, s in SERVICES.items() if "build" in s}
#: Read by `rerankq flower` (which refuses to start without it) and by Flower itself.
FLOWER_AUTH = "FLOWER_BASIC_AUTH"


def test_the_stack_has_every_part() -> None:
    assert {"redis", "gpu-worker", "cpu-worker", "watchdog", "api", "flower"} <= set(SERVICES)


def test_redis_keeps_jobs_durable_and_asks_for_a_password() -> None:
    command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass ${REDIS_PASSWORD:?" in command
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_every_service_command_is_a_real_rerankq_subcommand() -> None:
    assert len(RERANKQ_SERVICES) >= 4
    for service in RERANKQ_SERVICES.values():
        args = service["command"]
        done = subprocess.run([sys.executable, "-m", "rerankq", args[0], "--help"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        for option in (a for a in args[1:] if a.startswith("--")):
            assert option in done.stdout, (args[0], option)


def test_every_environment_variable_set_is_one_rerankq_reads() -> None:
    known = {f.metadata["env"] for f in fields(Settings)} | {FLOWER_AUTH}
    for service in RERANKQ_SERVICES.values():
        assert set(service["environment"]) <= known
        # The password apart from the URL: one with / # @ would break the URL unless percent-encoded.
        assert "@" not in service["environment"]["RERANKQ_BROKER_URL"]
        assert service["environment"]["RERANKQ_REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_every_process_reads_the_same_models() -> None:
    """Producers, workers and the watchdog must agree on the served models (tasks/models.py)."""
    for service in RERANKQ_SERVICES.values():
        assert service["environment"]["RERANKQ_MODELS"] == "${RERANKQ_MODELS:-}"
        assert service["environment"]["RERANKQ_MODEL"] == "${RERANKQ_MODEL:-BAAI/bge-reranker-v2-m3}"
    second = SERVICES["cpu-cross-encoder-2"]
    assert second["profiles"] == ["cpu-two"] and second["command"][-2] == "--model"


def test_gpu_workers_get_every_gpu_and_one_pinned_process_each() -> None:
    gpu = SERVICES["gpu-worker"]
    assert gpu["command"][:3] == ["worker", "--gpus", "all"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["BASE"].startswith("nvidia/cuda:") and "runtime" in gpu["build"]["args"]["BASE"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert any(v.startswith("model-cache:") for v in gpu["volumes"])


def test_flower_asks_for_a_password_from_the_environment_and_is_published_on_loopback_only() -> None:
    flower = SERVICES["flower"]
    assert flower["command"][0] == "flower" and "--no-auth" not in flower["command"]
    assert flower["environment"][FLOWER_AUTH].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_the_api_listens_on_every_interface_only_with_a_key_and_reports_its_health() -> None:
    api = SERVICES["api"]
    command = api["command"]
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    assert api["environment"]["RERANKQ_SERVE_API_KEY"].startswith("${RERANKQ_SERVE_API_KEY:?")
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in api["ports"]
    assert f"http://127.0.0.1:{port}/health" in " ".join(api["healthcheck"]["test"])
    assert api["ulimits"]["nofile"]["soft"] > Settings().serve_max_connections  # a file per connection


def test_cpu_workers_scale_with_docker_compose_scale() -> None:
    cpu = SERVICES["cpu-worker"]
    assert cpu["command"][:3] == ["worker", "--ranker", "fast"]
    assert "container_name" not in cpu and "ports" not in cpu  # both would clash between replicas


def test_no_secret_is_committed() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"redis://:[^$]", text), "a literal Redis password"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_the_dockerfile_copies_what_exists_and_declares_the_build_args_compose_passes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
    for service in RERANKQ_SERVICES.values():
        build = service["build"]
        if isinstance(build, dict):
            assert set(build.get("args", {})) <= declared
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    packages = re.search(r"packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S)
    assert packages
    copied = {line.split()[-1] for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)}
    for package in re.findall(r'"([\w.]+)"', packages[1]):  # every installed package's real folder is copied in
        folder = (ROOT / package.replace(".", "/")).resolve().relative_to(ROOT.resolve())
        assert str(folder.parts[0]) in copied, package
