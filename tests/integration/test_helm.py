"""The Helm chart (helm/aleno-bridge): lint, render, Kubernetes schema validation, and the
bridge's own validation of the config the chart writes.

Helm runs in-process through helm-python-sdk (Helm's Go SDK behind a C ABI; no helm
binary). Every rendered manifest is checked against the Kubernetes OpenAPI schemas with
kubernetes-validate. No cluster is involved; the whole module runs in about a second.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import stat
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python as helm  # a broken native library must fail the tests, never skip them
import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridge.config import parse_config
from bridge.sharding import shard_symbols
from bridge.simulator import default_equities, default_tickers
from bridge.sinks import Drivers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "aleno-bridge"
VALUES_DIR = ROOT / "tests" / "helm_values"
RELEASE = "prices"
NAMESPACE = "market-data"
# The oldest Kubernetes the chart targets and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # monitoring.coreos.com: not in k8s schemas
POD_ENV = {"ALENO_API_KEY": "dummy-key", "ALENO_SHARD_INDEX": "1"}

GOOD_VALUES = ["default", "sharded", "existing-secret", "monitoring", "kafka"]
BAD_VALUES = [
    "bad-shards-string",
    "bad-shards-zero",
    "bad-replicas",
    "bad-image-tag",
    "bad-config-no-sinks",
    "bad-unknown-key",
]


# ---------------------------------------------------------------------------
# helpers


def load_values(name: str) -> dict[str, Any] | None:
    if name == "default":
        return None
    loaded = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())
    assert isinstance(loaded, dict), name
    return loaded


def merged(base: dict[str, Any] | None, override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base or {})
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


class Rendered:
    """The manifests of one render, parsed; NOTES.txt kept as text."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = next((t for p, t in files.items() if p.endswith("NOTES.txt")), "")
        self.docs: list[dict[str, Any]] = []
        for path, text in sorted(files.items()):
            if path.endswith(".txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert isinstance(doc, dict), f"{path}: not a mapping"
                    self.docs.append(doc)

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {self.kinds()}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        found = self.all("Deployment") + self.all("StatefulSet")
        assert len(found) == 1, f"expected one workload, got {self.kinds()}"
        return found[0]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.workload["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def config_text(self) -> str:
        return self.one("ConfigMap")["data"]["config.yaml"]

    @property
    def checksum(self) -> str:
        return self.workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def render(chart: Any, values: dict[str, Any] | None) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))


