"""``rerankq status``: queues, backlogs, estimated waits, the route state and live workers, in tables."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock, lanes, memory
from rerankq.tasks.connections import BrokerRedis, broker_shown
from rerankq.tasks.router import RouteState, counts_key, state_key
from rerankq.worker.backlog import Snapshot, measure
from rerankq.worker.watchdog import recent_changes

RECENT_CHANGES = 5


def gather(broker: BrokerRedis, settings: Settings) -> dict[str, Any]:
    """Every served model's route, counts and changes (``models``; ``route``, ``routed`` and ``changes`` are the
    default model's), its queues' loads (fast-ranker queues last) and the live workers."""
    usage = memory.memory(broker.client)
    served = settings.served
    queues = lanes.both([*(m.queue for m in served), *served.fallbacks], settings.bulk_suffix)
    snapshot = measure(broker, queues, settings.poll_ms / 1000)
    with broker.client.pipeline(transaction=False) as pipe:
        for model in served:
            pipe.get(state_key(broker, model.queue))
            pipe.hgetall(counts_key(broker, model.queue))
        replies = pipe.execute()
    models = []
    for i, model in enumerate(served):
        raw_state, counts = replies[2 * i:2 * i + 2]
        models.append({"name": model.name, "aliases": list(model.aliases), "queue": model.queue,
                       "fallback": model.fallback,
                       "route": _route(RouteState.decode(raw_state) if raw_state else None),
                       "routed": {k.decode(): int(v) for k, v in sorted(counts.items())},
                       "changes": recent_changes(broker, model.queue, RECENT_CHANGES)})
    owners = {q: m.name for m in served for q in lanes.both([m.queue], settings.bulk_suffix)}
    return {
        **{key: models[0][key] for key in ("route", "routed", "changes")},
        "models": models,
        "queues": [{**_queue_row(snapshot, q, lanes.lane_of(q, settings.bulk_suffix)), "model": owners.get(q, "")}
                   for q in queues],
        "workers": _workers(snapshot, queues),
        "redis": {**asdict(usage), "full": usage.full, "describe": usage.describe()},
    }


def _workers(snapshot: Snapshot, queues: list[str]) -> list[dict[str, Any]]:
    """Each live worker once, under the first queue it serves (a worker reports under both its lanes)."""
    rows: dict[str, dict[str, Any]] = {}
    for queue in queues:
        for worker in snapshot.workers[queue]:
            rows.setdefault(worker.node, {"queue": queue, **asdict(worker), "pairs_per_s": worker.pairs_per_s})
    return list(rows.values())


def _route(state: RouteState | None) -> dict[str, Any]:
    if state is None:
        return {"route": "gpu", "cpu_open": True, "watchdog": False, "since": None, "reason": "",
                "metrics_port": 0, "leader": ""}
    return {"route": state.route, "cpu_open": state.cpu_open, "watchdog": True, "since": state.since,
            "reason": state.reason, "metrics_port": state.metrics_port, "leader": state.leader}


def _queue_row(snapshot: Snapshot, queue: str, lane: str) -> dict[str, Any]:
    load = snapshot.loads[queue]
    wait = load.wait_s
    return {**asdict(load), "lane": lane, "backlog": load.backlog,
            "wait_s": None if wait is None or wait == float("inf") else round(wait, 3)}


def _head(route: dict[str, Any], fallback: str) -> str:
    if not route["watchdog"]:
        return "route: gpu (no route state: the watchdog is not running, or its state expired)"
    gate = f"{fallback or 'fast-ranker queue'} {'open' if route['cpu_open'] else 'closed'}" if fallback \
        else "no fast-ranker fallback"
    return (f"route: {route['route']} for {clock.now() - route['since']:.0f}s, {gate}; watchdog {route['leader']} "
            f"leads, metrics {_port(route['metrics_port'])}")


def render(status: dict[str, Any]) -> str:
    models = status["models"]
    several = len(models) > 1
    lines = []
    for model in models:
        routed = ", ".join(f"{k} {v}" for k, v in model["routed"].items()) or "none yet"
        if several:
            lines += [f"model {model['name']} on {model['queue']}: {_head(model['route'], model['fallback'])}",
                      f"  jobs routed by producers: {routed}"]
        else:
            lines += [_head(model["route"], model["fallback"])]
    lines += [f"redis: {status['redis']['describe']}", ""]
    # A bulk lane's wait is for the record: it waits its turn behind interactive jobs, and is never shed.
    lines += _table(["queue", *(["model"] if several else []), "lane", "waiting", "held", "backlog", "workers",
                     "pairs/s", "est. wait"], [
        [q["queue"], *([q["model"] or "(fast ranker)"] if several else []), q["lane"], q["waiting"], q["held"],
         q["backlog"], q["workers"], _num(q["pairs_per_s"]),
         "no worker" if not q["workers"] else "unknown" if q["wait_s"] is None else f"{q['wait_s']:.2f}s"]
        for q in status["queues"]])
    if not several:
        routed = ", ".join(f"{k} {v}" for k, v in status["routed"].items()) or "none yet"
        lines += ["", f"jobs routed by producers: {routed}"]
    lines += [""]
    now = clock.now()
    # busy: share of the last 30 s in forward batches; wait p95: interactive jobs' queue wait, same window.
    lines += _table(["worker", "queue", "ranker", "model", "device", "held", "served", "pairs/s", "busy",
                     "wait p95", "metrics", "seen"], [
        [w["node"], w["queue"], w["ranker"], w["model"], w["device"], sum(w["held"].values()), w["served"],
         _num(w["pairs_per_s"]), f"{100 * w['busy_ratio']:.0f}%",
         "-" if w["wait_p95_ms"] is None else f"{w['wait_p95_ms']:.1f}ms", _port(w["metrics_port"]),
         f"{now - w['at']:.1f}s ago"]
        for w in status["workers"]]) if status["workers"] else ["no live workers"]
    for model in models:
        if model["changes"]:
            of = f" of {model['name']}" if several else ""
            lines += ["", f"recent route changes{of} (newest first):"]
            for change in model["changes"]:
                at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(change["at"])))
                gate = "open" if change["cpu_open"] == "1" else "closed"
                lines.append(f"  {at}  -> {change['route']}, cpu {gate}: {change['reason']}")
    return "\n".join(lines)


def _port(port: int) -> str:
    return f":{port}" if port else "none"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def run_status(as_json: bool) -> int:
    from rerankq.celeryconfig import settings
    from rerankq.tasks import RerankError, app

    try:
        broker = BrokerRedis(app)
        try:
            status = gather(broker, settings)
        finally:
            broker.close()
    except Exception as exc:
        where = broker_shown(app)
        cause = str(exc).rstrip(".")
        raise RerankError(f"cannot read the status from Redis at {where}: {cause}. Is RERANKQ_BROKER_URL right?"
                          ) from exc
    print(json.dumps(status, indent=2) if as_json else render(status))
    return 0
