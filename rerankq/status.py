"""``rerankq status``: queues, backlogs, estimated waits, the route state and live workers, in tables."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock, lanes, memory
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import RouteState, counts_key, state_key
from rerankq.worker.backlog import Snapshot, measure
from rerankq.worker.watchdog import recent_changes

RECENT_CHANGES = 5


def gather(broker: BrokerRedis, settings: Settings) -> dict[str, Any]:
    usage = memory.memory(broker.client)
    queues = lanes.both([settings.gpu_queue, settings.cpu_queue], settings.bulk_suffix)
    snapshot = measure(broker, queues, settings.poll_ms / 1000)
    with broker.client.pipeline(transaction=False) as pipe:
        pipe.get(state_key(broker, settings.gpu_queue))
        pipe.hgetall(counts_key(broker, settings.gpu_queue))
        raw_state, counts = pipe.execute()
    state = RouteState.decode(raw_state) if raw_state else None
    return {
        "route": _route(state),
        "queues": [_queue_row(snapshot, q, lanes.lane_of(q, settings.bulk_suffix)) for q in queues],
        "workers": _workers(snapshot, queues),
        "routed": {k.decode(): int(v) for k, v in sorted(counts.items())},
        "changes": recent_changes(broker, settings.gpu_queue, RECENT_CHANGES),
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


def render(status: dict[str, Any]) -> str:
    route = status["route"]
    if route["watchdog"]:
        age = clock.now() - route["since"]
        head = (f"route: {route['route']} for {age:.0f}s, cpu queue {'open' if route['cpu_open'] else 'closed'}; "
                f"watchdog {route['leader']} leads, metrics {_port(route['metrics_port'])}")
    else:
        head = "route: gpu (no route state: the watchdog is not running, or its state expired)"
    lines = [head, f"redis: {status['redis']['describe']}", ""]
    # A bulk lane's wait is for the record: it waits its turn behind interactive jobs, and is never shed.
    lines += _table(["queue", "lane", "waiting", "held", "backlog", "workers", "pairs/s", "est. wait"], [
        [q["queue"], q["lane"], q["waiting"], q["held"], q["backlog"], q["workers"], _num(q["pairs_per_s"]),
         "no worker" if not q["workers"] else "unknown" if q["wait_s"] is None else f"{q['wait_s']:.2f}s"]
        for q in status["queues"]])
    routed = ", ".join(f"{k} {v}" for k, v in status["routed"].items()) or "none yet"
    lines += ["", f"jobs routed by producers: {routed}", ""]
    now = clock.now()
    # busy: share of the last 30 s in forward batches; wait p95: interactive jobs' queue wait, same window.
    lines += _table(["worker", "queue", "ranker", "model", "device", "held", "served", "pairs/s", "busy",
                     "wait p95", "metrics", "seen"], [
        [w["node"], w["queue"], w["ranker"], w["model"], w["device"], sum(w["held"].values()), w["served"],
         _num(w["pairs_per_s"]), f"{100 * w['busy_ratio']:.0f}%",
         "-" if w["wait_p95_ms"] is None else f"{w['wait_p95_ms']:.1f}ms", _port(w["metrics_port"]),
         f"{now - w['at']:.1f}s ago"]
        for w in status["workers"]]) if status["workers"] else ["no live workers"]
    if status["changes"]:
        lines += ["", "recent route changes (newest first):"]
        for change in status["changes"]:
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
        where = app.connection_for_write().as_uri()  # the password masked
        cause = str(exc).rstrip(".")
        raise RerankError(f"cannot read the status from Redis at {where}: {cause}. Is RERANKQ_BROKER_URL right?"
                          ) from exc
    print(json.dumps(status, indent=2) if as_json else render(status))
    return 0
