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
    required = trainjob_manifest(_spec(secret_env={"mole-mlflow": {"MLFLOW_TRACKING_PASSWORD": "P"}},
                                       required_secrets=["mole-mlflow"]))["spec"]["trainer"]["env"]  # fmt: skip
    assert next(e for e in required if e["name"] == "P")["valueFrom"]["secretKeyRef"]["optional"] is False
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


T0 = 1_800_000_000  # a fixed wall clock (2027-01-15) for the fake kubelet's timestamps


def stamp(t: float) -> str:
    """RFC 3339 as the kubelet writes it: nanoseconds with trailing zeros dropped."""
    from datetime import UTC, datetime

    whole = datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    nanos = f"{round((t - int(t)) * 1e9):09d}".rstrip("0")
    return f"{whole}.{nanos}Z" if nanos else f"{whole}Z"


class FakeApi:
    """The Kubernetes boundary as the API behaves: job states played back from a script, and per pod a log of
    timestamped lines of which the kubelet returns the current file (``rotate_after``: older lines are gone),
    filtered by ``sinceSeconds`` against the wall clock ``now``."""

    def __init__(self, states: list[dict], create_error: Exception | None = None, rotate_after: int | None = None,
                 on_get: object = None) -> None:  # fmt: skip
        self.states, self.create_error, self.rotate_after, self.on_get = states, create_error, rotate_after, on_get
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.polls = 0
        self.now = float(T0)
        self.lines: dict[str, list[tuple[float, str]]] = {"node-0": [], "node-1": []}
        self.since: list[int | None] = []

    def create(self, group, version, namespace, plural, body):
        if self.create_error:
            raise self.create_error
        self.created.append(body)
        return body

    def get(self, group, version, namespace, plural, name):
        state = self.states[min(self.polls, len(self.states) - 1)]
        # Between polls each pod writes two lines, the second at the same instant as the first.
        for pod, lines in self.lines.items():
            lines += [(self.now, f"{pod} step {self.polls} a"), (self.now, f"{pod} step {self.polls} b")]
        self.now += 30.25
        self.polls += 1
        if callable(self.on_get):
            self.on_get(self)
        return state

    def delete(self, group, version, namespace, plural, name):
        self.deleted.append(name)

    def pods(self, namespace, selector):
        assert "mole-stage1-1234" in selector
        return ["node-0", "node-1"]

    def logs(self, namespace, pod, since_seconds=None):
        self.since.append(since_seconds)
        lines = self.lines[pod]
        if self.rotate_after is not None and len(lines) > self.rotate_after:
            lines = lines[-2:]  # rotated: the current file holds only the newest lines
        if since_seconds is not None:
            lines = [(t, text) for t, text in lines if t >= self.now - since_seconds]
        return "\n".join(f"{stamp(t)} {text}" for t, text in lines)

    def pod_uid(self, namespace, pod):
        return f"uid-of-{pod}"


RUNNING = {"status": {"conditions": [{"type": "Created", "status": "True"}]}}
COMPLETE = {"status": {"conditions": [{"type": "Complete", "status": "True", "message": "done"}]}}
FAILED = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailed",
                                     "message": "node-1 exited with code 137 (OOMKilled)"}]}}  # fmt: skip


def _run(api: FakeApi, lines: list[str], **kw):
    return run_distributed(_spec(), api=api, log=lines.append, sleep=lambda s: None, wall=lambda: api.now, **kw)


def test_run_waits_streams_logs_and_succeeds() -> None:
    api, lines = FakeApi([RUNNING, RUNNING, COMPLETE]), []
    _run(api, lines)
    assert len(api.created) == 1 and api.created[0]["kind"] == "TrainJob"
    printed = [line for line in lines if line.startswith("[node-0]")]
    expected = [f"[node-0] node-0 step {i} {half}" for i in range(3) for half in "ab"]
    assert printed == expected  # every line once, in order, the two lines of one instant both kept
    assert lines[-1].endswith("succeeded")
    # Only the first read fetched the whole log; later ones asked for the recent seconds only.
    assert api.since[:2] == [None, None] and api.since[2:] == [71] * 4  # 60.5 s since the last line + 10 s margin


