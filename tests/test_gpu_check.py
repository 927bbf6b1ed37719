"""``make gpu-check``'s script works without a GPU: its smoke mode runs every check at tiny sizes on CPU,
records a missing or failing sub-benchmark instead of crashing, and writes gpu.json and the latest.md
section. Its launched runs keep PYTHONPATH (on the GPU machine the packages live there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.train_throughput import REPO, launch_env


def test_launched_runs_keep_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: PYTHONPATH was replaced by the repository, so /tmp/site's packages vanished in the launched run.
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    parts = launch_env()["PYTHONPATH"].split(":")
    assert "/tmp/site" in parts and str(REPO / "src") in parts and str(REPO) in parts


def test_sd_shaped_model_writes_and_loads(tmp_path: Path) -> None:
    # Before: DDPMScheduler(set_alpha_to_one=...) raised TypeError under diffusers 0.42.1.
    from diffusers import StableDiffusionPipeline

    from bench.gpu_stage1 import write_model

    pipe = StableDiffusionPipeline.from_pretrained(write_model(tmp_path / "m", size="small"))
    assert pipe.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert len(pipe.unet.config.block_out_channels) == 4  # SD1.5's layout
    assert "set_alpha_to_one" not in pipe.scheduler.config


def test_pytest_gpu_collects_only_the_modules_with_gpu_tests() -> None:
    from bench.gpu_check import gpu_test_files

    files = gpu_test_files()
    assert "tests/test_gpu.py" in files and "tests/test_tracking.py" not in files  # mlflow: not on the device


@pytest.mark.slow
def test_gpu_check_smoke_records_every_check(tmp_path: Path) -> None:
    from bench.gpu_check import main

    results, latest = tmp_path / "gpu.json", tmp_path / "latest.json"
    code = main(["--smoke", "--results", str(results), "--latest", str(latest)])
    data = json.loads(results.read_text())
    checks = data["gpu_check"]["checks"]
    assert list(checks) == ["pytest_gpu", "training", "mole_cost", "generation"]
    # The plumbing this branch owns works; a sub-benchmark that is missing or fails is recorded with its error.
    assert checks["pytest_gpu"]["status"] == "ok" and checks["training"]["status"] == "ok", checks
    for name, record in checks.items():
        assert record["status"] in ("ok", "failed") and (record["status"] == "ok" or record["error"]), name
    assert code == (0 if all(r["status"] == "ok" for r in checks.values()) else 1)
    runs = data["training"]["runs"]
    assert set(runs) == {
        "stage1_plain",
        "stage1_mole",
        "expert",
        "gates",
        "stage1_mole_uncached",
    }
    assert all(r["samples_per_second"] > 0 for r in runs.values())
    assert data["training"]["speed_vs_plain"] > 0
    assert data["pytest_gpu"]["skipped"] == data["pytest_gpu"]["tests"] > 0  # no CUDA here: every gpu test skips
    md = latest.with_suffix(".md").read_text()
    assert "## GPU check" in md and "| training | ok |" in md
    assert json.loads(latest.read_text())["gpu"]["training"]["runs"]["gates"]["samples_per_second"] > 0
