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
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python as helm  # a broken native library must fail the tests, never skip them
import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridge.config import Settings, parse_config
from bridge.config.schema import is_loopback_host
from bridge.simulator import default_equities, default_tickers
from bridge.sinks import Drivers
from bridge.upstream.sharding import shard_symbols

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "aleno-bridge"
VALUES_DIR = ROOT / "tests" / "helm_values"
RELEASE = "prices"
NAMESPACE = "market-data"
# The oldest Kubernetes the chart targets and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # monitoring.coreos.com: not in k8s schemas
POD_ENV = {"ALENO_API_KEY": "dummy-key", "ALENO_SHARD_INDEX": "1"}

GOOD_VALUES = [
    "default",
    "sharded",
    "existing-secret",
    "monitoring",
    "kafka",
    "control-tokens",
    "control-existing-secret",
    "networkpolicy-off",
]
BAD_VALUES = [
    "bad-shards-string",
    "bad-shards-zero",
    "bad-replicas",
    "bad-image-tag",
    "bad-config-no-sinks",
    "bad-unknown-key",
    "bad-control-token-no-name",
    "bad-control-scope",
    "bad-control-short-token",
    "bad-control-anonymous",
    "bad-control-unknown-key",
    "bad-networkpolicy-peer",
]
# Where the schema must point for a bad values file (the reason it is bad, not another).
BAD_WHERE = {
    "bad-control-token-no-name": "/control/tokens/0",
    "bad-control-scope": "/control/tokens/0/scopes/1",
    "bad-control-short-token": "/control/tokens/0/token",
    "bad-control-anonymous": "/control/anonymous",
    "bad-control-unknown-key": "/control",
    "bad-networkpolicy-peer": "/networkPolicy/control/from/0",
}
# What the operator's Secret named by control-existing-secret.yaml holds.
EXISTING_TOKEN_SECRET = {
    "bridge-control-tokens": {
        "svc-a": "test-only-token-a9b8c7d6e5f40312",
        "svc-b": "test-only-token-1122334455667788",
        "unrelated": "not-a-token-of-this-release",
    },
}


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
    assert out.kinds() == ["ConfigMap", "Deployment", "NetworkPolicy", "Service",
                           "ServiceAccount"]
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
    assert_v1_guarded(settings)
    control = settings.config.control.http
    assert control is not None and control.loopback  # no tokens in these: /v1 stays in the pod


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
# the control surface (/v1): its own listener, tokens from a Secret, a NetworkPolicy

TOKEN_DIR = "/var/run/secrets/aleno-bridge/control-tokens"


def secret_data(out: Rendered) -> dict[str, dict[str, str]]:
    """The chart-made Secrets' contents by name, plus the operator's own Secrets."""
    found = {d["metadata"]["name"]: dict(d.get("stringData") or {}) for d in out.all("Secret")}
    return {**EXISTING_TOKEN_SECRET, **found}


def as_the_pod_reads_it(out: Rendered, root: Path) -> str:
    """The rendered config as the container sees it: every Secret volume of the pod is
    written under `root` the way the kubelet projects it (its `items`, or every key),
    and the config's paths under the mount point are pointed there. A key the volume
    names but the Secret lacks fails (the pod would not start)."""
    pod = out.workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = secret_data(out)
    text = out.config_text
    for mount in out.container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        data = secrets[volume["secret"]["secretName"]]
        items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
        target = root / mount["name"]
        target.mkdir(parents=True)
        for item in items:
            assert item["key"] in data, f"Secret has no key {item['key']!r}: the pod won't start"
            (target / item["path"]).write_text(data[item["key"]])
        text = text.replace(f"{mount['mountPath']}/", f"{target}/")
    return text


def assert_v1_guarded(settings: Settings) -> None:
    """What `aleno-bridge validate` enforces (issue 18): /v1 on a listener beyond
    loopback needs tokens, or anonymous scopes set explicitly."""
    control = settings.config.control
    http = control.http
    assert http is not None, "the chart always writes control.http"
    if http.enabled and not is_loopback_host(http.host):
        assert control.auth.tokens or control.auth.anonymous is not None, (
            f"/v1 on {http.host}:{http.port} without tokens or explicit anonymous scopes")


def ingress_peers(policy: dict[str, Any], port: str) -> list[dict[str, Any]] | None:
    """The peers a NetworkPolicy admits on the named port: None = from anywhere,
    [] = nobody."""
    assert "Ingress" in policy["spec"]["policyTypes"]
    peers: list[dict[str, Any]] = []
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            continue
        if not rule.get("from"):
            return None
        peers.extend(rule["from"])
    return peers


def selects_the_pods(out: Rendered, policy: dict[str, Any]) -> bool:
    labels: dict[str, str] = out.workload["spec"]["template"]["metadata"]["labels"]
    selector: dict[str, str] = policy["spec"]["podSelector"]["matchLabels"]
    return selector.items() <= labels.items()


