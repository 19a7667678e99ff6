"""deploy/k8s: every overlay renders, and what it sets is what the services read.

Rendering needs kubectl (kustomize built in); the YAML is turned into JSON by kubectl
too (`annotate --local` with a no-op removal), so no YAML library is needed.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
OVERLAY_NAMES = ("dev", "prod", "gpu")

# component label -> (settings class path, env prefix, gRPC service name)
SERVICES = {
    "encoder": (
        "copyfree_encoder.settings:EncoderSettings",
        "ENCODER_",
        "copyfree.v1.EncoderService",
    ),
    "index": (
        "copyfree_index.settings:IndexSettings",
        "INDEX_",
        "copyfree.v1.IndexService",
    ),
    "gateway": (
        "copyfree_gateway.settings:GatewaySettings",
        "GATEWAY_",
        "copyfree.v1.GatewayService",
    ),
}
# Variables without the service prefix that a manifest may set on purpose.
HELPER_VARS = {
    "REDIS_PASSWORD",  # only expanded into INDEX_REDIS_URL by Kubernetes
    "CUDA_CACHE_PATH",  # CUDA's kernel cache (GPU encoder, read-only root fs)
}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """kubectl kustomize <overlay> -> the objects, as JSON."""
    yaml_text = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    as_json = subprocess.run(
        ["kubectl", "annotate", "--local", "-f", "-", "-o", "json",
         "copyfree.render-check-"],
        input=yaml_text,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={"KUBECONFIG": "/dev/null", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    ).stdout  # fmt: skip
    decoder, pos = json.JSONDecoder(), 0
    objects: list[dict[str, Any]] = []
    while pos < len(as_json):
        if as_json[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(as_json, pos)
        items = obj["items"] if obj.get("kind") == "List" else [obj]
        objects.extend(items)
    return tuple(objects)


def workloads(overlay: str) -> dict[str, dict[str, Any]]:
    """component label -> its Deployment/StatefulSet, for the copyfree services."""
    found = {}
    for obj in render(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        component = obj["metadata"]["labels"].get("app.kubernetes.io/component")
        if component in SERVICES:
            found[component] = obj
    assert sorted(found) == sorted(SERVICES), f"{overlay}: workloads {sorted(found)}"
    return found


def server_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = [
        c for c in workload["spec"]["template"]["spec"]["containers"]
        if c["name"] == "server"
    ]  # fmt: skip
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def settings_class(component: str) -> type[BaseSettings]:
    module_name, _, class_name = SERVICES[component][0].partition(":")
    module = importlib.import_module(module_name)
    cls: type[BaseSettings] = getattr(module, class_name)
    return cls


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_renders(overlay: str) -> None:
    kinds = {obj["kind"] for obj in render(overlay)}
    assert {"Deployment", "StatefulSet", "Service", "Namespace"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("component", sorted(SERVICES))
def test_env_vars_are_settings_fields_and_valid(
    overlay: str, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = settings_class(component)
    _, prefix, _ = SERVICES[component]
    env = env_of(server_container(workloads(overlay)[component]))
    fields = set(cls.model_fields)
    for name in env:
        if name in HELPER_VARS:
            continue
        assert name.startswith(prefix), f"{overlay}/{component}: stray variable {name}"
        field = name.removeprefix(prefix).lower()
        assert field in fields, f"{overlay}/{component}: {name} is not a setting"

    # The literal values must also validate, all together, as the service reads them.
    for var in list(os.environ):
        if var.startswith(prefix):
            monkeypatch.delenv(var)
    for name, entry in env.items():
        if name in HELPER_VARS:
            continue
        # Values from the downward API or secrets: stand-ins of the right type.
        value = entry.get(
            "value", "0" if "fieldRef" in entry.get("valueFrom", {}) else ""
        )
        monkeypatch.setenv(name, value)
    cls()


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_index_replicas_equal_num_shards_and_gateway_knows_every_shard(
    overlay: str,
) -> None:
    found = workloads(overlay)
    index = found["index"]
    index_env = env_of(server_container(index))
    shards = int(index_env["INDEX_NUM_SHARDS"]["value"])
    assert index["kind"] == "StatefulSet"
    assert index["spec"]["replicas"] == shards
    assert index["spec"]["serviceName"] == "index"
    shard_id = index_env["INDEX_SHARD_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert shard_id == "metadata.labels['apps.kubernetes.io/pod-index']"

    port = int(index_env["INDEX_PORT"]["value"])
    gateway_env = env_of(server_container(found["gateway"]))
    addrs = json.loads(gateway_env["GATEWAY_INDEX_ADDRS"]["value"])
    assert addrs == [f"index-{i}.index:{port}" for i in range(shards)]

    headless = [
        o for o in render(overlay)
        if o["kind"] == "Service" and o["metadata"]["name"] == "index"
    ]  # fmt: skip
    assert headless and headless[0]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("component", sorted(SERVICES))
def test_probes_ports_and_hardening(overlay: str, component: str) -> None:
    _, prefix, service_name = SERVICES[component]
    workload = workloads(overlay)[component]
    container = server_container(workload)
    port = int(env_of(container)[f"{prefix}PORT"]["value"])

    assert {"name": "grpc", "containerPort": port} in [
        {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]
    ]
    # With TLS, probes use the plaintext health-only port (kubelet speaks no TLS).
    health = env_of(container).get(f"{prefix}HEALTH_PORT")
    port = int(health["value"]) if health else port
    assert container["readinessProbe"]["grpc"] == {
        "port": port,
        "service": service_name,
    }
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["port"] == port

    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(c["resources"]["limits"])
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_encoder_bundles_live_on_the_mounted_models_volume(overlay: str) -> None:
    container = server_container(workloads(overlay)["encoder"])
    env = env_of(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for name in ("ENCODER_DETECTION_BUNDLE", "ENCODER_RETRIEVAL_BUNDLE"):
        path = env[name]["value"]
        mount = next(m for m in mounts if path.startswith(m.rstrip("/") + "/"))
        assert mounts[mount].get("readOnly") is True


def test_gpu_overlay_asks_for_a_gpu_and_cuda() -> None:
    container = server_container(workloads("gpu")["encoder"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    assert env_of(container)["ENCODER_PROVIDERS"]["value"] == "cuda"
    assert container["image"].split("/")[-1].startswith("copyfree-encoder-gpu")
    cpu_encoder = server_container(workloads("prod")["encoder"])
    assert "nvidia.com/gpu" not in cpu_encoder["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_redis_keeps_an_append_only_file_on_a_volume(overlay: str) -> None:
    in_cluster = [
        o for o in render(overlay)
        if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "redis"
    ]  # fmt: skip
    if not in_cluster:
        pytest.skip(f"{overlay} uses an external Redis (component external-redis)")
    (redis,) = in_cluster
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir
