"""The Helm chart (deploy/helm/rerankq), rendered and validated offline: no cluster and no helm binary run here.
Helm's own Go SDK renders and lints it (helm-python-sdk); every built-in object is validated strictly against
Kubernetes' schemas (kubernetes-validate), and KEDA's and the Prometheus Operator's objects against strict schemas of
the fields the chart uses (deploy/helm/schemas, written from their reference docs). What the chart says about the
processes (ports, probes, grace period, metric names, flags, settings) is read from the code, not copied."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from rerankq.celeryconfig import Settings
from rerankq.cli import cli
from rerankq.worker import metrics
from rerankq.worker.consumer import STOP_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "rerankq"
KUBERNETES = "1.31.0"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
               ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json"}
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def keda(**overrides: Any) -> dict[str, Any]:
    autoscaling: dict[str, Any] = copy.deepcopy(DEFAULTS["workers"][0]["autoscaling"])
    autoscaling["keda"].update(enabled=True, **overrides)
    return autoscaling


def worker(**fields: Any) -> dict[str, Any]:
    return {**copy.deepcopy(DEFAULTS["workers"][0]), **fields}


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "two models": {"workers": [
        worker(autoscaling=keda()),
        worker(name="english", model="cross-encoder/ms-marco-MiniLM-L6-v2", servedName="minilm",
               aliases=["rerank-v3.5"], queue="rerank.en", gpu=False,
               resources={"requests": {"cpu": "4", "memory": "4Gi"}}, tolerations=[],
               autoscaling={**keda(), "keda": {**keda()["keda"], "enabled": False},
                            "hpa": {**keda()["hpa"], "enabled": True}}),
    ]},
    "sentinel": {
        "redis": {"url": "", "sentinel": {"hosts": ["sentinel-0.redis:26379", "sentinel-1.redis:26379"],
                                          "master": "mymaster"},
                  "passwordSecret": {"name": "redis", "key": "password"}},
        "workers": [worker(autoscaling=keda(trigger="list"),
                           modelCache={"existingClaim": "models", "sizeLimit": "1Gi"})],
        "flower": {**DEFAULTS["flower"], "enabled": True, "authSecret": {"name": "flower", "key": "basic-auth"}},
        "serve": {**DEFAULTS["serve"], "ingress": {**DEFAULTS["serve"]["ingress"], "enabled": True,
                                                   "className": "nginx", "tlsSecret": "rerank-tls"}},
        "monitoring": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
    },
    "scale to zero": {"workers": [worker(autoscaling=keda(scaleToZero=True))]},
    "list on redis with a password": {
        "redis": {**DEFAULTS["redis"], "url": "rediss://redis.db:6380/2",
                  "passwordSecret": {"name": "redis", "key": "password"}},
        "workers": [worker(autoscaling=keda(trigger="list"))]},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name="rq", namespace="rerank")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each Deployment's container, by the Deployment's component label."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in of_kind(objects, "Deployment")}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_chart_lints_renders_and_every_object_validates_strictly(name: str) -> None:
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report
    objects = render(values)
    assert {"Deployment", "PodDisruptionBudget", "Service"} <= {o["kind"] for o in objects}
    for obj in objects:
        schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema:
            jsonschema.validate(obj, json.loads((ROOT / "deploy" / "helm" / "schemas" / schema).read_text()))
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        for pod in [obj["spec"]["template"]["spec"]] if obj["kind"] == "Deployment" else []:
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"]
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # No secret in the clear: passwords and keys come from Secrets (redis:// URLs carry none).
    text = json.dumps(objects)
    assert not re.search(r"redis(s)?://[^@\"]*:[^@\"]*@", text) and "ConfigMap" not in text


def test_autoscaling_objects_follow_the_values() -> None:
    objects = render(VALUE_SETS["two models"])
    scaled, = of_kind(objects, "ScaledObject")
    hpa, = of_kind(objects, "HorizontalPodAutoscaler")
    assert scaled["spec"]["scaleTargetRef"]["name"].endswith("worker-reranker")
    assert hpa["spec"]["scaleTargetRef"]["name"].endswith("worker-english")
    deployments = {d["metadata"]["name"]: d["spec"] for d in of_kind(objects, "Deployment")}
    assert all("replicas" not in deployments[o["spec"]["scaleTargetRef"]["name"]] for o in (scaled, hpa))
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert scaled["spec"]["minReplicaCount"] == 1 and scaled["spec"]["fallback"]["replicas"] >= 1
    zero, = of_kind(render(VALUE_SETS["scale to zero"]), "ScaledObject")
    assert zero["spec"]["minReplicaCount"] == 0
    listed, auth = (of_kind(render(VALUE_SETS["list on redis with a password"]), kind)[0]
                    for kind in ("ScaledObject", "TriggerAuthentication"))
    trigger, = listed["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"] == {
        "address": "redis.db:6380", "enableTLS": "true", "databaseIndex": "2", "listName": "rerank.gpu",
        "listLength": "100", "activationListLength": "1"}
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    sentinel, = of_kind(render(VALUE_SETS["sentinel"]), "ScaledObject")
    assert sentinel["spec"]["triggers"][0]["metadata"]["addresses"] == "sentinel-0.redis:26379,sentinel-1.redis:26379"


@pytest.mark.parametrize(("values", "refusal"), [
    ({"workers": [worker(autoscaling={**keda(), "hpa": {**keda()["hpa"], "enabled": True}})]}, "autoscaling"),
    ({"redis": {**DEFAULTS["redis"], "sentinel": {"hosts": ["s:26379"], "master": "m"}}}, "redis"),
    ({"flower": {**DEFAULTS["flower"], "enabled": True}}, "flower"),
    ({"settings": {"RERANKQ_REDIS_PASSWORD": "hunter2"}}, "settings"),
    ({"settings": {"RERANKQ_MODELS": "a=b"}}, "settings"),
    ({"fastRanker": {**DEFAULTS["fastRanker"], "replicas": 0}}, "replicas"),
    ({"workers": [worker(terminationGracePeriodSeconds=30)]}, "terminationGracePeriodSeconds"),
    ({"workers": [worker(gpus=2)]}, "gpus"),
    ({"workers": [worker(autoscaling=keda(prometheus={**keda()["keda"]["prometheus"], "waitSeconds": 2.0}))]},
     "must be below watchdog.lowWaitSeconds"),
    ({"workers": [worker(), worker(name="cpu-pool", gpu=False, queue="rerank.other")]}, "name two queues"),
    ({"workers": [worker(servedName="has space")]}, "servedName"),
])
def test_contradictory_or_unsafe_values_are_refused(values: dict[str, Any], refusal: str) -> None:
    with pytest.raises(helm.HelmError, match=refusal):
        render(values)


def test_the_chart_says_what_the_code_does() -> None:
    objects = render(VALUE_SETS["sentinel"])
    by_component = containers(objects)
    base = Settings().metrics_port
    ports = {"worker-reranker": base, "fast-ranker": base + metrics.KIND_OFFSETS["fast"],
             "watchdog": base + metrics.KIND_OFFSETS["watchdog"]}
    for component, port in ports.items():
        container = by_component[component]
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port, component
        probes = [container[k] for k in ("startupProbe", "livenessProbe") if k in container]
        assert probes and all(p["httpGet"] == {"path": metrics.HEALTHZ, "port": "metrics"} for p in probes)
    deployment = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("worker-reranker"))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > STOP_TIMEOUT_S
    # Every flag a container passes is one its command takes, and every RERANKQ_ variable is a setting.
    settings = {f.metadata["env"] for f in fields(Settings)}
    for component, container in by_component.items():
        command = cli.commands[container["args"][0]]
        options = {opt for param in command.params for opt in param.opts}
        assert {a for a in container["args"] if a.startswith("--")} <= options, component
        names = {e["name"] for e in container["env"]}
        assert {n for n in names if n.startswith("RERANKQ_")} <= settings, component
        assert len(names) == len(container["env"]), f"{component}: a variable set twice"
    # Every process reads the same served models, and each worker serves its model's queue under its name.
    two = render(VALUE_SETS["two models"])
    envs = {component: {e["name"]: e.get("value") for e in c["env"]} for component, c in containers(two).items()}
    assert len({env["RERANKQ_MODELS"] for env in envs.values()}) == 1
    served = Settings.from_env({"RERANKQ_MODELS": envs["worker-reranker"]["RERANKQ_MODELS"]}).served
    assert served.names == ("BAAI/bge-reranker-v2-m3", "minilm") and served.resolve("rerank-v3.5").name == "minilm"
    for component, model in (("worker-reranker", served.models[0]), ("worker-english", served.models[1])):
        args = containers(two)[component]["args"]
        flags = dict(zip(args[1::2], args[2::2], strict=False))
        assert served.for_worker(flags["--model"], flags["--served-name"], [flags["--queue"]]) == model
        assert flags["--queue"] == model.queue
    assert served.models[1].queue == "rerank.en"
    scaled, = of_kind(two, "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    exported = {next(iter(m.describe())).name for m in (metrics.WAIT, metrics.WORKERS)}
    assert set(re.findall(r"rerankq_\w+", query)) == exported
    assert 'queue="rerank.gpu"' in query
