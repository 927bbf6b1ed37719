"""apply_mole on the tiny UNet: exactness at init, freezing, a peft oracle, file layouts, gates I/O."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests.conftest import make_peft_expert, unet_inputs

from mole.experts import ExpertError, load_expert
from mole.gates_io import load_gates, save_gates
from mole.inject import apply_mole, apply_mole_from_gates, mole_layers, record_gates, remove_mole


def _lora_layer_count(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(1 for k in f.keys() if "lora_A" in k or "lora.down" in k or "lora_down" in k)  # noqa: SIM118


def _randomize_gates(unet, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".mole_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _out(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def test_fresh_experts_leave_the_unet_output_exactly_unchanged(tiny_unet, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    # peft's default init: B = 0, so every expert is a no-op until trained.
    donor = UNet2DConditionModel.from_pretrained(tiny_unet.config._name_or_path, subfolder="unet")
    paths = {}
    for i, name in enumerate(["face", "hand"]):
        state = make_peft_expert(donor, name, rank=4, alpha=4, seed=i, zero_b=True)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    inputs = unet_inputs(tiny_unet, height=8, width=16)
    before = _out(tiny_unet, inputs)
    apply_mole(tiny_unet, paths, gate="both")
    _randomize_gates(tiny_unet)
    assert torch.equal(_out(tiny_unet, inputs), before)


def test_only_gate_parameters_train_and_they_get_gradients(tiny_unet, write_expert) -> None:
    apply_mole(tiny_unet, {"face": write_expert("face"), "hand": write_expert("hand", seed=2)})
    trainable = [n for n, p in tiny_unet.named_parameters() if p.requires_grad]
    assert trainable and all(".mole_local." in n or ".mole_global." in n for n in trainable)
    frozen = [n for n, p in tiny_unet.named_parameters() if not p.requires_grad]
    assert any(n.endswith("base_layer.weight") for n in frozen)
    base_before = {n: p.clone() for n, p in tiny_unet.named_parameters() if not p.requires_grad}
    experts_before = {n: b.clone() for n, b in tiny_unet.named_buffers() if "expert_" in n}

    inputs = unet_inputs(tiny_unet)
    opt = torch.optim.SGD([p for p in tiny_unet.parameters() if p.requires_grad], lr=1.0)
    tiny_unet(**inputs).sample.square().mean().backward()
    grads = [p.grad for p in tiny_unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in tiny_unet.named_parameters() if not p.requires_grad)
    assert all(torch.equal(b, experts_before[n]) for n, b in tiny_unet.named_buffers() if "expert_" in n)


def test_constant_gates_equal_peft_mixing_the_same_adapters(tiny_model_dir, write_expert) -> None:
    """Oracle: gates with zero weights and bias b are constant sigmoid(b)² ("both" mode), which is what peft
    computes for two adapters mixed by set_adapters at that weight, loaded by plain diffusers."""
    from diffusers import StableDiffusionPipeline

    face, hand = write_expert("face", rank=4, alpha=8, seed=1), write_expert("hand", rank=6, alpha=3, seed=2)
    bias = 0.7
    weight = torch.sigmoid(torch.tensor(bias)).item() ** 2

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(face.parent, adapter_name="face")
    pipe.load_lora_weights(hand.parent, adapter_name="hand")
    pipe.set_adapters(["face", "hand"], adapter_weights=[weight, weight])
    inputs = unet_inputs(pipe.unet, height=16, width=8)
    expected = _out(pipe.unet, inputs)

    mole = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    apply_mole(mole.unet, {"face": face, "hand": hand}, gate="both", init_bias=bias)
    got = _out(mole.unet, inputs)
    assert not torch.allclose(got, _out(StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet, inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _save_layouts(tmp_path: Path, state: dict[str, torch.Tensor], config) -> dict[str, tuple[Path, float]]:
    """The same expert in every layout we claim to read, with the scale diffusers gives each."""
    from peft.utils import get_peft_model_state_dict  # noqa: F401  (the layout source, for readers)

    scale = config.lora_alpha / config.r
    out: dict[str, tuple[Path, float]] = {}
    raw = tmp_path / "raw_peft.safetensors"  # no config stored: diffusers assumes alpha = r
    save_file(state, str(raw))
    out["raw_peft"] = (raw, 1.0)

    peft_dir = tmp_path / "peft_dir"  # PeftModel.save_pretrained layout
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    out["peft_dir"] = (peft_dir, scale)

    old = tmp_path / "old_diffusers.safetensors"  # attention-processor era: lora.down / lora.up
    save_file(
        {
            "unet." + k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
            for k, v in state.items()
        },
        str(old),
    )
    out["old_diffusers"] = (old, 1.0)

    kohya = tmp_path / "kohya.safetensors"  # A1111 / kohya: flattened names and per-layer alpha tensors
    tensors = {}
    for k, v in state.items():
        module, _, part = k.rpartition(".lora_")
        flat = "lora_unet_" + module.replace(".", "_")
        tensors[f"{flat}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        tensors[f"{flat}.alpha"] = torch.tensor(float(config.lora_alpha))
    save_file(tensors, str(kohya))
    out["kohya"] = (kohya, scale)
    return out


def test_every_layout_loads_every_layer_with_diffusers_scale(tiny_model_dir, tiny_unet, write_expert, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    reference = write_expert("face", rank=4, alpha=2, seed=5)  # save_lora_weights + metadata
    n_layers = _lora_layer_count(reference)
    donor = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    state = make_peft_expert(donor, "x", rank=4, alpha=2, seed=5)
    layouts = _save_layouts(tmp_path, state, LoraConfig(r=4, lora_alpha=2, target_modules=["to_q"]))
    layouts["save_lora_weights"] = (reference, 0.5)
    module_names = [n for n, _ in tiny_unet.named_modules()]
    for layout, (path, scale) in layouts.items():
        expert = load_expert(path, "face", module_names=module_names)
        assert len(expert.layers) == n_layers == 48, layout
        assert {round(w.scale, 6) for w in expert.layers.values()} == {scale}, layout
        assert not expert.ignored, layout


def test_wrapped_layer_count_equals_lora_layers_in_file(tiny_unet, write_expert) -> None:
    face = write_expert("face", targets=["to_q", "to_v", "proj_out"])
    apply_mole(tiny_unet, {"face": face})
    n_file = _lora_layer_count(face)
    assert n_file > 0 and len(mole_layers(tiny_unet)) == n_file
    assert sum(layer.is_conv for layer in mole_layers(tiny_unet).values()) == 4  # the proj_out 1×1 convs


@pytest.mark.parametrize("layout", ["save_lora_weights", "kohya"])
def test_fixed_scale_experts_equal_diffusers_loading_the_same_file(tiny_model_dir, write_expert, tmp_path, layout):
    """gate=none at weight 1 must be exactly what diffusers' own load_lora_weights computes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    path = write_expert("face", rank=4, alpha=2, seed=7)
    if layout == "kohya":
        donor = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
        state = make_peft_expert(donor, "x", rank=4, alpha=2, seed=7)
        path = _save_layouts(tmp_path, state, LoraConfig(r=4, lora_alpha=2))["kohya"][0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="face")
    inputs = unet_inputs(pipe.unet)
    expected = _out(pipe.unet, inputs)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    apply_mole(unet, {"face": path}, gate="none")
    torch.testing.assert_close(_out(unet, inputs), expected, atol=1e-5, rtol=1e-4)


