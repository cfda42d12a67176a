"""deploy/k8s agrees with the gateway: its settings load, its ports, probes and user are the
gateway's, and its grace period outlasts the drain. (`make k8s-check` validates the schemas.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from canvas_gateway_server.settings import Settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return document


def test_the_configmap_holds_valid_settings() -> None:
    settings = Settings.from_env(_load("configmap.yaml")["data"])  # an unknown CGW_ name would raise
    assert settings.tenants_file.startswith("/etc/canvas-gateway/")
    assert settings.log_format == "json"


def test_the_deployment_serves_the_gateway_s_ports_probes_and_user() -> None:
    settings = Settings.from_env(_load("configmap.yaml")["data"])
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {
        "grpc": int(settings.grpc_address.rpartition(":")[2]),
        "admin": int(settings.admin_address.rpartition(":")[2]),
    }
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tenants")
    assert settings.tenants_file.startswith(mount["mountPath"] + "/")
    drain = (
        gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
        + settings.shutdown_delay_seconds
        + settings.shutdown_grace_seconds
    )
    assert pod["terminationGracePeriodSeconds"] > drain + 5  # the drain ends before the kill


def test_the_service_balances_grpc_per_request() -> None:
    ports = {port["name"]: port for port in _load("service.yaml")["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
