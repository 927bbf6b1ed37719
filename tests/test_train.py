"""The three stages on the tiny model: outputs load in plain diffusers, loss falls, frozen stays frozen,
kill-and-resume is bit-identical, bad input fails before training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mole.cli import app
from mole.train import ConfigError, load_config, train_stage
from mole.train.config import parse_overrides, stage_config
from mole.train.model import min_snr_weights

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
runner = CliRunner()


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mole.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data")
    return {kind: _write(write_dataset, root / kind, kind) for kind in ("faces", "hands", "scenes")}


def _write(write_dataset, path: Path, kind: str) -> Path:
    write_dataset(path, kind, 8, seed=0, size=64)
    return path


@pytest.fixture(scope="session")
def stage1_model(tiny_model_dir: Path, datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    cfg = load_config(TINY, parse_overrides(["stage1.validation_prompts=[]"]))
    result = train_stage(
        "stage1", cfg, output=out, data=str(datasets["scenes"]), base=str(tiny_model_dir), max_steps=2
    )
    return Path(result.result)


@pytest.fixture(scope="session")
def experts(stage1_model: Path, datasets, tmp_path_factory) -> dict[str, Path]:
    cfg = load_config(TINY)
    out = {}
    for name, kind in (("face", "faces"), ("hand", "hands")):
        folder = tmp_path_factory.mktemp(f"expert-{name}")
        result = train_stage(
            "expert", cfg, output=folder, data=str(datasets[kind]), base=str(stage1_model), max_steps=3,
            expert_name=name,
        )  # fmt: skip
        out[name] = Path(result.result)
    return out


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# --- the loss weighting --------------------------------------------------------------------------------


def test_min_snr_weights_match_the_formula_by_hand() -> None:
    alphas_cumprod = torch.tensor([0.5, 0.9, 0.01, 0.999])
    t = torch.tensor([0, 1, 2, 3])
    # SNR = ᾱ/(1-ᾱ): 1, 9, 1/99, 999
    eps = min_snr_weights(alphas_cumprod, t, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([1.0, 5 / 9, 1.0, 5 / 999]))
    v = min_snr_weights(alphas_cumprod, t, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([1 / 2, 5 / 10, (1 / 99) / (1 / 99 + 1), 5 / 1000]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(alphas_cumprod, t, 5.0, "sample")


# --- configs ---------------------------------------------------------------------------------------------


def test_paper_preset_has_the_appendix_hyperparameters() -> None:
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.stage1.optimizer.name == "lion" and cfg.stage1.optimizer.lr == 2e-6
    assert cfg.stage1.min_snr_gamma == 5.0 and cfg.stage1.max_steps == 300_000 and cfg.stage1.train_text_encoder
    face, hand = cfg.experts["face"], cfg.experts["hand"]
    assert (face.rank, face.alpha, face.optimizer.lr, face.max_steps) == (256, 64, 2e-5, 30_000)
    assert (hand.rank, hand.alpha, hand.optimizer.lr, hand.max_steps) == (256, 128, 1e-5, 60_000)
    assert face.optimizer.name == hand.optimizer.name == cfg.gates.optimizer.name == "adamw"
    assert (cfg.gates.optimizer.lr, cfg.gates.max_steps, cfg.gates.gate) == (1e-5, 50_000, "both")
    assert cfg.model.resolution == 512


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  optimizer: {name: lion, lr: -1}\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "stage1.optimizer.lr" in str(err.value) and "stage1.learning_rate: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    cfg = load_config(TINY, parse_overrides(["experts.face.rank=4", "gates.gate=local"]))
    assert cfg.experts["face"].rank == 4 and cfg.gates.gate == "local"


# --- each stage through the CLI, outputs loaded by plain diffusers ---------------------------------------


def test_stage1_cli_writes_a_model_plain_diffusers_loads(tiny_model_dir, datasets, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    result = _invoke(
        "train", "stage1", "--config", TINY, "--data", datasets["scenes"], "--output", tmp_path,
        "--base", tiny_model_dir, "--max-steps", 3, "--set", "stage1.validation_steps=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    image = pipe("a man", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert list((tmp_path / "validation").glob("*.png"))  # the validation prompt was rendered at the end
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') >= 1


def test_expert_cli_output_loads_in_diffusers_with_every_layer(stage1_model, datasets, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    result = _invoke(
        "train", "expert", "--name", "face", "--config", TINY, "--data", datasets["faces"], "--output", tmp_path,
        "--base", stage1_model, "--max-steps", 2,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    n_file = sum(1 for k in load_file(weights) if "lora_A" in k)
    assert n_file == 48  # every attention, feed-forward and 1×1 proj layer of the tiny UNet
    pipe = StableDiffusionPipeline.from_pretrained(stage1_model)
    pipe.load_lora_weights(tmp_path, adapter_name="face")
    loaded = sum(1 for n, _ in pipe.unet.named_parameters() if n.endswith("lora_A.face.weight"))
    assert loaded == n_file  # a silently dropped layer (the proj_in/proj_out trap) fails here


def test_gates_cli_writes_gates_that_rebuild_the_mixture(stage1_model, experts, datasets, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    from mole.inject import apply_mole_from_gates, mole_layers

    stage1_folder = stage1_model.parent  # what stage 1's --output was: accepted as --base, its model/ found
    assert stage1_model.name == "model" and not (stage1_folder / "model_index.json").exists()
    result = _invoke(
        "train", "gates", "--config", TINY, "--data", datasets["scenes"], "--output", tmp_path,
        "--base", stage1_folder, "--experts", f"face={experts['face']}", "--experts", f"hand={experts['hand']}",
        "--gate", "global", "--max-steps", 2,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    unet = UNet2DConditionModel.from_pretrained(stage1_model, subfolder="unet")
    apply_mole_from_gates(unet, {k: str(v) for k, v in experts.items()}, tmp_path / "gates.safetensors")
    layers = mole_layers(unet)
    assert len(layers) == 48 and all(m.gate == "global" and m.mole_local is None for m in layers.values())


def test_stage_output_folders_stand_for_what_the_stage_wrote(stage1_model, experts, tmp_path, caplog) -> None:
    """`--base OUT_OF_STAGE1`, `--model OUT_OF_STAGE1` and `--gates OUT_OF_GATES`: the product is found and named."""
    import logging

    from mole.gates_io import save_gates
    from mole.outputs import gates_file, model_folder

    stage1_folder = stage1_model.parent
    with caplog.at_level(logging.INFO, logger="mole.outputs"):
        assert model_folder(stage1_folder) == stage1_model
        assert model_folder(stage1_model) == stage1_model  # the product itself passes through, silently
    assert [r.getMessage() for r in caplog.records] == [
        f"{stage1_folder} is a stage-1 output folder: using its model {stage1_model}"
    ]
    gates_out = tmp_path / "gates"
    gates_out.mkdir()
    with pytest.raises(FileNotFoundError, match=r"nor a folder holding gates\.safetensors"):
        gates_file(gates_out)
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json in it nor in"):
        model_folder(gates_out)
    from diffusers import UNet2DConditionModel

    from mole.inject import apply_mole

    unet = UNet2DConditionModel.from_pretrained(stage1_model, subfolder="unet")
    apply_mole(unet, {k: str(v) for k, v in experts.items()}, gate="global")
    save_gates(unet, gates_out / "gates.safetensors")
    assert gates_file(gates_out) == gates_out / "gates.safetensors"
    out = tmp_path / "img.png"
    result = _invoke("generate", "--model", stage1_folder, "--prompt", "a face", "--output", out, "--steps", 1,
                     "--experts", f"face={experts['face']}", "--experts", f"hand={experts['hand']}",
                     "--gates", gates_out, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file()


# --- what each stage trains, and that it learns ----------------------------------------------------------


def _stage_setup(stage: str, tiny_model_dir, stage1_model, experts):
    from mole.train.config import stage_config
    from mole.train.stages import build_stage

    cfg = load_config(TINY)
    base = tiny_model_dir if stage == "stage1" else stage1_model
    name = "face" if stage == "expert" else None
    section = stage_config(cfg, stage, name)
    spec = build_stage(
        stage, section, cfg.model, base, expert_name=name, experts={k: str(v) for k, v in experts.items()}
    )
    return cfg, section, spec


@pytest.mark.parametrize("stage", ["stage1", "expert", "gates"])
def test_each_stage_learns_and_keeps_frozen_weights_bit_identical(
    stage, tiny_model_dir, stage1_model, experts, datasets, tmp_path
) -> None:
    from tests.train_helpers import fixed_batch_loss

    from mole.train.data import ImageCaptionDataset, collate
    from mole.train.loop import run_training

    _, section, spec = _stage_setup(stage, tiny_model_dir, stage1_model, experts)
    data = datasets["faces" if stage == "expert" else "scenes"]
    section = section.model_copy(update={"max_steps": 30, "batch_size": 4, "validation_prompts": [], "seed": 3})
    if stage == "stage1":
        section.optimizer = section.optimizer.model_copy(update={"lr": 3e-4})
    if stage == "gates":
        assert all(".mole_" in n for n in spec.trainable)
    frozen = {n: p.detach().clone() for n, p in spec.model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in spec.model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in spec.model.named_parameters() if p.requires_grad}
    assert trainable and (stage == "stage1" or frozen)

    ds = ImageCaptionDataset(data, spec.tokenizer, 64, random_flip=False)
    batch = collate([ds[(i, i)] for i in range(4)])
    before = fixed_batch_loss(spec, batch, section)
    run_training(spec, section, str(data), tmp_path, resolution=64)
    after = fixed_batch_loss(spec, batch, section)
    assert after < before, f"{stage}: loss {before:.4f} -> {after:.4f}"

    params = dict(spec.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen parameter changed"
    # A MoLE layer's stacked down-projection holds the experts' rows, then copies of the gates (which train).
    rank_rows = {f"{n}.stacked_": m.rank_rows for n, m in spec.model.named_modules() if hasattr(m, "rank_rows")}
    for name, b in spec.model.named_buffers():
        rows = next((r for prefix, r in rank_rows.items() if name.startswith(prefix)), None)
        expert_part = (lambda t, r=rows: t[:r]) if rows is not None else (lambda t: t)
        assert torch.equal(expert_part(b), expert_part(buffers[name])), f"a buffer (expert) changed: {name}"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "nothing trained"


# --- kill and resume -------------------------------------------------------------------------------------


def _train_cmd(out: Path, data: Path, base: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "mole", "train", "expert", "--name", "face", "--config", str(TINY), "--data", str(data),
        "--output", str(out), "--base", str(base), "--max-steps", str(steps), "--resume", "latest",
        "--set", "experts.face.checkpoint_every=2", "--set", "experts.face.keep_checkpoints=2",
        "--set", "experts.face.lr_scheduler=cosine", "--set", "experts.face.caption_dropout=0.3",
        "--set", "experts.face.ema_decay=0.9",  # the EMA resumes from safetensors + JSON, not a pickle
    ]  # fmt: skip


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(stage1_model, datasets, tmp_path) -> None:
    steps = 24
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    subprocess.run(
        _train_cmd(straight, datasets["faces"], stage1_model, steps), check=True, env=env, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, datasets["faces"], stage1_model, steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoints"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, as a preempted node
    proc.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists(), "the run finished before the kill"
    resumed = subprocess.run(
        _train_cmd(killed, datasets["faces"], stage1_model, steps), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((killed / "checkpoints").glob("step-*"))) == 2  # rotation kept the newest two


# --- bad input fails before training ----------------------------------------------------------------------


def test_bad_inputs_fail_clearly_before_training(tiny_model_dir, stage1_model, datasets, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _invoke(
        "train",
        "stage1",
        "--config",
        TINY,
        "--data",
        empty,
        "--output",
        tmp_path / "o1",
        "--base",
        tiny_model_dir,
    )
    assert r.exit_code == 2 and "dataset.json" in r.output
    r = _invoke("train", "stage1", "--config", TINY, "--data", datasets["scenes"], "--output", tmp_path / "o2",
                "--base", tmp_path / "nope")  # fmt: skip
    assert r.exit_code == 2 and "model_index.json" in r.output
    r = _invoke("train", "gates", "--config", TINY, "--data", datasets["scenes"], "--output", tmp_path / "o3",
                "--base", tiny_model_dir, "--experts", f"face={tmp_path / 'missing.safetensors'}")  # fmt: skip
    assert r.exit_code == 2 and "not found" in r.output
    r = _invoke("train", "stage1", "--config", TINY, "--set", "stage1.optimiser.lr=1")
    assert r.exit_code == 2 and "stage1.optimiser: unknown key" in r.output
    r = _invoke("train", "expert", "--name", "elbow", "--config", TINY)  # feet has a section now
    assert r.exit_code == 2 and "no experts.elbow section" in r.output
    assert "--set experts.elbow.rank=R` creates it" in " ".join(r.output.split())
    # ... and it does: the named section, at that rank.
    assert stage_config(load_config(TINY, parse_overrides(["experts.elbow.rank=4"])), "expert", "elbow").rank == 4
    assert not (tmp_path / "o1" / "checkpoints").exists() and not (tmp_path / "o2" / "checkpoints").exists()


def test_expert_from_another_architecture_is_refused(stage1_model, experts, datasets, tmp_path) -> None:
    """Experts trained on the tiny UNet do not fit a UNet with other widths: a clear error, not a crash."""
    from diffusers import UNet2DConditionModel

    other = tmp_path / "other"
    from mole.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    unet = UNet2DConditionModel(**{**pipe.unet.config, "block_out_channels": (64, 64), "cross_attention_dim": 32})
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    pipe.save_pretrained(other)
    r = _invoke(
        "train", "gates", "--config", TINY, "--data", datasets["scenes"], "--output", tmp_path / "o", "--base", other,
        "--experts", f"face={experts['face']}", "--experts", f"hand={experts['hand']}",
    )  # fmt: skip
    assert r.exit_code == 2 and "does not fit" in r.output


def test_stage_guards_are_errors_that_hold_under_python_O(stage1_model, experts, monkeypatch) -> None:
    """The gates stage trains only gates, and each stage gets its own section: raised, never asserted."""
    from mole.train import stages

    cfg = load_config(TINY)
    with pytest.raises(stages.StageError, match="needs its own config section"):
        stages.build_stage("gates", cfg.stage1, cfg.model, stage1_model)
    with pytest.raises(stages.StageError, match="needs an expert name"):
        stages.build_stage("expert", cfg.experts["face"], cfg.model, stage1_model)
    monkeypatch.setattr(stages, "_trainable", lambda model: ["unet.conv_in.weight"])
    with pytest.raises(stages.StageError, match="would train non-gate parameters"):
        paths = {k: str(p) for k, p in experts.items()}
        stages.build_stage("gates", cfg.gates, cfg.model, stage1_model, experts=paths)
    code = "import sys, mole.train.stages as s; sys.exit(0 if 'assert ' not in open(s.__file__).read() else 1)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
