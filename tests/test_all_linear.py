"""Experts on every linear layer of the UNet (the paper's "any linear layers"): LoRA and MoLE land on all of
them, and gates training and generation still work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from torch import nn

from mole.train import ConfigError, load_config, train_stage
from mole.train.config import parse_overrides
from mole.train.stages import linear_targets

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _expected(unet: nn.Module) -> set[str]:
    linear = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    conv1 = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    return linear | conv1


def test_linear_targets_names_every_linear_and_1x1_conv(tiny_unet) -> None:
    targets = linear_targets(tiny_unet)
    assert set(targets) == _expected(tiny_unet)
    kinds = {t.split(".")[-1] for t in targets}
    # Beyond the attention/feed-forward/proj default: the time embedding, ResNet time projections, 1×1 shortcuts.
    assert {"linear_1", "linear_2", "time_emb_proj", "conv_shortcut"} <= kinds
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for n, m in tiny_unet.named_modules()
                   if n in targets)  # fmt: skip


def test_target_modules_accepts_only_a_list_or_all_linear() -> None:
    cfg = load_config(TINY, parse_overrides(["experts.face.target_modules=all-linear"]))
    assert cfg.experts["face"].target_modules == "all-linear"
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(TINY, parse_overrides(["experts.face.target_modules=everything"]))


@pytest.mark.slow
def test_all_linear_experts_then_gates_then_generation(tiny_model_dir, tiny_unet, tmp_path) -> None:
    from mole.data.synthetic import write_dataset
    from mole.generate import generate, load_pipeline
    from mole.inject import mole_layers

    for kind in ("faces", "hands", "scenes"):
        write_dataset(tmp_path / kind, kind, 4, seed=0, size=64)
    overrides = ["experts.face.target_modules=all-linear", "experts.hand.target_modules=all-linear",
                 "stage1.validation_prompts=[]"]  # fmt: skip
    cfg = load_config(TINY, parse_overrides(overrides))
    experts = {}
    for name, kind in (("face", "faces"), ("hand", "hands")):
        result = train_stage("expert", cfg, output=tmp_path / name, data=str(tmp_path / kind),
                             base=str(tiny_model_dir), max_steps=1, expert_name=name)  # fmt: skip
        experts[name] = result.result
        with safe_open(str(result.result), "pt") as f:
            layers = {k.split(".lora_A")[0].removeprefix("unet.").removeprefix("base_model.model.")
                      for k in f.keys() if ".lora_A" in k}  # noqa: SIM118  # fmt: skip
        assert layers == _expected(tiny_unet), sorted(layers ^ _expected(tiny_unet))[:5]
    gates = train_stage("gates", cfg, output=tmp_path / "gates", data={"scenes": str(tmp_path / "scenes"),
                        "faces": str(tmp_path / "faces")}, base=str(tiny_model_dir), max_steps=2,
                        experts={k: str(v) for k, v in experts.items()})  # fmt: skip
    assert gates.steps == 2 and np.isfinite(gates.final_loss)
    pipe = load_pipeline(tiny_model_dir, experts=experts, gates=gates.result, device="cpu")
    assert set(mole_layers(pipe.unet)) == _expected(tiny_unet)
    out = generate(pipe, ["a man waving"], steps=2, width=64, height=64)
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