def check_k8s(doc: dict[str, Any]) -> None:
    """Validate one manifest against the Kubernetes schemas (strict: unknown fields fail)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc["kind"] in CRD_KINDS:
        # The Prometheus Operator CRDs are not in kubernetes-validate: check the shape
        # the operator needs (selector + endpoints on the named port).
        assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
        spec = doc["spec"]
        assert spec["selector"]["matchLabels"], where
        endpoints = spec["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["http-metrics"], where
        assert all(e["path"] == "/metrics" for e in endpoints), where
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            err = exc.caught
            path = "/".join(str(p) for p in getattr(err, "absolute_path", []))
            pytest.fail(f"{where} is invalid for Kubernetes {version} at /{path}: "
                        f"{getattr(err, 'message', err)}")


# ---------------------------------------------------------------------------
# the library itself


def test_helm_sdk_loads() -> None:
    assert helm.helm_sdk_version().startswith("v"), helm.helm_sdk_version()
    helm.validate_release_name(RELEASE)


def test_schema_is_draft7() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)


# ---------------------------------------------------------------------------
# lint + render + Kubernetes schemas, for every example values file


@pytest.mark.parametrize("name", GOOD_VALUES)
def test_lint_clean(name: str) -> None:
    report = helm.lint(CHART, load_values(name), strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems
    assert not report["errors"], report["errors"]


@pytest.mark.parametrize("name", GOOD_VALUES)
def test_every_manifest_is_valid(chart: Any, name: str) -> None:
    out = render(chart, load_values(name))
    assert out.docs
    for doc in out.docs:
        assert doc["metadata"]["name"].startswith(RELEASE)
        if doc["kind"] not in CRD_KINDS:
            assert doc["metadata"]["namespace"] == NAMESPACE
        check_k8s(doc)


def test_default_layout(chart: Any) -> None:
    out = render(chart, None)
    assert out.kinds() == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    dep = out.one("Deployment")
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    c = out.container
    assert c["args"] == ["run", "-c", "/etc/aleno-bridge/config.yaml"]
    assert "command" not in c  # the image's ENTRYPOINT (aleno-bridge)
    assert c["ports"] == [{"name": "http-metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/aleno-bridge"]]["configMap"]["name"] == dep["metadata"]["name"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    svc = out.one("Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert "no Secret is configured" in out.notes  # the operator is told what is missing
    config = yaml.safe_load(out.config_text)
    assert config["http"] == {"enabled": True, "host": "0.0.0.0", "port": 9464}
    assert config["sinks"] == {"console": {"driver": "console"}}


def test_metrics_port_reaches_config_container_and_monitors(chart: Any) -> None:
    out = render(chart, load_values("monitoring"))
    assert yaml.safe_load(out.config_text)["http"]["port"] == 9500
    assert out.container["ports"][0]["containerPort"] == 9500
    svc = out.one("Service")
    assert svc["spec"]["ports"][0]["port"] == 9500
    sm, pm = out.one("ServiceMonitor"), out.one("PodMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    # the ServiceMonitor selects the metrics Service only; the PodMonitor the pods
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    pod_labels = out.workload["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert out.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "scraped twice" in out.notes


def test_monitors_are_off_by_default(chart: Any) -> None:
    kinds = render(chart, None).kinds()
    assert "ServiceMonitor" not in kinds and "PodMonitor" not in kinds
    with pytest.raises(helm.HelmError, match=r"metrics\.service\.enabled"):
        render(chart, {"metrics": {"service": {"enabled": False},
                                   "serviceMonitor": {"enabled": True}}})


# ---------------------------------------------------------------------------
# the config the chart writes is one the bridge accepts


@pytest.mark.parametrize("name", ["default", "sharded", "existing-secret", "monitoring"])
def test_bridge_accepts_rendered_config(chart: Any, name: str) -> None:
    out = render(chart, load_values(name))
    settings = parse_config(out.config_text, env=POD_ENV, source=f"{name} ConfigMap")
    http = settings.config.http
    port = out.container["ports"][0]["containerPort"]
    assert (http.enabled, http.host, http.port) == (True, "0.0.0.0", port)
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == POD_ENV["ALENO_API_KEY"]


def test_kafka_example_renders(chart: Any) -> None:
    out = render(chart, load_values("kafka"))
    assert yaml.safe_load(out.config_text)["sinks"]["bus"]["driver"] == "kafka"


def test_kafka_example_config_validates(chart: Any) -> None:
    if "kafka" not in Drivers().names():
        pytest.skip("the kafka driver is not installed in this environment")
    out = render(chart, load_values("kafka"))
    parse_config(out.config_text, env=POD_ENV)


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("name", ["default", "sharded", "monitoring", "kafka", "fanout"])
def test_buffers_fit_the_memory_limit(chart: Any, name: str) -> None:
    """With every buffer full, the estimate of docs/reliability.md stays under the
    container's memory limit (an OOM kill would lose every buffer at once)."""
    if name == "fanout":  # the shipped fan-out example, deployed with the chart defaults
        fanout = yaml.safe_load((ROOT / "config" / "fanout.yaml").read_text())
        fanout["source"]["url"] = "https://pricing.aleno.ai"
        values = {"config": {k: v for k, v in fanout.items() if k != "http"}}
    else:
        values = load_values(name)
    out = render(chart, values)
    env = {**POD_ENV, "ALENO_AUDIT_FILE": "/tmp/audit.jsonl"}
    settings = parse_config(out.config_text, env=env, drivers=Drivers())
    limit = _bytes(out.container["resources"]["limits"]["memory"])
    assert settings.memory_estimate() <= limit, (
        f"{name}: {settings.memory_estimate() / 2**20:.0f} MiB with full buffers, "
        f"limit {limit / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------
# secrets


def test_secret_values_never_reach_the_configmap(chart: Any) -> None:
    secrets = {"ALENO_API_KEY": "sk-live-9d2f61c0a7", "KAFKA_PASSWORD": "hunter2-kafka-pw"}
    values = merged(load_values("kafka"), {"secrets": secrets})
    out = render(chart, values)
    secret = out.one("Secret")
    assert secret["stringData"] == secrets
    for doc in out.docs:
        if doc is not secret:
            text = yaml.safe_dump(doc)
            for value in secrets.values():
                assert value not in text, f"a secret value leaked into {doc['kind']}"
    for value in secrets.values():
        assert value not in out.notes
    assert "${ALENO_API_KEY}" in out.config_text
    env_from = out.container["envFrom"]
    assert env_from == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    # rotating a secret rolls the pods
    annotations = out.workload["spec"]["template"]["metadata"]["annotations"]
    rotated = render(chart, merged(values, {"secrets": {"KAFKA_PASSWORD": "rotated-pw"}}))
    rotated_ann = rotated.workload["spec"]["template"]["metadata"]["annotations"]
    assert rotated_ann["checksum/secret"] != annotations["checksum/secret"]
    assert rotated_ann["checksum/config"] == annotations["checksum/config"]


def test_existing_secret(chart: Any) -> None:
    out = render(chart, load_values("existing-secret"))
    assert not out.all("Secret")
    assert out.container["envFrom"] == [{"secretRef": {"name": "aleno-bridge-env"}}]
    assert "checksum/secret" not in out.workload["spec"]["template"]["metadata"]["annotations"]
    assert 'Secret "aleno-bridge-env"' in out.notes
    both = merged(load_values("existing-secret"), {"secrets": {"ALENO_API_KEY": "x"}})
    with pytest.raises(helm.HelmError, match="not both"):
        render(chart, both)


def test_literal_api_key_is_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match="literal key"):
        render(chart, {"config": {"source": {"api_key": "sk-live-oops"}}})


