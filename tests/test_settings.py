"""Settings: typed, each from an environment variable, documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerankq import celeryconfig
from rerankq.celeryconfig import Settings
from rerankq.redis_server import RedisServer
from rerankq.tasks.app import app
from rerankq.tasks.errors import ConfigError
from tests.conftest import rerankq


def test_every_setting_reads_its_environment_variable() -> None:
    s = Settings.from_env({"RERANKQ_MAX_CHUNK_TOKENS": "999", "RERANKQ_MAX_WAIT_MS": "2.5",
                           "RERANKQ_BROKER_URL": "rediss://:pw@host:6380/1", "RERANKQ_MODEL": "/models/x"})
    assert (s.max_chunk_tokens, s.max_wait_ms, s.model) == (999, 2.5, "/models/x")
    assert s.backend_url == "rediss://:pw@host:6380/1"


@pytest.mark.parametrize(("env", "message"), [
    ({"RERANKQ_MAX_DOCS": "many"}, "RERANKQ_MAX_DOCS='many' is not a valid int"),
    ({"RERANKQ_MAX_CHUNK_TOKENS": "0"}, "RERANKQ_MAX_CHUNK_TOKENS must be > 0"),
    ({"RERANKQ_MAX_WAIT_MS": "-1"}, "RERANKQ_MAX_WAIT_MS must be >= 0"),
    ({"RERANKQ_PREFETCH": "10"}, "set it to at least 128"),
    ({"RERANKQ_BROKER_URL": "amqp://guest@localhost//"}, "is not a Redis URL"),
    ({"RERANKQ_RESULT_BACKEND": "db+sqlite:///r.db"}, "RERANKQ_RESULT_BACKEND"),
    ({"RERANKQ_LOW_WAIT_S": "3", "RERANKQ_HIGH_WAIT_S": "2"}, "RERANKQ_LOW_WAIT_S=3.0 must be below"),
    ({"RERANKQ_HIGH_JOBS": "100", "RERANKQ_LOW_JOBS": "100"}, "RERANKQ_LOW_JOBS=100 must be below"),
    ({"RERANKQ_POLL_MS": "-200"}, "RERANKQ_POLL_MS must be >= 0"),
    ({"RERANKQ_POLL_MS": "0"}, "RERANKQ_POLL_MS must be > 0"),
    ({"RERANKQ_POLL_MS": "500", "RERANKQ_ROUTE_TTL_S": "0.5"}, "must outlast one poll"),
    ({"RERANKQ_PASSTHROUGH": "maybe"}, "RERANKQ_PASSTHROUGH='maybe' is not a valid bool"),
    ({"RERANKQ_BULK_SUFFIX": ""}, "RERANKQ_BULK_SUFFIX must not be empty"),
    ({"RERANKQ_BACKEND": "tensorrt"}, "RERANKQ_BACKEND='tensorrt': use 'torch' or 'onnx-int8'"),
    ({"RERANKQ_BROKER_URL": "redis+cluster://h:7000"}, "Redis Cluster is not supported"),
    ({"RERANKQ_BROKER_URL": "sentinel://h:26379?ssl_cert_reqs=required"}, "TLS with Redis Sentinel is not supported"),
])
def test_bad_settings_are_refused_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        Settings.from_env(env)


@pytest.mark.parametrize(("raw", "value"), [("0", False), ("off", False), ("1", True), ("Yes", True)])
def test_switches_read_the_usual_words(raw: str, value: bool) -> None:
    assert Settings.from_env({"RERANKQ_PASSTHROUGH": raw}).passthrough is value


def test_forward_batches_default_large_on_a_gpu_and_small_on_a_cpu_unless_set() -> None:
    auto, fixed = Settings.from_env({}), Settings.from_env({"RERANKQ_MAX_BATCH_TOKENS": "4096"})
    assert (auto.batch_tokens("cuda:0"), auto.batch_tokens("cpu")) == (8192, 2048)
    assert (fixed.batch_tokens("cuda:0"), fixed.batch_tokens("cpu")) == (4096, 4096)
    # A GPU's measured memory sizes the default (worker/model.py warm_up), never a budget the user set.
    assert (auto.batch_tokens("cuda:0", 24576), fixed.batch_tokens("cuda:0", 24576)) == (24576, 4096)


def test_prefetch_holds_two_chunks_of_bulk_and_keeps_a_chunk_of_room_for_interactive_jobs() -> None:
    default = Settings.from_env({"RERANKQ_MAX_CHUNK_JOBS": "50"})
    assert (default.prefetch_count, default.bulk_limit) == (150, 100)
    tight = Settings.from_env({"RERANKQ_MAX_CHUNK_JOBS": "50", "RERANKQ_PREFETCH": "100"})
    assert (tight.prefetch_count, tight.bulk_limit) == (100, 50)


def test_celery_is_configured_for_json_only_and_late_acks() -> None:
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_acks_late is True
    timeout = celeryconfig.settings.visibility_timeout
    assert conf.broker_transport_options["visibility_timeout"] == timeout
    assert conf.result_backend_transport_options["visibility_timeout"] == timeout


def test_celery_is_given_its_own_keys_and_no_secret() -> None:
    """Flower and `celery inspect conf` show the app's config: rerankq's settings (an API key, a URL with its
    password) must not be in it, and every key given is one Celery knows."""
    from celery.app.defaults import NAMESPACES, flatten

    # Celery's Redis backend reads its health-check interval by name, without an entry in the defaults table.
    known = {name for name, _ in flatten(NAMESPACES)} | {"redis_backend_health_check_interval"}
    given = celeryconfig.celery_config(Settings.from_env({"RERANKQ_SERVE_API_KEY": "sekrit"}))
    assert set(given) <= known, set(given) - known
    assert "sekrit" not in repr(given)
    assert not [key for key in app.conf if key.lower() in ("settings", "serve_api_key")]


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert celeryconfig.settings_table() in readme


@pytest.mark.parametrize(("url", "used"), [
    # kombu would connect to a bare rediss:// URL without checking the certificate: rerankq asks for the check.
    ("rediss://:pw@host:6380/1", "rediss://:pw@host:6380/1?ssl_cert_reqs=required"),
    ("rediss://host/0?ssl_ca_certs=/etc/ca.pem", "rediss://host/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required"),
    ("rediss://host/0?ssl_cert_reqs=none", "rediss://host/0?ssl_cert_reqs=none"),  # said on purpose: kept
    ("redis://host/0", "redis://host/0"),
])
def test_a_tls_url_verifies_the_server_unless_it_says_otherwise(url: str, used: str) -> None:
    assert celeryconfig.verified(url) == used


def test_kombu_checks_the_certificate_of_a_bare_tls_url_given_to_rerankq() -> None:
    import ssl

    from kombu.connection import Connection

    assert Connection("rediss://host:6380/0").ssl == {"ssl_cert_reqs": ssl.CERT_NONE}  # kombu on its own
    assert Connection(celeryconfig.verified("rediss://host:6380/0")).ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_sentinel_urls_name_the_master_for_kombu_and_celery_and_plain_urls_do_not() -> None:
    sentinels = Settings.from_env({"RERANKQ_BROKER_URL": "sentinel://h1:26379;sentinel://h2:26379",
                                   "RERANKQ_SENTINEL_MASTER": "cache"})
    assert celeryconfig.broker_options(sentinels)["master_name"] == "cache"
    asked = celeryconfig.broker_options(sentinels)["sentinel_kwargs"]
    assert asked["socket_timeout"] == sentinels.socket_timeout_s and asked["retry"].get_retries() == 0
    assert celeryconfig.backend_options(sentinels)["master_name"] == "cache"  # results on the broker's URL
    split = sentinels.with_(result_backend="redis://results:6379/0")
    assert "master_name" not in celeryconfig.backend_options(split)
    assert "master_name" not in celeryconfig.broker_options(Settings.from_env({}))


@pytest.mark.parametrize("url", ["reddis://:pw-LEAK-1@h:6379/0", "redis+cluster://user:pw-LEAK-1@h:7000",
                                 "amqp://:pw-LEAK-1/ab#c@h//"])
def test_no_secret_in_a_settings_repr_or_an_error_that_names_a_url(url: str) -> None:
    shown = repr(Settings(broker_url="redis://:pw-LEAK-1@h/0", serve_api_key="pw-LEAK-2", redis_password="pw-LEAK-3"))
    assert "LEAK" not in shown and "serve_api_key='***'" in shown and "redis://:***@h/0" in shown
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"RERANKQ_BROKER_URL": url})
    assert "LEAK" not in str(refused.value) and ":***@" in str(refused.value)
    status = rerankq("status", env={"RERANKQ_BROKER_URL": url})  # what a user sees, end to end
    assert status.returncode != 0 and "LEAK" not in status.stdout + status.stderr, status.stderr


@pytest.mark.integration
def test_a_password_given_apart_from_the_url_needs_no_encoding() -> None:
    """``openssl rand -base64`` passwords hold / + =: in a URL, / ends the host part (compose wrote it there)."""
    password = "a/b+c=d#e@f?g%h"
    with RedisServer(password=password) as server:
        plain = f"redis://127.0.0.1:{server.port}/0"
        status = rerankq("status", env={"RERANKQ_BROKER_URL": plain, "RERANKQ_REDIS_PASSWORD": password})
        assert status.returncode == 0, status.stdout + status.stderr
        assert password not in status.stdout + status.stderr
        assert Settings.from_env({"RERANKQ_BROKER_URL": f"redis://:given@127.0.0.1:{server.port}/0",
                                  "RERANKQ_REDIS_PASSWORD": password}).broker_url.startswith("redis://:given@")