def test_gates_save_load_round_trip(tiny_model_dir, write_expert, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts, gate="both")
    _randomize_gates(unet)
    inputs = unet_inputs(unet)
    expected = _out(unet, inputs)
    path = save_gates(unet, tmp_path / "gates.safetensors")
    settings = json.loads(path.with_suffix(".json").read_text())
    assert settings["gate"] == "both" and settings["experts"] == ["face", "hand"]

    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    apply_mole_from_gates(fresh, {"hand": experts["hand"], "face": experts["face"]}, path)
    assert torch.equal(_out(fresh, inputs), expected)

    path.with_suffix(".json").unlink()  # the settings also live in the safetensors metadata
    again = apply_mole_from_gates(
        UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts, path
    )
    assert torch.equal(_out(again, inputs), expected)


def test_gates_refuse_a_different_mixture(tiny_model_dir, write_expert, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts, gate="local")
    path = save_gates(unet, tmp_path / "gates.safetensors")
    other = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts, gate="both")
    with pytest.raises(ValueError, match="gate='local'"):
        load_gates(other, path)
    with pytest.raises(ValueError, match="trained with experts"):
        apply_mole_from_gates(
            UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
            {"face": experts["face"]},
            path,
        )


def test_expert_that_does_not_fit_is_a_clear_error(tiny_unet, write_expert, tmp_path) -> None:
    face = write_expert("face")
    with safe_open(str(face), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad_shape = {k: (torch.zeros(v.shape[0], v.shape[1] + 1) if "to_k.lora_A" in k else v) for k, v in tensors.items()}
    save_file(bad_shape, str(tmp_path / "bad_shape.safetensors"))
    with pytest.raises(ExpertError, match="does not fit"):
        apply_mole(tiny_unet, {"face": tmp_path / "bad_shape.safetensors"})
    assert not mole_layers(tiny_unet)  # all or nothing
    assert all(p.requires_grad for p in tiny_unet.parameters())

    unknown = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in tensors.items()}
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ExpertError, match="does not have"):
        apply_mole(tiny_unet, {"face": tmp_path / "unknown.safetensors"})

    half = {k: v for k, v in tensors.items() if not k.endswith("attn1.to_q.lora_B.weight")}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ExpertError, match="has only"):
        load_expert(tmp_path / "half.safetensors", "face")

    with pytest.raises(ExpertError, match="not found"):
        load_expert(tmp_path / "missing.safetensors", "face")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExpertError, match="cannot read"):
        load_expert(tmp_path / "garbage.safetensors", "face")