def test_default_install_keeps_v1_loopback_only(chart: Any) -> None:
    out = render(chart, None)
    config = yaml.safe_load(out.config_text)
    assert config["control"]["http"]["host"] == "127.0.0.1"
    assert config["control"]["http"]["port"] == 9465
    assert "tokens" not in config["control"].get("auth", {})
    settings = parse_config(out.config_text, env=POD_ENV)
    http = settings.config.control.http
    assert http is not None and http.enabled and http.loopback
    assert settings.config.control.auth.anonymous is None
    assert_v1_guarded(settings)
    # nothing publishes the loopback listener
    assert [p["name"] for p in out.container["ports"]] == ["http-metrics"]
    assert all(p["name"] != "http-control" for s in out.all("Service") for p in s["spec"]["ports"])
    assert not out.all("Secret")
    assert all(m["mountPath"] != TOKEN_DIR for m in out.container["volumeMounts"])
    policy = out.one("NetworkPolicy")
    assert selects_the_pods(out, policy)
    assert ingress_peers(policy, "http-metrics") is None  # probes, Prometheus: as before
    assert ingress_peers(policy, "http-control") == []
    assert ingress_peers(policy, "anything-else") == []
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress (upstream, brokers) is free
    assert "127.0.0.1:9465 inside the pod only" in out.notes
    assert "port-forward deployment/prices-aleno-bridge 9465" in out.notes


@pytest.mark.parametrize("name", ["control-tokens", "control-existing-secret",
                                  "networkpolicy-off"])
