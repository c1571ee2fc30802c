"""The chart's ``persistence`` section (issue 22): a claim per pod for the sinks' disk
spools, mounted where the configuration's ``buffer.disk.path`` points, sized by the rule
of the values' comments; and the values the chart refuses."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
import yaml

from bridge.config import parse_config
from bridge.sinks import Drivers
from tests.integration.helm.test_helm import (
    CHART,
    NAMESPACE,
    POD_ENV,
    _bytes,
    check_k8s,
    load_values,
    merged,
    render,
)

pytestmark = pytest.mark.integration

MOUNT = "/var/lib/aleno-bridge/spool"


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def test_lint_clean() -> None:
    report = helm.lint(CHART, load_values("persistence"), strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"], report["errors"]


@pytest.mark.parametrize("extra", [{}, {"shards": 2, "replicasPerShard": 2}])
def test_a_claim_per_pod_mounted_at_the_spool_path(chart: Any, extra: dict[str, Any]) -> None:
    out = render(chart, merged(load_values("persistence"), extra))
    for doc in out.docs:
        check_k8s(doc)
    sts = out.workload
    assert sts["kind"] == "StatefulSet" and not out.all("Deployment")
    assert sts["spec"]["replicas"] == (1 if not extra else 4)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["metadata"]["annotations"] == {"backup.example.com/skip": "true"}
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-local",
                             "resources": {"requests": {"storage": "9Gi"}}}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain", "whenScaled": "Retain"}
    mounts = {m["name"]: m["mountPath"] for m in out.container["volumeMounts"]}
    assert mounts["spool"] == MOUNT
    # the claim is the pod's volume: no pod volume of that name hides it
    assert "spool" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    headless = [s for s in out.all("Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]]
    assert "spool-<pod>" in out.notes and "aleno-bridge spool inspect" in out.notes
    # without shards there is no shard entrypoint
    assert ("command" in out.container) is bool(extra)


def test_the_rendered_config_fits_the_claim(chart: Any) -> None:
    """The sizing rule: the bridge's worst case (validate's figure) fits the claim."""
    if "kafka" not in Drivers().names():
        pytest.skip("the kafka driver is not installed in this environment")
    out = render(chart, load_values("persistence"))
    settings = parse_config(out.config_text, env=POD_ENV)
    disk = settings.disk_estimate()
    assert list(disk) == ["bus"]
    (claim,) = out.workload["spec"]["volumeClaimTemplates"]
    size = _bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert sum(disk.values()) * 1.05 <= size
    assert settings.sinks["bus"].common.buffer.disk is not None
    assert settings.sinks["bus"].common.buffer.disk.path.startswith(MOUNT + "/")


def test_off_by_default(chart: Any) -> None:
    out = render(chart, None)
    assert out.workload["kind"] == "Deployment"
    assert "volumeClaimTemplates" not in out.workload["spec"]
    assert MOUNT not in {m["mountPath"] for m in out.container["volumeMounts"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"persistence": {"enabled": False}},
         r"config\.sinks\.bus\.buffer\.disk: a spool needs a volume that outlives the pod"),
        ({"config": {"sinks": {"bus": {"buffer": {"disk": {"path": "/tmp/spool"}}}}}},
         r"config\.sinks\.bus\.buffer\.disk\.path: \"/tmp/spool\" is not under "
         r"persistence\.mountPath"),
        ({"persistence": {"size": "lots"}}, r"persistence\.size|/persistence/size"),
        ({"persistence": {"retentionPolicy": {"whenDeleted": "Keep"}}},
         r"whenDeleted"),
        ({"persistence": {"mountpath": "/data"}}, r"mountpath"),
    ],
)
def test_refused_at_render(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(chart, merged(load_values("persistence"), values))


def test_values_comments_state_the_sizing_rule() -> None:
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("\npersistence:") - 1500:text.index("\npersistence:")]
    assert "Sizing rule" in block and "max_bytes" in block and "validate" in block
    assert yaml.safe_load(text)["persistence"]["enabled"] is False
