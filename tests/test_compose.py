"""The compose file, checked statically (no Docker engine runs in CI)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from celeryconfig import Settings

COMPOSE = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
RERANKQ_SERVICES = {name: s for name, s in COMPOSE["services"].items() if "build" in s}


def test_redis_keeps_jobs_durable_and_asks_for_a_password() -> None:
    command = " ".join(COMPOSE["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass ${REDIS_PASSWORD" in command


def test_every_service_command_is_a_real_rerankq_subcommand() -> None:
    assert RERANKQ_SERVICES
    for service in RERANKQ_SERVICES.values():
        args = service["command"]
        done = subprocess.run([sys.executable, "-m", "rerankq", args[0], "--help"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        for option in (a for a in args[1:] if a.startswith("--")):
            assert option in done.stdout, (args[0], option)


def test_every_environment_variable_set_is_one_rerankq_reads() -> None:
    known = {f.metadata["env"] for f in fields(Settings)}
    for service in RERANKQ_SERVICES.values():
        assert set(service["environment"]) <= known
        assert "${REDIS_PASSWORD}" in service["environment"]["RERANKQ_BROKER_URL"]
