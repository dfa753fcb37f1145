"""Scheduling policy (worker/batching.py): which jobs join the window, which pairs form the next forward
batch, how large it may be. Pure logic."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from rerankq.tasks.lanes import BULK, INTERACTIVE
from rerankq.worker.batching import (
    AGE_EVERY,
    BULK_EVERY,
    KEEP,
    MAX_BUSY,
    OUTLIERS_SKIPPED,
    SWEEP_AGE_EVERY,
    Budget,
    Pace,
    Turns,
    admit,
    budgets,
    next_batch,
    target_tokens,
)


@dataclass(eq=False)
class W:
    costs: list[int]
    lane: str = INTERACTIVE
    left: list[int] = field(default_factory=list)
    left_tokens: int = 0

    def __post_init__(self) -> None:
        self.left = sorted(range(len(self.costs)), key=lambda i: -self.costs[i])
        self.left_tokens = sum(self.costs)

    @property
    def tokens(self) -> int:
        return sum(self.costs)

    def take(self, indices: list[int]) -> None:
        self.left = [i for i in self.left if i not in indices]
        self.left_tokens -= sum(self.costs[i] for i in indices)


def padded(batch: list[tuple[W, int]]) -> int:
    return len(batch) * max(w.costs[i] for w, i in batch)


def limit(tokens: int, sweep: bool = False) -> dict[str, Budget]:
    """The same budget for both lanes."""
    return {INTERACTIVE: Budget(tokens, sweep), BULK: Budget(tokens, sweep)}


def drain(window: list[W], tokens: int, sweep: bool = False) -> list[list[tuple[W, int]]]:
    """Run batches until every pair is scored, as the runner does (a turn counter included)."""
    batches, count = [], 0
    while any(w.left for w in window):
        batch = next_batch(window, limit(tokens, sweep), Turns.after(count, 0))
        assert batch
        for work in {id(w): w for w, _ in batch}.values():
            work.take([i for w, i in batch if w is work])
        batches.append(batch)
        count += 1
    return batches


# -- admission ------------------------------------------------------------------------------------


def test_the_window_admits_jobs_in_arrival_order_until_its_token_budget_is_full() -> None:
    interactive = deque([W([40]), W([30]), W([50]), W([10])])
    assert [w.tokens for w in admit(interactive, deque(), [], max_tokens=100, max_jobs=10)] == [40, 30]
    assert [w.tokens for w in interactive] == [50, 10]


def test_a_job_larger_than_the_window_is_admitted_alone_rather_than_never() -> None:
    interactive = deque([W([500]), W([10])])
    assert [w.tokens for w in admit(interactive, deque(), [], 100, 10)] == [500]
    assert admit(interactive, deque(), [W([500])], 100, 10) == []


def test_scored_pairs_make_room_in_the_window() -> None:
    running = W([60, 30])
    interactive = deque([W([50])])
    assert admit(interactive, deque(), [running], 100, 10) == []
    running.take([0])
    assert [w.tokens for w in admit(interactive, deque(), [running], 100, 10)] == [50]


def test_bulk_jobs_fill_what_the_window_leaves_and_never_keep_interactive_ones_out() -> None:
    bulk_running = W([90], BULK)
    interactive, bulk = deque([W([60]), W([30])]), deque([W([5])])
    taken = admit(interactive, bulk, [bulk_running], max_tokens=100, max_jobs=10)
    assert [(w.lane, w.tokens) for w in taken] == [(INTERACTIVE, 60), (INTERACTIVE, 30)]
    assert list(bulk) and [w.tokens for w in admit(deque(), bulk, [], 100, 10)] == [5]


def test_each_lane_gets_a_job_into_a_window_that_has_none_of_its_own() -> None:
    interactive, bulk = deque([W([150]), W([10])]), deque([W([30], BULK), W([1], BULK)])
    taken = admit(interactive, bulk, [], max_tokens=100, max_jobs=10)
    assert [(w.lane, w.tokens) for w in taken] == [(INTERACTIVE, 150), (BULK, 30)]


def test_the_window_holds_at_most_max_jobs_per_lane_and_bulk_counts_both() -> None:
    interactive, bulk = deque(W([1]) for _ in range(7)), deque(W([1], BULK) for _ in range(7))
    taken = admit(interactive, bulk, [], max_tokens=100, max_jobs=3)
    assert [w.lane for w in taken] == [INTERACTIVE] * 3 + [BULK]


# -- forward batches ------------------------------------------------------------------------------


def test_every_pair_is_scored_once_in_batches_within_the_padded_budget() -> None:
    rng = random.Random(5)
    window = [W([rng.randint(1, 90) for _ in range(rng.randint(1, 12))], rng.choice([INTERACTIVE, BULK]))
              for _ in range(20)]
    window.append(W([300, 4]))  # a pair over the budget gets a batch of its own
    for sweep in (False, True):
        fresh = [W(list(w.costs), w.lane) for w in window]
        batches = drain(fresh, 200, sweep)
        seen = [(id(w), i) for batch in batches for w, i in batch]
        assert sorted(seen) == sorted((id(w), i) for w in fresh for i in range(len(w.costs)))
        for batch in batches:
            assert padded(batch) <= 200 or len(batch) == 1


def sorted_chunk_padded(jobs: list[list[int]], tokens: int) -> int:
    """What the chunk runner padded for one chunk: its pairs sorted by length, cut into batches of ``tokens``."""
    pairs = sorted((c for job in jobs for c in job), reverse=True)
    padding, start = 0, 0
    while start < len(pairs):
        size = max(1, tokens // pairs[start])
        padding += min(size, len(pairs) - start) * pairs[start]
        start += size
    return padding


def test_a_saturated_worker_sweeps_by_length_wasting_as_little_padding_as_a_sorted_chunk() -> None:
    rng = random.Random(1)
    costs = [[rng.randint(25, 135) for _ in range(10)] for _ in range(16)]
    chunk_padded = sorted_chunk_padded(costs, 2048)
    sweep = sum(padded(b) for b in drain([W(job) for job in costs], 2048, sweep=True))
    least_left_first = sum(padded(b) for b in drain([W(job) for job in costs], 2048))
    assert sweep <= 1.03 * chunk_padded < least_left_first


def sorted_chunks_padded(jobs: list[list[int]], tokens: int, window_tokens: int, window_jobs: int) -> int:
    """What the chunk runner padded: chunks of the window's size in arrival order, each sorted by length."""
    padding, ready = 0, deque(jobs)
    while ready:
        chunk = [ready.popleft()]
        used = sum(chunk[0])
        while ready and len(chunk) < window_jobs and used + sum(ready[0]) <= window_tokens:
            used += sum(ready[0])
            chunk.append(ready.popleft())
        padding += sorted_chunk_padded(chunk, tokens)
    return padding


