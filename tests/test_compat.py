"""The kombu and Celery rerankq bends (worker/upstream/): every internal it relies on is there, the code it
copies is the code it was written against, and the library behaviour it patches is still as the patches
say, against a real Redis."""

from __future__ import annotations

import re
import threading
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import celery
import kombu
import pytest
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult
from kombu.transport import redis as kombu_redis

from rerankq.tasks.errors import ConfigError
from rerankq.worker.upstream import results, surface
from rerankq.worker.upstream.patches import flush_task_events, route_task_events

SENDERS, EVENTS = 2, 3000
ROOT = Path(__file__).parent.parent


def test_every_kombu_and_celery_internal_rerankq_relies_on_is_the_one_it_was_written_against() -> None:
    fatal, changed = surface.problems()
    assert not fatal + changed, f"celery {celery.__version__}, kombu {kombu.__version__}:\n" + "\n".join(
        fatal + changed)


def test_a_library_that_moved_fails_the_check_naming_what_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(kombu_redis.Channel, "_flush_brpop_reauth")
    monkeypatch.setattr(kombu_redis.QoS, "append", lambda self, message, delivery_tag: None)
    monkeypatch.setattr(kombu, "__version__", "5.8.0")
    fatal, changed = ("\n".join(found) for found in surface.problems())
    assert "kombu 5.8.0 is not a version rerankq supports (>=5.7,<5.8)" in fatal
    assert "kombu.transport.redis:Channel._flush_brpop_reauth is gone" in fatal
    assert "kombu.transport.redis:QoS.append in kombu 5.8.0 is not the code worker/upstream/transport.py" in changed
    with pytest.raises(ConfigError, match="_flush_brpop_reauth is gone"):
        surface.check()


def test_a_fingerprint_is_of_the_code_not_its_docstrings_or_comments() -> None:
    code = 'def f(x):\n    """Adds one."""\n    return x + 1  # one\n'
    assert surface.code_fingerprint(code) == surface.code_fingerprint(
        'def f(x):\n    """Adds 1 to x."""\n    # the next line\n    return x + 1\n')
    assert surface.code_fingerprint(code) != surface.code_fingerprint('def f(x):\n    return x + 2\n')


