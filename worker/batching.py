"""Pure scheduling policy: which received jobs the runner works on, and which of their pairs form the next
forward batch.

The runner schedules pairs, not chunks. Its *window* holds the jobs in progress (bounded in unscored
tokens and jobs); each forward batch is chosen afresh from the window, so a job that arrives while others
are being scored joins the next forward batch, and a job's result is written as soon as its own pairs are
done. A batch is built around an *anchor* job:

* the anchor is the interactive job with the least work left (it finishes soonest: what minimises the
  mean wait), except every ``AGE_EVERY``-th batch, which anchors the oldest, so a large job is never
  starved by a stream of small ones; bulk jobs anchor only when no interactive job is in the window, or
  on a *bulk turn* (see ``Turns``), so bulk work slows down but never stops under web traffic. A bulk
  turn anchors the oldest bulk job: its pairs are the ones that find no room beside web traffic (aging on
  the batch count alone fell on every bulk turn or on none, by the count when the job came);
* every interactive job not started yet joins the batch with one pair (its longest of at most the
  anchor's longest, else its shortest), so a job that arrives waits for the batch running when it came
  and no more: the anchor's pairs decide when a job *finishes*, these when it *starts*;
* the batch is padded to its longest pair ``L``: the anchor's pairs down to ``LEAD_SHARE`` of its longest
  and those of the jobs joining, then the longest pairs of at most ``L`` tokens from the other jobs,
  interactive before bulk (they cost no extra padding, and taking the longest leaves the short ones to
  pack together later); if room is left, the shortest longer pairs widen the batch while it stays in
  budget.

A saturated lane (jobs waiting that the window cannot take) sweeps instead: full batches of pairs of like
length, with no pair per job not started (which would only add padding where the wait is the backlog's).
Its batch starts at the length whose full batch wastes the least padding (``_sweep_start``), not always at
the window's longest pair: the window refills as it drains, with long pairs coming in all the time, so
always taking the longest padded a batch from near the longest length there is down to the short pairs the
window had kept (6% more padding than sorted chunks on the simulated GPU's workload, BENCHMARKS.md).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from rerankq.tasks.lanes import BULK, INTERACTIVE

#: A bulk backlog beside web traffic (an interactive job received within this many seconds), and every
#: batch of a model whose fixed cost per call is over half the time target (a CPU), run the smallest
#: batches that keep ``KEEP`` of a full batch's throughput (``Pace.keeping``), not full ones, so jobs that
#: arrive wait less behind them.
QUIET_S = 5.0
KEEP = 0.95
#: A device busier than this over the last ``BUSY_S`` seconds (``worker.stats.Busy``) runs batches of twice
#: the time target: near saturation, short batches' fixed costs would make the backlog the target is there
#: to avoid.
MAX_BUSY = 0.9
BUSY_S = 2.0
#: Away from a sweep, the anchor's pairs go in down to this share of its longest; shorter ones wait for a
#: batch of their own length (padding every pair of a job to its longest wasted a fifth of a CPU's work).
LEAD_SHARE = 0.5
#: Every this many batches the anchor is the oldest job rather than the one with the least work left:
#: half the batches finish the small jobs first (the median), half the old ones (the tail; with every
#: fourth batch, a CPU worker's p95 at 60% load was a third higher, BENCHMARKS.md). A sweep, whose wait
#: is its backlog's, ages every ``SWEEP_AGE_EVERY``-th batch: an old job's pairs, down to half its longest,
#: pad more than a sweep's like lengths.
AGE_EVERY = 2
SWEEP_AGE_EVERY = 4
#: With bulk jobs in the window, at least one batch in this many holds bulk pairs.
BULK_EVERY = 8


class Work(Protocol):
    """A job in the window, as the policy sees it."""

    @property
    def lane(self) -> str: ...

    @property
    def tokens(self) -> int: ...

    #: Tokens of each (query, doc) pair.
    costs: list[int]
    #: Indices of the pairs not scored yet, longest first.
    left: list[int]
    #: Tokens of those pairs.
    left_tokens: int


W = TypeVar("W", bound=Work)


def admit(interactive: deque[W], bulk: deque[W], window: Sequence[W], max_tokens: int, max_jobs: int) -> list[W]:
    """Pop the ready jobs that join the window, in arrival order per lane.

    Interactive jobs count only against each other, so a window full of bulk work never keeps one out;
    bulk jobs fill what the window's unscored tokens and job count leave. Each lane admits one job into an
    empty window of its own even when over the budget, so a job larger than the budget runs rather than
    never.
    """
    tokens = {INTERACTIVE: 0, BULK: 0}
    jobs = {INTERACTIVE: 0, BULK: 0}
    for work in window:
        tokens[work.lane] += work.left_tokens
        jobs[work.lane] += 1
    taken: list[W] = []
    while interactive and (not jobs[INTERACTIVE] or (
            jobs[INTERACTIVE] < max_jobs and tokens[INTERACTIVE] + interactive[0].tokens <= max_tokens)):
        tokens[INTERACTIVE] += interactive[0].tokens
        jobs[INTERACTIVE] += 1
        taken.append(interactive.popleft())
    while bulk and (not jobs[BULK] or (sum(jobs.values()) < max_jobs
                                       and sum(tokens.values()) + bulk[0].tokens <= max_tokens)):
        tokens[BULK] += bulk[0].tokens
        jobs[BULK] += 1
        taken.append(bulk.popleft())
    return taken


@dataclass(frozen=True)
class Turns:
    """Whose turn the next batch is, from the runner's batch count."""

    #: Anchor the oldest job of the lane rather than the one with the least work left (in a sweep:
    #: ``oldest_sweeping``).
    oldest: bool = False
    oldest_sweeping: bool = False
    #: Anchor the oldest bulk job even though interactive jobs are in the window.
    bulk: bool = False

    @classmethod
    def after(cls, batches: int, batches_without_bulk: int) -> Turns:
        return cls(oldest=batches % AGE_EVERY == AGE_EVERY - 1,
                   oldest_sweeping=batches % SWEEP_AGE_EVERY == SWEEP_AGE_EVERY - 1,
                   bulk=batches_without_bulk >= BULK_EVERY - 1)