def test_text_encoder_keys_are_reported_not_silently_dropped(write_expert, tmp_path, caplog) -> None:
    face = write_expert("face")
    with safe_open(str(face), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    expert = load_expert(tmp_path / "with_te.safetensors", "face")
    assert len(expert.ignored) == 1 and "text-encoder" in next(iter(expert.ignored.values()))
    assert "not used" in caplog.text


def test_target_modules_restrict_wrapping(tiny_unet, write_expert) -> None:
    apply_mole(tiny_unet, {"face": write_expert("face")}, target_modules=["to_q"])
    assert len(mole_layers(tiny_unet)) == 8 and all(n.endswith("to_q") for n in mole_layers(tiny_unet))
    remove_mole(tiny_unet)
    assert not mole_layers(tiny_unet)


def test_apply_twice_is_refused(tiny_unet, write_expert) -> None:
    apply_mole(tiny_unet, {"face": write_expert("face")})
    with pytest.raises(ValueError, match="already has MoLE layers"):
        apply_mole(tiny_unet, {"face": write_expert("face")})


def test_record_gates_traces_each_unet_call(tiny_unet, write_expert) -> None:
    apply_mole(tiny_unet, {"face": write_expert("face"), "hand": write_expert("hand", seed=2)})
    _randomize_gates(tiny_unet)
    inputs = unet_inputs(tiny_unet)
    with record_gates(tiny_unet) as trace:
        _out(tiny_unet, inputs)
        _out(tiny_unet, {**inputs, "sample": inputs["sample"] * 3})
    assert trace.experts == ["face", "hand"] and len(trace.local) == len(trace.global_) == 2
    assert all(0.0 < v < 1.0 for step in trace.local for v in step)
    assert trace.local[0] != trace.local[1]  # the gates depend on the input
    assert all(not m.record_gates and m.last_local is None for m in mole_layers(tiny_unet).values())
    assert math.isfinite(sum(trace.global_[0]))