def test_a_window_that_refills_from_a_backlog_pads_no_more_than_sorted_chunks() -> None:
    # Saturated, the window takes a new job whenever pairs are scored: long pairs keep coming in, and a
    # sweep that always started at the longest padded each batch down to the short pairs left behind.
    rng = random.Random(7)
    jobs = [[rng.randint(25, 135) for _ in range(10)] for _ in range(300)]
    ready, batches, padding = deque(W(job) for job in jobs), 0, 0
    window: list[W] = []
    while ready or window:
        window += admit(ready, deque(), window, 16384, 64)
        batch = next_batch(window, budgets(8192, None, {INTERACTIVE: bool(ready)}), Turns.after(batches, 0))
        padding += padded(batch)
        for work in {id(w): w for w, _ in batch}.values():
            work.take([i for w, i in batch if w is work])
        window = [w for w in window if w.left]
        batches += 1
    assert padding <= sorted_chunks_padded(jobs, 8192, 16384, 64)


def test_away_from_a_sweep_an_anchors_short_pairs_wait_for_a_batch_of_their_length() -> None:
    anchor, other = W([100, 90, 30, 20]), W([100] * 10)
    other.take(other.left[:1])  # started: no pair of it joins as a newcomer would
    first = next_batch([anchor, other], limit(1000))
    assert {anchor.costs[i] for w, i in first if w is anchor} == {100, 90}  # 30 and 20 are under half of 100
    for work in (anchor, other):
        work.take([i for w, i in first if w is work])
    assert {anchor.costs[i] for w, i in next_batch([anchor, other], limit(1000)) if w is anchor} == {30, 20}


def test_batches_away_from_a_sweep_pad_nearly_as_little_as_a_sorted_chunk() -> None:
    rng = random.Random(3)
    costs = [[rng.randint(8, 160) for _ in range(rng.randint(1, 30))] for _ in range(30)]
    one_chunk = W([cost for job in costs for cost in job])  # a sorted chunk: one job swept by length
    chunk = sum(padded(b) for b in drain([one_chunk], 2048, sweep=True))
    calm = sum(padded(b) for b in drain([W(job) for job in costs], 2048))
    assert calm <= 1.1 * chunk  # every job's pairs padded to its longest: 1.21x here


def test_the_job_with_the_least_work_left_is_finished_first() -> None:
    big, small = W([50] * 20), W([50, 50])
    batch = next_batch([big, small], limit(200))
    assert [w for w, _ in batch[:2]] == [small, small]


