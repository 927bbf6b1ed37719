"""`mole evaluate` end to end on the embedded default: tiny model, tiny CLIP scorer, tables and gate plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mole.cli import app
from mole.evaluate.runner import mean_stderr, prompt_seed

runner = CliRunner()

PROMPTS = ["a close-up photo of a smiling woman", "a man waving his hand", "a girl holding a red ball",
           "two people walking in a park", "a hand making a fist", "an old man with a beard"]  # fmt: skip


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    _ok(["tiny", "clip", "--output", str(folder), "--overwrite"])
    return folder


@pytest.fixture
def mole_parts(tiny_model_dir: Path, write_expert, tmp_path: Path) -> tuple[dict[str, Path], Path]:
    from diffusers import UNet2DConditionModel

    from mole.gates_io import save_gates
    from mole.inject import apply_mole

    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts)
    with torch.no_grad():  # gates that are not at their init, so MoLE images differ from the base's
        for name, p in unet.named_parameters():
            if name.endswith("mole_global.bias"):
                p.copy_(torch.tensor([2.0, -1.0]))
    return experts, save_gates(unet, tmp_path / "gates.safetensors")


def test_tiny_clip_refuses_to_overwrite(clip_dir: Path) -> None:
    result = runner.invoke(app, ["tiny", "clip", "--output", str(clip_dir)])
    assert result.exit_code == 2 and "already holds a model" in result.output


def test_tiny_clip_score_says_whether_the_image_shows_its_caption(clip_dir: Path) -> None:
    """The embedded default's CLIP is trained on synthetic pairs, so its score means something: on pairs it never
    saw, an image scores higher with its own caption than with a caption of another kind, and the training
    record in the folder says so too."""
    from mole.data.synthetic import generate
    from mole.evaluate.scorers import build_scorer

    scorer = build_scorer("clip", {"clip": {"model": str(clip_dir), "batch_size": 16}}, device="cpu")
    pairs = {kind: list(generate(kind, 6, seed=4242)) for kind in ("faces", "hands", "feet", "scenes")}
    images = [image for kind in pairs for image, _, _ in pairs[kind]]
    own = [caption for kind in pairs for _, caption, _ in pairs[kind]]
    other = own[6:] + own[:6]  # each image with the caption of the same index in the next kind
    own_scores, other_scores = scorer.score(images, own), scorer.score(images, other)
    assert float(torch.as_tensor(own_scores).mean()) > float(torch.as_tensor(other_scores).mean()) + 20.0
    assert sum(a > b for a, b in zip(own_scores, other_scores, strict=True)) >= 20  # of 24
    record = json.loads((clip_dir / "tiny_clip.json").read_text(encoding="utf-8"))
    assert record["train_steps"] > 0
    assert record["heldout_matched_cos"] > record["heldout_mismatched_cos"] + 0.3
    assert record["heldout_top1"] > 10 * record["heldout_top1_chance"]


def test_evaluate_run_compare_and_gates(tiny_model_dir: Path, clip_dir: Path, mole_parts, tmp_path: Path) -> None:
    experts, gates = mole_parts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    conf = tmp_path / "scorers.yaml"
    conf.write_text(f"clip:\n  model: {clip_dir}\n  device: cpu\n", encoding="utf-8")
    common = ["--prompts", str(prompts), "--num-prompts", "4", "--repeats", "3", "--scorers", "clip",
              "--scorer-config", str(conf), "--seed", "7", "--steps", "2", "--batch-size", "3"]  # fmt: skip
    expert_args = [a for name, path in experts.items() for a in ("--experts", f"{name}={path}")]
    base_out, mole_out, again_out = tmp_path / "eval-base", tmp_path / "eval-mole", tmp_path / "eval-again"
    table = _ok(["evaluate", "run", "--model", str(tiny_model_dir), "--output", str(base_out), "--label", "base",
                 *common])  # fmt: skip
    assert "| base |" in table and "clip" in table
    _ok(["evaluate", "run", "--model", str(tiny_model_dir), *expert_args, "--gates", str(gates),
         "--output", str(mole_out), "--label", "mole", *common])  # fmt: skip
    _ok(["evaluate", "run", "--model", str(tiny_model_dir), "--output", str(again_out), "--label", "base", *common])

    report = json.loads((base_out / "report.json").read_text())
    assert report["num_prompts"] == 4 and report["repeats"] == 3
    rows = list(csv.DictReader((base_out / "scores.csv").open()))
    assert len(rows) == 12  # 4 prompts × 3 repeats, one row each, with its image on disk
    for row in rows:
        assert row["prompt"] in PROMPTS and 0.0 <= float(row["clip"]) <= 100.0
        assert int(row["seed"]) == prompt_seed(7, int(row["repeat"]), row["prompt"])
        assert (base_out / row["image"]).is_file()
    # The summary is the mean ± standard error over the three repeat means, recomputed from the rows.
    means = [sum(float(r["clip"]) for r in rows if r["repeat"] == str(k)) / 4 for k in range(3)]
    mean, se = mean_stderr(means)
    assert report["scores"]["clip"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert report["scores"]["clip"]["stderr"] == pytest.approx(se, abs=1e-9) and se > 0
    # Same settings, same model: the same prompts, seeds, images and scores.
    again = json.loads((again_out / "report.json").read_text())
    assert again["scores"] == report["scores"]
    # Base and MoLE see the same prompts with the same seeds; the images differ.
    mole_rows = list(csv.DictReader((mole_out / "scores.csv").open()))
    assert [(r["prompt"], r["seed"]) for r in mole_rows] == [(r["prompt"], r["seed"]) for r in rows]
    assert (mole_out / mole_rows[0]["image"]).read_bytes() != (base_out / rows[0]["image"]).read_bytes()

    out = _ok(["evaluate", "compare", str(base_out), str(mole_out), "--labels", "base,MoLE",
               "--output", str(tmp_path / "table")])  # fmt: skip
    assert "| base |" in out and "| MoLE |" in out and " ± " in out
    with (tmp_path / "table.csv").open() as f:
        table_rows = list(csv.reader(f))
    assert table_rows[0] == ["model", "clip_mean", "clip_stderr"] and [r[0] for r in table_rows[1:]] == [
        "base",
        "MoLE",
    ]

    groups = tmp_path / "groups.yaml"
    groups.write_text("face: [a close-up photo of a face]\nhand: [a hand waving]\n", encoding="utf-8")
    out = _ok(["evaluate", "gates", "--model", str(tiny_model_dir), *expert_args, "--gates", str(gates),
               "--groups", str(groups), "--steps", "2", "--output", str(tmp_path / "plots")])  # fmt: skip
    assert "face prompts: mean global gate face 0.881" in out  # sigmoid(2) = 0.8808
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {
        "global_gates.png",
        "local_maps.png",
        "gate_stats.json",
    }


def test_evaluate_errors_are_clear(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a woman\n", encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "run", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                 "--output", str(tmp_path / "o"), "--scorers", "clip"])  # fmt: skip
    assert result.exit_code == 2 and "model" in result.output  # the CLIP scorer's missing `model` path is named
    result = runner.invoke(app, ["evaluate", "run", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                 "--output", str(tmp_path / "o"), "--scorers", "nope"])  # fmt: skip
    assert result.exit_code == 2 and "unknown scorer" in result.output
    result = runner.invoke(app, ["evaluate", "compare", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no evaluation report" in result.output
