"""Multi-node stage 1: a Kubeflow Trainer ``TrainJob`` (or a training-operator ``PyTorchJob``) of N nodes × G GPUs,
each node running the same ``accelerate launch`` command with DeepSpeed.

The pipeline's stage-1 step calls :func:`run_distributed`: build the manifest, validate it offline, create it,
wait for it with a timeout while streaming the pods' logs, and raise :class:`TrainJobFailed` with the reason
when it fails. The job belongs to the run: it is created with an owner reference to the step's own pod (deleting
the run's pods deletes it), and a SIGTERM/SIGINT to the step (a cancelled run) deletes it before the step ends,
so a cancelled run never leaves GPUs busy. Logs are followed as they are written and placed by timestamp,
reconnecting with ``sinceSeconds`` from the last line printed (:mod:`mole.pipeline.podlogs`), so a rotated or
restarted log loses no line and prints none twice. The nodes write into the shared workspace (a ReadWriteMany
PVC), where the step then reads ``result.json``. The Kubernetes API is reached only through :class:`KubeApi`,
which tests replace.

Rendezvous: the Trainer's ``torch-distributed`` runtime (and the PyTorchJob operator) set ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` (the PyTorchJob operator
sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK`` for each pod); the command maps them onto accelerate's flags.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mole.pipeline.podlogs import LogStreams

logger = logging.getLogger(__name__)

TRAINER_GROUP, TRAINER_VERSION, TRAINER_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
#: The replicated job and container of the Trainer's torch-distributed runtime that the patches address.
TRAINER_NODE = "node"


class TrainJobFailed(RuntimeError):
    """The distributed job failed, timed out or could not be created; the message says which and why."""


class ManifestError(ValueError):
    """A manifest does not match the CRD's schema; the message names the field."""


@dataclass
class DistributedSpec:
    """What to run and where.

    Attributes:
        name: The job name (a DNS-1123 label: lower case, digits, ``-``; at most 63 characters).
        namespace: Where to create it.
        image: The mole image.
        mole_args: Arguments after ``mole``, e.g. ``["train", "stage1", "--config", ...]``.
        nodes: Number of nodes (pods).
        gpus_per_node: GPUs per node; also the processes per node.
        accelerate_config: The accelerate + DeepSpeed config file inside the image.
        runtime: The ClusterTrainingRuntime to use (Trainer only).
        node_selector / tolerations: Placement on the A100 pool.
        env: Plain environment variables. secret_env: ``{secret name: {key: ENV_NAME}}``.
        required_secrets: Secrets of ``secret_env`` a pod must not start without (the MLflow user); the others
            are optional (S3 keys, for which a workload identity can stand in).
        pvc / mount_path: The shared workspace.
        cpu / memory: Requests per node. shm_size: The ``/dev/shm`` memory emptyDir per node.
        service_account: The pods' service account.
        owner: An owner reference (the pipeline step's pod): the job is garbage-collected with it.
    """

    name: str
    namespace: str
    image: str
    mole_args: list[str]
    nodes: int = 2
    gpus_per_node: int = 8
    accelerate_config: str = "configs/accelerate/zero2.yaml"
    runtime: str = "torch-distributed"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, dict[str, str]] = field(default_factory=dict)
    required_secrets: list[str] = field(default_factory=list)
    pvc: str | None = None
    mount_path: str = "/workspace"
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    service_account: str | None = None
    owner: dict[str, Any] | None = None


def _metadata(spec: DistributedSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace,
                            "labels": {"app.kubernetes.io/part-of": "mole"}}  # fmt: skip
    if spec.owner:
        meta["ownerReferences"] = [dict(spec.owner)]
    return meta


