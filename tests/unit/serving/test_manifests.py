"""deploy/k8s, the security side: every overlay validates strictly against recent
Kubernetes schemas; auth everywhere, TLS in prod, network isolation, disruption budgets
and autoscaling as designed; every file a setting points at is mounted."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_deploy import (
    OVERLAY_NAMES,
    ROOT,
    SERVICES,
    env_of,
    render,
    server_container,
    workloads,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")
# The oldest version the manifests need (the pod-index label is >= 1.28; grpc probes
# GA in 1.27) that is still supported, and the newest schema the validator ships.
K8S_VERSIONS = ("1.33.0", "1.37.0")
EXTERNAL_SECRETS = {"copyfree-auth", "copyfree-tls", "copyfree-redis-external"}


def _named(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{overlay} {name} invalid for {version}: {e.message}")


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("component", sorted(SERVICES))
def test_every_service_requires_tokens_and_mounts_every_file_it_reads(
    overlay: str, component: str
) -> None:
    workload = workloads(overlay)[component]
    container = server_container(workload)
    prefix = SERVICES[component][1]
    env = env_of(container)
    assert env[f"{prefix}AUTH_TOKENS_FILE"]["value"]
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container["volumeMounts"]]
    for name, entry in env.items():
        if name.endswith("_FILE"):
            path = entry["value"]
            assert any(path.startswith(m) for m in mounts), f"{name}={path} unmounted"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"].startswith("copyfree-auth")


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_production_overlays_use_tls_and_mutual_tls_internally(overlay: str) -> None:
    found = workloads(overlay)
    for component, (_, prefix, _) in SERVICES.items():
        env = env_of(server_container(found[component]))
        assert f"{prefix}TLS_CERT_FILE" in env and f"{prefix}TLS_KEY_FILE" in env
        if component != "gateway":  # only a client certificate from our CA gets in
            assert f"{prefix}TLS_CLIENT_CA_FILE" in env
    gateway = env_of(server_container(found["gateway"]))
    assert {"GATEWAY_UPSTREAM_CA_FILE", "GATEWAY_UPSTREAM_CERT_FILE"} <= set(gateway)


def test_dev_runs_one_cpu_shard_and_prod_four_with_external_redis() -> None:
    dev, prod = workloads("dev"), workloads("prod")
    assert dev["index"]["spec"]["replicas"] == 1
    assert prod["index"]["spec"]["replicas"] == 4
    assert (
        "nvidia.com/gpu" not in server_container(dev["encoder"])["resources"]["limits"]
    )
    assert "redis" in _named("dev", "StatefulSet")
    assert "redis" not in _named("prod", "StatefulSet")
    url = env_of(server_container(prod["index"]))["INDEX_REDIS_URL"]
    assert url["valueFrom"]["secretKeyRef"]["name"] == "copyfree-redis-external"
    # Egress to the external Redis replaced the rules that named in-cluster pods.
    policies = _named("prod", "NetworkPolicy")
    for name, rule in (("copyfree-index", 0), ("copyfree-gateway", 2)):
        egress = policies[name]["spec"]["egress"][rule]
        assert "ipBlock" in egress["to"][0]
        assert {"protocol": "TCP", "port": 6379} in egress["ports"]


def _peers(rule: dict[str, Any]) -> list[str]:
    return [
        p.get("podSelector", {})
        .get("matchLabels", {})
        .get("app.kubernetes.io/name", "*")
        for p in rule.get("from", rule.get("to", [{}]))
    ]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_network_policies_expose_only_the_gateway(overlay: str) -> None:
    policies = _named(overlay, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {
        "Ingress",
        "Egress",
    }
    gateway_in = policies["copyfree-gateway"]["spec"]["ingress"]
    assert [r.get("from") for r in gateway_in] == [None]  # anyone, on the API port
    assert gateway_in[0]["ports"] == [{"protocol": "TCP", "port": 50050}]
    for name, only_from in (
        ("copyfree-encoder", "copyfree-gateway"),
        ("copyfree-index", "copyfree-gateway"),
        ("copyfree-redis", "copyfree-index"),
        ("copyfree-redis-audit", "copyfree-gateway"),
    ):
        if name not in policies:  # external Redis: no in-cluster pods to protect
            assert overlay != "dev"
            continue
        for rule in policies[name]["spec"]["ingress"]:
            assert _peers(rule) == [only_from], (overlay, name, rule)
    # Metrics only from a namespace that is marked as the scraper.
    scrape = policies["allow-metrics-scrape"]["spec"]["ingress"][0]
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert "namespaceSelector" in scrape["from"][0]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_disruption_budgets_and_the_gateway_autoscaler(overlay: str) -> None:
    pdbs = _named(overlay, "PodDisruptionBudget")
    assert set(pdbs) >= {"copyfree-encoder", "copyfree-gateway", "index"}
    assert all(p["spec"]["maxUnavailable"] == 1 for p in pdbs.values())
    hpa = _named(overlay, "HorizontalPodAutoscaler")["copyfree-gateway"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "copyfree-gateway"
    gateway = _named(overlay, "Deployment")["copyfree-gateway"]
    assert "replicas" not in gateway["spec"]  # the HPA owns the count
    assert hpa["minReplicas"] == (1 if overlay == "dev" else 2)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_referenced_secrets_are_generated_or_documented_as_external(
    overlay: str,
) -> None:
    generated = set(_named(overlay, "Secret"))
    referenced: set[str] = set()
    for obj in render(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "secret" in v:
                referenced.add(v["secret"]["secretName"])
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    missing = referenced - generated
    if overlay == "dev":
        assert not missing, f"dev must generate {missing}"
    else:
        assert missing <= EXTERNAL_SECRETS, missing


def test_dev_token_files_parse_and_the_gateway_token_opens_encoder_and_index() -> None:
    from copyfree.serving.auth import METHOD_SCOPES, TokenTable, authorize

    secrets = ROOT / "deploy" / "k8s" / "overlays" / "dev" / "secrets"
    TokenTable.from_json((secrets / "gateway-tokens.json").read_text())
    internal = TokenTable.from_json((secrets / "internal-tokens.json").read_text())
    token = (secrets / "gateway-token").read_text().strip()
    gateway = internal.authenticate([("authorization", f"Bearer {token}")])
    for method in METHOD_SCOPES:
        if "/copyfree.v1.GatewayService/" not in method:
            authorize(gateway, method)
