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
    assert settings.tenants.file.startswith("/etc/canvas-gateway/")
    assert settings.telemetry.log_format == "json"


def test_the_deployment_serves_the_gateway_s_ports_probes_and_user() -> None:
    settings = Settings.from_env(_load("configmap.yaml")["data"])
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {
        "grpc": int(settings.listen.grpc_address.rpartition(":")[2]),
        "admin": int(settings.listen.admin_address.rpartition(":")[2]),
    }
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tenants")
    assert settings.tenants.file.startswith(mount["mountPath"] + "/")
    drain = (
        gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
        + settings.shutdown.delay_seconds
        + settings.shutdown.grace_seconds
    )
    assert pod["terminationGracePeriodSeconds"] > drain + 5  # the drain ends before the kill


def test_the_service_balances_grpc_per_request() -> None:
    ports = {port["name"]: port for port in _load("service.yaml")["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"


# --- shared state: Redis, shipped ----------------------------------------------------------------


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object the kustomization lists, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in _load("kustomization.yaml")["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def test_more_than_one_pod_means_shared_state_that_a_pod_cannot_start_without() -> None:
    objects = _objects()
    pods = max(
        objects[("Deployment", "canvas-gateway")]["spec"]["replicas"],
        objects[("HorizontalPodAutoscaler", "canvas-gateway")]["spec"]["minReplicas"],
    )
    assert pods > 1
    (gateway,) = objects[("Deployment", "canvas-gateway")]["spec"]["template"]["spec"]["containers"]
    env = _env(gateway)
    password = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert "optional" not in password  # no Secret, no pod: never a pod that shares nothing
    url = env["CGW_REDIS_URL"]["value"]
    assert list(env).index("REDIS_PASSWORD") < list(env).index("CGW_REDIS_URL")  # $(...) expands
    settings = Settings.from_env(
        {**_load("configmap.yaml")["data"], "CGW_REDIS_URL": url.replace("$(REDIS_PASSWORD)", "0f" * 32)}
    )
    service = objects[("Service", "canvas-gateway-redis")]
    assert settings.state.redis_url == f"redis://:{'0f' * 32}@{service['metadata']['name']}:6379/0"
    assert [port["port"] for port in service["spec"]["ports"]] == [6379]

    redis = objects[("StatefulSet", "canvas-gateway-redis")]
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    assert _env(server)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password  # the same Secret
    requirepass = server["args"].index("--requirepass")
    assert server["args"][requirepass + 1] == "$(REDIS_PASSWORD)"


def test_redis_persists_every_write_and_has_probes_a_volume_and_a_disruption_budget() -> None:
    objects = _objects()
    redis = objects[("StatefulSet", "canvas-gateway-redis")]
    pod = redis["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = server["args"]
    option = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2) if args[i].startswith("--")}
    assert option["--appendonly"] == "yes"  # an empty Redis after a restart would resend
    assert option["--maxmemory-policy"] == "noeviction"  # an evicted key would resend
    (mount,) = server["volumeMounts"]
    assert mount["mountPath"] == option["--dir"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]  # the data outlives the pod
    # A cluster can pull it: the official image, a version tag (never latest).
    name, _, tag = server["image"].partition(":")
    assert name == "redis" and tag[0].isdigit()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe in server, probe
    assert "PONG" in " ".join(server["readinessProbe"]["exec"]["command"])
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True

    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "canvas-gateway-redis")]
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == server["ports"][0]["name"]
    budget = objects[("PodDisruptionBudget", "canvas-gateway-redis")]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["minAvailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # Only the gateway's pods reach it, and the gateway's own selectors never pick Redis' pod.
    gateway_labels = objects[("Deployment", "canvas-gateway")]["spec"]["template"]["metadata"]["labels"]
    policy = objects[("NetworkPolicy", "canvas-gateway-redis")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[(kind, "canvas-gateway")]["spec"]
        selected = selector.get("selector", {})
        selected = selected.get("matchLabels", selected)
        assert not selected.items() <= pod_labels.items(), kind


ENTRY_BYTES = 800
"""An upper bound of what the in-process key store keeps a batch (tests/test_idempotency.py
measures about 580 B with tracemalloc and holds it under this)."""
GATEWAY_BYTES = 64 * 2**20
"""The gateway's own resident memory, rounded up (BENCHMARKS.md: 55-61 MiB over a soak)."""


def _bytes(quantity: str) -> int:
    number, unit = quantity[:-2], quantity[-2:]
    return int(number) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def test_the_in_process_key_store_at_its_default_capacity_fits_the_pod_s_memory() -> None:
    """A pod without Redis (an overlay that removes it) keeps keys in memory only on port 0, but
    the default must fit anyway: 50,000 batches x 800 B = 38 MiB, with the gateway's 64 MiB
    within the 128 MiB request (the old 200,000 x 4.7 KB = 900 MiB was far over the 256 MiB limit)."""
    (gateway,) = _load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    request = _bytes(gateway["resources"]["requests"]["memory"])
    limit = _bytes(gateway["resources"]["limits"]["memory"])
    capacity = Settings.from_env(_load("configmap.yaml")["data"]).state.idempotency_capacity
    assert GATEWAY_BYTES + capacity * ENTRY_BYTES <= request < limit


# --- Prometheus Operator: the PodMonitor, outside the kustomization -----------------------------

PODMONITOR = K8S / "prometheus-operator" / "podmonitor.yaml"


def test_the_podmonitor_scrapes_the_gateway_s_admin_port_under_the_job_the_alerts_expect() -> None:
    """`make k8s-check` cannot validate a custom resource offline: its fields are held here."""
    monitor = yaml.safe_load(PODMONITOR.read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert set(monitor["spec"]) == {"jobLabel", "selector", "podMetricsEndpoints"}
    assert PODMONITOR.name not in str(_load("kustomization.yaml")["resources"])
    objects = _objects()
    template = objects[("Deployment", "canvas-gateway")]["spec"]["template"]
    labels = template["metadata"]["labels"]
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= labels.items()  # it picks the gateway's pods
    redis_labels = objects[("StatefulSet", "canvas-gateway-redis")]["spec"]["template"]["metadata"]["labels"]
    assert not selector["matchLabels"].items() <= redis_labels.items()  # and not Redis'
    # The job is the value of the pods' label it names: the job alerts.yml's CanvasGatewayDown expects.
    assert labels[monitor["spec"]["jobLabel"]] == "canvas-gateway"
    assert 'up{job="canvas-gateway"}' in (K8S.parent / "prometheus" / "alerts.yml").read_text()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (gateway,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert endpoint["port"] in ports
    annotations = template["metadata"]["annotations"]  # the same port and path as the annotations
    assert str(ports[endpoint["port"]]) == annotations["prometheus.io/port"]
    assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"