def test_a_job_that_arrives_joins_the_next_batch_ahead_of_a_large_job_in_progress() -> None:
    long_job = W([40] * 100)
    long_job.take(long_job.left[:30])
    newcomer = W([40] * 3)
    batch = next_batch([long_job, newcomer], limit(400))
    assert {i for w, i in batch if w is newcomer} == {0, 1, 2}
    assert padded(batch) <= 400


def test_jobs_not_started_join_the_next_batch_even_when_the_job_in_progress_could_fill_it() -> None:
    running = W([40] * 10)
    running.take(running.left[:1])
    first, second = W([40] * 20), W([50, 30] * 8)
    batch = next_batch([running, first, second], limit(400))
    assert [w for w, _ in batch] == [running] * 8 + [first, second]
    assert second.costs[batch[-1][1]] == 30  # its longest pair that costs the batch no extra padding
    assert padded(batch) <= 400


def test_a_job_not_started_whose_pairs_are_all_longer_widens_the_batch_within_its_limit() -> None:
    running, newcomer = W([10] * 6), W([100, 80])
    running.take(running.left[:1])
    batch = next_batch([running, newcomer], limit(350))
    assert [w.costs[i] for w, i in batch] == [10, 10, 10, 80]  # its shortest pair; 4 x 80 fits, 5 would not
    assert next_batch([running, W([500])], limit(350)) == [(running, i) for i in running.left]  # never over


def test_interactive_jobs_not_started_join_a_bulk_batch_too() -> None:
    bulk, started, newcomer = W([30] * 10, BULK), W([30] * 10), W([30] * 3)
    started.take(started.left[:1])
    batch = next_batch([bulk, started, newcomer], limit(150), turns=Turns.after(0, BULK_EVERY - 1))
    assert [w for w, _ in batch] == [bulk] * 4 + [newcomer]


def test_a_saturated_worker_sweeps_without_a_pair_for_each_job_not_started() -> None:
    jobs = [W([100, 20]), W([90, 10]), W([80, 5])]
    batch = next_batch(jobs, limit(200, sweep=True))
    assert [w.costs[i] for w, i in batch] == [100, 90]


def test_every_other_batch_anchors_the_oldest_job_so_a_large_one_is_never_starved() -> None:
    old, small = W([100] * 10), W([10] * 2)
    assert next_batch([old, small], limit(100))[0][0] is small
    turns = Turns.after(AGE_EVERY - 1, 0)
    assert turns.oldest and next_batch([old, small], limit(100), turns=turns)[0][0] is old


def test_a_sweep_anchors_the_oldest_job_less_often_its_wait_being_the_backlogs() -> None:
    old, short = W([100] * 2 + [40] * 8), W([40] * 10)
    old.take(old.left[:1])
    assert SWEEP_AGE_EVERY > AGE_EVERY
    for batches in range(SWEEP_AGE_EVERY):
        batch = next_batch([old, short], limit(400, sweep=True), turns=Turns.after(batches, 0))
        assert (old.costs[batch[0][1]] == 100) == (batches == SWEEP_AGE_EVERY - 1)  # else the 40s: no padding


def test_interactive_pairs_go_ahead_of_bulk_pairs_and_bulk_fills_the_room_left() -> None:
    bulk, web = W([30] * 10, BULK), W([30] * 2)
    batch = next_batch([bulk, web], limit(150))
    assert [w.lane for w, _ in batch] == [INTERACTIVE] * 2 + [BULK] * 3


def test_bulk_work_gets_a_batch_of_its_own_every_so_often_under_a_stream_of_interactive_work() -> None:
    bulk, web = W([30] * 10, BULK), W([30] * 10)
    web.take(web.left[:1])  # started: a job that is not would join the bulk batch (below)
    assert all(w is web for w, _ in next_batch([bulk, web], limit(150)))
    turns = Turns.after(0, BULK_EVERY - 1)
    assert turns.bulk and all(w is bulk for w, _ in next_batch([bulk, web], limit(150), turns=turns))


