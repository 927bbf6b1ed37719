"""Tracking against a real MLflow server with S3 artifacts: runs, registry, lineage, pyfunc, promotion, secrets."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SECRET_IN_CONFIG = "s3cr3t-in-a-config-value"


@pytest.fixture(scope="module")
def tracked(mlflow_server, s3_server, tiny_model_dir, tmp_path_factory):
    """The three stages on the tiny model, tracked into the server (module-scoped: run once)."""
    from mole.data.synthetic import write_dataset
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    mp = pytest.MonkeyPatch()
    mp.setenv("MOLE_TRACKING", "on")
    mp.setenv("MOLE_SYSTEM_METRICS", "off")
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "mole-test")
    mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    mp.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    mp.setenv("MOLE_TEST_API_TOKEN", SECRET_IN_CONFIG)  # a credential-looking env var the config also holds
    root = tmp_path_factory.mktemp("tracked")
    data = {k: root / "data" / k for k in ("scenes", "faces", "hands")}
    for kind, path in data.items():
        write_dataset(path, kind, 8, seed=1, size=64)
    cfg = load_config(TINY, parse_overrides([f"stage1.validation_prompts=['{SECRET_IN_CONFIG}']",
                                             "stage1.validation_steps=2"]))  # fmt: skip
    results = {"stage1": train_stage("stage1", cfg, output=root / "s1", data=str(data["scenes"]),
                                     base=str(tiny_model_dir), max_steps=2)}  # fmt: skip
    for name, kind in (("face", "faces"), ("hand", "hands")):
        results[name] = train_stage("expert", cfg, output=root / name, data=str(data[kind]),
                                    base=str(root / "s1" / "model"), max_steps=2, expert_name=name)  # fmt: skip
    results["gates"] = train_stage("gates", cfg, output=root / "gates", data={k: str(v) for k, v in data.items()},
                                   base=str(root / "s1" / "model"), max_steps=2,
                                   experts={"face": str(root / "face"), "hand": str(root / "hand")})  # fmt: skip
    yield root, data, results
    mp.undo()


def test_runs_registry_and_candidate_alias(tracked) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    root, _, _ = tracked
    for name in ("mole-stage1", "mole-expert-face", "mole-expert-hand", "mole"):
        assert client.get_registered_model(name).name == name
    candidate = client.get_model_version_by_alias("mole", "candidate")
    gates_result = json.loads((root / "gates" / "result.json").read_text())
    assert candidate.run_id == gates_result["mlflow_run_id"] and candidate.version == gates_result["version"]
    run = client.get_run(candidate.run_id)
    assert run.data.tags["mole.stage"] == "gates" and "loss" in run.data.metrics
    history = client.get_metric_history(candidate.run_id, "loss")
    assert [m.step for m in history] == [2]
    # Artifacts went through the server into S3.
    assert candidate.source.startswith(("models:/", "mlflow-artifacts:", "s3://"))


def test_lineage_walks_back_to_the_datasets(tracked) -> None:
    from mole import tracking
    from mole.data.shards import dataset_digest

    _, data, _ = tracked
    chain = tracking.lineage("models:/mole@candidate")
    stages = {step["stage"]: step for step in chain}
    assert set(stages) == {"gates", "stage1", "expert:face", "expert:hand"}
    assert set(stages["gates"]["upstream"]) == {"base", "expert_face", "expert_hand"}
    assert stages["gates"]["upstream"]["base"] == stages["stage1"]["run_id"]
    assert stages["expert:face"]["upstream"]["base"] == stages["stage1"]["run_id"]
    assert stages["stage1"]["datasets"][0]["digest"] == dataset_digest(data["scenes"])
    assert stages["expert:hand"]["datasets"][0]["digest"] == dataset_digest(data["hands"])
    # The gates trained on the mixture: every source's digest is an input of its run.
    assert sorted(d["digest"] for d in stages["gates"]["datasets"]) == sorted(dataset_digest(p) for p in data.values())
    text = tracking.format_lineage(chain)
    assert "expert:face" in text and dataset_digest(data["faces"]) in text


def test_pyfunc_generates_from_the_registry(tracked) -> None:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/mole@candidate")
    out = model.predict(pd.DataFrame({"prompt": ["a woman waving"], "steps": [2], "width": [48], "height": [64]}))
    image = Image.open(io.BytesIO(base64.b64decode(out["png"][0])))
    assert image.format == "PNG" and image.size == (48, 64)


def test_promotion_only_moves_champion_to_a_better_candidate(tracked) -> None:
    import mlflow

    from mole import tracking

    client = mlflow.MlflowClient()
    first = client.get_model_version_by_alias("mole", "candidate").version
    tracking.set_model_metric("mole", first, "hps", 20.0)
    moved, why = tracking.promote("hps")
    assert moved and client.get_model_version_by_alias("mole", "champion").version == first, why
    # A second, worse candidate: champion stays.
    second = _register_another_version(tracked)
    # Registered from two files with the same name (pytorch_lora_weights.safetensors): both experts must
    # survive as separate artifacts and the version must still generate.
    pipe = tracking.load_registered_pipeline(f"models:/mole/{second}")
    from mole.inject import mole_layers

    assert next(iter(mole_layers(pipe.unet).values())).expert_names == ["face", "hand"]
    tracking.set_model_metric("mole", second, "hps", 19.0)
    moved, why = tracking.promote("hps")
    assert not moved and "does not beat" in why
    assert client.get_model_version_by_alias("mole", "champion").version == first
    # Better: champion moves.
    tracking.set_model_metric("mole", second, "hps", 21.5)
    moved, why = tracking.promote("hps")
    assert moved and client.get_model_version_by_alias("mole", "champion").version == second


def _register_another_version(tracked) -> str:
    from mole import tracking

    root, _, _ = tracked
    with tracking.StageRun("gates") as run:
        ref = run.register_mole(root / "s1" / "model", {"face": root / "face" / "pytorch_lora_weights.safetensors",
                                "hand": root / "hand" / "pytorch_lora_weights.safetensors"},
                                root / "gates" / "gates.safetensors")  # fmt: skip
    return ref.version


def test_no_secret_reaches_params_tags_or_logged_text(tracked, s3_server) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("mole-test")
    secrets = (s3_server.secret_key, SECRET_IN_CONFIG)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 4
    for run in runs:
        blob = json.dumps(run.data.params) + json.dumps(run.data.tags)
        assert not any(s in blob for s in secrets), run.info.run_name
    gates = next(r for r in runs if r.data.tags.get("mole.stage") == "stage1")
    assert gates.data.params["stage1.validation_prompts"] == "***"  # the config value equal to a secret


def test_lineage_reaches_the_curation_run(tracked, tiny_model_dir, tmp_path) -> None:
    """Raw photos -> tracked `mole curate` -> tracked stage 1 -> lineage shows the curate run and the digest."""
    from skimage import data as skdata
    from typer.testing import CliRunner

    from mole import tracking
    from mole.cli import app
    from mole.data.shards import read_index
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(skdata.astronaut()).save(raw / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(raw / "coffee.png")
    result = CliRunner().invoke(app, ["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "cur"),
                                      "--set", "size=64", "--set", "filters={blur: {}}", "--set",
                                      "default_caption=a photo", "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    index = read_index(tmp_path / "cur")
    curate_run = index.meta["mlflow_run_id"]
    cfg = load_config(TINY, parse_overrides(["stage1.validation_prompts=[]"]))
    train_stage(
        "stage1", cfg, output=tmp_path / "s1", data=str(tmp_path / "cur"), base=str(tiny_model_dir), max_steps=1
    )
    uri = json.loads((tmp_path / "s1" / "result.json").read_text())["model_uri"]
    chain = {step["stage"]: step for step in tracking.lineage(uri)}
    assert chain["curate:scenes"]["run_id"] == curate_run
    assert chain["stage1"]["upstream"]["curate"] == curate_run
    assert chain["stage1"]["datasets"][0]["digest"] == index.digest


def test_s3_down_fails_clearly_and_registers_nothing(s3_server, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """The tracking server's artifact store (S3) is down: the stage fails with an error that says so, its run is
    FAILED, and no registered version points at artifacts that were never stored."""
    import mlflow
    from tests.mlflow_server import free_port, running_mlflow_server

    from mole import tracking
    from mole.data.synthetic import write_dataset
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3_env = {"MLFLOW_S3_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": s3_server.access_key,
              "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_MAX_ATTEMPTS": "2"}  # fmt: skip
    with running_mlflow_server(tmp_path, s3_env) as server:
        monkeypatch.setenv("MOLE_TRACKING", "on")
        monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "s3-down")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the server answers 500: do not wait minutes
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        write_dataset(tmp_path / "faces", "faces", 4, seed=1, size=64)
        cfg = load_config(TINY, parse_overrides(["experts.face.validation_prompts=[]"]))
        with pytest.raises(tracking.ArtifactStoreError, match="could not store the face expert of run") as failure:
            train_stage("expert", cfg, output=tmp_path / "face", data=str(tmp_path / "faces"),
                        base=str(tiny_model_dir), max_steps=1, expert_name="face")  # fmt: skip
        assert "nothing was registered" in str(failure.value) and server.uri in str(failure.value)
        assert s3_server.secret_key not in str(failure.value)
        client = mlflow.MlflowClient()
        assert client.search_model_versions("name='mole-expert-face'") == []
        runs = client.search_runs([client.get_experiment_by_name("s3-down").experiment_id])
        assert [r.info.status for r in runs] == ["FAILED"]
        assert not (tmp_path / "face" / "result.json").exists() or "version" not in json.loads(
            (tmp_path / "face" / "result.json").read_text()
        )


def test_pipeline_parent_run_is_found_by_its_job_id(tmp_path, monkeypatch) -> None:
    """start (twice, as a retried step does), artifacts, finish: all reach the one parent run of the job; a job that
    never started has none; a job id that would break the tag filter is refused."""
    import mlflow

    from mole import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mole-parent")
    first = tracking.start_pipeline_run("job-1", "demo", {"steps": 3})
    assert tracking.start_pipeline_run("job-1", "demo", {"steps": 3}) == first
    assert tracking.start_pipeline_run("job-2", "other", {}) != first
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<p>report</p>", encoding="utf-8")
    assert tracking.log_pipeline_artifacts("job-1", tmp_path / "report", "report") == first
    assert tracking.finish_pipeline_run("job-1", "FAILED", "boom") == first
    run = mlflow.MlflowClient().get_run(first)
    assert run.info.status == "FAILED" and run.data.tags["mole.pipeline_error"] == "boom"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(first, "report")] == ["report/index.html"]
    assert tracking.finish_pipeline_run("never-started", "SUCCEEDED") is None
    with pytest.raises(ValueError, match="quote"):
        tracking.finish_pipeline_run("x' OR tags.a = 'b", "SUCCEEDED")
