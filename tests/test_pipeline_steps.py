"""The pipeline's step bodies as a cluster runs them: GPU counts the pool can give, step deadlines, data steps
whose output a cache hit can reuse, typed structured parameters, no silent pod-local tracking."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mole.pipeline import steps


def test_a_gpu_count_the_pool_cannot_give_is_refused() -> None:
    steps.check_gpus(8, 8)
    steps.check_gpus(1, 1, "trainjob", 8)
    with pytest.raises(ValueError, match=r"gpus=8 cannot be scheduled: a node of the GPU pool has gpus_per_node=1"):
        steps.check_gpus(8, 1)
    with pytest.raises(ValueError, match="stage1_nodes must be at least 1"):
        steps.check_gpus(1, 1, "trainjob", 0)


def test_a_step_past_its_deadline_ends_with_its_children(tmp_path: Path) -> None:
    """The watchdog ends the step (exit 124) and the worker processes it started, even while the main thread
    waits on them."""
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import logging, subprocess, sys
        from mole.pipeline import steps
        logging.basicConfig(level=logging.INFO)
        with steps.deadline("expert", {{"expert": 1}}):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
            steps._CHILDREN.add(proc)
            open({str(pidfile)!r}, "w").write(str(proc.pid))
            proc.wait()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == steps.TIMEOUT_EXIT, done.stderr
    assert "past its timeout of 1 s (pipeline parameter step_timeouts['expert'])" in done.stderr
    assert _gone(int(pidfile.read_text())), "the step's worker outlived its deadline"


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process ended (no longer exists, or a zombie waiting for init to reap it)."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_no_deadline_and_bad_deadlines() -> None:
    with steps.deadline("data", {}):
        pass
    with steps.deadline("data", {"data": 0}):
        pass
    with pytest.raises(ValueError, match=r"step_timeouts\['data'\]"), steps.deadline("data", {"data": -1}):
        pass


def test_data_steps_write_where_the_next_run_finds_them(tmp_path: Path) -> None:
    """Two runs with the same data inputs get the same dataset folder (what a cache hit hands on); a different
    count gets another one. Nothing lands in a run's folder."""
    first = steps.data("faces", str(tmp_path), "synthetic", {}, count=4)
    again = steps.data("faces", str(tmp_path), "synthetic", {}, count=4)
    other = steps.data("faces", str(tmp_path), "synthetic", {}, count=5)
    assert first == again != other
    assert Path(first).parent == tmp_path / "data" and (Path(first) / "dataset.json").is_file()
    assert steps.data("hands", str(tmp_path), "synthetic", {}, count=4, data_root=str(tmp_path / "d")) == str(
        tmp_path / "d" / "hands"
    )
    key = steps.dataset_key("faces", "curate", "s3://a/faces", "configs/curate.yaml", 0, 0)
    assert key != steps.dataset_key("faces", "curate", "s3://b/faces", "configs/curate.yaml", 0, 0)


@pytest.fixture(autouse=True)
def _untracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLE_TRACKING", "off")


def test_structured_parameters_arrive_decoded() -> None:
    """`kfp run create` hands a dict to a dict parameter; JSON text from older callers still works."""
    assert steps._json_dict({"clip": {"model": "m"}}, "scorer_config") == {"clip": {"model": "m"}}
    assert steps._json_dict('{"a": 1}', "scorer_config") == {"a": 1}
    assert steps._json_dict("", "scorer_config") == {}
    with pytest.raises(ValueError, match="scorer_config must be an object"):
        steps._json_dict([1], "scorer_config")
    with pytest.raises(ValueError, match="scorer_config is not valid JSON"):
        steps._json_dict("{", "scorer_config")


def test_start_returns_a_dict_scorer_config(tmp_path: Path) -> None:
    out = steps.start(str(tmp_path), "job-1", "run", "", "", {"hps_v1": {"batch": 2}}, {})
    assert out["scorer_config"] == {"hps_v1": {"batch": 2}} and out["workdir"] == str(tmp_path / "runs" / "job-1")


def test_namespace_defaults_to_the_pods_own(tmp_path: Path) -> None:
    ns = tmp_path / "namespace"
    ns.write_text("team-a\n")
    assert steps.own_namespace(str(ns)) == "team-a"
    with pytest.raises(ValueError, match="set namespace="):
        steps.own_namespace(str(tmp_path / "missing"))


def test_tracking_in_a_pod_without_a_uri_refuses_the_pod_local_store(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    from mole import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(tracking.TrackingConfigError, match="ConfigMap named by the pipeline's config_map"):
        tracking.StageRun("curate:faces")
    assert not (tmp_path / "mlruns").exists()


class FakeApps:
    """The Deployment boundary as the API behaves: a patch merges into the stored object."""

    def __init__(self, replicas: int) -> None:
        self.deployment = {"spec": {"replicas": replicas, "template": {"metadata": {"annotations": {"a": "b"}}}}}
        self.patches: list[dict] = []

    def replicas(self, namespace: str, name: str) -> int:
        return self.deployment["spec"]["replicas"]

    def patch(self, namespace: str, name: str, body: dict) -> None:
        self.patches.append(body)

        def merge(into: dict, patch: dict) -> None:
            for k, v in patch.items():
                if isinstance(v, dict):
                    merge(into.setdefault(k, {}), v)
                else:
                    into[k] = v

        merge(self.deployment, body)


def test_promotion_rolls_the_service_out_and_scales_it_from_zero() -> None:
    from mole.pipeline.rollout import VERSION_ANNOTATION, roll_out

    waiting = FakeApps(0)  # no champion yet: no serve pod, no GPU held
    what = roll_out("mole-serve", "kubeflow", "mole", "3", 2, api=waiting)
    assert waiting.deployment["spec"]["replicas"] == 2 and "scaled 0 -> 2" in what
    annotations = waiting.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"a": "b", VERSION_ANNOTATION: "mole/3"}
    autoscaled = FakeApps(5)  # an autoscaler's choice is kept; the new version still rolls out
    roll_out("mole-serve", "kubeflow", "mole", "4", 2, api=autoscaled)
    assert autoscaled.deployment["spec"]["replicas"] == 5 and "replicas" not in autoscaled.patches[0]["spec"]
    assert autoscaled.deployment["spec"]["template"]["metadata"]["annotations"][VERSION_ANNOTATION] == "mole/4"


def test_a_step_without_s3_credentials_names_the_secret() -> None:
    """The S3 Secret is optional (a workload identity may stand in); when neither gives keys the error says
    which Secret the step reads them from."""
    from botocore.exceptions import NoCredentialsError

    from mole.storage import StorageError, _translate

    with pytest.raises(StorageError, match="s3_secret parameter, default mole-s3"), _translate("reading", "s3://b/k"):
        raise NoCredentialsError()