def test_control_port_is_published(chart: Any, name: str) -> None:
    values = load_values(name)
    assert values is not None
    out = render(chart, values)
    port = out.container["ports"][1]
    assert port == {"name": "http-control", "containerPort": 9465, "protocol": "TCP"}
    assert out.container["ports"][0]["name"] == "http-metrics"
    svc = next(s for s in out.all("Service")
               if s["metadata"]["name"] == f"{RELEASE}-aleno-bridge-control")
    assert svc["spec"]["ports"] == [{"name": "http-control", "port": 9465,
                                     "targetPort": "http-control", "protocol": "TCP"}]
    pod_labels = out.workload["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "control"
    assert not svc["spec"].get("publishNotReadyAddresses")  # ready pods only
    metrics = next(s for s in out.all("Service") if s["metadata"]["name"].endswith("-metrics"))
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["http-metrics"]
    config = yaml.safe_load(out.config_text)
    assert config["control"]["http"]["enabled"] is True
    assert config["control"]["http"]["host"] == "0.0.0.0"
    assert config["control"]["http"]["port"] == port["containerPort"]
    assert config["http"]["port"] == out.container["ports"][0]["containerPort"]  # unchanged
    for doc in out.docs:
        check_k8s(doc)


@pytest.mark.parametrize("name", ["control-tokens", "control-existing-secret",
                                  "networkpolicy-off"])
def test_tokens_reach_the_bridge_as_files(chart: Any, name: str, tmp_path: Path) -> None:
    values = load_values(name)
    assert values is not None
    out = render(chart, values)
    declared = values["control"]["tokens"]
    existing = values["control"].get("existingTokenSecret")
    config = yaml.safe_load(out.config_text)
    written = config["control"]["auth"]["tokens"]
    assert [t["name"] for t in written] == [t["name"] for t in declared]
    # the mount and the config agree on every path
    mount = next(m for m in out.container["volumeMounts"] if m["name"] == "control-tokens")
    assert mount["mountPath"] == TOKEN_DIR and mount["readOnly"] is True
    volume = next(v for v in out.workload["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "control-tokens")
    secret_name = existing or f"{RELEASE}-aleno-bridge-control-tokens"
    assert volume["secret"]["secretName"] == secret_name
    items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
    for token, spec in zip(written, declared, strict=True):
        assert token["token_file"] == f"{mount['mountPath']}/{items[spec['name']]}"
        assert "token" not in token
        assert token.get("scopes", ["snapshot"]) == spec.get("scopes", ["snapshot"])
        assert token.get("max_symbols") == spec.get("maxSymbols")
    assert config["control"]["auth"].get("anonymous") == values["control"].get("anonymous")
    # the token Secret: chart-made (holds the values) or the operator's (nothing rendered)
    if existing:
        assert not any(s["metadata"]["name"] == existing for s in out.all("Secret"))
        assert "checksum/control-tokens" not in (
            out.workload["spec"]["template"]["metadata"]["annotations"])
    else:
        secret = next(s for s in out.all("Secret") if s["metadata"]["name"] == secret_name)
        assert secret["stringData"] == {t["name"]: t["token"] for t in declared}
    # no token value anywhere but its Secret
    values_of = secret_data(out)[secret_name]
    for doc in out.docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == secret_name:
            continue
        text = yaml.safe_dump(doc)
        for token in values_of.values():
            assert token not in text, f"a control token leaked into {doc['kind']}"
    for token in values_of.values():
        assert token not in out.notes and token not in out.config_text
    # the bridge reads them where the kubelet puts them, and accepts the whole config
    settings = parse_config(as_the_pod_reads_it(out, tmp_path), env=POD_ENV, source=name)
    assert_v1_guarded(settings)
    auth = settings.config.control.auth
    assert [t.name for t in auth.tokens] == [t["name"] for t in declared]
    for token in auth.tokens:
        assert token.token_file is not None
        assert token.token_file.read_text() == values_of[token.name]
    http = settings.config.control.http
    assert http is not None and not http.loopback and http.port == 9465


def test_control_service_for_shards_and_notes(chart: Any) -> None:
    tokens = load_values("control-tokens")
    assert tokens is not None
    values = merged(load_values("sharded"), {"control": tokens["control"]})
    out = render(chart, values)
    headless = next(s for s in out.all("Service") if s["spec"].get("clusterIP") == "None")
    assert {p["name"] for p in headless["spec"]["ports"]} == {"http-metrics", "http-control"}
    assert "Each shard holds its own symbols" in out.notes
    # NOTES: how to call it with a token, fetched from the Secret
    notes = render(chart, load_values("control-tokens")).notes
    assert "port-forward deployment/prices-aleno-bridge 9465" in notes
    assert ("kubectl -n market-data get secret prices-aleno-bridge-control-tokens "
            "-o jsonpath='{.data.pricing-ui}' | base64 -d") in notes
    assert 'curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:9465/v1/snapshot' in notes
    assert "prices-aleno-bridge-control.market-data.svc:9465" in notes
    assert "risk.engine: snapshot, lease, max 200 leased symbols" in notes
    assert "networkPolicy.control.from is empty" not in notes
    dotted = render(chart, merged(load_values("control-tokens"), {"control": {"tokens": [
        {"name": "risk.engine", "token": "test-only-token-c0ffee5eed1234ab"}]}})).notes
    assert "jsonpath='{.data.risk\\.engine}'" in dotted  # kubectl jsonpath escapes dots
    unguarded = render(chart, load_values("networkpolicy-off")).notes
    assert "every pod in the cluster can reach the control port" in unguarded
    closed = render(chart, merged(load_values("control-tokens"),
                                  {"networkPolicy": {"control": {"from": []}}})).notes
    assert "networkPolicy.control.from is empty" in closed


def test_rotating_a_token_rolls_the_pods(chart: Any) -> None:
    values = load_values("control-tokens")
    assert values is not None
    base = render(chart, values).workload["spec"]["template"]["metadata"]["annotations"]
    tokens = copy.deepcopy(values["control"]["tokens"])
    tokens[0]["token"] = "test-only-token-rotated00000001"
    rotated = render(chart, merged(values, {"control": {"tokens": tokens}}))
    annotations = rotated.workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/control-tokens"] != base["checksum/control-tokens"]
    assert annotations["checksum/config"] == base["checksum/config"]  # the ConfigMap holds no token


@pytest.mark.parametrize("name", ["control-tokens", "control-existing-secret"])
def test_network_policy_admits_metrics_and_only_named_peers_on_control(chart: Any,
                                                                       name: str) -> None:
    values = load_values(name)
    assert values is not None
    out = render(chart, values)
    policy = out.one("NetworkPolicy")
    assert selects_the_pods(out, policy)
    check_k8s(policy)
    wanted_metrics = values["networkPolicy"].get("metrics", {}).get("from") or None
    assert ingress_peers(policy, "http-metrics") == wanted_metrics
    assert ingress_peers(policy, "http-control") == values["networkPolicy"]["control"]["from"]
    assert ingress_peers(policy, "http-other") == []
    # every port a rule names is a port of the container
    named = {p["name"] for p in out.container["ports"]}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in named
    # no peer admitted on control unless named
    without = render(chart, merged(values, {"networkPolicy": {"control": {"from": []}}}))
    assert ingress_peers(without.one("NetworkPolicy"), "http-control") == []


def test_network_policy_off_renders_none(chart: Any) -> None:
    out = render(chart, load_values("networkpolicy-off"))
    assert not out.all("NetworkPolicy")
    assert out.all("Deployment")


def test_network_policy_extra_ingress(chart: Any) -> None:
    extra = [{"ports": [{"port": 15090, "protocol": "TCP"}]}]
    out = render(chart, {"networkPolicy": {"extraIngress": extra}})
    policy = out.one("NetworkPolicy")
    assert policy["spec"]["ingress"][-1] == extra[0]
    check_k8s(policy)


def test_control_listener_off(chart: Any, tmp_path: Path) -> None:
    values = merged(load_values("control-tokens"), {"control": {"enabled": False}})
    out = render(chart, values)
    assert [p["name"] for p in out.container["ports"]] == ["http-metrics"]
    assert not any(s["metadata"]["name"].endswith("-control") for s in out.all("Service"))
    assert ingress_peers(out.one("NetworkPolicy"), "http-control") == []
    settings = parse_config(as_the_pod_reads_it(out, tmp_path), env=POD_ENV)
    assert settings.config.control.http is not None
    assert settings.config.control.http.enabled is False
    assert len(settings.config.control.auth.tokens) == 2  # still the NATS door's tokens
    assert "listener is off" in out.notes


def test_control_explicit_bind_and_anonymous(chart: Any) -> None:
    # explicit anonymous scopes are a choice: the listener may leave loopback without tokens
    out = render(chart, {"control": {"anonymous": ["snapshot"]}})
    settings = parse_config(out.config_text, env=POD_ENV)
    assert settings.config.control.http is not None
    assert settings.config.control.http.host == "0.0.0.0"
    assert settings.config.control.auth.anonymous == ["snapshot"]
    assert_v1_guarded(settings)
    assert "Without a token: snapshot" in out.notes
    # a loopback bindAddress with tokens: nothing published, tokens still mounted
    values = merged(load_values("control-tokens"), {"control": {"bindAddress": "127.0.0.1"}})
    local = render(chart, values)
    assert [p["name"] for p in local.container["ports"]] == ["http-metrics"]
    assert yaml.safe_load(local.config_text)["control"]["http"]["host"] == "127.0.0.1"
    assert any(m["mountPath"] == TOKEN_DIR for m in local.container["volumeMounts"])
    ipv6 = render(chart, merged(load_values("control-tokens"), {"control": {"bindAddress": "::"}}))
    assert yaml.safe_load(ipv6.config_text)["control"]["http"]["host"] == "::"
    assert ipv6.container["ports"][1]["name"] == "http-control"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"control": {"bindAddress": "0.0.0.0"}}, r"without tokens"),
        ({"control": {"bindAddress": "10.1.2.3"}}, r"without tokens"),
        ({"control": {"tokens": [{"name": "svc-a"}]}}, r"has no token"),
        ({"control": {"existingTokenSecret": "s", "tokens": [
            {"name": "svc-a", "token": "test-only-token-0a1b2c3d4e5f6789"}]}},
         r"existingTokenSecret is set"),
        ({"control": {"existingTokenSecret": "s"}}, r"control\.tokens is empty"),
        ({"control": {"tokens": [
            {"name": "svc-a", "token": "test-only-token-0a1b2c3d4e5f6789"},
            {"name": "svc-a", "token": "test-only-token-9999999999999999"}]}},
         r"also the name of control\.tokens\[0\]"),
        ({"control": {"tokens": [
            {"name": "svc-a", "token": "test-only-token-0a1b2c3d4e5f6789"},
            {"name": "svc-b", "token": "test-only-token-0a1b2c3d4e5f6789"}]}},
         r"the same token as control\.tokens\[0\]"),
        ({"config": {"control": {"auth": {"tokens": [
            {"name": "svc-a", "token": "test-only-token-0a1b2c3d4e5f6789"}]}}}},
         r"set by the chart"),
        ({"control": {"port": 9464}}, r"both 9464"),
    ],
)
def test_control_values_refused_at_render(chart: Any, values: dict[str, Any],
                                          message: str) -> None:
    chart.validate_schema(values)  # the schema lets them through: the templates refuse them
    with pytest.raises(helm.HelmError, match=message) as caught:
        render(chart, values)
    assert "test-only-token-0a1b2c3d4e5f6789" not in str(caught.value)


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
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    if name in BAD_WHERE:
        assert f"at '{BAD_WHERE[name]}'" in str(caught.value), str(caught.value)
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
    assert re.search(r"^ARG PYTHON_IMAGE=docker\.io/library/python:3\.12-slim$", dockerfile, re.M)
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert defaults["securityContext"]["runAsUser"] == 10001
    ports = f"{defaults['metrics']['port']} {defaults['control']['port']}"
    assert re.search(rf"^EXPOSE {ports}$", dockerfile, re.M)
    assert 'ENTRYPOINT ["aleno-bridge"]' in dockerfile
    assert 'CMD ["run", "-c", "/etc/aleno-bridge/config.yaml"]' in dockerfile
    assert chart.metadata["appVersion"] == "0.1.0"
    assert chart.metadata["apiVersion"] == "v2"
    # the default image is what `make image` tags: aleno-bridge:<package version>
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert defaults["image"]["repository"] == "aleno-bridge"
    assert defaults["image"]["tag"] in ("", project["version"])
    assert chart.metadata["appVersion"] == project["version"]
