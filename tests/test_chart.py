"""The Helm chart (helm/mole), read the way a cluster would get it: `helm template` output, parsed.

helm is the binary `make chart` installs into .tools/ (or $HELM). Each render takes ~0.1 s; the one slow test
starts the MLflow server with exactly the command and environment the chart gives its container.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "mole"
EXAMPLES = sorted(p.name for p in CHART.glob("values-*.yaml"))
KUBE_VERSION = "1.33.0"
NAMESPACE = "kubeflow"  # the default topology: standalone KFP, whose pipeline pods run in "kubeflow"
#: Every optional part switched on, so that the checks below see every pod the chart can create.
ALL_ON = [
    "--set", "pipelineSubmit.enabled=true", "--set", "pipelineSubmit.kfpServiceAccountToken=true",
    "--set", "pipelineSubmit.kfpToken.existingSecret=kfp-token", "--set", "mlflow.ingress.enabled=true",
    "--set", "mlflow.ingress.host=mlflow.example.com", "--set", "serve.podDisruptionBudget.enabled=true",
    "--set", "serve.autoscaling.enabled=true", "--set", "serve.serviceMonitor.enabled=true",
    "--set", "serve.followAliasSeconds=60",
]  # fmt: skip
#: Kinds of CRDs the cluster must have for the options that create them; their schemas are not in
#: kubernetes-validate, so these objects are checked against the CRD's own schema (tests/crd_schema.py) by the
#: tests that render them.
CRD_KINDS = {"ServiceMonitor"}
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="session")
def helm() -> str:
    path = os.environ.get("HELM") or str(REPO / ".tools" / "helm")
    if not Path(path).is_file():
        message = f"no helm at {path}: `make chart` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_helm(helm: str, *args: str, namespace: str = NAMESPACE) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", "mole", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def render(helm: str, *args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The manifests of one `helm template` (hooks and `helm test` Jobs included)."""
    result = run_helm(helm, *args, namespace=namespace)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: str, *args: str, namespace: str = NAMESPACE) -> str:
    result = run_helm(helm, *args, namespace=namespace)
    assert result.returncode != 0, "the chart rendered values it should refuse"
    return result.stderr


