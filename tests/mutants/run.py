"""Mutants of rerankq's core invariants: each breaks one on purpose in a copy of the tree, and the tests named
beside it must fail. A mutant they let through (a *survivor*) means a test that cannot fail for the property
its name claims.

    python -m tests.mutants.run            # every mutant
    python -m tests.mutants.run ack reclaim  # those whose name starts so

Not in CI (each runs integration tests against real workers, a few minutes in all): run it before resolving
an issue that touches acks, receive, reclaim, routing or serve, and record the result in RELIABILITY.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    #: What it breaks, in words.
    breaks: str
    path: str
    #: Each piece of code replaced (it must occur exactly once) and what replaces it.
    changes: tuple[tuple[str, str], ...]
    #: The tests that must fail, every one (pytest node ids, from the repository's root).
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("ack-never-in-redis", "acks never reach Redis: every job stays unacked, to be served again",
           "worker/upstream/acks.py", (("    client.eval(memory.script(client, _ACK), 2, *keys, *args)",
                                        "    pass"),),
           ("tests/faults/test_worker_faults.py::test_a_worker_killed_mid_chunk_has_its_jobs_redelivered_and_completed",
            "tests/test_lanes.py::test_a_worker_killed_holding_both_lanes_loses_nothing_and_scores_each_job_once")),
    Mutant("ack-any-delivery", "an ack removes whatever record its tag has, a later delivery's of the same job too",
           "worker/upstream/acks.py", (("  local own = from == ''", "  local own = true"),),
           ("tests/test_transport.py::test_an_ack_removes_only_its_own_deliverys_record_not_a_later_one_of_the_same_"
            "job",)),
    Mutant("late-ack-takes-new-delivery", "a late ack of a job received again on the channel acks the new delivery",
           "worker/upstream/acks.py",
           (("        return self.channel.qos._delivered.get(self.delivery_tag, self) is not self",
             "        return False"),),
           ("tests/test_transport.py::test_a_late_ack_of_a_job_received_again_on_the_same_channel_leaves_the_new_"
            "delivery_alone",)),
    Mutant("ack-not-sent-again", "a batch's ack that timed out is left to each job's ack on the event loop",
           "worker/settle.py", (("ACK_PATIENCE_S = 10.0", "ACK_PATIENCE_S = 0.0"),),
           ("tests/faults/test_hung_redis.py::test_acks_whose_connection_goes_silent_are_sent_again_on_a_new_one_"
            "and_no_job_is_scored_twice",)),
    Mutant("demotion-kept", "a connection to a master demoted in place stays on it, refused at every write",
           "tasks/primary.py", (("            if not demoted(error):\n                raise",
                                 "            if True:\n                raise"),),
           ("tests/faults/test_demoted.py::test_a_master_demoted_behind_its_address_loses_no_job_and_restarts_no_"
            "process",)),
    Mutant("publisher-stays-on-demoted", "a connection opened before a demotion was met is kept, on the old server",
           "tasks/primary.py", (("        if known and check_health and self._generation != seen:",
                                 "        if False:"),),
           ("tests/test_primary.py::test_once_a_demotion_is_met_every_connection_opened_before_it_leaves_its_server",)),
    Mutant("refusal-sent-again", "a pipeline refused part-way by a demoted server is sent again whole",
           "tasks/primary.py", (("supported_errors=(OpenedBefore,)", "supported_errors=(Demoted,)"),),
           ("tests/test_primary.py::test_a_write_to_a_replica_drops_the_connection_as_lost_and_reads_go_on",)),
    Mutant("reclaim-does-nothing", "the watchdog never puts a dead worker's jobs back",
           "worker/reclaim.py", (("    orphans = [tag for tag in candidates if tag not in held]",
                                  "    orphans: list[str] = []"),),
           ("tests/faults/test_worker_faults.py::test_with_a_watchdog_a_killed_workers_jobs_are_back_in_seconds_not_"
            "after_the_visibility_timeout",)),
    Mutant("requeue-forgets-task-ready", "a job put back stays in Celery's worker state, one entry per round",
           "worker/settle.py", (("                             pending.request.id)\n"
                                 "        worker_state.task_ready(pending.request)",
                                 "                             pending.request.id)"),),
           ("tests/faults/test_backend_faults.py",)),
    Mutant("router-ignores-state", "producers send every job to the GPU queue whatever the watchdog says",
           "tasks/router.py", (("        if state is None or state.route != SHED:", "        if True:"),),
           ("tests/test_routing.py::test_a_backlog_sheds_new_jobs_to_the_fast_ranker_until_it_drains",)),
    Mutant("lanes-flipped", "a worker takes bulk jobs before interactive ones",
           "worker/upstream/transport.py", (("key=lambda queue: (lanes.lane_of(queue) == lanes.BULK, queue))",
                                             "key=lambda queue: (lanes.lane_of(queue) != lanes.BULK, queue))"),),
           ("tests/test_lanes.py::test_an_interactive_job_sent_while_a_bulk_run_saturates_a_worker_joins_the_next_"
            "forward_batch",)),
    Mutant("clock-never-resynced", "the offset from Redis's clock is measured once, never again",
           "tasks/clock.py", (("    if not force and time.monotonic() - _synced_at < SYNC_S:",
                               "    if _synced_at and not force:"),),
           ("tests/test_clock.py::test_the_offset_is_measured_again_only_after_the_sync_period",)),
    Mutant("serve-swaps-answers", "two requests in flight together get each other's scores",
           "server/app.py", (("ERRORS: dict", "swapped: list[str] = []\nERRORS: dict"),
                             ("        result = await arerank(query, texts,",
                              "        swapped.append(query)  # a request takes the query of the one before it\n"
                              "        query = swapped.pop(0) if len(swapped) > 1 else query\n"
                              "        result = await arerank(query, texts,")),
           ("tests/test_serve.py::test_concurrent_requests_all_get_their_own_scores",)),
    Mutant("former-master-kept", "nothing asks the sentinels again: connections stay on the old master",
           "tasks/sentinel.py",
           (('threading.Thread(target=self._loop, name="rerankq-sentinels", daemon=True).start()', "pass"),),
           ("tests/faults/test_sentinel.py::test_a_planned_failover_moves_every_connection_to_the_new_master_and_"
            "scores_each_job_once",)),
    Mutant("sentinels-asked-inline", "each connection asks the sentinels before a command, once a second",
           "tasks/sentinel.py", (("            master = self.connection_pool.master_address",
                                  "            master = self.connection_pool.get_master_address()"),),
           ("tests/faults/test_sentinel.py::test_sentinels_that_hang_delay_no_command",)),
    Mutant("heartbeat-unbounded", "a heartbeat retries for as long as Redis hangs",
           "worker/upstream/patches.py",
           (('original_send(type, **{**fields, "retry_policy": HEARTBEAT_RETRY})', "original_send(type, **fields)"),),
           ("tests/faults/test_hung_redis.py::test_a_heartbeat_sent_while_redis_hangs_gives_up_after_its_bounded_"
            "retries",)),
    Mutant("next-batch-not-ahead", "the next forward batch is chosen and padded only after the one running is read",
           "worker/runner.py",
           (("                self._ahead = self._choose()\n                self._model.land(flight)",
             "                self._model.land(flight)"),),
           ("tests/test_scheduling.py::test_the_next_batch_is_prepared_while_one_runs_on_the_device",)),
    Mutant("retokenised-per-batch", "the runner tokenises each forward batch's pairs again",
           "worker/torch_rankers.py",
           (("    def prepare(self, rows: Sequence[Row]) -> Any:\n        return self._on_device(",
             "    def prepare(self, rows: Sequence[Row]) -> Any:\n"
             "        self._tokens(['q'] * len(rows), ['d'] * len(rows))\n        return self._on_device("),),
           ("tests/test_rankers.py::test_each_pair_is_tokenised_once_by_the_preparer_and_scored_from_those_ids",)),
    Mutant("oom-retry-inside-except", "a batch that ran out of memory is retried beside the failed forward's memory",
           "worker/model.py", (("            failure = self._failure(exc)\n        if failure is not None:  # outside",
                                "            failure = self._failure(exc)\n            self._isolate(live, failure)\n"
                                "            return None\n        if failure is not None:  # outside"),),
           ("tests/test_rankers.py::test_a_batch_that_ran_out_of_memory_is_retried_once_the_failed_forwards_memory_is_"
            "free",)),
    Mutant("oom-budget-kept", "after out of memory the budget stays where it ran out",
           "worker/batching.py",
           (("    return max(longest, min(max_tokens, failed_at // 2))", "    return max_tokens"),),
           ("tests/test_scheduling.py::test_after_out_of_memory_batches_stay_under_the_size_that_ran_out",)),
    Mutant("malformed-kept", "a message that is no rerank job goes back to its queue instead of being dropped",
           "worker/upstream/strategy.py", (("        message.ack()\n", "        message.reject(requeue=True)\n"),),
           ("tests/faults/test_malformed.py",)),
)


def copy_tree(into: Path) -> None:
    """The working tree as it is (committed or not), without build outputs and virtual environments."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        source, target = ROOT / name, into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)