@dataclass(frozen=True)
class Budget:
    """How large a forward batch anchored in a lane may be: its padded tokens (pairs x longest pair) at
    most ``tokens``; ``sweep`` (the lane has a backlog): the lane's longest pairs, for the least padding,
    as a whole chunk sorted by length would be."""

    tokens: int
    sweep: bool = False


def budgets(max_tokens: int, target_tokens: int | None, backlog: Mapping[str, bool],
            bulk_beside_web: int | None = None) -> dict[str, Budget]:
    """Each lane's budget. A batch keeps to the time target (``target_tokens``, from the measured pace), so
    that a job that arrives waits at most about one target for the batch running to end. A lane with jobs
    waiting that the window cannot take is saturated: smaller or less tightly packed batches would only add
    per-batch cost and slow its backlog down, so its batches take the full budget, except a bulk backlog
    beside web traffic, which takes ``bulk_beside_web`` (``Pace.keeping``: most of a full batch's
    throughput at a fraction of its time). Interactive batches, bulk pairs filling them included, keep to
    the target."""
    calm = max_tokens if target_tokens is None else max(1, min(max_tokens, target_tokens))
    full = {INTERACTIVE: max_tokens, BULK: max(calm, min(max_tokens, bulk_beside_web or max_tokens))}
    return {lane: Budget(full[lane] if backlog.get(lane) else calm, bool(backlog.get(lane)))
            for lane in (INTERACTIVE, BULK)}


def target_tokens(tokens: int | None, busy: float, bulk_waits: bool = False) -> int | None:
    """The padded tokens of a batch that keeps to the time target (``Pace.tokens_for``), or twice that while
    the device has been busier than ``MAX_BUSY`` with no bulk work in the window: at a target of 15 ms on the
    simulated GPU, a 10-doc job arrives every 15 ms at 80% load, and batches of one job each leave a quarter of
    the device to fixed costs (BENCHMARKS.md, "Queue wait against load"). Bulk work keeps a device busy with
    batches of its own size; doubling then only made each web job's batch, filled with bulk pairs, twice as long
    (web p95 beside a bulk run 157 ms with it, 131 without, medians of 3 runs: BENCHMARKS.md "lanes")."""
    return tokens if tokens is None or busy <= MAX_BUSY or bulk_waits else 2 * tokens


#: A GPU's forward batches take at most this share of the memory free after the warm-up, up to this many tokens.
MEMORY_SHARE = 0.5
MAX_GPU_TOKENS = 32768


