"""The run report (`make demo`'s last word): one self-contained HTML page built from a pipeline run's folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch


def _fake_run(workdir: Path, tiny_model_dir: Path, write_expert) -> None:
    """A run folder laid out as the pipeline's steps leave it, with tiny stand-ins for every stage."""
    from diffusers import UNet2DConditionModel

    from mole.data.synthetic import write_dataset
    from mole.gates_io import save_gates
    from mole.inject import apply_mole
    from mole.tiny import init_tiny_clip

    shutil.copytree(tiny_model_dir, workdir / "embedded" / "model")
    shutil.copytree(tiny_model_dir, workdir / "stage1" / "model")
    init_tiny_clip(workdir / "embedded" / "clip", train_steps=0)
    # As the pipeline lays them out: data steps outside the run, content-keyed; stage 1's params name them.
    data = {kind: workdir.parent.parent / "data" / f"{kind}-0123abcd" for kind in ("scenes", "faces", "hands")}
    for kind, folder in data.items():
        write_dataset(folder, kind, 2)
    params = {"stage": "stage1", "stage1": {"data": {k: str(v) for k, v in data.items()}}}
    (workdir / "stage1" / "params.json").write_text(json.dumps(params), encoding="utf-8")
    experts = {}
    for name, seed in (("face", 1), ("hand", 2)):
        (workdir / f"expert-{name}").mkdir()
        experts[name] = shutil.copy(write_expert(name, seed=seed), workdir / f"expert-{name}")
    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts)
    with torch.no_grad():
        for key, p in unet.named_parameters():
            if key.endswith("mole_global.bias"):
                p.copy_(torch.tensor([1.0, -1.0]))
    (workdir / "gates").mkdir()
    save_gates(unet, workdir / "gates" / "gates.safetensors")
    for stage in ("stage1", "expert-face", "expert-hand", "gates"):
        lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)] + [json.dumps({"artifact": "x"})]
        (workdir / stage / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, label in (("evaluate", "MoLE"), ("evaluate-stage1", "stage 1")):
        (workdir / name).mkdir()
        report = {"label": label, "num_prompts": 8, "repeats": 3, "scores": {"clip": {"mean": 9.5, "stderr": 0.4}}}
        (workdir / name / "report.json").write_text(json.dumps(report), encoding="utf-8")


@pytest.mark.slow
def test_report_shows_data_every_stage_losses_gates_and_scores(tiny_model_dir: Path, write_expert, tmp_path) -> None:
    from mole.evaluate.report import build_report

    workdir = tmp_path / "runs" / "job-1"
    _fake_run(workdir, tiny_model_dir, write_expert)
    page = build_report(workdir, steps=2, seeds=(0, 1))
    text = page.read_text(encoding="utf-8")
    assert page == workdir / "report" / "index.html"
    # Training data of every dataset, with captions.
    for kind in ("scenes", "faces", "hands"):
        assert f"<h3>{kind}</h3>" in text
    # One row per prompt (a fresh caption of every kind) and seed, one column per model, the same seeds across.
    head = re.search(r"<tr><th>prompt</th><th>seed</th>(.*?)</tr>", text).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["base", "stage 1", "+ experts", "MoLE"]
    # Prompts of the kinds the run trained on (scenes, faces, hands: no feet).
    assert len(re.findall(r"<td class='prompt'>", text)) == 3 * 2 and "feet" not in text.split("<h2>Generated")[1]
    assert len(list((workdir / "report").glob("*.png"))) == 4 * 3 * 3 * 2 + 2  # every image, losses, gates
    # Loss curves, gates over the steps, scores of both evaluations and the caption retrieval with its chance.
    assert (workdir / "report" / "losses.png").is_file() and (workdir / "report" / "gates.png").is_file()
    assert "MoLE gates over the denoising steps" in text
    assert "clip 9.500 ± 0.400" in text and "<td>stage 1</td>" in text
    retrieval = json.loads((workdir / "report" / "report.json").read_text())["retrieval"]
    assert set(retrieval) == {"base", "stage 1", "+ experts", "MoLE"}
    # 3 prompts of each of the 3 trained kinds x 2 seeds: chance 1/9 for the own prompt, 1/3 for the right kind.
    assert retrieval["MoLE"]["top1_chance"] == pytest.approx(1 / 9) and retrieval["MoLE"]["images"] == 18
    assert retrieval["MoLE"]["kind_chance"] == pytest.approx(1 / 3) and "chance 33%" in text and "chance 11%" in text
    # Self-contained: every image inline, nothing fetched.
    assert 'src="data:image/png;base64,' in text and 'src="http' not in text


def test_report_leaves_out_what_the_run_did_not_make(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run that stopped after stage 1: the page shows base and stage 1 only and says what is missing."""
    from mole.evaluate.report import build_report

    workdir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, workdir / "embedded" / "model")
    shutil.copytree(tiny_model_dir, workdir / "stage1" / "model")
    text = build_report(workdir, steps=1, seeds=(0,)).read_text(encoding="utf-8")
    head = re.search(r"<tr><th>prompt</th><th>seed</th>(.*?)</tr>", text).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["base", "stage 1"]
    assert "no evaluation reports found" in text and "no datasets found" in text
    assert "MoLE gates" not in text


def test_report_prompts_are_of_the_kinds_the_run_trained_on(tmp_path: Path) -> None:
    from mole.evaluate.report import ALL_KINDS, RunFolders, trained_kinds

    folders = RunFolders(workdir=tmp_path)
    assert trained_kinds(folders) == ALL_KINDS  # nothing recognised: every kind
    folders.datasets = {"scenes-dfc666": tmp_path, "hands-e088": tmp_path, "faces": tmp_path}
    assert trained_kinds(folders) == ("faces", "hands", "scenes")
    folders.datasets = {"feet": tmp_path, "my-own-data": tmp_path}
    assert trained_kinds(folders) == ("feet",)


def test_demo_recipe_is_valid_and_longer_than_the_smoke_recipe() -> None:
    """`make demo` trains with configs/demo.yaml (the pipeline's embedded default), tiny.yaml stays the tests'."""
    from mole.pipeline.run import EMBEDDED_PARAMS
    from mole.train import load_config

    repo = Path(__file__).resolve().parents[1]
    demo, tiny = load_config(repo / "configs" / "demo.yaml"), load_config(repo / "configs" / "tiny.yaml")
    assert EMBEDDED_PARAMS["config"] == "configs/demo.yaml"
    assert demo.stage1.max_steps * demo.stage1.batch_size >= 50 * tiny.stage1.max_steps * tiny.stage1.batch_size
    assert demo.stage1.cache_latents and not demo.stage1.random_flip  # flips made the prompt steer less here
    assert not demo.stage1.train_text_encoder  # trained at this lr it collapsed: every prompt gave one image
    assert set(demo.experts) == set(tiny.experts)
