"""The training speed switches take effect and leave the math alone (their speed is measured by
``make gpu-check``, never here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.train_helpers import fixed_batch_loss

from mole.train.config import ModelConfig, OptimizerConfig, Stage1Config
from mole.train.loop import apply_speed_settings, build_optimizer
from mole.train.stages import build_stage1


def _steps(name: str, foreach: bool, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = build_optimizer(params, OptimizerConfig(name=name, lr=1e-2, foreach=foreach))
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + k + i)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_multi_tensor_optimizers_make_the_same_update(name: str) -> None:
    fast = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(name=name, foreach=True))
    # The switch takes effect: lion-pytorch's foreach class, torch's fused AdamW.
    assert type(fast).__module__ == "lion_pytorch.foreach" if name == "lion" else fast.defaults["fused"]
    for a, b in zip(_steps(name, True), _steps(name, False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
            "input_ids": torch.randint(0, 100, (2, 77), generator=g)}  # fmt: skip


def test_channels_last_changes_the_layout_not_the_loss(tiny_model_dir: Path) -> None:
    cfg = Stage1Config(min_snr_gamma=5.0)
    plain = build_stage1(cfg, ModelConfig(), tiny_model_dir)
    fast_cfg = Stage1Config(min_snr_gamma=5.0, channels_last=True)
    fast = build_stage1(fast_cfg, ModelConfig(), tiny_model_dir)
    apply_speed_settings(fast, fast_cfg)
    conv = fast.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = _batch()
    assert fixed_batch_loss(fast, batch, fast_cfg) == pytest.approx(fixed_batch_loss(plain, batch, cfg), rel=1e-5)


def test_compile_is_in_place_and_keeps_the_state_dict_keys(tiny_model_dir: Path) -> None:
    cfg = Stage1Config(compile=True)
    stage = build_stage1(cfg, ModelConfig(), tiny_model_dir)
    keys = list(stage.model.state_dict())
    apply_speed_settings(stage, cfg)
    assert stage.model.unet._compiled_call_impl is not None  # nn.Module.compile: what the next call runs
    assert list(stage.model.state_dict()) == keys  # checkpoints and saving are unchanged (no _orig_mod.)