def test_a_rotated_log_loses_no_line() -> None:
    """Counting lines (the old way) skipped new lines once the kubelet rotated the file and it shrank."""
    api, lines = FakeApi([RUNNING] * 4 + [COMPLETE], rotate_after=4), []
    _run(api, lines)
    printed = [line for line in lines if line.startswith("[node-1]")]
    assert printed == [f"[node-1] node-1 step {i} {half}" for i in range(5) for half in "ab"]


def test_timestamps_parse_exactly() -> None:
    from mole.pipeline.podlogs import parse_timestamp

    assert parse_timestamp("2027-01-15T08:00:00.5Z") == (1_800_000_000 - 1_800_000_000 % 86400 + 28800, 500_000_000)
    assert parse_timestamp("2027-01-15T08:00:00.000000001Z")[1] == 1
    assert parse_timestamp(stamp(T0 + 0.25)) > parse_timestamp(stamp(T0 + 0.125))
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_the_job_is_owned_by_the_steps_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "mole-run-abc-stage1-op-123")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    api = FakeApi([COMPLETE])
    _run(api, [])
    (owner,) = api.created[0]["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "mole-run-abc-stage1-op-123",
                     "uid": "uid-of-mole-run-abc-stage1-op-123"}  # fmt: skip
    validate_trainjob(api.created[0])  # the CRD's metadata accepts it
    owned = pytorchjob_manifest(_spec(owner=owner))
    assert owned["metadata"]["ownerReferences"] == [owner]


def test_a_terminated_step_deletes_its_job() -> None:
    """A cancelled run: SIGTERM reaches the step while it follows the job; the job goes, then the step fails."""
    import os
    import signal

    def cancel(api: FakeApi) -> None:
        if api.polls == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    api = FakeApi([RUNNING], on_get=cancel)
    with pytest.raises(TrainJobFailed, match="terminated \\(SIGTERM\\): deleted TrainJob mole-stage1-1234"):
        _run(api, [])
    assert api.deleted == ["mole-stage1-1234"]
    assert signal.getsignal(signal.SIGTERM) is before  # the step's own handler is back


def test_run_fails_with_the_operator_reason() -> None:
    with pytest.raises(TrainJobFailed, match="OOMKilled"):
        _run(FakeApi([RUNNING, FAILED]), [])
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


class FollowApi(FakeApi):
    """Follows logs as the API's ``follow=true`` does: each connection yields the pod's lines since the given
    second and ends; node-0's first connection drops after one line."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.streams: list[tuple[str, int | None]] = []

    def stream(self, namespace, pod, since_seconds=None):
        self.streams.append((pod, since_seconds))
        lines = [
            (t, text) for t, text in list(self.lines[pod]) if since_seconds is None or t >= self.now - since_seconds
        ]
        for i, (t, text) in enumerate(lines):
            if pod == "node-0" and len(self.streams) == 1 and i == 1:
                raise ConnectionError("connection reset by peer")
            yield f"{stamp(t)} {text}"


def test_followed_logs_reconnect_from_the_last_line_and_lose_nothing() -> None:
    api, lines = FollowApi([RUNNING, RUNNING, RUNNING, COMPLETE]), []
    _run(api, lines)
    for pod in ("node-0", "node-1"):
        printed = [line for line in lines if line.startswith(f"[{pod}]")]
        assert printed == [f"[{pod}] {pod} step {i} {half}" for i in range(4) for half in "ab"], printed
    assert api.streams, "the logs were not followed"
    reconnects = [since for pod, since in api.streams if pod == "node-0"][1:]
    assert reconnects and all(s is not None for s in reconnects)  # from the last line, not the whole log