@pytest.mark.parametrize("backlog", [False, True], ids=["calm", "sweeping"])
@pytest.mark.parametrize("first_batch", range(BULK_EVERY))
def test_a_large_bulk_job_beside_web_traffic_and_smaller_bulk_jobs_finishes_whenever_it_arrives(
        first_batch: int, backlog: bool) -> None:
    # Its pairs never fit as filler beside the web jobs' short ones, and the smaller bulk jobs always have
    # less work left: only a bulk turn that anchors it moves it. Such turns once fell on every 8th batch and
    # aging on every 2nd, so whether any bulk turn aged depended on the batch count when it came.
    large = W([400] * 32, BULK)
    window = [large, W([400] * 4, BULK), W([40] * 10)]
    budget = budgets(2048, 2048, {BULK: backlog})
    batches, without_bulk = first_batch, 0
    for _ in range(20 * BULK_EVERY):
        batch = next_batch(window, budget, Turns.after(batches, without_bulk))
        for work in {id(w): w for w, _ in batch}.values():
            work.take([i for w, i in batch if w is work])
        batches += 1
        without_bulk = 0 if any(w.lane == BULK for w, _ in batch) else without_bulk + 1
        if not large.left:
            return
        for work in [w for w in window if not w.left]:  # a finished job's place taken by one like it
            window[window.index(work)] = W(list(work.costs), work.lane)
    pytest.fail(f"the large bulk job still has {len(large.left)} of its 32 pairs after {20 * BULK_EVERY} batches")


def test_shorter_pairs_ride_along_and_room_left_takes_the_shortest_longer_ones() -> None:
    anchor, shorter, longer = W([20, 10]), W([15, 5, 18, 1]), W([50, 70, 200, 1])
    shorter.take([3])
    longer.take([3])  # both started, so neither joins as a job not started yet does
    batch = next_batch([longer, shorter, anchor], limit(300))
    assert [(w.costs[i]) for w, i in batch] == [20, 10, 18, 15, 5, 50]  # 6 x 50; 7 x 70 would not fit


def test_an_empty_window_gives_no_batch() -> None:
    assert next_batch([], limit(100)) == []
    done = W([5])
    done.take([0])
    assert next_batch([done], limit(100)) == []


# -- batch size -----------------------------------------------------------------------------------


def test_batches_keep_to_the_time_target_unless_their_lane_has_a_backlog() -> None:
    calm = budgets(8192, 1500, {INTERACTIVE: False, BULK: False})
    assert calm == {INTERACTIVE: Budget(1500), BULK: Budget(1500)}
    assert budgets(8192, 1500, {INTERACTIVE: True, BULK: False})[INTERACTIVE] == Budget(8192, sweep=True)
    assert budgets(8192, 20000, {})[INTERACTIVE] == Budget(8192)
    assert budgets(8192, None, {})[BULK] == Budget(8192)


def test_a_bulk_backlog_runs_full_batches_while_interactive_batches_keep_to_the_target() -> None:
    budget = budgets(8192, 1500, {INTERACTIVE: False, BULK: True})
    assert budget == {INTERACTIVE: Budget(1500), BULK: Budget(8192, sweep=True)}
    web, bulk = W([30] * 2), W([30] * 300, BULK)
    assert padded(next_batch([bulk, web], budget)) <= 1500  # bulk pairs fill the interactive batch to 1500
    assert padded(next_batch([bulk], budget)) == 8190  # then full bulk batches


def test_beside_web_traffic_a_bulk_backlog_runs_the_smallest_batches_that_keep_most_of_its_throughput() -> None:
    pace = Pace()
    for tokens in (8192, 2000, 5000) * 20:
        pace.add(0.004 + 10e-6 * tokens, tokens)
    keeping = pace.keeping(0.95, 8192)
    assert keeping is not None

    def efficiency(tokens: int) -> float:
        return 10e-6 * tokens / (0.004 + 10e-6 * tokens)

    assert efficiency(keeping) >= 0.95 * efficiency(8192) > efficiency(keeping - 10)
    budget = budgets(8192, 1500, {BULK: True}, bulk_beside_web=keeping)
    assert budget[BULK] == Budget(keeping, sweep=True) and budget[INTERACTIVE] == Budget(1500)


def test_the_pace_sizes_a_batch_that_takes_the_target_including_its_fixed_cost() -> None:
    pace = Pace()
    assert pace.tokens_for(0.025, 8192) is None
    fixed_s, per_token_s = 0.004, 10e-6
    rng = random.Random(2)
    tokens = 8192
    for _ in range(200):  # the runner's loop: batches of what the window holds, at most the target's size
        pace.add(fixed_s + per_token_s * tokens, tokens)
        tokens = min(pace.tokens_for(0.025, 8192) or 8192, rng.randint(200, 8192))
    fit = pace.fit()
    assert fit is not None and abs(fit[0] - fixed_s) < 1e-4 and abs(fit[1] - per_token_s) < 1e-7
    assert pace.tokens_for(0.025, 8192) == pytest.approx(2100, abs=20)
    assert pace.tokens_for(0, 8192) is None