def example(name: str) -> list[str]:
    return ["-f", str(CHART / name)]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found in {[d['metadata']['name'] for d in docs]}"
    return matches[0]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Pod specs of every workload (Deployments, Jobs), by KIND/NAME."""
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if "template" in d.get("spec", {})
    }


def container(docs: list[dict], kind: str, name: str) -> dict:
    (only,) = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


VARIANTS = {"default": [], **{name: example(name) for name in EXAMPLES}, "all-on": ALL_ON}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_renders_valid_kubernetes_objects(helm: str, variant: str) -> None:
    """Every object passes the Kubernetes OpenAPI schema in strict mode (a misspelled field fails)."""
    import kubernetes_validate

    docs = render(helm, *VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "Job"} <= kinds
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_strict_validation_catches_a_misspelled_field(helm: str) -> None:
    """The validation above can fail: one misspelled field in a Deployment is refused."""
    import kubernetes_validate

    deployment = find(render(helm), "Deployment", "mole-serve")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_gpu_pods_request_gpus_on_the_configured_pool(helm: str) -> None:
    selector = {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb", "pool": "a100"}
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    docs = render(
        helm, "--set-json", f"gpuPool.nodeSelector={json.dumps(selector)}",
        "--set-json", f"gpuPool.tolerations={json.dumps(tolerations)}", "--set", "serve.gpu.count=2", *ALL_ON,
    )  # fmt: skip
    spec = find(docs, "Deployment", "mole-serve")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == selector
    assert spec["tolerations"] == tolerations
    (serve,) = spec["containers"]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert serve["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert serve["resources"]["limits"]["memory"] == "32Gi"  # the values' own limits are kept
    # The pipeline's GPU steps are sent to the same pool.
    args = container(docs, "Job", "mole-pipeline-submit")["args"]
    assert f"node_selector={json.dumps(selector, separators=(',', ':'), sort_keys=True)}" in args
    assert f"tolerations={json.dumps(tolerations, separators=(',', ':'), sort_keys=True)}" in args
    # Pods without a GPU stay off the pool.
    for name, pod in pod_specs(docs).items():
        if name != "Deployment/mole-serve":
            assert "nodeSelector" not in pod and "tolerations" not in pod, name
            assert all("nvidia.com/gpu" not in str(c.get("resources")) for c in pod["containers"]), name


@pytest.mark.parametrize(("machine", "per_node"), [("a2-highgpu-8g", 8), ("a2-highgpu-1g", 1)])
def test_gke_examples_ask_what_their_nodes_have(helm: str, machine: str, per_node: int) -> None:
    """Every GPU request of the example fits one node of its machine type (a2-highgpu-1g has one GPU: a pod that
    asks 8 there is never scheduled)."""
    docs = render(helm, *example(f"values-gke-{machine}.yaml"), namespace="kubeflow")
    spec = find(docs, "Deployment", "mole-serve")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100",
                                    "node.kubernetes.io/instance-type": machine}  # fmt: skip
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] <= per_node
    args = container(docs, "Job", "mole-pipeline-submit")["args"]
    params = dict(a.split("=", 1) for a in args[2:] if not a.startswith("--"))
    assert int(params["gpus"]) <= per_node and params["gpus_per_node"] == str(per_node)
    assert int(params["gpus"]) * int(params["stage1_nodes"]) >= 8  # stage 1 still gets 8+ GPUs, over nodes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "gpuPool.gpusPerNode=1", "--set", "serve.gpu.count=2"],
         "serve.gpu.count=2 cannot be scheduled: a node of the GPU pool has gpuPool.gpusPerNode=1"),
        (["--set", "gpuPool.gpusPerNode=1", "--set", "pipelineSubmit.enabled=true",
          "--set", "pipelineSubmit.parameters.gpus=8"],
         "pipelineSubmit.parameters.gpus=8 cannot be scheduled"),
    ],
)  # fmt: skip
def test_gpu_counts_a_node_cannot_give_are_refused(helm: str, args: list[str], expected: str) -> None:
    assert expected in render_error(helm, *args)


# --- namespaces: the chart goes where Kubeflow Pipelines runs the pipeline's pods -----------------------------


def test_standalone_kfp_topology(helm: str) -> None:
    """Standalone KFP runs every pipeline pod in "kubeflow" as pipeline-runner: the release lives there, the Role
    is bound to pipeline-runner there, and the claim, ConfigMap and MLflow URI are all in that namespace."""
    docs = render(helm, "--set", "pipelineSubmit.enabled=true", namespace="kubeflow")
    subjects = find(docs, "RoleBinding", "mole-pipeline")["subjects"]
    assert ("pipeline-runner", "kubeflow") in {(s["name"], s["namespace"]) for s in subjects}
    assert find(docs, "ConfigMap", "mole-config")["data"]["MLFLOW_TRACKING_URI"].startswith(
        "http://mole-mlflow.kubeflow.svc:"
    )
    args = container(docs, "Job", "mole-pipeline-submit")["args"]
    assert "namespace=kubeflow" in args and not any(a.startswith("--namespace") for a in args)
    # MLflow admits the release namespace: the pipeline's pods are in it.
    assert find(docs, "NetworkPolicy", "mole-mlflow")["spec"]["ingress"][0]["from"][0] == {"podSelector": {}}
    error = render_error(helm, namespace="mole")
    assert 'standalone Kubeflow Pipelines runs the pipeline\'s pods in namespace "kubeflow"' in error
    assert "install with -n kubeflow" in error


def test_multi_user_kfp_topology(helm: str) -> None:
    """Multi-user KFP runs a user's pipeline pods in their profile namespace as default-editor: the release goes
    into the profile namespace and submits there."""
    docs = render(helm, *example("values-gke-a2-highgpu-1g.yaml"), namespace="team-vision")
    subjects = find(docs, "RoleBinding", "mole-pipeline")["subjects"]
    assert {(s["name"], s["namespace"]) for s in subjects} == {
        ("mole", "team-vision"),
        ("default-editor", "team-vision"),
    }
    args = container(docs, "Job", "mole-pipeline-submit")["args"]
    assert "--namespace=team-vision" in args and "namespace=team-vision" in args
    assert find(docs, "ConfigMap", "mole-config")["data"]["MLFLOW_TRACKING_URI"].startswith(
        "http://mole-mlflow.team-vision.svc:"
    )
    error = render_error(helm, *example("values-gke-a2-highgpu-1g.yaml"), "--set", "pipelineSubmit.namespace=other",
                         namespace="team-vision")  # fmt: skip
    assert 'pipelineSubmit.namespace "other"' in error and 'the release namespace "team-vision"' in error


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_container_is_non_root_without_privilege_escalation(helm: str, variant: str) -> None:
    specs = pod_specs(render(helm, *VARIANTS[variant]))
    assert specs
    for name, pod in specs.items():
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for c in pod["containers"] + pod.get("initContainers", []):
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            where = f"{name} container {c['name']}"
            assert ctx.get("runAsNonRoot") is True, where
            assert ctx.get("runAsUser", 0) != 0, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("privileged") is not True, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where


CREDENTIAL_ENV = re.compile(r"PASSWORD|SECRET|TOKEN$|ACCESS_KEY|USERNAME|^PGUSER$")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_credentials_come_from_secrets(helm: str, variant: str) -> None:
    """No Secret is rendered, every credential variable is a secretKeyRef, and nothing in the render (URIs,
    ConfigMaps, arguments) carries a password."""
    docs = render(helm, *VARIANTS[variant])
    assert not [d for d in docs if d["kind"] == "Secret"]
    checked = 0
    for name, pod in pod_specs(docs).items():
        for c in pod["containers"]:
            for env in c.get("env", []):
                if CREDENTIAL_ENV.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} is a literal"
                    assert "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']} is not from a Secret"
                    checked += 1
    assert checked >= 4  # the admin user and Flask key of MLflow, the MLflow user of the mole pods
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"[a-z+]+://[^/\s:@]+:[^/\s@]+@", text), "credentials inside a URI"
    assert "password1234" not in text  # MLflow's former built-in admin password
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in cm["data"].items():
            assert not re.search(r"password|secret|token", key, re.I), key
            assert not re.search(r"(?im)^\s*(admin_)?password\s*=", value), key


def test_no_value_can_carry_a_password(helm: str) -> None:
    """Passwords have no place in values: the schema refuses the keys one would try."""
    for key in ("mlflow.auth.adminPassword", "mlflow.backendStore.postgres.password", "tracking.password"):
        err = render_error(helm, "--set", f"{key}=hunter2hunter2")
        assert f"additional properties '{key.rsplit('.', 1)[1]}' not allowed" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "mlfow.enabled=true"], "additional properties 'mlfow' not allowed"),
        (["--set", "serve.gpu.cuont=1"], "at '/serve/gpu': additional properties 'cuont' not allowed"),
        (["--set-string", "serve.gpu.count=two"], "at '/serve/gpu/count': got string, want integer"),
        (["--set", "serve.gpu.count=0"], "at '/serve/gpu/count': minimum: got 0, want 1"),
        (["--set", "mlflow.backendStore.type=mysql"], "at '/mlflow/backendStore/type': value must be one of"),
        (["--set", "serve.tolerations=null"], "at '/serve': additional properties 'tolerations' not allowed"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(helm: str, args: list[str], expected: str) -> None:
    err = render_error(helm, *args)
    assert "values don't meet the specifications of the schema" in err
    assert expected in err, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "mlflow.backendStore.type=postgres"], "mlflow.backendStore.postgres.host must be set"),
        (
            ["--set", "mlflow.backendStore.type=postgres", "--set", "mlflow.backendStore.postgres.host=db"],
            "mlflow.backendStore.postgres.existingSecret.name must name",
        ),
        (["--set", "mlflow.artifacts.s3.enabled=true"], "mlflow.artifacts.s3.bucket must be set"),
        (["--set", "mlflow.replicaCount=2"], "mlflow.replicaCount > 1 needs mlflow.backendStore.type=postgres"),
        (["--set", "mlflow.persistence.enabled=false"], "mlflow.persistence.enabled must be true"),
        (["--set", "mlflow.allowedHosts={*}"], "mlflow.allowedHosts"),
        (["--set", "mlflow.auth.existingSecret.name="], "mlflow.auth.existingSecret.name must name"),
        (["--set", "mlflow.enabled=false"], "tracking.uri must be set when mlflow.enabled is false"),
    ],
)
def test_inconsistent_values_fail_naming_the_value(helm: str, args: list[str], expected: str) -> None:
    assert expected in render_error(helm, *args)


def test_mlflow_defaults_sqlite_on_a_volume_with_basic_auth_and_allowed_hosts(helm: str) -> None:
    docs = render(helm)
    c = container(docs, "Deployment", "mole-mlflow")
    args = c["args"]
    assert args[0] == "server" and "--app-name=basic-auth" in args
    assert "--backend-store-uri=sqlite:////mlflow/data/mlflow.db" in args
    assert "--artifacts-destination=/mlflow/artifacts" in args
    (hosts,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
    assert {
        "mole-mlflow",
        "mole-mlflow:*",
        f"mole-mlflow.{NAMESPACE}.svc:*",
        f"mole-mlflow.{NAMESPACE}.svc.cluster.local:*",
    } <= set(hosts)
    env = env_of(c)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mole-mlflow-auth",
        "key": "password",
    }
    ini = find(docs, "ConfigMap", "mole-mlflow-auth")["data"]["basic_auth.ini"]
    assert "database_uri = sqlite:////mlflow/data/basic_auth.db" in ini
    assert find(docs, "PersistentVolumeClaim", "mole-mlflow")["metadata"]["annotations"]["helm.sh/resource-policy"]
    assert find(docs, "Deployment", "mole-mlflow")["spec"]["strategy"]["type"] == "Recreate"


def test_mlflow_on_external_postgres_and_s3(helm: str) -> None:
    docs = render(helm, *example("values-external-postgres.yaml"))
    deployment = find(docs, "Deployment", "mole-mlflow")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert (
        "--backend-store-uri=postgresql://postgres.databases.svc.cluster.local:5432/mlflow?sslmode=require"
        in c["args"]
    )
    assert "--artifacts-destination=s3://mole-artifacts/mlflow" in c["args"]
    env = env_of(c)
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mole-postgres", "key": "password"}
    assert env["PGUSER"]["valueFrom"]["secretKeyRef"] == {"name": "mole-postgres", "key": "username"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mole-s3"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc.cluster.local:9000"
    ini = find(docs, "ConfigMap", "mole-mlflow-auth")["data"]["basic_auth.ini"]
    assert "database_uri = postgresql://postgres.databases.svc.cluster.local:5432/mlflow_auth?sslmode=require" in ini
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "mole-mlflow"]
    serve_env = env_of(container(docs, "Deployment", "mole-serve"))
    assert serve_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mole-mlflow-client"


def test_generation_service_serves_the_alias_with_probes(helm: str) -> None:
    docs = render(helm, "--set", "serve.model.alias=candidate", "--set", "serve.maxQueue=3")
    c = container(docs, "Deployment", "mole-serve")
    assert c["args"][0] == "serve"
    assert "--model=models:/mole@candidate" in c["args"] and "--max-queue=3" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert env_of(c)["MLFLOW_TRACKING_URI"]["value"] == f"http://mole-mlflow.{NAMESPACE}.svc:5000"
    pod = find(docs, "Deployment", "mole-serve")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 60  # longer than --shutdown-timeout
    by_uri = container(render(helm, "--set", "serve.model.uri=/models/mole"), "Deployment", "mole-serve")
    assert "--model=/models/mole" in by_uri["args"]


def test_rbac_lets_pipeline_runs_launch_training_jobs_and_read_logs(helm: str) -> None:
    docs = render(helm, "--set", "rbac.extraServiceAccounts={pipeline-runner,trainer}")
    rules = find(docs, "Role", "mole-pipeline")["rules"]

    def verbs(group: str, resource: str) -> set[str]:
        return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    manage = {"create", "get", "list", "watch", "delete"}
    assert manage <= verbs("trainer.kubeflow.org", "trainjobs")
    assert manage <= verbs("kubeflow.org", "pytorchjobs")
    assert verbs("", "pods") == verbs("", "pods/log") == {"get", "list", "watch"}
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)
    subjects = find(docs, "RoleBinding", "mole-pipeline")["subjects"]
    assert {(s["name"], s["namespace"]) for s in subjects} == {
        ("mole", NAMESPACE),
        ("pipeline-runner", NAMESPACE),
        ("trainer", NAMESPACE),
    }
    assert len(subjects) == 3  # the runner account is bound once, whether or not it is also listed
    rules = find(render(helm, "--set", "rbac.pytorchJobs=false"), "Role", "mole-pipeline")["rules"]
    assert not [r for r in rules if "pytorchjobs" in r["resources"]]


def test_network_policies_fence_mlflow_and_the_gpu_pods(helm: str) -> None:
    docs = render(helm)
    serve = find(docs, "NetworkPolicy", "mole-serve")["spec"]
    assert set(serve["policyTypes"]) == {"Ingress", "Egress"}
    assert serve["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "serve"
    egress_peers = [peer for rule in serve["egress"] for peer in rule.get("to", [])]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in egress_peers] == ["mlflow"]
    dns_rule = next(rule for rule in serve["egress"] if "to" not in rule)
    assert {p["port"] for p in dns_rule["ports"]} == {53}
    mlflow = find(docs, "NetworkPolicy", "mole-mlflow")["spec"]
    assert mlflow["ingress"][0]["from"] == [{"podSelector": {}}]  # the release namespace only
    assert not [d for d in render(helm, "--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]


def test_pipeline_submit_job_passes_the_release_settings(helm: str) -> None:
    docs = render(helm, *example("values-gke-a2-highgpu-8g.yaml"), "--set", "pipelineSubmit.parameters.gpus=4")
    job = find(docs, "Job", "mole-pipeline-submit")
    # An upgrade does not start a training run unless asked to.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    again = render(helm, *example("values-gke-a2-highgpu-8g.yaml"), "--set", "pipelineSubmit.onUpgrade=true")
    assert find(again, "Job", "mole-pipeline-submit")["metadata"]["annotations"]["helm.sh/hook"] == (
        "post-install,post-upgrade"
    )
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["pipeline", "submit"]
    assert "--host=http://ml-pipeline.kubeflow.svc.cluster.local:8888" in c["args"]
    params = dict(a.split("=", 1) for a in c["args"][2:] if not a.startswith("--"))
    assert params["image"] == "us-central1-docker.pkg.dev/my-project/mole/mole:0.1.0"
    assert params["namespace"] == NAMESPACE and params["workspace_pvc"] == "mole-workspace"
    assert params["mlflow_secret"] == "mole-mlflow" and params["config_map"] == "mole-config"
    assert params["gpus"] == "4"  # values win over the example's 8
    assert json.loads(params["raw_inputs"])["faces"] == "s3://my-project-mole-data/raw/faces"
    config = find(docs, "ConfigMap", "mole-config")["data"]
    assert config["MLFLOW_TRACKING_URI"] == f"http://mole-mlflow.{NAMESPACE}.svc:5000"
    assert config["MLFLOW_S3_ENDPOINT_URL"] == "https://storage.googleapis.com"
    assert not [d for d in render(helm) if d["kind"] == "Job" and "submit" in d["metadata"]["name"]]


def cli_options(*path: str) -> set[str]:
    import typer.main

    from mole.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def test_chart_passes_only_options_the_mole_cli_accepts(helm: str, tmp_path: Path) -> None:
    """Every flag given to `mole serve` / `mole pipeline submit` exists, and every pipeline parameter the Job passes
    (the chart's own and the GKE example's) is declared by the compiled pipeline with a value of its type."""
    from mole.pipeline.run import compile_pipeline, parse_params, pipeline_parameters

    package = REPO / "pipelines" / "mole_pipeline.yaml"
    if not package.is_file():
        package = compile_pipeline(tmp_path / "mole_pipeline.yaml")
    declared = pipeline_parameters(package)
    for variant in (ALL_ON, example("values-gke-a2-highgpu-8g.yaml"), example("values-gke-a2-highgpu-1g.yaml")):
        docs = render(helm, *variant)
        serve_args = container(docs, "Deployment", "mole-serve")["args"]
        assert serve_args[0] == "serve"
        assert {a.split("=", 1)[0] for a in serve_args[1:]} <= cli_options("serve")
        submit_args = container(docs, "Job", "mole-pipeline-submit")["args"]
        assert submit_args[:2] == ["pipeline", "submit"]
        flags = {a.split("=", 1)[0] for a in submit_args[2:] if a.startswith("--")}
        assert flags <= cli_options("pipeline", "submit")
        params = parse_params([a for a in submit_args[2:] if not a.startswith("--")], declared)
        assert params["namespace"] == NAMESPACE and isinstance(params["tolerations"], list)


def test_every_value_is_documented_and_typed() -> None:
    """A comment above every leaf value of values.yaml (or above its parent); a description on every schema
    property, and no schema object that accepts unknown keys."""
    undocumented: list[str] = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = previous.lstrip().startswith("#") or any(doc for _, doc in stack)
            if match.group(3).strip() and not documented:
                undocumented.append(match.group(2))
            stack.append((indent, documented))
        if line.strip():
            previous = line
    assert not undocumented

    def walk(node: dict, path: str) -> Iterator[str]:
        for key, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                yield f"{path}.{key}"
            if sub.get("type") == "object" and "properties" in sub:
                assert sub.get("additionalProperties") is False, f"{path}.{key} accepts unknown keys"
                yield from walk(sub, f"{path}.{key}")

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert not list(walk(schema, ""))


# --- the MLflow container, run here as the chart configures it ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, auth: tuple[str, str] | None = None, host: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


class FakeServe(BaseHTTPRequestHandler):
    ready = 200

    def do_GET(self) -> None:
        self.send_response({"/healthz": 200, "/readyz": FakeServe.ready}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_mlflow_runs_with_the_charts_command_and_helm_test_checks_it(helm: str, tmp_path: Path) -> None:
    """`mlflow server` with the rendered args and env (Secrets filled in, volumes mapped to folders): it starts,
    refuses anonymous API calls and unknown Host headers, lets the admin in; the `helm test` script passes against
    it and fails when the generation service is not ready."""
    docs = render(helm, "--set", "mlflow.allowedHosts={127.0.0.1:*}", "--set", "mlflow.workers=1")
    c = container(docs, "Deployment", "mole-mlflow")
    (tmp_path / "etc").mkdir()
    ini = find(docs, "ConfigMap", "mole-mlflow-auth")["data"]["basic_auth.ini"]
    paths = {"/mlflow/data": str(tmp_path / "data"), "/mlflow/artifacts": str(tmp_path / "artifacts"),
             "/etc/mlflow": str(tmp_path / "etc"), "/tmp": str(tmp_path)}  # fmt: skip

    def local(text: str) -> str:  # one pass: the folders themselves lie under /tmp
        return re.sub("|".join(map(re.escape, paths)), lambda m: paths[m.group(0)], text)

    (tmp_path / "data").mkdir()
    (tmp_path / "etc" / "basic_auth.ini").write_text(local(ini))
    secrets = {"username": "admin", "password": "a-long-test-password", "flask-secret-key": "k" * 32}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for e in c["env"]:
        env[e["name"]] = local(e["value"]) if "value" in e else secrets[e["valueFrom"]["secretKeyRef"]["key"]]
    port = free_port()
    args = [local(a) for a in c["args"] if not a.startswith(("--host=", "--port="))]
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert mlflow
    log = tmp_path / "mlflow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([mlflow, *args, "--host=127.0.0.1", f"--port={port}"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeServe)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _up(uri):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        admin = (secrets["username"], secrets["password"])
        assert http_status(api) == 401
        assert http_status(api, admin) == 200
        assert http_status(api, ("admin", "wrong-password-123")) == 401
        assert http_status(api, admin, host="attacker.example:5000") == 403
        assert http_status(api, admin, host=f"mole-mlflow.{NAMESPACE}.svc:5000") == 200

        test_job = container(docs, "Job", "mole-test")
        script = test_job["args"][0]
        job_env = {
            **os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": admin[0],
            "MLFLOW_TRACKING_PASSWORD": admin[1], "MOLE_SERVE_URL": f"http://127.0.0.1:{fake.server_port}",
        }  # fmt: skip
        assert {e["name"] for e in test_job["env"]} >= {"MLFLOW_TRACKING_URI", "MOLE_SERVE_URL"}
        passed = subprocess.run([sys.executable, "-c", script], env=job_env, capture_output=True, text=True)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        FakeServe.ready = 503
        failed = subprocess.run([sys.executable, "-c", script], env=job_env, capture_output=True, text=True)
        assert failed.returncode == 1 and "/readyz (model loaded): 503" in failed.stdout
        # Waiting for a first champion, the generation Service has no pod: not a failure of the release ...
        assert {e["name"]: e["value"] for e in test_job["env"] if "value" in e}["MOLE_SERVE_MAY_WAIT"] == "1"
        nobody = {**job_env, "MOLE_SERVE_URL": f"http://127.0.0.1:{free_port()}", "MOLE_SERVE_MAY_WAIT": "1"}
        waiting = subprocess.run([sys.executable, "-c", script], env=nobody, capture_output=True, text=True)
        assert waiting.returncode == 0 and "no pod yet" in waiting.stdout, waiting.stdout + waiting.stderr
        # ... but it is once the service should be up.
        nobody.pop("MOLE_SERVE_MAY_WAIT")
        down = subprocess.run([sys.executable, "-c", script], env=nobody, capture_output=True, text=True)
        assert down.returncode == 1 and "/healthz: unreachable" in down.stdout
    finally:
        FakeServe.ready = 200
        fake.shutdown()
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def _up(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=2).close()
        return True
    except OSError:
        return False


# --- images by digest, serving that waits for its champion, optional scaling and monitoring --------------------


def test_images_by_digest_everywhere(helm: str) -> None:
    """A digest pins every mole pod and the pipeline's steps (the submit Job passes it as `image`)."""
    docs = render(helm, "--set", f"image.digest={DIGEST}", "--set", f"mlflow.image.digest={DIGEST}",
                  "--set", "pipelineSubmit.enabled=true")  # fmt: skip
    mole_image = f"ghcr.io/mole-project/mole@{DIGEST}"
    assert container(docs, "Deployment", "mole-serve")["image"] == mole_image
    assert container(docs, "Deployment", "mole-mlflow")["image"] == f"ghcr.io/mole-project/mole-mlflow@{DIGEST}"
    submit = container(docs, "Job", "mole-pipeline-submit")
    assert submit["image"] == mole_image and f"image={mole_image}" in submit["args"]
    assert "at '/image/digest'" in render_error(helm, "--set", "image.digest=latest")


