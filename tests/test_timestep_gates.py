"""Timestep-aware gates and any number of experts on the tiny model: exact at init, step-dependent once trained,
saved and reloaded with their condition, three experts trained and generated, one pipeline task per expert."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tests.conftest import unet_inputs
from typer.testing import CliRunner

from mole.cli import app
from mole.gates_io import gate_state_dict, load_gates, read_gate_settings, save_gates
from mole.inject import apply_mole, apply_mole_from_gates, mole_layers, record_gates, remove_mole
from mole.timestep import timestep_embedding

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _fresh(tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()


def _randomize(unet, prefix: str, seed: int = 3, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if f".{prefix}" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _run(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def test_zero_time_projection_gives_exactly_the_plain_gates(tiny_model_dir, write_expert, tmp_path) -> None:
    experts = {
        "face": write_expert("face"),
        "hand": write_expert("hand", seed=2),
        "feet": write_expert("feet", seed=4),
    }
    plain = apply_mole(_fresh(tiny_model_dir), experts)
    timed = apply_mole(_fresh(tiny_model_dir), experts, condition="timestep")
    _randomize(plain, "mole_local")
    _randomize(plain, "mole_global", seed=4)
    timed.load_state_dict(plain.state_dict(), strict=False)  # same φ, ω; mole_time stays at zero
    time_params = {k: v for k, v in gate_state_dict(timed).items() if ".mole_time." in k}
    assert len(time_params) == 2 * len(mole_layers(timed)) and all(not v.any() for v in time_params.values())
    emb_dim = 4 * timed.config.block_out_channels[0]
    assert all(m.mole_time.in_features == emb_dim and m.mole_time.out_features == 2 * 3
               for m in mole_layers(timed).values())  # fmt: skip

    inputs = unet_inputs(plain, batch=3)  # three different timesteps in one batch
    expected = _run(plain, inputs)
    assert torch.equal(expected, _run(timed, inputs))
    # The training path (no in-place accumulation) too, and the gate values themselves.
    with record_gates(plain) as a, record_gates(timed) as b:
        out_plain, out_timed = plain(**inputs).sample, timed(**inputs).sample
    assert torch.equal(out_plain, out_timed) and a.global_ == b.global_ and a.local == b.local

    # Only the gates train, mole_time included, and it gets a gradient at zero.
    out_timed.square().mean().backward()
    trainable = {n for n, p in timed.named_parameters() if p.requires_grad}
    assert trainable == set(gate_state_dict(timed)) and any(".mole_time." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in timed.named_parameters()
               if n.endswith("mole_time.weight"))  # fmt: skip

    # The condition is saved with the gates and rebuilt from them; a plain model refuses timestep gates.
    path = save_gates(timed, tmp_path / "gates.safetensors")
    assert read_gate_settings(path).condition == "timestep"
    rebuilt = apply_mole_from_gates(_fresh(tiny_model_dir), experts, path)
    assert rebuilt.mole_settings.condition == "timestep" and torch.equal(_run(rebuilt, inputs), expected)
    with pytest.raises(ValueError, match="condition"):
        load_gates(apply_mole(_fresh(tiny_model_dir), experts), path)
    with pytest.raises(ValueError, match="gate='none'"):
        apply_mole(_fresh(tiny_model_dir), experts, gate="none", condition="timestep")
    remove_mole(rebuilt)
    assert not rebuilt._forward_pre_hooks and not rebuilt.time_embedding._forward_hooks


def test_gates_change_with_the_timestep_once_the_projection_is_trained(tiny_model_dir, write_expert) -> None:
    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    unet = apply_mole(_fresh(tiny_model_dir), experts, condition="timestep")
    _randomize(unet, "mole_local")
    layer = next(m for m in mole_layers(unet).values() if not m.is_conv)
    x = torch.randn(1, 6, layer.in_features).expand(2, -1, -1)  # the same features for two samples
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(torch.tensor([50, 900])))  # [2, emb_dim]
        with timestep_embedding([layer], emb):
            zero = layer.gates(x)
        # At init the step changes nothing: the two rows differ at most by the rounding of where a row sits in
        # the batched matmul (exact equality of whole outputs is the previous test's).
        torch.testing.assert_close(zero[0], zero[1], rtol=0, atol=1e-6)
        _randomize(unet, "mole_time", seed=5, scale=0.2)
        with timestep_embedding([layer], emb):
            moved = layer.gates(x)
    assert not torch.allclose(moved[0], moved[1], atol=1e-3)  # same features, different steps: different gates

    # In the UNet, under a classifier-free-guidance batch: each half carries its own samples' steps.
    inputs = unet_inputs(unet, batch=2)
    same_t = {**inputs, "timestep": torch.tensor([500, 500])}
    for m in mole_layers(unet).values():
        m.record_gates = True
    _run(unet, same_t)
    at_500 = {n: m.last_global.clone() for n, m in mole_layers(unet).items()}
    _run(unet, {**same_t, "timestep": torch.tensor([500, 20])})
    changed = [not torch.equal(m.last_global[1], at_500[n][1]) for n, m in mole_layers(unet).items()]
    assert all(torch.equal(m.last_global[0], at_500[n][0]) for n, m in mole_layers(unet).items())
    assert all(changed)
    # A deep copy conditions on its own forwards (its hooks and layers share a fresh context).
    twin = copy.deepcopy(unet)
    twin_layer = mole_layers(twin)[next(n for n, m in mole_layers(unet).items() if m is layer)]
    with pytest.raises(RuntimeError, match="no timestep embedding"):  # outside a UNet forward
        twin_layer.gates(x)
    assert torch.equal(_run(twin, inputs), _run(unet, inputs))


@pytest.fixture(scope="module")
def three_experts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """face, hand and feet experts trained on the tiny model with the tiny recipe (2 steps each)."""
    from mole.data.synthetic import write_dataset
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    root = tmp_path_factory.mktemp("three")
    cfg = load_config(REPO / "configs" / "tiny.yaml", parse_overrides(
        [f"experts.{n}.{k}" for n in ("face", "hand", "feet") for k in ("batch_size=2", "rank=4")]))  # fmt: skip
    out = {"data_scenes": root / "scenes"}
    write_dataset(out["data_scenes"], "scenes", 4, seed=0, size=64)
    for name, kind in (("face", "faces"), ("hand", "hands"), ("feet", "feet")):
        write_dataset(root / kind, kind, 4, seed=0, size=64)
        result = train_stage("expert", cfg, output=root / f"expert-{name}", data=str(root / kind),
                             base=str(tiny_model_dir), max_steps=2, expert_name=name)  # fmt: skip
        out[name] = root / f"expert-{name}"
        assert Path(result.result).is_file()
    return out


def test_three_experts_train_gates_and_generate(tiny_model_dir, three_experts, tmp_path) -> None:
    from mole.generate import generate, load_pipeline

    names = ("face", "hand", "feet")
    result = runner.invoke(app, ["train", "gates", "--config", str(REPO / "configs" / "tiny.yaml"),
                                 "--base", str(tiny_model_dir), "--data", str(three_experts["data_scenes"]),
                                 *[a for n in names for a in ("--experts", f"{n}={three_experts[n]}")],
                                 "--condition", "timestep", "--max-steps", "2", "--set", "gates.batch_size=2",
                                 "--output", str(tmp_path / "gates")])  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "gates" / "result.json").read_text())
    assert info["condition"] == "timestep" and list(info["experts"]) == list(names)
    gates = tmp_path / "gates" / "gates.safetensors"
    assert read_gate_settings(gates).experts == tuple(names)
    # Two steps of AdamW at lr 1e-2 have moved the timestep projections off zero.
    from safetensors.torch import load_file

    assert any(v.abs().sum() > 0 for k, v in load_file(str(gates)).items() if ".mole_time." in k)

    pipe = load_pipeline(tiny_model_dir, {n: three_experts[n] for n in names}, gates, device="cpu")
    assert pipe.unet.mole_settings.condition == "timestep"
    out = generate(pipe, ["a close-up photo of feet in red shoes"], steps=3, guidance=5.0, record=True)
    assert len(out.images) == 1 and out.gate_trace.experts == list(names)
    assert len(out.gate_trace.global_) == 3 and all(len(step) == 3 for step in out.gate_trace.global_)


def test_pipeline_has_one_parallel_expert_task_per_listed_expert(tmp_path) -> None:
    import yaml

    from mole.pipeline.run import compile_pipeline, parse_experts

    experts = parse_experts(["face", "hand", "feet", "hair=faces"])
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", experts).read_text()))
    dag = docs[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    by_name = {t["taskInfo"]["name"]: (k, t) for k, t in dag.items()}
    expert_tasks = {n: by_name[f"expert-{n}"] for n in experts}
    keys = {k for k, _ in expert_tasks.values()}
    assert len(keys) == 4
    for _, task in expert_tasks.values():
        assert not set(task.get("dependentTasks", [])) & keys  # no expert waits for another: parallel
    gates_key, gates = by_name["gates"]
    assert keys <= set(gates["dependentTasks"])
    assert (
        gates["inputs"]["parameters"]["gate_condition"]["componentInputParameter"] == "pipelinechannel--gate_condition"
    )
    assert docs[0]["root"]["inputDefinitions"]["parameters"]["gate_condition"]["defaultValue"] == ""
    assert gates_key not in {d for _, t in expert_tasks.values() for d in t.get("dependentTasks", [])}


def test_compare_plain_and_timestep_gates_on_the_same_prompts(tiny_model_dir, write_expert, tmp_path) -> None:
    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    gates = {}
    for condition in ("none", "timestep"):
        unet = apply_mole(_fresh(tiny_model_dir), experts, condition=condition)
        _randomize(unet, "mole_global", seed=7)
        if condition == "timestep":
            _randomize(unet, "mole_time", seed=8, scale=0.3)
        gates[condition] = save_gates(unet, tmp_path / f"gates-{condition}.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a close-up photo of a face\na hand waving\n", encoding="utf-8")
    clip = tmp_path / "clip"
    assert runner.invoke(app, ["tiny", "clip", "--output", str(clip)]).exit_code == 0
    scorer = tmp_path / "scorers.yaml"
    scorer.write_text(f"clip: {{model: {clip}, device: cpu}}\n", encoding="utf-8")
    expert_args = [a for n, p in experts.items() for a in ("--experts", f"{n}={p}")]
    for condition, path in gates.items():
        result = runner.invoke(app, ["evaluate", "run", "--model", str(tiny_model_dir), *expert_args, "--gates",
                                     str(path), "--prompts", str(prompts), "--num-prompts", "2", "--repeats", "1",
                                     "--scorer-config", str(scorer), "--steps", "2", "--label", condition,
                                     "--output", str(tmp_path / f"eval-{condition}")])  # fmt: skip
        assert result.exit_code == 0, result.output
    groups = tmp_path / "groups.yaml"
    groups.write_text("face: [a close-up photo of a face]\nhand: [a hand waving]\n", encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "compare", str(tmp_path / "eval-none"), str(tmp_path / "eval-timestep"),
                                 "--labels", "MoLE,MoLE+timestep", "--gate-plots", str(tmp_path / "plots"),
                                 "--groups", str(groups)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| MoLE | 2 experts, both | " in result.output
    assert "| MoLE+timestep | 2 experts, both, timestep | " in result.output
    assert "face: own / others" in result.output and "warning" not in result.output
    written = {p.relative_to(tmp_path / "plots").as_posix() for p in (tmp_path / "plots").rglob("*") if p.is_file()}
    assert {"global_gates_compare.png", "gate_specialisation.md", "0-MoLE/global_gates.png",
            "1-MoLE-timestep/global_gates.png"} <= written  # fmt: skip
    plain = json.loads((tmp_path / "plots" / "0-MoLE" / "gate_stats.json").read_text())
    timed = json.loads((tmp_path / "plots" / "1-MoLE-timestep" / "gate_stats.json").read_text())
    assert set(plain["specialisation"]) == {"face", "hand"}
    assert plain["global_by_group"] != timed["global_by_group"]
