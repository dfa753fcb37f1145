"""``rerankq submit jobs.jsonl -o scores.jsonl``: offline bulk reranking from a JSONL file.

Each input line is ``{"id", "query", "docs"[, "top_k", "long_docs", "model", "instruction"]}``. Each output
line is written and flushed as its result arrives: ``{"id", "scores", "top", "ranker", "model"}``, or
``{"id", "error"}`` for a job that failed. Lines that are not valid jobs (and repeated ids) go to the errors
file with their line number, and the run goes on. ``--resume`` skips the ids the output already holds.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rerankq.producer.bulk import submit_many
from rerankq.tasks.errors import BadJob, RerankError, UnknownModel
from rerankq.tasks.lanes import BULK
from rerankq.tasks.records import Job, Result

#: Seconds between progress lines when the output is not a terminal.
REPORT_EVERY_S = 10.0


@dataclass
class Summary:
    jobs: int = 0
    pairs: int = 0
    failed: int = 0
    bad_lines: int = 0
    skipped: int = 0
    rankers: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rankers = ", ".join(f"{n} {name}" for name, n in sorted(self.rankers.items())) or "none"
        return (f"{self.jobs} jobs ({self.failed} failed), {self.pairs} pairs in {elapsed:.1f}s = "
                f"{self.pairs / elapsed:.1f} pairs/s; served by: {rankers}; {self.bad_lines} bad input lines; "
                f"{self.skipped} already done (resume)")


def done_ids(output: Path) -> set[Any]:
    """Ids the output already holds. A last line cut short by a crash is removed (its job runs again)."""
    if not output.exists():
        return set()
    ids: set[Any] = set()
    with open(output, "r+b") as f:
        good = 0
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("cut short")
                ids.add(json.loads(raw)["id"])
            except (ValueError, KeyError, TypeError):
                break
            good += len(raw)
        f.truncate(good)
    return ids


def read_jobs(lines: IO[str], skip: set[Any], errors: IO[str], max_docs: int,
              summary: Summary, max_query_chars: int | None = None) -> Iterator[dict[str, Any]]:
    """The valid, new jobs of the input; bad lines (an unknown model's among them) and repeated ids are written
    to ``errors``."""
    from rerankq.celeryconfig import settings

    first_line: dict[Any, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        job_id: Any = None
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise BadJob(f"a line is a JSON object, got {type(data).__name__}")
            job_id = data.get("id")
            if isinstance(job_id, bool) or not isinstance(job_id, str | int):
                raise BadJob(f"'id' must be a string or an integer, got {job_id!r}")
            if job_id in first_line:
                raise BadJob(f"duplicate id {job_id!r} (first on line {first_line[job_id]}); this line is skipped")
            first_line[job_id] = number
            unknown = sorted(set(data) - {"id", "query", "docs", "top_k", "long_docs", "model", "instruction"})
            if unknown:
                raise BadJob(f"unknown field {unknown[0]!r}: a line has id, query, docs and optionally top_k, "
                             "long_docs, model and instruction")
            model = data.get("model")
            if model is not None:
                if not isinstance(model, str):
                    raise BadJob(f"model must be a served model's name, got {model!r}")
                settings.served.resolve(model)
            job = Job.from_call((), {k: v for k, v in data.items() if k not in ("id", "model")}, max_docs,
                                max_query_chars)
        except (ValueError, BadJob, UnknownModel) as exc:
            summary.bad_lines += 1
            reason = f"not JSON: {exc}" if isinstance(exc, ValueError) else str(exc)
            _write(errors, {"line": number, "id": job_id, "error": reason})
            continue
        if job_id in skip:
            summary.skipped += 1
            continue
        yield {"id": job_id, "query": job.query, "docs": job.docs, "top_k": job.top_k, "long_docs": job.long_docs,
               "model": model, "instruction": job.instruction}


def run_submit(source: Path, output: Path, errors_path: Path | None, max_in_flight: int, resume: bool,
               queue: str | None, progress: bool | None = None, lane: str = BULK, model: str | None = None) -> int:
    from rerankq.celeryconfig import settings

    settings.served.resolve(model)  # an unknown --model ends the run before anything is read or sent
    if output.exists() and output.stat().st_size and not resume:
        raise RerankError(f"{output} exists: pass --resume to carry on from it, or remove it to start over")
    errors_path = errors_path or output.with_name(output.name + ".errors.jsonl")
    skip = done_ids(output) if resume else set()
    with open(source, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    summary = Summary()
    show = _Progress(total - len(skip), sys.stderr.isatty() if progress is None else progress)
    with open(source, encoding="utf-8") as lines, open(output, "a", encoding="utf-8") as out, \
            open(errors_path, "a" if resume else "w", encoding="utf-8") as errors:
        jobs = read_jobs(lines, skip, errors, settings.max_docs, summary, settings.max_query_chars)
        results = submit_many(jobs, max_in_flight=max_in_flight, queue=queue, lane=lane, model=model)
        try:
            for job_id, outcome in results:
                _record(out, job_id, outcome, summary)
                show.update(summary)
        except KeyboardInterrupt:
            results.close()
            show.close()
            print(f"rerankq submit: interrupted; {output} holds every result written so far. Run again with "
                  f"--resume to finish. {summary.line()}", file=sys.stderr)
            return 130
    show.close()
    print(f"rerankq submit: done. {summary.line()}", file=sys.stderr)
    if summary.bad_lines:
        print(f"rerankq submit: {summary.bad_lines} input lines were not valid jobs: see {errors_path}",
              file=sys.stderr)
    return 1 if summary.failed or summary.bad_lines else 0


def _record(out: IO[str], job_id: Any, outcome: Result | BaseException, summary: Summary) -> None:
    summary.jobs += 1
    if isinstance(outcome, BaseException):
        summary.failed += 1
        _write(out, {"id": job_id, "error": f"{type(outcome).__name__}: {outcome}"})
        return
    summary.pairs += len(outcome.scores)
    summary.rankers[outcome.ranker] += 1
    _write(out, {"id": job_id, "scores": outcome.scores, "top": outcome.top, "ranker": outcome.ranker,
                 "model": outcome.model})


def _write(f: IO[str], record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


class _Progress:
    """A tqdm bar on a terminal; a plain line every ``REPORT_EVERY_S`` otherwise."""

    def __init__(self, total: int, bar: bool) -> None:
        self.total = total
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="job", dynamic_ncols=True)
        self._reported = time.monotonic()

    def update(self, summary: Summary) -> None:
        elapsed = max(time.monotonic() - summary.started, 1e-9)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(pairs_per_s=f"{summary.pairs / elapsed:.0f}", refresh=False)
        elif time.monotonic() - self._reported >= REPORT_EVERY_S:
            self._reported = time.monotonic()
            rate = summary.jobs / elapsed
            eta = (self.total - summary.jobs) / rate if rate else float("inf")
            print(f"rerankq submit: {summary.jobs}/{self.total} jobs, {summary.pairs / elapsed:.1f} pairs/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