def test_a_device_near_saturation_runs_batches_of_twice_the_target() -> None:
    assert target_tokens(1100, busy=0.5) == target_tokens(1100, busy=MAX_BUSY) == 1100
    assert target_tokens(1100, busy=MAX_BUSY + 0.01) == 2200
    assert target_tokens(None, busy=1.0) is None  # no target: the full budget already


def test_a_device_busy_with_bulk_work_keeps_web_batches_to_the_target() -> None:
    assert target_tokens(1100, busy=1.0, bulk_waits=True) == 1100


def test_a_cost_that_is_all_fixed_keeps_batches_near_the_full_budget() -> None:
    pace = Pace()
    pace.add(0.1, 224)  # 100 ms per call, whatever its size: the first shrinks the next...
    assert pace.tokens_for(0.025, 8192) == 56
    for size in (56, 14, 224) * 10:
        pace.add(0.1, size)
    tokens = pace.tokens_for(0.025, 8192)  # ...until the fit sees it is all fixed cost
    assert tokens is not None and tokens >= int(KEEP * 8192)


def test_a_fixed_cost_over_half_the_target_runs_the_smallest_batches_that_keep_most_throughput() -> None:
    # MiniLM on two CPU cores: 9.5 ms per call and 0.18 ms per padded token. No batch takes 15 ms; a full
    # one of 2048 tokens takes 375 ms, which a job that arrives waits for.
    pace = Pace()
    for size in (2048, 300, 900) * 20:
        pace.add(0.0095 + 0.178e-3 * size, size)
    tokens = pace.tokens_for(0.015, 2048)
    assert tokens is not None and tokens == pace.keeping(KEEP, 2048)
    assert 0.0095 + 0.178e-3 * tokens < 0.4 * (0.0095 + 0.178e-3 * 2048)


def test_with_one_batch_size_seen_the_pace_counts_all_of_its_time_per_token() -> None:
    pace = Pace()
    pace.add(0.05, 1000)
    assert pace.fit() == pytest.approx((0.0, 0.05 / 1000))
    assert pace.tokens_for(0.025, 8192) == 500


def test_a_batch_far_slower_than_the_fit_predicts_is_not_learned_from_unless_slowness_persists() -> None:
    pace = Pace()
    for size in (2000, 500, 1000) * 5:
        pace.add(0.002 + 1e-5 * size, size)
    settled = pace.tokens_for(0.015, 8192)
    assert settled is not None
    pace.add(2.0, 1000)  # one pause (a cold kernel, a collection): 167x the prediction
    assert pace.tokens_for(0.015, 8192) == settled
    for _ in range(OUTLIERS_SKIPPED):  # the model is slower now: after a few in a row, it is learned
        pace.add(1.0, 1000)
    assert (pace.tokens_for(0.015, 8192) or 0) < settled


def test_the_warm_up_runs_each_of_its_shapes_through_the_model() -> None:
    from rerankq.worker.model import WARM_UP, warm_up
    from rerankq.worker.simulated import SimulatedRanker

    calls: list[int] = []

    class Cold(SimulatedRanker):
        kind = "cross-encoder"  # a simulated ranker has no cold start, and is not warmed up

        def score(self, pairs: list[tuple[str, str]]) -> list[float]:  # type: ignore[override]
            calls.append(len(pairs))
            return super().score(pairs)

    warm_up(Cold("latency_ms=0,token_us=0"))
    assert calls == [pairs for pairs, _ in WARM_UP]


def test_a_gpus_batch_budget_is_half_its_free_memory_at_the_warm_ups_cost_per_token_within_bounds() -> None:
    from rerankq.worker.batching import MAX_GPU_TOKENS, memory_budget

    mib = 1 << 20
    assert memory_budget(8 * 1024 * mib, 0.5 * mib, 512) == 8192  # 4 GiB for batches at 0.5 MiB a token
    assert memory_budget(8 * 1024 * mib, 0.3 * mib, 512) == 13312  # rounded down to whole 1,024s
    assert memory_budget(80 * 1024 * mib, 0.1 * mib, 512) == MAX_GPU_TOKENS
    assert memory_budget(100 * mib, 1 * mib, 512) == 512  # never under one longest pair


def test_after_out_of_memory_the_budget_is_half_the_batch_that_ran_out() -> None:
    from rerankq.worker.batching import after_out_of_memory

    assert after_out_of_memory(8192, None, 512) == 8192
    assert after_out_of_memory(8192, 6000, 512) == 3000
    assert after_out_of_memory(2048, 6000, 512) == 2048  # ran out far above the budget: no lower than it was
    assert after_out_of_memory(8192, 600, 512) == 512
