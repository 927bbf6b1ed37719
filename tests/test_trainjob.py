"""Multi-node stage 1: the TrainJob / PyTorchJob manifests, offline schema validation, the wait loop with the
Kubernetes API replaced at its client boundary."""

from __future__ import annotations

import copy

import pytest

from mole.pipeline.trainjob import (
    DistributedSpec,
    ManifestError,
    TrainJobFailed,
    job_state,
    launch_command,
    pytorchjob_manifest,
    run_distributed,
    trainjob_manifest,
    validate_trainjob,
)


def _spec(**kw) -> DistributedSpec:
    base = dict(
        name="mole-stage1-1234", namespace="team-a", image="ghcr.io/mole-project/mole:0.1.0", nodes=4,
        gpus_per_node=8, mole_args=["train", "stage1", "--config", "configs/paper.yaml", "--output",
                                    "/workspace/runs/1/stage1", "--resume", "latest"],
        node_selector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        secret_env={"mole-s3": {"AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}}, pvc="mole-workspace",
    )  # fmt: skip
    base.update(kw)
    return DistributedSpec(**base)


def test_trainjob_manifest_matches_the_crd_schema() -> None:
    manifest = trainjob_manifest(_spec())
    validate_trainjob(manifest)  # the models generated from the TrainJob CRD accept it, field for field
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": "/workspace"} in pod["containers"][0]["volumeMounts"]
    secret = next(e for e in trainer["env"] if e["name"] == "AWS_SECRET_ACCESS_KEY")
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "mole-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}
    script = trainer["command"][-1]
    assert "accelerate launch --config_file configs/accelerate/zero2.yaml" in script
    assert "--num_machines ${PET_NNODES}" in script and "--machine_rank ${PET_NODE_RANK}" in script
    assert "--num_processes $((${PET_NNODES} * 8))" in script and script.endswith("--resume latest")


def test_validation_names_the_bad_field() -> None:
    manifest = trainjob_manifest(_spec())
    typo = copy.deepcopy(manifest)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    with pytest.raises(ManifestError, match=r"spec\.trainer\.numNode"):
        validate_trainjob(typo)
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(ManifestError, match="numNodes"):
        validate_trainjob(wrong_type)
    missing = copy.deepcopy(manifest)
    del missing["spec"]["runtimeRef"]
    with pytest.raises(ManifestError, match="runtimeRef"):
        validate_trainjob(missing)
    with pytest.raises(ManifestError, match="DNS-1123"):
        trainjob_manifest(_spec(name="Mole_Stage1"))


def test_pytorchjob_manifest() -> None:
    manifest = pytorchjob_manifest(_spec(nodes=3))
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert "--machine_rank ${RANK}" in launch_command(_spec(nodes=3), "pytorchjob")[-1]
    assert replicas["Worker"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]


class FakeApi:
    """The Kubernetes boundary: records calls, plays back a scripted list of job states and pod logs."""

    def __init__(self, states: list[dict], create_error: Exception | None = None) -> None:
        self.states, self.create_error = states, create_error
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.polls = 0

    def create(self, group, version, namespace, plural, body):
        if self.create_error:
            raise self.create_error
        self.created.append(body)
        return body

    def get(self, group, version, namespace, plural, name):
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        return state

    def delete(self, group, version, namespace, plural, name):
        self.deleted.append(name)

    def pods(self, namespace, selector):
        assert "mole-stage1-1234" in selector
        return ["node-0", "node-1"]

    def logs(self, namespace, pod):
        return "\n".join(f"{pod} step {i}" for i in range(self.polls))


RUNNING = {"status": {"conditions": [{"type": "Created", "status": "True"}]}}
COMPLETE = {"status": {"conditions": [{"type": "Complete", "status": "True", "message": "done"}]}}
FAILED = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailed",
                                     "message": "node-1 exited with code 137 (OOMKilled)"}]}}  # fmt: skip


def test_run_waits_streams_logs_and_succeeds() -> None:
    api, lines = FakeApi([RUNNING, RUNNING, COMPLETE]), []
    run_distributed(_spec(), api=api, log=lines.append, sleep=lambda s: None)
    assert len(api.created) == 1 and api.created[0]["kind"] == "TrainJob"
    assert "[node-0] node-0 step 0" in lines and "[node-1] node-1 step 1" in lines
    assert lines.count("[node-0] node-0 step 0") == 1  # each line printed once
    assert lines[-1].endswith("succeeded")


def test_run_fails_with_the_operator_reason() -> None:
    with pytest.raises(TrainJobFailed, match="OOMKilled"):
        run_distributed(_spec(), api=FakeApi([RUNNING, FAILED]), log=lambda line: None, sleep=lambda s: None)
    assert job_state(FAILED)[0] == "failed" and job_state(RUNNING) == ("running", "")


def test_run_times_out_and_deletes_the_job() -> None:
    api, now = FakeApi([RUNNING]), iter(range(0, 10_000, 100))
    with pytest.raises(TrainJobFailed, match="did not finish within 250 s"):
        run_distributed(_spec(), api=api, timeout_s=250, log=lambda line: None, clock=lambda: next(now),
                        sleep=lambda s: None)  # fmt: skip
    assert api.deleted == ["mole-stage1-1234"]


def test_a_retried_step_adopts_the_existing_job() -> None:
    exists = type("ApiException", (Exception,), {"status": 409})("AlreadyExists")
    api = FakeApi([COMPLETE], create_error=exists)
    run_distributed(_spec(), api=api, log=lambda line: None, sleep=lambda s: None)
    forbidden = type("ApiException", (Exception,), {"status": 403})("Forbidden: cannot create trainjobs")
    with pytest.raises(TrainJobFailed, match=r"could not create TrainJob .*Forbidden"):
        run_distributed(_spec(), api=FakeApi([COMPLETE], create_error=forbidden), log=lambda line: None)
