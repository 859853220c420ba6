"""deploy/kubernetes: every manifest valid against the Kubernetes JSON schemas (strict: an
unknown field fails), and the numbers that must agree with Surge agree."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from surge.server.lifecycle import ENGINE_SHUTDOWN_SECONDS
from tests.deploy._files import kubernetes_documents, parse_serve, resource

KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate==1.37.0 ships


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("path", "document"), kubernetes_documents(),
                         ids=lambda value: value.name if isinstance(value, Path) else "")
def test_manifest_is_valid_against_the_schemas(path: Path, document: dict[str, Any]) -> None:
    _validate(document)


def test_the_validator_rejects_a_broken_deployment() -> None:
    broken = copy.deepcopy(resource("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    misspelt = copy.deepcopy(resource("Deployment"))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(misspelt)


def _container() -> dict[str, Any]:
    return resource("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_the_container_args_are_surge_serve_flags() -> None:
    args = parse_serve(["--host", "0.0.0.0", "--port", "8000", *_container()["args"]])
    assert args.drain_timeout > 0


def test_the_grace_period_covers_prestop_drain_and_engine_shutdown() -> None:
    spec = resource("Deployment")["spec"]["template"]["spec"]
    container = _container()
    drain = parse_serve(container["args"]).drain_timeout
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    prestop = float(command[1])
    assert 0 < prestop < drain
    assert spec["terminationGracePeriodSeconds"] > prestop + drain + ENGINE_SHUTDOWN_SECONDS


def test_probes_ask_health_on_the_served_port() -> None:
    container = _container()
    port = container["ports"][0]
    assert port["containerPort"] == 8000  # the image's `--port 8000`
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", port["name"]), probe
    # Liveness must outlast an engine restart (/health 503 meanwhile) by a wide margin.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def test_the_pods_run_as_the_image_user_not_root() -> None:
    context = resource("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001


def test_the_service_and_the_autoscaler_point_at_the_deployment() -> None:
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == _container()["ports"][0]["name"]
    target = resource("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_the_autoscaler_metric_is_the_one_the_adapter_serves() -> None:
    metric = resource("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "surge:num_requests_waiting"
    config = yaml.safe_load(resource("ConfigMap")["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in config["rules"]}
    assert metric in served