# ---------------------------------------------------------------------------
# checksum/config


def test_config_checksum_follows_the_config(chart: Any) -> None:
    base = render(chart, None)
    again = render(chart, None)
    assert base.checksum == again.checksum
    assert base.checksum == hashlib.sha256(
        chart.render(None, name=RELEASE, namespace=NAMESPACE)[
            "aleno-bridge/templates/configmap.yaml"
        ].encode()
    ).hexdigest()
    changed = render(chart, {"config": {"source": {"tickers": ["BTC/USD", "SOL/USD"]}}})
    assert changed.checksum != base.checksum
    port = render(chart, {"metrics": {"port": 9999}})  # the port is written into the config
    assert port.checksum != base.checksum
    unrelated = render(chart, {"resources": {"requests": {"cpu": "1"}}})
    assert unrelated.checksum == base.checksum


def test_hot_config_reload_does_not_roll_the_pods(chart: Any) -> None:
    hot = render(chart, {"configReload": "hot"})
    annotations = hot.workload["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" not in annotations
    assert annotations["aleno.ai/config-reload"] == "hot"
    check_k8s(hot.workload)
    changed = render(chart, {"configReload": "hot",
                             "config": {"source": {"tickers": ["BTC/USD", "SOL/USD"]}}})
    assert changed.workload["spec"]["template"] == hot.workload["spec"]["template"]
    assert changed.all("ConfigMap") != hot.all("ConfigMap")
    # the config is mounted as a directory (no subPath), so the kubelet's updates reach it
    mounts = hot.container["volumeMounts"]
    assert all("subPath" not in m for m in mounts)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"configReload": "sometimes"})


# ---------------------------------------------------------------------------
# the schema rejects bad values at install time


@pytest.mark.parametrize("name", BAD_VALUES)
def test_schema_rejects_bad_values(chart: Any, name: str) -> None:
    values = load_values(name)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match="schema"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)  # install/template fail
    report = helm.lint(CHART, values)
    assert report["errors"], f"lint accepted {name}"


# ---------------------------------------------------------------------------
# scale-out


