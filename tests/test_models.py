"""The registry of served models (tasks/models.py), how a worker finds the one it serves, how GPUs are split
among models, and /health's verdict over several: pure logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rerankq.celeryconfig import DEFAULT_MODEL, Settings
from rerankq.server.health import judge, overall
from rerankq.server.schemas import Health
from rerankq.supervisor import split_gpus
from rerankq.tasks.errors import ConfigError, UnknownModel
from rerankq.tasks.models import Models, ServedModel, parse
from rerankq.tasks.router import SHED, RouteState


def models(spec: str) -> Models:
    return parse(spec, DEFAULT_MODEL, "rerank.gpu", "rerank.cpu", ".bulk")


def test_with_nothing_set_one_model_is_served_as_before_by_its_hub_id_and_its_short_name() -> None:
    served = Settings.from_env({}).served
    assert len(served) == 1
    assert served.default == ServedModel("BAAI/bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3", "rerank.gpu",
                                         "rerank.cpu", ("bge-reranker-v2-m3",))
    assert served.resolve(None) == served.resolve("bge-reranker-v2-m3") == served.resolve(DEFAULT_MODEL)
    local = Settings.from_env({"RERANKQ_MODEL": "/models/my-reranker/", "RERANKQ_GPU_QUEUE": "q"}).served
    assert local.default.names() == ("/models/my-reranker/", "my-reranker") and local.default.queue == "q"


def test_name_pairs_give_each_model_a_queue_the_first_the_default() -> None:
    served = models("bge=BAAI/bge-reranker-v2-m3, minilm=cross-encoder/ms-marco-MiniLM-L6-v2")
    assert served.names == ("bge", "minilm")
    assert [m.queue for m in served] == ["rerank.gpu", "rerank.gpu.minilm"]
    assert served.resolve(None).name == "bge" and served.resolve("minilm").path == "cross-encoder/ms-marco-MiniLM-L6-v2"
    assert served.fallbacks == ["rerank.cpu"]


def test_an_unknown_name_is_refused_with_the_served_names() -> None:
    served = models("bge=a,minilm=b")
    with pytest.raises(UnknownModel) as refused:
        served.resolve("jina-reranker-v2")
    assert "'jina-reranker-v2' is not served here; served: bge, minilm (omit model for bge;" in str(refused.value)
    assert refused.value.served == ("bge", "minilm")
    with pytest.raises(UnknownModel, match="a int"):
        served.resolve(3)  # type: ignore[arg-type]


def test_json_gives_aliases_queues_and_fallbacks(tmp_path: Path) -> None:
    spec = [{"name": "Qwen/Qwen3-Reranker-0.6B", "aliases": ["qwen3"], "fallback": None},
            {"name": "bge", "model": "/models/bge", "queue": "gpu.bge", "fallback": "cpu.multilingual"}]
    (tmp_path / "models.json").write_text(json.dumps(spec))
    for served in (models(json.dumps(spec)), models(str(tmp_path / "models.json"))):
        qwen, bge = served
        assert qwen == ServedModel("Qwen/Qwen3-Reranker-0.6B", "Qwen/Qwen3-Reranker-0.6B", "rerank.gpu", "", ("qwen3",))
        assert bge == ServedModel("bge", "/models/bge", "gpu.bge", "cpu.multilingual")
        assert served.resolve("qwen3") is qwen and served.fallbacks == ["cpu.multilingual"]
    second = models(json.dumps([{"name": "a"}, {"name": "Org/Model-X"}]))
    assert second.models[1].queue == "rerank.gpu.Model-X"


@pytest.mark.parametrize(("spec", "message"), [
    ("a=x,a=y", "name or alias 'a' is given twice"),
    ('[{"name": "a", "aliases": ["b"]}, {"name": "b"}]', "name or alias 'b' is given twice"),
    ('[{"name": "a"}, {"name": "org/m"}, {"name": "other/m"}]', "queue 'rerank.gpu.m' is given twice (give one"),
    ('[{"name": "a"}, {"name": "bulk"}]', "ends in RERANKQ_BULK_SUFFIX='.bulk'"),
    ('[{"name": "a", "queue": "rerank.cpu"}]', "is also a fallback queue"),
    ('[{"name": "a", "modle": "x"}]', "unknown field 'modle'"),
    ('[{"name": "a b"}]', "name 'a b' must be"),
    ('[{"name": "a", "fallback": "rerank.gpu.bulk"}]', "fallback 'rerank.gpu.bulk' ends in RERANKQ_BULK_SUFFIX"),
    ('[{"name": "a", "kind": "seq2seq"}]', "kind 'seq2seq' is not 'cross-encoder' or 'llm'"),
    ('[{"name": "a", "high_wait_s": 0}]', "high_wait_s must be a number of seconds above 0, got 0"),
    ('[{"name": "a", "low_wait_s": 3}]', "a's low wait mark 3 s must be below its high mark 2 s"),
    ('[{"name": "a", "aliases": "b"}]', "aliases must be a list"),
    ("a", "'a' is not name=hub-id-or-path"),
    ("[not json", "not valid JSON"),
    ('{"name": "a"}', "a JSON list of models"),
    ("[]", "lists no model"),
    ("/nowhere/models.json", "cannot read it"),
])
def test_a_bad_list_of_models_fails_at_start_saying_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as refused:
        Settings.from_env({"RERANKQ_MODELS": spec})
    assert message in str(refused.value)


def test_model_and_models_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="RERANKQ_MODEL and RERANKQ_MODELS are both set"):
        Settings.from_env({"RERANKQ_MODELS": "a=x", "RERANKQ_MODEL": "y"})


def test_a_worker_serves_the_model_it_names_by_name_alias_or_path() -> None:
    served = models('[{"name": "bge", "model": "/m/bge", "aliases": ["rerank-v3.5"]}, '
                    '{"name": "mini", "model": "/m/mini"}]')
    bge, mini = served
    assert served.for_worker("", None) == bge
    assert served.for_worker("mini", None) == mini
    assert served.for_worker("/m/mini", None) == mini
    assert served.for_worker("rerank-v3.5", None) == bge
    # --served-name: that model's queue and name, loaded from where --model says.
    copy = served.for_worker("/local/copy", "mini")
    assert (copy.name, copy.path, copy.queue) == ("mini", "/local/copy", mini.queue)
    assert served.for_worker("", "mini") == mini
    with pytest.raises(ConfigError, match="--served-name: model 'nope' is not served here"):
        served.for_worker("/x", "nope")
    with pytest.raises(ConfigError, match=r"--model '/elsewhere' is none of the served models \(bge, mini;"):
        served.for_worker("/elsewhere", None)
    # With its own --queue, or in a one-model deployment, a model not listed is served under its own name.
    assert served.for_worker("/elsewhere", None, ["my.queue"]).name == "/elsewhere"
    one = models("")
    ad_hoc = one.for_worker("/tmp/tiny", None)
    assert (ad_hoc.name, ad_hoc.path, ad_hoc.queue) == ("/tmp/tiny", "/tmp/tiny", "rerank.gpu")


def test_a_worker_never_serves_another_models_queue() -> None:
    served = models("bge=/m/bge,mini=/m/mini")
    bge, mini = served
    assert served.for_worker("", None, [mini.queue]) == mini  # naming no model: the queue's own
    assert served.for_worker("mini", None, [mini.queue]) == mini
    for model, name in (("bge", None), ("", "bge"), ("/m/other", "bge"), ("/m/other", None)):
        with pytest.raises(ConfigError, match=r"--queue: rerank.gpu.mini is the queue of mini \(RERANKQ_MODELS\), "
                                              "not of"):
            served.for_worker(model, name, [mini.queue])
    assert served.for_worker("/m/other", None, ["elsewhere"]).queue == bge.queue  # its own queue, ad hoc


def test_unknown_names_may_go_to_the_default_model_when_asked() -> None:
    lenient = Settings.from_env({"RERANKQ_MODELS": "bge=x,mini=y", "RERANKQ_UNKNOWN_MODEL": "default"}).served
    assert lenient.resolve("rerank-v3.5").name == "bge" and lenient.resolve("mini").name == "mini"
    with pytest.raises(ConfigError, match="--served-name: model 'nope' is not served here"):
        lenient.for_worker("/x", "nope")
    with pytest.raises(ConfigError, match="RERANKQ_UNKNOWN_MODEL='maybe': use 'refuse' or 'default'"):
        Settings.from_env({"RERANKQ_UNKNOWN_MODEL": "maybe"})
    with pytest.raises(UnknownModel, match="add it to the model's aliases in RERANKQ_MODELS, or set "
                                           "RERANKQ_UNKNOWN_MODEL=default"):
        Settings.from_env({}).served.resolve("rerank-v3.5")


def test_a_local_path_is_a_name_too() -> None:
    served = models('[{"name": "/models/bge"}, {"name": "./mini"}]')
    assert served.names == ("/models/bge", "./mini") and served.models[1].queue == "rerank.gpu.mini"


def test_gpus_are_split_evenly_among_models_in_order() -> None:
    assert split_gpus([0, 1, 2, 3], ["a", "b"]) == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert split_gpus([0, 1, 2], ["a", "b"]) == [(0, "a"), (1, "a"), (2, "b")]
    assert split_gpus([4, 6], ["a"]) == [(4, "a"), (6, "a")]
    assert split_gpus([0, 1], []) == [(0, ""), (1, "")]
    # Fewer GPUs than models: they share, one process each.
    assert split_gpus([0, 1], ["a", "b", "c"]) == [(0, "a"), (1, "b"), (0, "c")]


def test_health_is_the_default_models_degraded_by_another_and_503_only_for_the_default() -> None:
    settings = Settings.from_env({"RERANKQ_MODELS": "a=x,b=y"})
    a, b = settings.served
    workers = {a.queue: 1, b.queue: 0, a.fallback: 1}
    verdicts = {m.name: (m.queue, judge(None, workers, settings, None, m)) for m in settings.served}
    assert verdicts["b"][1].status == "unavailable" and "rerankq worker --model b" in verdicts["b"][1].reason
    health = overall(verdicts["a"][1], verdicts)
    assert health.status == "degraded" and health.reason.startswith("1 live worker(s) on rerank.gpu; but b: no live")
    assert (health.models["a"].status, health.models["b"].status) == ("ok", "unavailable")
    # The default gone: unavailable, whatever the others.
    workers = {a.queue: 0, b.queue: 1, a.fallback: 1}
    verdicts = {m.name: (m.queue, judge(None, workers, settings, None, m)) for m in settings.served}
    assert overall(verdicts["a"][1], verdicts).status == "unavailable"
    # Shedding one model to no fast ranker: passthrough, degraded.
    settings = Settings.from_env({"RERANKQ_MODELS": '[{"name": "a"}, {"name": "b", "fallback": null}]'})
    shed = RouteState(route=SHED, cpu_open=False, since=0.0, at=0.0)
    verdict: Health = judge(shed, {settings.served.models[1].queue: 1}, settings, None, settings.served.models[1])
    assert verdict.status == "degraded" and "passthrough" in verdict.reason


def test_up_starts_a_worker_per_model_and_a_fast_ranker_per_fallback(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rerankq import celeryconfig, up

    spec = '[{"name": "bge"}, {"name": "mini", "fallback": "cpu.en"}, {"name": "qwen3", "fallback": null}]'
    monkeypatch.setattr(celeryconfig, "settings", Settings.from_env({"RERANKQ_MODELS": spec}))
    children = up._children({}, "", True, 5555, 8000, 9808, tmp_path)
    workers = {c.name: c.args for c in children if c.args[0] == "worker"}
    assert list(workers) == ["worker cpu bge", "worker cpu mini", "worker cpu qwen3", "fast worker rerank.cpu",
                             "fast worker cpu.en"]
    assert [a[a.index("--model") + 1] for n, a in workers.items() if "--model" in a] == ["bge", "mini", "qwen3"]
    assert [a[a.index("--queue") + 1] for n, a in workers.items() if "--ranker" in a] == ["rerank.cpu", "cpu.en"]
    ports = [c.args[c.args.index("--metrics-port") + 1] for c in children if "--metrics-port" in c.args]
    assert ports == [str(9808 + i) for i in range(6)]  # five workers and the watchdog, none shared
    assert len({c.log_path for c in children}) == len(children)
    with pytest.raises(ConfigError, match="--model 'x' with RERANKQ_MODELS listing 3 models"):
        up._children({}, "x", True, 5555, 8000, 9808, tmp_path)
    monkeypatch.setattr(celeryconfig, "settings", Settings.from_env({}))
    env: dict[str, str] = {}
    one = up._children(env, "/models/mine", True, 5555, 8000, 0, tmp_path)
    assert env["RERANKQ_MODEL"] == "/models/mine"  # every process knows the model by the name its answers carry
    assert one[0].args[:5] == ["worker", "--device", "cpu", "--model", "/models/mine"]