def test_serving_waits_for_a_champion_without_gpus(helm: str) -> None:
    """Before the first champion the Deployment has no pod (so none holds a GPU); the promote step, allowed to
    get and patch that one Deployment, scales it up and rolls it onto each new champion."""
    docs = render(helm, "--set", "serve.replicaCount=3", "--set", "pipelineSubmit.enabled=true")
    assert find(docs, "Deployment", "mole-serve")["spec"]["replicas"] == 0
    args = container(docs, "Job", "mole-pipeline-submit")["args"]
    assert "serve_deployment=mole-serve" in args and "serve_replicas=3" in args
    rules = find(docs, "Role", "mole-pipeline")["rules"]
    (apps,) = [r for r in rules if r["apiGroups"] == ["apps"]]
    assert apps == {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["mole-serve"],
                    "verbs": ["get", "patch"]}  # fmt: skip
    eager = render(helm, "--set", "serve.replicaCount=3", "--set", "serve.waitForChampion=false")
    assert find(eager, "Deployment", "mole-serve")["spec"]["replicas"] == 3
    assert "--compile" not in container(eager, "Deployment", "mole-serve")["args"]
    compiled = render(helm, "--set", "serve.compile=true")
    assert "--compile" in container(compiled, "Deployment", "mole-serve")["args"]


