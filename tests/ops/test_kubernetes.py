"""deploy/kubernetes: every kustomization renders with ``kubectl kustomize`` and every object is valid.

No cluster is available here, so the manifests are checked as far as tools allow: Kubernetes
objects against the official schemas (``kubernetes-validate``, strict: unknown fields are errors)
for the oldest and newest Kubernetes it knows; the ServiceMonitor against the Prometheus
Operator's CRD model (``cloudcoil-models-prometheus-operator``); and how the pieces refer to each
other (selectors, ports, probes, mounts, the shard count, the daemon's own config validation for
every replica with the environment the pod would have).

kubectl: Debian's ``kubernetes-client`` package (kubectl 1.20, kustomize v2) or any newer one; the
manifests stick to what both understand. Set ``KUBECTL`` to test another binary. Skips with a
message when there is none.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from daemon.config import Settings
from daemon.fleet import FleetPlan, Shard

from .dashboard import ROOT

K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/gpu-sam2", "overlays/servicemonitor"]
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
PASSWORD = "not-a-real-password-7Qx"

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the [test] extra)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """{kustomization: objects}, rendered from a copy of deploy/kubernetes with a password file."""
    if not KUBECTL:
        pytest.skip("kubectl not installed (Debian: apt-get install kubernetes-client); manifests not rendered")
    tree = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("mqtt-password"))
    (tree / "base" / "mqtt-password").write_text(PASSWORD)  # the operator creates this file
    out = {}
    for k in KUSTOMIZATIONS:
        r = subprocess.run([KUBECTL, "kustomize", str(tree / k)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kubectl kustomize {k}: {r.stderr}"
        out[k] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def one(objs: list[dict], kind: str) -> dict:
    (found,) = [o for o in objs if o["kind"] == kind]
    return found


def container(objs: list[dict]) -> dict:
    (c,) = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return c


def daemon_config(objs: list[dict]) -> tuple[str, str]:
    """(file name, TOML text) of the config the StatefulSet mounts and passes with --config."""
    sts = one(objs, "StatefulSet")
    c = container(objs)
    path = Path(c["args"][c["args"].index("--config") + 1])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    vol = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == vol["configMap"]["name"])
    return path.name, cm["data"][path.name]


# -- schemas ----------------------------------------------------------------------------------

def test_every_kustomization_renders_the_expected_objects(rendered):
    for k, objs in rendered.items():
        kinds = sorted(o["kind"] for o in objs)
        want = ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "StatefulSet"]
        assert kinds == sorted(want + (["ServiceMonitor"] if k.endswith("servicemonitor") else [])), k


@pytest.mark.parametrize("version", ["1.25.0", "latest"])
def test_every_object_validates_against_the_kubernetes_schemas(rendered, version):
    version = kv.latest_version() if version == "latest" else version
    for k, objs in rendered.items():
        for o in objs:
            if o["kind"] == "ServiceMonitor":
                continue  # a CRD: next test
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{k}: {o['kind']}/{o['metadata']['name']} (Kubernetes {version}): {e.message} "
                            f"at {'.'.join(map(str, e.path))}")


def test_the_schema_check_catches_a_mistake(rendered):
    sts = copy.deepcopy(one(rendered["base"], "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}  # typo
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, kv.latest_version(), strict=True)
    pdb = copy.deepcopy(one(rendered["base"], "PodDisruptionBudget"))
    pdb["spec"]["maxUnavailable"] = [1]
    with pytest.raises(kv.ValidationError):
        kv.validate(pdb, kv.latest_version(), strict=True)


def test_servicemonitor_matches_the_prometheus_operator_crd(rendered):
    pytest.importorskip("cloudcoil.models.prometheus_operator", reason="pip install cloudcoil-models-prometheus-operator")
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    objs = rendered["overlays/servicemonitor"]
    sm = one(objs, "ServiceMonitor")
    model = ServiceMonitor.model_validate(sm)
    # The model ignores unknown fields: a round trip that loses something means a misspelt key.
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == sm
    broken = copy.deepcopy(sm)
    broken["spec"]["endpoints"][0]["intervl"] = "15s"
    assert ServiceMonitor.model_validate(broken).model_dump(by_alias=True, exclude_none=True, mode="json") != broken
    # It selects the Service and scrapes a port the Service has.
    svc = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # And the pods no longer carry scrape annotations (no second scrape by annotation discovery).
    assert not one(objs, "StatefulSet")["spec"]["template"]["metadata"].get("annotations")


# -- how the pieces fit -------------------------------------------------------------------------

@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_service_pdb_probes_and_ports_fit_the_statefulset(rendered, k):
    objs = rendered[k]
    sts, svc, pdb = one(objs, "StatefulSet"), one(objs, "Service"), one(objs, "PodDisruptionBudget")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # Headless Service named by the StatefulSet, selecting its pods, listing not-ready ones too.
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items() and svc["spec"]["publishNotReadyAddresses"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert sts["spec"]["podManagementPolicy"] == "Parallel"

    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    _, text = daemon_config(objs)
    listen = tomllib.loads(text)["metrics"]["listen"]
    assert listen.startswith("0.0.0.0:") and ports["metrics"] == int(listen.rsplit(":", 1)[1])
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    annotations = sts["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/scrape" in annotations:
        assert annotations["prometheus.io/port"] == str(ports["metrics"]) and annotations["prometheus.io/path"] == "/metrics"
    # Clean shutdown (pipelines, then the outbox flush) fits in the grace period.
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_volumes_config_secret_and_state_fit_the_daemon(rendered, k):
    objs = rendered[k]
    sts, c = one(objs, "StatefulSet"), container(objs)
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for m in c["volumeMounts"]:
        assert m["name"] in volumes or m["name"] in claims, m
    # Generated names (with their content hash) are what the pod refers to.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for v in volumes.values():
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in names
        if "secret" in v:
            assert ("Secret", v["secret"]["secretName"]) in names
    cfg = tomllib.loads(daemon_config(objs)[1])
    # The password file is the Secret's key, mounted where the config looks for it.
    pw = Path(cfg["sinks"]["mqtt"]["password_file"])
    secret_vol = volumes[mounts[str(pw.parent)]]["secret"]
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == secret_vol["secretName"])
    assert pw.name in secret["data"]
    # The state dir is the replica's own volume (one claim per replica), not the image's disk.
    assert claims[mounts[cfg["state"]["dir"]]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The password is in the Secret only.
    import base64

    assert base64.b64decode(secret["data"][pw.name]).decode() == PASSWORD
    for o in objs:
        if o is not secret:
            assert PASSWORD not in yaml.safe_dump(o), o["kind"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsNonRoot"]


def pod_environment(c: dict, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet would expand it for ``pod_name``."""
    env: dict[str, str] = {}
    for e in c["env"]:
        if "valueFrom" in e:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, e
            env[e["name"]] = pod_name
        else:
            # $(VAR) expands only for variables defined earlier in the list.
            for ref in re.findall(r"\$\((\w+)\)", e["value"]):
                assert ref in env, f"{e['name']} uses $({ref}) before it is defined"
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], e["value"])
    return env


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_every_replica_gets_a_valid_config_and_the_shards_cover_every_camera_once(rendered, k, tmp_path,
                                                                                    monkeypatch):
    objs = rendered[k]
    sts, c = one(objs, "StatefulSet"), container(objs)
    replicas = sts["spec"]["replicas"]
    _, text = daemon_config(objs)
    # Files that exist only in the image (/models/...) stand in as empty files here.
    for path in set(re.findall(r"/models/[\w.\-]+", text + yaml.safe_dump(c["env"]))):
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_bytes(b"")
    local = lambda s: s.replace("/models/", f"{tmp_path}/models/")  # noqa: E731
    data = tomllib.loads(local(text))
    runs: dict[str, int] = {}
    for i in range(replicas):
        env = pod_environment(c, f"{sts['metadata']['name']}-{i}")
        for key in [key for key in os.environ if key.startswith("REGIONWATCH_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("REGIONWATCH_"):
                monkeypatch.setenv(key, local(value))
        settings = Settings(**data)  # the daemon's own validation, with the pod's environment
        assert settings.fleet.parsed == Shard(i, replicas), "spec.replicas and the shard count disagree"
        plan = FleetPlan.of(settings)
        for cam in plan.settings.cameras:
            assert cam.id not in runs, f"{cam.id} runs on replicas {runs[cam.id]} and {i}"
            runs[cam.id] = i
        assert plan.settings.state.dir == f"/var/lib/regionwatch/shard-{i}"
        if k.endswith("gpu-sam2"):
            assert settings.tracker.backend == "sam2" and settings.detector.device.startswith("cuda")
            assert settings.tracker.sam2.checkpoint and settings.tracker.sam2.device.startswith("cuda")
    assert sorted(runs) == sorted(cam["id"] for cam in data["cameras"])


def test_gpu_overlay_asks_for_a_gpu_and_tolerates_gpu_nodes(rendered):
    objs = rendered["overlays/gpu-sam2"]
    c = container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(rendered["base"])["resources"].get("limits", {})
    tolerations = one(objs, "StatefulSet")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert c["image"].endswith("-cuda")
