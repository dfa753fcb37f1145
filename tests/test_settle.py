"""The settler's gathering of forward batches (worker/settle.py): pure, on a queue."""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import Any

from rerankq.worker.settle import gather


def inbox(*groups: Sequence[Any] | None) -> queue.SimpleQueue[Any]:
    box: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for group in groups:
        box.put(group)
    return box


def test_batches_waiting_are_settled_together_in_order() -> None:
    box = inbox(["a", "b"], ["c"], ["d", "e"])
    assert gather(box) == ["a", "b", "c", "d", "e"]
    assert box.empty()


def test_a_gathering_stops_at_its_limit_and_leaves_the_rest() -> None:
    box = inbox(["a", "b"], ["c", "d"], ["e"])
    assert gather(box, limit=3) == ["a", "b", "c", "d"]  # whole batches: the one that crosses the limit is taken
    assert gather(box, limit=3) == ["e"]


def test_a_stop_behind_batches_settles_them_first() -> None:
    box = inbox(["a"], ["b"], None)
    assert gather(box) == ["a", "b"]
    assert gather(box) is None