@pytest.mark.parametrize(
    ("values", "kind", "replicas", "pdb"),
    [
        (None, "Deployment", 1, False),
        ({"replicasPerShard": 2}, "Deployment", 2, True),
        ({"shards": 4}, "StatefulSet", 4, True),
        ({"shards": 3, "replicasPerShard": 2}, "StatefulSet", 6, True),
        ({"sharding": {"enabled": True}}, "StatefulSet", 1, True),
        ({"shards": 2, "podDisruptionBudget": {"enabled": False}}, "StatefulSet", 2, False),
    ],
)
def test_layout(chart: Any, values: dict[str, Any] | None, kind: str, replicas: int,
                pdb: bool) -> None:
    out = render(chart, values)
    assert out.workload["kind"] == kind
    assert out.workload["spec"]["replicas"] == replicas
    assert bool(out.all("PodDisruptionBudget")) is pdb
    headless = [s for s in out.all("Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == (kind == "StatefulSet")
    for doc in out.docs:
        check_k8s(doc)


@pytest.fixture(scope="module")
def fake_bridge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in `aleno-bridge` on PATH that prints the shard env and its arguments."""
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "aleno-bridge"
    exe.write_text('#!/bin/sh\necho "$ALENO_SHARD_INDEX $ALENO_SHARD_COUNT $*"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bindir


def run_pod_entrypoint(rendered: Rendered, ordinal: int, bindir: Path) -> tuple[int, int]:
    """Run the sharded pod's real command (shard.sh from the ConfigMap) as pod `ordinal`
    would, with the env the pod spec gives it; returns (shard index, shard count)."""
    sts = rendered.one("StatefulSet")
    container = rendered.container
    script = rendered.one("ConfigMap")["data"]["shard.sh"]
    command = container["command"]
    assert command == ["/bin/sh", "/etc/aleno-bridge/shard.sh"]
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
            env[var["name"]] = f"{sts['metadata']['name']}-{ordinal}"  # StatefulSet pod name
        else:
            env[var["name"]] = NAMESPACE
    proc = subprocess.run(
        ["/bin/sh", "-c", script, "shard.sh", *container["args"]],
        env=env, capture_output=True, text=True, timeout=10, check=True,
    )
    index, count, args = proc.stdout.strip().split(" ", 2)
    assert args == " ".join(container["args"])  # exec'd with the container's args
    assert f"serves shard {index} of {count}" in proc.stderr
    return int(index), int(count)


def test_sharded_statefulset(chart: Any, fake_bridge: Path) -> None:
    values = load_values("sharded")
    assert values is not None
    shards, per_shard = values["shards"], values["replicasPerShard"]
    tickers, equities = default_tickers(), default_equities()  # the simulator's universe
    values = merged(values, {"config": {"source": {"tickers": tickers, "equities": equities}}})
    out = render(chart, values)

    sts = out.one("StatefulSet")
    assert not out.all("Deployment")
    assert sts["spec"]["replicas"] == shards * per_shard
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in out.all("Service")}
    env = {e["name"]: e for e in out.container["env"]}
    assert env["ALENO_SHARD_COUNT"]["value"] == str(shards)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = yaml.safe_load(out.config_text)
    assert config["source"]["shard"] == {"index": "${ALENO_SHARD_INDEX}", "count": shards}

    # every pod ordinal -> the shard its entrypoint derives
    indices: dict[int, int] = {}
    for ordinal in range(shards * per_shard):
        index, count = run_pod_entrypoint(out, ordinal, fake_bridge)
        assert count == shards
        indices[ordinal] = index
    assert Counter(indices.values()) == {i: per_shard for i in range(shards)}
    assert sorted(indices[o] for o in range(shards)) == list(range(shards))  # 0..N-1 cover all

    # each shard's pods subscribe to that shard's symbols: together exactly the universe
    subscribed: dict[int, tuple[list[str], list[str]]] = {}
    for index in sorted(set(indices.values())):
        settings = parse_config(out.config_text, env={**POD_ENV, "ALENO_SHARD_INDEX": str(index)})
        src = settings.config.source
        assert src.shard is not None
        assert (src.shard.index, src.shard.count) == (index, shards)
        subscribed[index] = (
            shard_symbols("ticker", src.tickers, src.shard.index, src.shard.count),
            shard_symbols("equity", src.equities, src.shard.index, src.shard.count),
        )
    for kind, configured, pos in (("ticker", tickers, 0), ("equity", equities, 1)):
        parts = [subscribed[i][pos] for i in range(shards)]
        flat = [s for part in parts for s in part]
        assert len(flat) == len(set(flat)), f"a {kind} is in two shards"
        assert sorted(flat) == sorted(configured), f"{kind}s lost or invented by sharding"
        assert all(parts), f"an empty {kind} shard: {[len(p) for p in parts]}"


def test_shard_entrypoint_refuses_a_pod_name_without_ordinal(chart: Any, fake_bridge: Path) -> None:
    out = render(chart, load_values("sharded"))
    script = out.one("ConfigMap")["data"]["shard.sh"]
    proc = subprocess.run(
        ["/bin/sh", "-c", script, "shard.sh", "run"],
        env={"PATH": f"{fake_bridge}{os.pathsep}/usr/bin:/bin", "POD_NAME": "not-a-statefulset",
             "ALENO_SHARD_COUNT": "3"},
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert proc.returncode == 64
    assert "cannot read a pod ordinal" in proc.stderr
    assert proc.stdout == ""  # the bridge was not started


# ---------------------------------------------------------------------------
# the image and the chart agree


def test_dockerfile_matches_the_chart(chart: Any) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    defaults = chart.values
    assert re.search(r"^FROM python:3\.12-slim|^ARG PYTHON_IMAGE=python:3\.12-slim", dockerfile,
                     re.M)
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert defaults["securityContext"]["runAsUser"] == 10001
    assert re.search(rf"^EXPOSE {defaults['metrics']['port']}$", dockerfile, re.M)
    assert 'ENTRYPOINT ["aleno-bridge"]' in dockerfile
    assert 'CMD ["run", "-c", "/etc/aleno-bridge/config.yaml"]' in dockerfile
    assert chart.metadata["appVersion"] == "0.1.0"
    assert chart.metadata["apiVersion"] == "v2"
