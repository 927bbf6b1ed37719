"""The hardening rules of docs/security.md: one name rule, one redaction, unsafe URIs refused early."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mole.cli import app

runner = CliRunner()
PASSWORD = "hunter2pass"
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# --- redaction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"http://user:{PASSWORD}@mlflow.example:5000",
        f"postgresql://mole:{PASSWORD}@db/mlflow",
        f"s3://user:{PASSWORD}@bucket/x",
        f"http:/user:{PASSWORD}@host/m is not a folder",  # what pathlib makes of a URI
        f"https://{PASSWORD}@github.com/org/repo",  # a token as the user
        f"https://b.s3.example/k?X-Amz-Signature={PASSWORD}&X-Amz-Date=1",
    ],
)
def test_redact_masks_uri_credentials(text: str) -> None:
    from mole.security import redact

    assert PASSWORD not in redact(text) and "***" in redact(text)


def test_redact_masks_environment_secrets_and_keeps_plain_text(monkeypatch) -> None:
    from mole.security import redact

    assert redact("models:/mole@champion and models:/mole-expert-face/3") == (
        "models:/mole@champion and models:/mole-expert-face/3"
    )  # MLflow aliases are no credentials
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert redact(f"login failed with {PASSWORD}") == "login failed with ***"
    assert redact("s3://bucket/raw/faces at http://host:5000") == "s3://bucket/raw/faces at http://host:5000"


def test_one_redaction_everywhere() -> None:
    """storage, serve and tracking use the same function (one home for the rule)."""
    from mole import security, storage, tracking
    from mole.serve import service

    assert storage.redact is security.redact and service.redact is security.redact
    assert tracking.redact is security.redact


def test_params_never_store_uri_credentials(monkeypatch) -> None:
    from mole.tracking import redact_params as redact

    monkeypatch.setenv("MOLE_TEST_TOKEN", "tok-abcdef-123")
    flat = redact({"output": f"s3://user:{PASSWORD}@bucket/x", "data": {"paths": ["http://u:tok-abcdef-123@h/d"]},
                   "aws_secret": "plain"})  # fmt: skip
    assert flat["output"] == "s3://***@bucket/x"
    assert "tok-abcdef-123" not in flat["data.paths"] and flat["aws_secret"] == "***"


def test_log_filter_masks_every_record() -> None:
    from mole.security import RedactingFilter

    record = logging.LogRecord("mole.tracking", logging.INFO, __file__, 1, "MLflow run %s at %s", None, None)
    record.args = ("abc", f"http://user:{PASSWORD}@host")
    assert RedactingFilter().filter(record)
    assert PASSWORD not in record.getMessage() and "abc" in record.getMessage()


def test_cli_error_messages_never_show_uri_credentials(tmp_path: Path) -> None:
    from mole.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "faces", "faces", 4, seed=0, size=32) and tmp_path / "faces"
    cases = [
        ["serve", "--model", f"http://user:{PASSWORD}@example.invalid/m"],
        ["train", "stage1", "--config", str(TINY), "--base", f"s3://user:{PASSWORD}@bucket/m", "--data", str(data),
         "--output", str(tmp_path / "o")],
        ["train", "stage1", "--config", str(TINY), "--data", f"s3://user:{PASSWORD}@bucket/d",
         "--output", str(tmp_path / "o")],
        ["curate", "faces", "--input", f"s3://user:{PASSWORD}@bucket/raw", "--output", str(tmp_path / "c")],
        ["curate", "faces", "--input", str(tmp_path), "--output", f"s3://user:{PASSWORD}@bucket/out"],
    ]  # fmt: skip
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert PASSWORD not in result.output and "***" in result.output, result.output


# --- unsafe s3:// URIs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3://raw/../../x", "s3://raw/a/./b", "s3://raw/.."])
def test_s3_dot_segments_cannot_escape_the_download_cache(uri: str, tmp_path: Path) -> None:
    from mole.storage import StorageURIError, localize

    with pytest.raises(StorageURIError, match=r"'\.\.'"):
        localize(uri, tmp_path / "cache")
    assert not any(tmp_path.parent.glob("x"))


@pytest.mark.slow
def test_tracking_uri_and_params_with_credentials_never_reach_log_or_server(mlflow_server, monkeypatch, caplog):
    """A tracking URI with user:password (basic auth in the URI) is masked in mole's log line, and an output URI
    with credentials is stored masked as a param."""
    import mlflow

    from mole.tracking import StageRun

    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri.replace("http://", f"http://user:{PASSWORD}@"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mole-security")
    caplog.set_level(logging.INFO, logger="mole")
    with StageRun("curate") as run:
        run.log_params({"output": f"s3://user:{PASSWORD}@bucket/x"})
    assert "MLflow run" in caplog.text and PASSWORD not in caplog.text
    stored = mlflow.MlflowClient(mlflow_server.uri).get_run(run.run_id).data.params
    assert stored["output"] == "s3://***@bucket/x"


# --- checkpoints never unpickle ---------------------------------------------------------------------------------


class _Plant:
    """Unpickling this runs ``Path.touch`` on a marker: what a malicious checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_resume_never_unpickles_a_planted_checkpoint_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    import pickle

    import torch

    from mole.data.synthetic import write_dataset
    from mole.train.checkpoint import EMA_WEIGHTS, list_checkpoints

    write_dataset(tmp_path / "faces", "faces", 4, seed=0, size=32)
    args = ["train", "expert", "--name", "face", "--config", str(TINY), "--data", str(tmp_path / "faces"),
            "--output", str(tmp_path / "out"), "--base", str(tiny_model_dir), "--resume", "latest",
            "--set", "experts.face.checkpoint_every=1", "--set", "experts.face.ema_decay=0.9",
            "--set", "experts.face.validation_prompts=[]"]  # fmt: skip
    first = runner.invoke(app, [*args, "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    (checkpoint,) = list_checkpoints(tmp_path / "out")
    assert (checkpoint / EMA_WEIGHTS).is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the EMA is no pickle any more
    marker = tmp_path / "pwned"
    with open(checkpoint / "custom_checkpoint_0.pkl", "wb") as f:
        torch.save(_Plant(marker), f, pickle_module=pickle)
    resumed = runner.invoke(app, [*args, "--max-steps", "2"])
    assert not marker.exists(), "resuming ran code from a checkpoint file"
    assert resumed.exit_code == 2 and "custom_checkpoint_0.pkl" in resumed.output, resumed.output


# --- names ----------------------------------------------------------------------------------------------------

BAD_NAMES = ["/some/dir", "../../X", "", "a.b", "Face", "1face", "face/../x", "a b", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_name_refuses_what_could_become_a_path(name: str) -> None:
    from mole.security import InvalidNameError, check_name

    with pytest.raises(InvalidNameError, match="is not allowed"):
        check_name(name)


@pytest.mark.parametrize("name", ["face", "hand", "feet", "left_hand", "face-2"])
def test_check_name_accepts_ordinary_names(name: str) -> None:
    from mole.security import check_name

    assert check_name(name) == name


@pytest.mark.parametrize("name", ["/some/dir", "../../X", "a.b"])
def test_cli_refuses_bad_expert_names_before_any_work(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = f"{name}=models:/mole-expert-face/1"
    for args in (
        ["train", "gates", "--config", str(TINY), "--experts", spec, "--output", str(tmp_path / "o")],
        ["generate", "--model", str(tmp_path), "--prompt", "p", "--output", "x.png", "--experts", spec],
        ["serve", "--model", str(tmp_path), "--experts", spec],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "is not allowed" in result.output, (args, result.output)
    result = runner.invoke(app, ["train", "expert", "--name", name, "--config", str(TINY)])
    assert result.exit_code == 2 and "is not allowed" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_config_sections_and_library_refuse_bad_names(tiny_unet) -> None:
    from mole.inject import apply_mole
    from mole.pipeline.run import parse_experts
    from mole.security import InvalidNameError
    from mole.tracking import expert_model_name
    from mole.train import ConfigError, load_config
    from mole.train.config import parse_overrides

    with pytest.raises(ConfigError, match=r"experts.*'a\.b' is not allowed"):
        load_config(TINY, parse_overrides(["gates.experts={'a.b': '/x'}"]))
    with pytest.raises(ConfigError, match="is not allowed"):
        load_config(None, {"experts": {"../x": {}}})
    for call in (lambda: apply_mole(tiny_unet, {"": "x.safetensors"}), lambda: expert_model_name("../x"),
                 lambda: parse_experts(["../../X=faces"]), lambda: parse_experts(["feet=../../x"])):  # fmt: skip
        with pytest.raises(InvalidNameError):
            call()


def test_pipeline_steps_refuse_bad_names(tmp_path: Path) -> None:
    from mole.pipeline import steps
    from mole.security import InvalidNameError

    with pytest.raises(InvalidNameError):
        steps.train(stage="expert", config=str(TINY), data="d", base_model="b", workdir=str(tmp_path), expert="../x")
    with pytest.raises(InvalidNameError):
        steps.data(kind="../../x", workspace=str(tmp_path), source="synthetic", raw_inputs={})
    assert list(tmp_path.iterdir()) == []


# --- shards are verified before training --------------------------------------------------------------------------


def _one_shard_dataset(tmp_path: Path) -> tuple[Path, Path]:
    from mole.data.shards import read_index
    from mole.data.synthetic import write_dataset

    root = tmp_path / "faces"
    write_dataset(root, "faces", 16, seed=0, size=32)
    return root, root / read_index(root).shards[0].path


@pytest.mark.parametrize("damage", ["truncate", "random", "index_count"])
def test_training_refuses_a_damaged_shard_naming_it(damage: str, tmp_path: Path) -> None:
    import json
    import os

    from mole.data.shards import DatasetError
    from mole.train.data import index_samples

    root, shard = _one_shard_dataset(tmp_path)
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 3])
    elif damage == "random":
        shard.write_bytes(os.urandom(shard.stat().st_size))
    else:  # an index that lies about the count (its sha256 values still match)
        index = json.loads((root / "dataset.json").read_text())
        index["shards"][0]["num_samples"] += 1
        index["num_samples"] += 1
        (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=rf"shard {shard.name}.*(sha256|holds 16 samples)"):
        index_samples(root)


def test_train_cli_fails_with_the_shard_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    root, shard = _one_shard_dataset(tmp_path)
    shard.write_bytes(shard.read_bytes()[:30_000])
    args = ["train", "stage1", "--config", str(TINY), "--data", str(root), "--base", str(tiny_model_dir),
            "--output", str(tmp_path / "o"), "--max-steps", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and shard.name in result.output and "sha256" in result.output, result.output
    assert not (tmp_path / "o" / "result.json").exists()


# --- resume notices change --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_changed_data_or_settings_unless_told(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from mole.data.synthetic import write_dataset

    for kind in ("faces", "hands"):
        write_dataset(tmp_path / kind, kind, 4, seed=0, size=32)
    out = tmp_path / "out"

    def train(kind: str, steps: int, lr: str, *extra: str):
        return runner.invoke(app, [
            "train", "expert", "--name", "face", "--config", str(TINY), "--data", str(tmp_path / kind), "--output",
            str(out), "--base", str(tiny_model_dir), "--resume", "latest", "--max-steps", str(steps),
            "--set", "experts.face.checkpoint_every=1", "--set", "experts.face.log_every=1",
            "--set", "experts.face.validation_prompts=[]", "--set", f"experts.face.optimizer.lr={lr}", *extra,
        ])  # fmt: skip

    assert train("faces", 1, "1e-4").exit_code == 0
    params = (out / "params.json").read_text()
    refused = train("hands", 2, "3e-4")
    assert refused.exit_code == 2, refused.output
    assert "refusing to resume" in refused.output and "data: digest" in refused.output
    assert "optimizer.lr: 0.0001 -> 0.0003" in refused.output
    assert (out / "params.json").read_text() == params  # nothing recorded for a run that did not happen
    assert train("faces", 2, "1e-4").exit_code == 0  # more steps is the same work
    allowed = train("hands", 3, "3e-4", "--resume-changed")
    assert allowed.exit_code == 0, allowed.output
    recorded = json.loads((out / "params.json").read_text())
    assert recorded["expert"]["optimizer"]["lr"] == 3e-4 and recorded["resume_changed"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {line["step"]: line["lr"] for line in lines if "lr" in line}
    assert lrs[2] == pytest.approx(1e-4) and lrs[3] == pytest.approx(3e-4)  # the new lr is what ran
    assert json.loads((out / "result.json").read_text())["data"].endswith("hands")