def run(mutant: Mutant) -> tuple[bool, str]:
    """Apply ``mutant`` to a copy of the tree and run its tests there; returns (killed: every test failed,
    pytest's summary line)."""
    with tempfile.TemporaryDirectory(prefix=f"rerankq-mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        target = tree / mutant.path
        code = target.read_text()
        for old, new in mutant.changes:
            if code.count(old) != 1:
                raise SystemExit(f"{mutant.name}: {old!r} is not in {mutant.path} exactly once: update the mutant")
            code = code.replace(old, new)
        target.write_text(code)
        # This copy's rerankq first on every process's path, the tests' subprocesses too (PYTHONSAFEPATH: not the
        # working directory ahead of it).
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rN",
                               *mutant.tests], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
        counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (failed|passed|errors?)", summary)}
        return counts.get("passed", 0) == 0 and counts.get("failed", 0) > 0, summary


def main(prefixes: list[str]) -> int:
    chosen = [m for m in MUTANTS if not prefixes or any(m.name.startswith(p) for p in prefixes)]
    survivors = []
    print("| mutant | breaks | tests | result |")
    print("| --- | --- | --- | --- |")
    for mutant in chosen:
        killed, tail = run(mutant)
        if not killed:
            survivors.append(mutant.name)
        result = f"killed: {tail.strip('= ')}" if killed else f"**survived**: {tail.strip('= ')}"
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in mutant.tests)
        print(f"| {mutant.name} | {mutant.breaks} | {tests} | {result} |", flush=True)
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} killed; survivors: {', '.join(survivors) or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
