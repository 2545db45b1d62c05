"""deploy/kubernetes: the producer pod with its sidecar, checked against the sidecar itself.

The manifests are parsed (no cluster here): the sidecar's env - resolved from the
ConfigMap, the Secret and the container's own env - and its command must be real options
of ``order-sidecar serve`` that pass its start-up validation; the producer must call the
address the sidecar listens on; the probes must ask the health check script the image
ships for that same address, liveness without failing on NOT_SERVING; every container
must have resources and a non-root, locked-down security context.
"""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
from types import ModuleType
from typing import Any

import pytest
import yaml
from order_sidecar.runtime.security import is_loopback

from tests.support.deploy import (
    DOCKERFILE,
    HEALTHCHECK,
    ROOT,
    dockerfile_stages,
    load_producer_module,
    sidecar_config,
    split_address,
)

K8S = ROOT / "deploy" / "kubernetes"
Manifest = dict[str, Any]


def load_manifests() -> list[Manifest]:
    documents: list[Manifest] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def one(manifests: list[Manifest], kind: str, name: str = "") -> Manifest:
    found = [
        m for m in manifests if m["kind"] == kind and (not name or m["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck_script", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return load_manifests()


@pytest.fixture(scope="module")
def pod(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [
        c
        for c in pod.get("initContainers", []) + pod["containers"]
        if c.get("command", [])[:2] == ["order-sidecar", "serve"]
    ]
    assert len(found) == 1, "expected one order-sidecar serve container"
    container: dict[str, Any] = found[0]
    return container


def producer_container(pod: dict[str, Any]) -> dict[str, Any]:
    assert len(pod["containers"]) == 1, "one producer container per pod"
    container: dict[str, Any] = pod["containers"][0]
    return container


def container_env(container: dict[str, Any], manifests: list[Manifest]) -> dict[str, str]:
    """The container's env as the kubelet would set it (downward API values stand in)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = one(manifests, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            env.update({k: str(v) for k, v in data.items()})
        if "secretRef" in source:
            secret = one(manifests, "Secret", source["secretRef"]["name"])
            env.update({k: str(v) for k, v in secret.get("stringData", {}).items()})
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.name", field
            env[item["name"]] = "producer-7d9f-abcde"
    return env


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for manifest in load_manifests():
        assert {"apiVersion", "kind", "metadata"} <= set(manifest), manifest
        assert manifest["metadata"]["name"]


def test_deployment_selects_its_pods(manifests: list[Manifest]) -> None:
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2, "the point is several producer replicas"


def test_sidecar_uses_real_options_from_env(manifests: list[Manifest], pod: dict[str, Any]) -> None:
    sidecar = sidecar_container(pod)
    # A native sidecar: starts before the producer, stops after it.
    assert sidecar in pod.get("initContainers", []) and sidecar["restartPolicy"] == "Always"
    env = container_env(sidecar, manifests)
    config = sidecar_config(sidecar["command"] + sidecar.get("args", []), env)
    # Configuration comes from the ConfigMap/Secret, not from flags.
    assert sidecar["command"] == ["order-sidecar", "serve"] and not sidecar.get("args")
    assert config.nats_url and config.redis_url, "NATS and Redis addresses from env"
    assert config.chosen_lock_backend == "redis"
    # A Redis URL may carry a password: it comes from the Secret.
    secret_keys = {
        k
        for source in sidecar["envFrom"]
        if "secretRef" in source
        for k in one(manifests, "Secret", source["secretRef"]["name"]).get("stringData", {})
    }
    assert "ORDER_SIDECAR_REDIS_URL" in secret_keys
    assert config.producer_id == "producer-7d9f-abcde", "producer id from the pod name"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config.shutdown_grace, "the kubelet would SIGKILL the sidecar's drain"


def test_grpc_on_loopback_metrics_on_a_named_port(
    manifests: list[Manifest], pod: dict[str, Any]
) -> None:
    sidecar = sidecar_container(pod)
    config = sidecar_config(sidecar["command"], container_env(sidecar, manifests))
    assert is_loopback(split_address(config.listen)[0]), config.listen
    metrics_host, metrics_port = split_address(config.metrics_listen)
    assert ipaddress.ip_address(metrics_host).is_unspecified, "Prometheus scrapes the pod IP"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"metrics": metrics_port}, "only metrics leaves the pod"

    annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    service = one(manifests, "Service")
    labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("metrics", "metrics")
    ]

    producer = producer_container(pod)
    args = load_producer_module().parse_args([], container_env(producer, manifests))
    assert split_address(args.target) == split_address(config.listen)
    assert not producer.get("ports"), "the producer example serves nothing"


def test_probes_ask_the_sidecars_own_address(
    manifests: list[Manifest], pod: dict[str, Any]
) -> None:
    sidecar = sidecar_container(pod)
    env = container_env(sidecar, manifests)
    listen = sidecar_config(sidecar["command"], env).listen
    healthcheck = load_healthcheck()
    stages = dockerfile_stages(DOCKERFILE.read_text())
    shipped = {args.split()[-1] for args in stages[-1].all("COPY")}
    parser_live: dict[str, bool] = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = sidecar[kind]
        # kubelet's grpc: probe dials the pod IP, where nothing listens: exec, in the pod.
        assert "grpc" not in probe and "exec" in probe, kind
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "/app/healthcheck.py"], command
        assert command[1] in shipped, "the image does not ship the script"
        parsed = healthcheck.parse_args(command[2:])
        target = parsed.target or healthcheck.default_target(env)
        assert split_address(target) == split_address(listen), kind
        # The kubelet gives up at timeoutSeconds: the script must answer before that.
        assert parsed.timeout < probe["timeoutSeconds"], kind
        parser_live[kind] = parsed.live
    # NOT_SERVING (NATS down) takes the pod out of rotation but must not restart it.
    assert parser_live == {"startupProbe": True, "livenessProbe": True, "readinessProbe": False}


def test_resources_and_security_context(pod: dict[str, Any]) -> None:
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    user = dockerfile_stages(DOCKERFILE.read_text())[-1].all("USER")[-1].split(":")[0]
    assert pod_security["runAsUser"] == int(user) != 0, "the image's own non-root uid"
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    containers = pod.get("initContainers", []) + pod["containers"]
    assert len(containers) == 2
    for container in containers:
        name = container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert security.get("runAsUser", pod_security["runAsUser"]) != 0, name