def memory_budget(free_bytes: int, bytes_per_token: float, longest: int) -> int:
    """The padded tokens a GPU's forward batch may hold: ``MEMORY_SHARE`` of the free memory at the warm-up's cost
    per token (whole thousands of 1,024), between one pair of ``longest`` tokens and ``MAX_GPU_TOKENS``. A larger
    budget only serves backlogs (the batch-time target sizes batches otherwise); an underestimate is corrected by
    ``after_out_of_memory``."""
    fits = int(free_bytes * MEMORY_SHARE / bytes_per_token) // 1024 * 1024
    return max(longest, min(MAX_GPU_TOKENS, fits))


def after_out_of_memory(max_tokens: int, failed_at: int | None, longest: int) -> int:
    """The forward-batch budget once a batch of ``failed_at`` padded tokens (several pairs) ran out of memory:
    half of it, the size of the halves its retry ran, and never under one pair of ``longest`` tokens. The
    settings' budget is a latency choice, set before the worker saw its device's free memory."""
    if failed_at is None:
        return max_tokens
    return max(longest, min(max_tokens, failed_at // 2))


def next_batch(window: Sequence[W], budget: Mapping[str, Budget], turns: Turns = Turns()) -> list[tuple[W, int]]:
    """The next forward batch as (job, pair index) pairs, within the budget of its anchor's lane; ``window``
    in arrival order. A single pair over the budget gets a batch of its own; the oldest job's pairs lead
    every ``AGE_EVERY``-th batch (``SWEEP_AGE_EVERY``-th sweeping); interactive jobs not started yet join
    every batch while it has room, unless the interactive lane is saturated."""
    interactive = [w for w in window if w.left and w.lane == INTERACTIVE]
    bulk = [w for w in window if w.left and w.lane == BULK]
    bulk_turn = bool(bulk and interactive and turns.bulk)
    lane_jobs = bulk if bulk_turn or not interactive else interactive
    if not lane_jobs:
        return []
    limit, sweep = budget[lane_jobs[0].lane].tokens, budget[lane_jobs[0].lane].sweep
    oldest = bulk_turn or (turns.oldest_sweeping if sweep else turns.oldest)
    if oldest:
        anchor = lane_jobs[0]
    elif sweep:
        anchor, start = _sweep_start(lane_jobs, interactive + bulk, limit)
    else:
        anchor = min(lane_jobs, key=lambda w: w.left_tokens)
    if sweep and not oldest:
        lead = [start]
    else:
        lead = [i for i in anchor.left if anchor.costs[i] >= LEAD_SHARE * anchor.costs[anchor.left[0]]]
    longest = max(1, anchor.costs[lead[0]])
    openers: list[tuple[W, int]] = []
    if not budget[INTERACTIVE].sweep:  # a saturated lane's wait is its backlog's: no padding spent on it
        for work in interactive:
            if work is anchor or len(work.left) < len(work.costs):
                continue
            index = next((i for i in work.left if work.costs[i] <= longest), work.left[-1])
            width = max(longest, work.costs[index])
            if (len(openers) + 2) * width <= limit:
                openers.append((work, index))
                longest = width
    batch = [(anchor, index) for index in lead[:max(1, limit // longest - len(openers))]] + openers
    taken = set(batch)
    others = [(w.costs[i], w, i) for w in interactive + bulk for i in w.left if (w, i) not in taken]
    # Pairs no longer than the anchor's cost no extra padding: interactive first, then bulk, longest first.
    within = sorted((c for c in others if c[0] <= longest), key=lambda c: (c[1].lane == BULK, -c[0]))
    room = max(0, limit // longest - len(batch))
    batch.extend((work, index) for _, work, index in within[:room])
    if len(within) > room:
        return batch
    # Room left: widen the batch with the shortest longer pairs while it stays within the limit.
    for cost, work, index in sorted((c for c in others if c[0] > longest), key=lambda c: c[0]):
        if (len(batch) + 1) * cost > limit:
            break
        batch.append((work, index))
    return batch


def _sweep_start(lane_jobs: Sequence[W], window: Sequence[W], limit: int) -> tuple[W, int]:
    """The pair a sweep's batch starts at: of the lane's pair lengths, the one whose full batch (the longest
    window pairs of at most that length, as many as ``limit`` holds) has the most real tokens per padded
    one; the lane's longest pair where no length fills a batch."""
    negated = sorted(-w.costs[i] for w in window for i in w.left)  # longest first, for bisect
    before = [0, *itertools.accumulate(-c for c in negated)]
    best, chosen = -1.0, max(w.costs[w.left[0]] for w in lane_jobs)
    for length in sorted({w.costs[i] for w in lane_jobs for i in w.left}, reverse=True):
        first = bisect.bisect_left(negated, -length)  # the first pair of at most ``length``
        size = max(1, limit // max(1, length))
        if first + size > len(negated):
            break  # a shorter start needs more pairs and has fewer
        efficiency = (before[first + size] - before[first]) / (size * max(1, length))
        if efficiency > best:
            best, chosen = efficiency, length
    anchor = next(w for w in lane_jobs if any(w.costs[i] == chosen for i in w.left))
    return anchor, next(i for i in anchor.left if anchor.costs[i] == chosen)


#: A batch that took this many times the fitted prediction is not learned from (``Pace.add``): one cold CUDA
#: forward (0.5-3 s) made the next 138-198 batches one pair each in a replay on the CPU.
OUTLIER = 4.0
OUTLIERS_SKIPPED = 3
SETTLED = 10


class Pace:
    """The model's cost of a forward batch as ``fixed + per_token x padded tokens``, fitted to recent batches
    (exponentially weighted least squares), to size a batch that takes ``target_s``.

    Where the fixed cost alone is over half the target, no batch size meets it at a sensible cost (most of
    each call would be overhead): the batch is then the smallest that keeps most of a full batch's
    throughput (``keeping``) rather than shrink to nothing. On a CPU, MiniLM's 9 ms per call made that
    a full budget of 2048 tokens, 370 ms that a job arriving waited for; ``KEEP`` of its throughput is a
    third of that.
    """

    def __init__(self, weight: float = 0.05) -> None:
        self._weight = weight
        self._sums = [0.0] * 5  # weight, tokens, seconds, tokens^2, tokens x seconds
        self._skipped = self._learned = 0

    def add(self, seconds: float, padded_tokens: int) -> None:
        """Learn from one batch, unless it took over ``OUTLIER`` times what a fit of ``SETTLED`` batches or more
        predicts (a pause: a cold kernel, a collection, a swapped page), up to ``OUTLIERS_SKIPPED`` in a row:
        more is the model slower."""
        fit = self.fit()
        if fit is not None and self._learned >= SETTLED and self._skipped < OUTLIERS_SKIPPED and \
                seconds > OUTLIER * (fit[0] + fit[1] * padded_tokens):
            self._skipped += 1
            return
        self._skipped, self._learned = 0, self._learned + 1
        keep, x = 1 - self._weight, float(padded_tokens)
        for i, value in enumerate((1.0, x, seconds, x * x, x * seconds)):
            self._sums[i] = keep * self._sums[i] + self._weight * value

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per padded token), or None before any batch was measured."""
        n, x, y, xx, xy = self._sums
        if n <= 0 or x <= 0:
            return None
        mean_x, mean_y = x / n, y / n
        variance = xx / n - mean_x ** 2
        if variance > (0.05 * mean_x) ** 2:  # batches of different sizes: fit the line
            per_token = max(0.0, (xy / n - mean_x * mean_y) / variance)
            return max(0.0, mean_y - per_token * mean_x), per_token
        return 0.0, mean_y / mean_x  # one size seen so far: all of it per token

    def keeping(self, share: float, max_tokens: int) -> int | None:
        """The smallest batch that runs at ``share`` of the throughput of a ``max_tokens`` one (fixed cost
        amortised: efficiency ``per_token x T / (fixed + per_token x T)``); None before a fit."""
        fit = self.fit()
        if fit is None or fit[1] <= 0:
            return None
        fixed, per_token = fit
        full = per_token * max_tokens / (fixed + per_token * max_tokens)
        wanted = share * full
        return min(max_tokens, max(1, math.ceil(wanted * fixed / (per_token * (1 - wanted)))))

    def tokens_for(self, target_s: float, max_tokens: int) -> int | None:
        """Padded tokens a batch of ``target_s`` holds, or ``keeping(KEEP, max_tokens)`` where the fixed cost
        is over half the target; None (the full budget) with no target, or no measurement yet."""
        fit = self.fit()
        if target_s <= 0 or fit is None or fit[1] <= 0:
            return None
        fixed, per_token = fit
        if fixed > target_s / 2:
            return self.keeping(KEEP, max_tokens)
        return round((target_s - fixed) / per_token)