def test_copied_code_that_changed_only_warns_a_worker(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def restore_by_tag(self: Any, tag: str, client: Any = None, leftmost: bool = False) -> None:
        return None

    monkeypatch.setattr(kombu_redis.QoS, "restore_by_tag", restore_by_tag)
    surface.check()  # runs: the code differs, nothing it relies on is gone
    assert "QoS.restore_by_tag in kombu" in caplog.text


def test_pyproject_and_the_dockerfile_pin_the_versions_the_check_supports() -> None:
    pyproject, dockerfile = (ROOT / "pyproject.toml").read_text(), (ROOT / "Dockerfile").read_text()
    for package, (low, high) in surface.SUPPORTED.items():
        bounds = re.search(rf'"{package}(\[redis\])?>=([\d.]+),<([\d.]+)"', pyproject)
        assert bounds, f"pyproject.toml does not bound {package} on both sides"
        assert (bounds[2], bounds[3]) == (f"{low[0]}.{low[1]}", f"{high[0]}.{high[1]}")
        pinned = re.search(rf"ARG {package.upper()}_VERSION=(\d+)\.(\d+)\.\d+", dockerfile)
        assert pinned and low <= (int(pinned[1]), int(pinned[2])) < high, f"the Dockerfile's {package}"


def published_by_threads(celery_app: Any, patched: bool) -> int:
    """Events two threads send into a buffered dispatcher while a third flushes it without pause, as the
    runner, the settler and the event loop do: how many of them were published. Patched, the threads send
    into an outbox that the flushing thread alone hands to the dispatcher."""
    published = 0
    with celery_app.connection_for_write() as conn:
        dispatcher = celery_app.events.Dispatcher(conn, buffer_group=["task"], buffer_limit=10**9)
        publish = dispatcher._publish

        def count(event: Any, producer: Any, routing_key: str, **kwargs: Any) -> Any:
            nonlocal published
            published += len(event) if isinstance(event, list) else 1
            return publish(event, producer, routing_key, **kwargs)

        dispatcher._publish = count
        outbox: deque[Any] = deque()
        if patched:
            route_task_events(dispatcher, outbox, lambda: None)
        sending = threading.Barrier(SENDERS + 1)
        done = threading.Event()

        def send() -> None:
            sending.wait()
            for n in range(EVENTS):
                dispatcher.send("task-started", uuid=str(n))

        def flush() -> None:
            sending.wait()
            while not done.is_set():
                flush_task_events(dispatcher, outbox) if patched else dispatcher.flush()

        threads = [threading.Thread(target=send) for _ in range(SENDERS)]
        flusher = threading.Thread(target=flush)
        for thread in [*threads, flusher]:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        flusher.join()
        flush_task_events(dispatcher, outbox)
        dispatcher.flush()
        dispatcher.close()
    return published


@pytest.mark.integration
def test_task_events_sent_from_other_threads_are_all_published_while_the_event_loop_flushes(
        celery_app: Any) -> None:
    assert published_by_threads(celery_app, patched=True) == SENDERS * EVENTS


def published_with_a_send_inside_the_flush(celery_app: Any, patched: bool) -> int:
    """The race, made to happen: a task event sent (as by another thread) after a flush has published the
    buffer and before it empties it. Two events sent in all; how many were published."""
    published = 0
    with celery_app.connection_for_write() as conn:
        dispatcher = celery_app.events.Dispatcher(conn, buffer_group=["task"], buffer_limit=10**9)
        outbox: deque[Any] = deque()
        if patched:
            route_task_events(dispatcher, outbox, lambda: None)
        publish, sent_late = dispatcher._publish, False

        def publish_then_send(event: Any, producer: Any, routing_key: str, **kwargs: Any) -> Any:
            nonlocal published, sent_late
            published += len(event) if isinstance(event, list) else 1
            result = publish(event, producer, routing_key, **kwargs)
            if not sent_late:
                sent_late = True
                dispatcher.send("task-succeeded", uuid="late")
            return result

        dispatcher._publish = publish_then_send
        dispatcher.send("task-started", uuid="first")
        for _ in range(2):
            if patched:
                flush_task_events(dispatcher, outbox)
            else:
                dispatcher.flush()
        dispatcher.close()
    return published


@pytest.mark.integration
def test_an_event_sent_while_the_event_loop_flushes_is_published_with_the_patch(celery_app: Any) -> None:
    assert published_with_a_send_inside_the_flush(celery_app, patched=True) == 2


@pytest.mark.integration
def test_celery_drops_an_event_sent_during_its_flush_exactly_in_the_versions_the_patch_says(
        celery_app: Any) -> None:
    # celery 5.7.0 clears only what it published. If this fails, the versions in worker/upstream/patches.py's note
    # are wrong: the race is back, or gone from a version said to have it.
    dropped = published_with_a_send_inside_the_flush(celery_app, patched=False) == 1
    assert dropped == (tuple(celery.VERSION[:2]) < (5, 7)), f"celery {celery.__version__}"


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("failed", [False, True])
def test_the_result_record_is_the_one_celery_writes(extended: bool, failed: bool) -> None:
    app = celery.Celery(backend="redis://localhost:1/0", set_as_current=False)
    app.conf.result_extended = extended
    backend = app.backend
    child = AsyncResult("child-1", app=app)
    request = SimpleNamespace(id="job-1", group="g-1", parent_id="p-1", task="rerankq.rerank", args=["q"],
                              kwargs={}, hostname="w@h", retries=0, delivery_info={"routing_key": "rerankq"},
                              children=[child])
    outcome = results.Outcome(request, error=ValueError("no")) if failed else results.Outcome(
        request, result={"scores": [0.5]})
    value = outcome.result if not failed else backend.prepare_exception(outcome.error)
    celerys = backend._get_result_meta(result=value, state=outcome.state, traceback=None, request=request)
    stamp = results.Stamp.now(backend)
    assert stamp.celerys is extended
    ours = results.record(backend, outcome, value, stamp)
    assert ours == {**celerys, "date_done": stamp.date_done, "task_id": "job-1"}
    key, raw = results.entry(backend, outcome, stamp)
    assert (key, backend.decode(raw)) == (backend.get_key_for_task("job-1"), backend.decode(backend.encode(ours)))


def test_a_backend_that_builds_its_own_result_record_keeps_it() -> None:
    class Own(RedisBackend):  # type: ignore[misc]
        def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return {**super()._get_result_meta(*args, **kwargs), "mine": True}

    app = celery.Celery(set_as_current=False)
    backend = Own(app=app, url="redis://localhost:1/0")
    stamp = results.Stamp.now(backend)
    assert stamp.celerys
    outcome = results.Outcome(SimpleNamespace(id="job-1"), result={"scores": []})
    assert results.record(backend, outcome, outcome.result, stamp)["mine"] is True