def test_optional_pdb_autoscaler_and_service_monitor(helm: str) -> None:
    assert not {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"} & {d["kind"] for d in render(helm)}
    docs = render(helm, *ALL_ON)
    labels = find(docs, "Deployment", "mole-serve")["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "mole-serve")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = find(docs, "HorizontalPodAutoscaler", "mole-serve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mole-serve"}
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "mole_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    from tests.crd_schema import crd_errors

    assert crd_errors("prometheus-servicemonitor-v1", find(docs, "ServiceMonitor", "mole-serve")) == []
    monitor = find(docs, "ServiceMonitor", "mole-serve")["spec"]
    service = find(docs, "Service", "mole-serve")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert "minReplicas=5 is above" in render_error(helm, "--set", "serve.autoscaling.enabled=true",
                                                    "--set", "serve.autoscaling.minReplicas=5")  # fmt: skip
    assert "additional properties 'maxUnavailabel' not allowed" in render_error(
        helm, "--set", "serve.podDisruptionBudget.maxUnavailabel=1"
    )


# --- KServe --------------------------------------------------------------------------------------------------------


def test_kserve_inference_service_runs_the_same_container(helm: str) -> None:
    """The InferenceService option: valid against KServe's own CRD schema (strict), the same image, command,
    environment and GPU placement as the Deployment it replaces."""
    import kubernetes_validate
    from tests.crd_schema import crd_errors

    plain = render(helm)
    docs = render(helm, "--set", "serve.kserve.enabled=true", "--set", "serve.compile=true")
    assert not [d for d in docs if d["kind"] in {"Deployment", "Service"} and d["metadata"]["name"] == "mole-serve"]
    isvc = find(docs, "InferenceService", "mole-serve")
    assert crd_errors("kserve-inferenceservice-v1beta1", isvc) == []
    for doc in docs:
        if doc["kind"] != "InferenceService":
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    deployed = container(plain, "Deployment", "mole-serve")
    assert c["image"] == deployed["image"]
    assert c["args"] == [*deployed["args"], "--compile"]
    assert c["env"] == deployed["env"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = find(plain, "Deployment", "mole-serve")["spec"]["template"]["spec"]
    assert predictor["tolerations"] == pod["tolerations"]
    policy = find(docs, "NetworkPolicy", "mole-serve")["spec"]["podSelector"]["matchLabels"]
    assert policy.items() <= predictor["labels"].items()  # the NetworkPolicies still select its pods
    assert not [r for r in find(docs, "Role", "mole-pipeline")["rules"] if r["apiGroups"] == ["apps"]]
    assert "needs serve.kserve.deploymentMode=Serverless" in render_error(
        helm, "--set", "serve.kserve.enabled=true", "--set", "serve.kserve.minReplicas=0"
    )


def test_crd_validation_catches_a_misspelled_field(helm: str) -> None:
    from tests.crd_schema import crd_errors

    isvc = find(render(helm, "--set", "serve.kserve.enabled=true"), "InferenceService", "mole-serve")
    isvc["spec"]["predictor"]["minReplica"] = 1
    isvc["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}
    errors = crd_errors("kserve-inferenceservice-v1beta1", isvc)
    assert any("minReplica" in e for e in errors) and any("readinesProbe" in e for e in errors), errors
