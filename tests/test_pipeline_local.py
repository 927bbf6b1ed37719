"""The whole DAG run locally through kfp.local on the embedded default, tracked in MLflow: the lineage chain,
the registry hand-off, promotion, and the parent run closed by the exit handler."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAST = {"stage1_max_steps": 3, "expert_max_steps": 3, "gates_max_steps": 3, "synthetic_count": 8,
        "num_prompts": 3, "repeats": 2, "eval_steps": 2}  # fmt: skip


@pytest.fixture
def tracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tracking on, into a sqlite store of this test (the steps are subprocesses: they inherit the env)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pipeline-test")
    return tmp_path


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=200)


def test_local_run_tracks_the_lineage_chain(tracked: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mole import tracking
    from mole.pipeline.run import run_local

    result = run_local(tracked / "ws", FAST)
    client = MlflowClient()
    runs = _runs(client, "pipeline-test")
    parent = [r for r in runs if r.data.tags.get("mole.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["mole.pipeline_state"] == "SUCCEEDED"
    stages = {r.data.tags["mole.stage"]: r for r in runs if r.data.tags.get("mole.stage") != "pipeline"}
    assert set(stages) == {"curate:scenes", "curate:faces", "curate:hands", "stage1", "expert:face", "expert:hand",
                           "gates", "evaluate"}  # fmt: skip
    for name, run in stages.items():  # every training and evaluation stage under the pipeline's parent run
        # A dataset is cached across runs (its step takes no per-run input), so its curation run has no parent:
        # the lineage reaches it through the stages that trained on it.
        expected = None if name.startswith("curate:") else parent[0].info.run_id
        assert run.data.tags.get("mlflow.parentRunId") == expected, name
        assert run.info.status == "FINISHED", name

    # The registry is the hand-off: experts and gates were trained from registered versions.
    candidate = client.get_model_version_by_alias("mole", "candidate")
    assert stages["expert:face"].data.params["base"] == "models:/mole-stage1/1"
    # Promotion on a first run: champion only if the MoLE beats stage 1 scored on the same prompts and seeds.
    mole_score = float(candidate.tags["mole.metric.clip"])
    stage1_score = float(client.get_model_version("mole-stage1", "1").tags["mole.metric.clip"])
    try:
        champion = client.get_model_version_by_alias("mole", "champion").version
    except MlflowException:
        champion = None
    assert champion == (candidate.version if mole_score > stage1_score else None), (mole_score, stage1_score)
    assert result["promotion"].startswith("champion ->" if champion else f"candidate version {candidate.version}")
    assert "/.models/base/" in stages["expert:face"].data.params["base_local"]  # downloaded from the registry
    chain = tracking.lineage("models:/mole@candidate")
    by_stage = {step["stage"]: step for step in chain}
    assert set(by_stage) >= {"gates", "stage1", "expert:face", "expert:hand", "curate:scenes"}
    assert by_stage["gates"]["upstream"]["expert_face"] == stages["expert:face"].info.run_id
    assert by_stage["expert:face"]["upstream"]["base"] == stages["stage1"].info.run_id
    # Stage 1 trains on the mixture (issue 17): one upstream curation run and one dataset per source.
    for kind in ("scenes", "faces", "hands"):
        assert by_stage["stage1"]["upstream"][f"curate.{kind}"] == stages[f"curate:{kind}"].info.run_id
    assert {d["name"] for d in by_stage["stage1"]["datasets"]} >= {"synthetic-scenes", "synthetic-faces"}
    # Evaluation: its scores on the registered version; images on disk.
    assert float(candidate.tags["mole.metric.clip"]) >= 0.0
    workdir = next((tracked / "ws" / "runs").iterdir())
    assert len(list((workdir / "evaluate" / "images").rglob("*.png"))) == 6  # 3 prompts × 2 repeats
    assert len(list((workdir / "evaluate-stage1" / "images").rglob("*.png"))) == 6  # the baseline, the same
    assert result["seconds"] > 0
    # The run report: one page, also stored on the parent run.
    assert Path(result["report"]) == workdir / "report" / "index.html" and Path(result["report"]).is_file()
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")}


def test_a_failed_run_marks_the_parent_failed(tracked: Path) -> None:
    from mlflow import MlflowClient

    from mole.pipeline.run import run_local

    with pytest.raises(RuntimeError, match="FAILURE"):
        run_local(tracked / "ws", {**FAST, "data_source": "nowhere"})
    runs = _runs(MlflowClient(), "pipeline-test")
    parent = [r for r in runs if r.data.tags.get("mole.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert parent[0].data.tags["mole.pipeline_state"] == "FAILED"