def launch_command(spec: DistributedSpec, flavour: Literal["trainjob", "pytorchjob"]) -> list[str]:
    """The shell command every node runs: ``accelerate launch`` across all nodes, then ``mole``."""
    if flavour == "trainjob":
        nodes, rank, addr, port = "${PET_NNODES}", "${PET_NODE_RANK}", "${PET_MASTER_ADDR}", "${PET_MASTER_PORT}"
    else:
        nodes, rank, addr, port = str(spec.nodes), "${RANK}", "${MASTER_ADDR}", "${MASTER_PORT}"
    mole = " ".join(shlex.quote(a) for a in spec.mole_args)
    script = (
        f"exec accelerate launch --config_file {shlex.quote(spec.accelerate_config)} "
        f"--num_machines {nodes} --num_processes $(({nodes} * {spec.gpus_per_node})) --machine_rank {rank} "
        f"--main_process_ip {addr} --main_process_port {port} -m mole {mole}"
    )
    return ["/bin/bash", "-c", script]


def _env_list(spec: DistributedSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    for secret, keys in sorted(spec.secret_env.items()):
        for key, name in sorted(keys.items()):
            ref = {"name": secret, "key": key, "optional": secret not in spec.required_secrets}
            env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(spec: DistributedSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.pvc:
        volumes.append({"name": "workspace", "persistentVolumeClaim": {"claimName": spec.pvc}})
        mounts.append({"name": "workspace", "mountPath": spec.mount_path})
    return volumes, mounts


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise ManifestError(f"job name {name!r} is not a DNS-1123 label (lower case, digits, '-', ≤ 63 chars)")


def _placement(spec: DistributedSpec) -> dict[str, Any]:
    """The pod-spec fields that place a training pod: node selector, tolerations, service account (those set)."""
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        out["serviceAccountName"] = spec.service_account
    return out


def trainjob_manifest(spec: DistributedSpec) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob on the ``torch-distributed`` runtime; placement, volumes and
    the shared workspace go in as a runtime patch on the ``node`` replicated job."""
    _check_name(spec.name)
    volumes, mounts = _volumes(spec)
    pod: dict[str, Any] = {"volumes": volumes, "containers": [{"name": TRAINER_NODE, "volumeMounts": mounts}]}
    pod.update(_placement(spec))
    resources = {"nvidia.com/gpu": str(spec.gpus_per_node), "cpu": spec.cpu, "memory": spec.memory}
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": _metadata(spec),
        "spec": {
            "runtimeRef": {"name": spec.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": TRAINER_GROUP},
            "trainer": {
                "image": spec.image,
                "command": launch_command(spec, "trainjob"),
                "env": _env_list(spec),
                "numNodes": spec.nodes,
                "numProcPerNode": spec.gpus_per_node,
                "resourcesPerNode": {"requests": resources, "limits": {"nvidia.com/gpu": str(spec.gpus_per_node)}},
            },
            "runtimePatches": [
                {
                    "manager": "mole",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": pod}}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def pytorchjob_manifest(spec: DistributedSpec) -> dict[str, Any]:
    """The same job as a training-operator ``kubeflow.org/v1`` PyTorchJob (one Master + N-1 Workers)."""
    _check_name(spec.name)
    volumes, mounts = _volumes(spec)
    resources = {"nvidia.com/gpu": str(spec.gpus_per_node), "cpu": spec.cpu, "memory": spec.memory}

    def replica(count: int) -> dict[str, Any]:
        pod: dict[str, Any] = {
            "containers": [{
                "name": "pytorch", "image": spec.image, "command": launch_command(spec, "pytorchjob"),
                "env": _env_list(spec), "volumeMounts": mounts,
                "resources": {"requests": resources, "limits": {"nvidia.com/gpu": str(spec.gpus_per_node)}},
            }],
            "volumes": volumes,
        }  # fmt: skip
        pod.update(_placement(spec))
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec),
        "spec": {"runPolicy": {"cleanPodPolicy": "None"}, "pytorchReplicaSpecs": replicas},
    }


def validate_trainjob(manifest: Mapping[str, Any]) -> None:
    """Check a TrainJob against the CRD's schema, offline, through the models that kubeflow-trainer-api generates
    from it: types are checked strictly, required fields must be there, and a field the schema does not know
    (a misspelling) is an error — it would not survive the round trip through the models.

    Raises:
        ManifestError: With the path of the offending field.
    """
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    if manifest.get("apiVersion") != f"{TRAINER_GROUP}/{TRAINER_VERSION}" or manifest.get("kind") != "TrainJob":
        raise ManifestError(f"not a {TRAINER_GROUP}/{TRAINER_VERSION} TrainJob: {manifest.get('apiVersion')}, "
                            f"{manifest.get('kind')}")  # fmt: skip
    try:
        model = TrainerV1alpha1TrainJob.from_dict(dict(manifest))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"TrainJob field {where}: {first['msg']}") from None
    unknown = _unknown_fields(dict(manifest), model.to_dict(), "")
    if unknown:
        raise ManifestError(f"TrainJob fields not in the CRD schema: {', '.join(unknown)}")


def _unknown_fields(given: Any, kept: Any, path: str) -> list[str]:
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        out = []
        for key, value in given.items():
            sub = f"{path}.{key}" if path else key
            out += [sub] if key not in kept else _unknown_fields(value, kept[key], sub)
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [
            u for i, (a, b) in enumerate(zip(given, kept, strict=False)) for u in _unknown_fields(a, b, f"{path}[{i}]")
        ]
    return []


class KubeApi:
    """The Kubernetes calls this module makes, and nothing else: the boundary tests replace."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def create(self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any]) -> dict:
        return self.custom.create_namespaced_custom_object(group, version, namespace, plural, body)

    def get(self, group: str, version: str, namespace: str, plural: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)

    def delete(self, group: str, version: str, namespace: str, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)

    def pods(self, namespace: str, selector: str) -> list[str]:
        return [p.metadata.name for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]

    def logs(self, namespace: str, pod: str, since_seconds: int | None = None) -> str:
        """The pod's log, every line prefixed with its RFC 3339 timestamp; only the last ``since_seconds``."""
        kw = {"since_seconds": since_seconds} if since_seconds else {}
        return self.core.read_namespaced_pod_log(pod, namespace, timestamps=True, **kw)

    def stream(self, namespace: str, pod: str, since_seconds: int | None = None):
        """Follow the pod's log (``follow=true``, timestamped) line by line until the container ends."""
        kw = {"since_seconds": since_seconds} if since_seconds else {}
        response = self.core.read_namespaced_pod_log(pod, namespace, follow=True, timestamps=True,
                                                     _preload_content=False, **kw)  # fmt: skip
        pending = b""
        try:
            for chunk in response.stream(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
            if pending:
                yield pending.decode("utf-8", errors="replace")
        finally:
            response.release_conn()

    def pod_uid(self, namespace: str, pod: str) -> str:
        return self.core.read_namespaced_pod(pod, namespace).metadata.uid


def _conditions(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def job_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(``running`` | ``succeeded`` | ``failed``, reason) from a TrainJob's or PyTorchJob's conditions."""
    cond = _conditions(obj)
    for kind in ("Failed",):
        if kind in cond:
            c = cond[kind]
            return "failed", f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    for kind in ("Complete", "Succeeded"):
        if kind in cond:
            return "succeeded", cond[kind].get("message", "")
    return "running", ""


def owner_of_this_pod(api: KubeApi, namespace: str) -> dict[str, Any] | None:
    """An owner reference to the pod this step runs in (``HOSTNAME`` is its name in Kubernetes), or None outside
    a pod or when the pod cannot be read: ownership is a safety net, the signal handler does the cleanup."""
    pod = os.environ.get("HOSTNAME", "")
    if not pod or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    try:
        uid = api.pod_uid(namespace, pod)
    except Exception as err:  # no RBAC for get pods, or another namespace: run without an owner
        logger.warning("cannot read this step's pod %s/%s (%s): the job gets no owner reference", namespace, pod, err)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}


class _Terminated(Exception):
    """SIGTERM / SIGINT reached the step while it followed the job."""


def run_distributed(
    spec: DistributedSpec,
    flavour: Literal["trainjob", "pytorchjob"] = "trainjob",
    *,
    timeout_s: float = 7 * 24 * 3600,
    poll_s: float = 30.0,
    api: KubeApi | None = None,
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall: Callable[[], float] = time.time,
    follow_logs: bool = True,
) -> dict[str, Any]:
    """Create the job, stream its pods' logs (followed as they are written with ``follow_logs``, else read at
    every poll), wait until it ends; returns the final object.

    A job that already exists (the pipeline step was retried) is adopted, not created again. On timeout, and when
    the step is terminated (SIGTERM/SIGINT: the run was cancelled), the job is deleted, so that it stops holding
    GPUs. Without an owner in ``spec``, the step's own pod becomes the job's owner.

    Raises:
        TrainJobFailed: It could not be created, it failed (with the operator's reason), it timed out, or the
            step was terminated.
    """
    from mole.pipeline import trainjob as me

    log = log or (lambda line: logger.info("%s", line))
    api = api or me.KubeApi()
    if spec.owner is None:
        spec.owner = owner_of_this_pod(api, spec.namespace)
    if flavour == "trainjob":
        manifest, coords = trainjob_manifest(spec), (TRAINER_GROUP, TRAINER_VERSION, spec.namespace, TRAINER_PLURAL)
        validate_trainjob(manifest)
        selector = f"jobset.sigs.k8s.io/jobset-name={spec.name}"
    else:
        manifest = pytorchjob_manifest(spec)
        coords = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, spec.namespace, PYTORCHJOB_PLURAL)
        selector = f"training.kubeflow.org/job-name={spec.name}"
    kind = manifest["kind"]
    try:
        api.create(*coords, manifest)
        log(f"created {kind} {spec.namespace}/{spec.name}: {spec.nodes} node(s) × {spec.gpus_per_node} GPU")
    except Exception as err:
        if getattr(err, "status", None) != 409:  # 409: it exists already; adopt it
            raise TrainJobFailed(f"could not create {kind} {spec.name}: {err}") from err
        log(f"{kind} {spec.name} exists already; following it")

    def delete(why: str) -> None:
        try:
            api.delete(*coords, spec.name)
            log(f"deleted {kind} {spec.name} ({why})")
        except Exception as err:  # the owner reference still collects it with the step's pod
            logger.error("could not delete %s %s after %s: %s", kind, spec.name, why, err)

    start = clock()
    streams = LogStreams(api, spec.namespace, selector, log, wall, follow=follow_logs)
    with _terminate_on_signals():
        try:
            while True:
                obj = api.get(*coords, spec.name)
                streams.poll()
                state, reason = job_state(obj)
                if state == "succeeded":
                    streams.close()
                    log(f"{kind} {spec.name} succeeded")
                    return obj
                if state == "failed":
                    streams.close()
                    raise TrainJobFailed(f"{kind} {spec.name} failed: {reason or 'no reason given'}")
                if clock() - start > timeout_s:
                    delete("timeout")
                    raise TrainJobFailed(f"{kind} {spec.name} did not finish within {timeout_s:.0f} s; deleted it")
                sleep(poll_s)
        except _Terminated as err:
            delete(str(err))
            raise TrainJobFailed(f"the step was terminated ({err}): deleted {kind} {spec.name}") from None


class _terminate_on_signals:
    """Within the block, SIGTERM and SIGINT raise :class:`_Terminated` in the main thread (elsewhere signal
    handlers cannot be set, and the block leaves them alone); the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> None:
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def raise_terminated(signum: int, _frame: Any) -> None:
            raise _Terminated(signal.Signals(signum).name)

        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, raise_terminated)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def parse_json_arg(value: str | Mapping | Sequence | None, what: str) -> Any:
    """A pipeline parameter given as JSON text or already decoded."""
    import json

    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} is not valid JSON: {err}") from None
    return value
