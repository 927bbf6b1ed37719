"""The UNets and the peers MoLE is measured against, built on the same base weights and the same experts.

* ``base``: the UNet alone.
* ``mole``: :func:`mole.inject.apply_mole` with local + global gates (the paper's MoLE).
* ``mole_fixed``: the same layers with the gates off (``gate="none"``, fixed expert weights), the fair peer of
* ``peft``: peft with two LoRA adapters mixed by ``set_adapters`` at the same fixed weights;
* ``naive``: a MoLE layer written as the released code does it — separate expert modules, the local gate
  applied to the input of each expert, four matmuls per layer (:class:`NaiveMoLELayer`).

``mole`` and ``naive`` compute the same function with the same gate weights, and so do ``mole_fixed`` and
``peft``; :func:`build_variants` checks both pairs agree before anything is timed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mole.experts import Expert
from mole.inject import apply_mole, mole_layers
from mole.layers import ExpertWeights, MoLELayer

#: Expert targets of the tiny and mid-size benchmarks: attention, feed-forward and the 1×1 conv projections.
ATTN_FF_PROJ = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
#: Fixed weights of the two experts for the ungated peers (the paper's Fig. 1 scales are of this order).
FIXED_WEIGHTS = (0.7, 0.4)


@dataclass(frozen=True)
class UNetSize:
    """One benchmarked model size.

    Attributes:
        name: ``tiny``, ``mid`` or ``sd15``.
        unet: ``UNet2DConditionModel`` keyword arguments; None for the embedded default's (:mod:`mole.tiny`).
        latent: Latent side (pixels / 8).
        batch: UNet batch.
        text_len: Text tokens.
        rank: Rank of each of the two experts.
        targets: Expert layers: a list of module-name suffixes, or ``"all-linear"`` (every ``nn.Linear``).
    """

    name: str
    unet: Mapping[str, Any] | None
    latent: int
    batch: int
    text_len: int
    rank: int
    targets: Sequence[str] | str


_SD15_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

SIZES: dict[str, UNetSize] = {
    # The embedded default's UNet (mole.tiny's, whose config is used as is), as `mole generate` runs it: a
    # CFG pair of 8×8 latents, two rank-8 experts as configs/tiny.yaml trains them.
    "tiny": UNetSize("tiny", None, latent=8, batch=2, text_len=77, rank=8, targets=ATTN_FF_PROJ),
    # The issue's mid-size UNet: SD1.5's layout at (128, 256, 512) channels, one layer per block.
    "mid": UNetSize(
        "mid",
        {
            "sample_size": 32,
            "block_out_channels": (128, 256, 512),
            "layers_per_block": 1,
            **_SD15_BLOCKS,
            "cross_attention_dim": 256,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        latent=32,
        batch=1,
        text_len=77,
        rank=64,
        targets=ATTN_FF_PROJ,
    ),
    # SD1.5's UNet (diffusers' defaults are SD1.x's, with a 768-wide text encoder) at 512², a CFG pair,
    # two rank-256 experts on all 184 nn.Linear layers.
    "sd15": UNetSize(
        "sd15",
        {"sample_size": 64, "cross_attention_dim": 768},
        latent=64,
        batch=2,
        text_len=77,
        rank=256,
        targets="all-linear",
    ),
}


def build_unet(size: UNetSize, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The base UNet of a size with random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    if size.unet is None:
        from mole.tiny import build_tiny_pipeline

        unet = build_tiny_pipeline(seed=seed).unet
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**size.unet)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unet_inputs(size: UNetSize, unet, seed: int = 0, batch: int | None = None) -> dict[str, torch.Tensor]:
    """Noisy latents, timesteps and text states for one UNet call of this size (``batch`` overrides its batch)."""
    g = torch.Generator().manual_seed(seed)
    p = next(unet.parameters())
    cfg = unet.config
    batch = batch or size.batch
    latents = torch.randn(batch, cfg.in_channels, size.latent, size.latent, generator=g)
    states = torch.randn(batch, size.text_len, cfg.cross_attention_dim, generator=g)
    return {
        "sample": latents.to(p.device, p.dtype),
        "timestep": torch.tensor([500] * batch, device=p.device),
        "encoder_hidden_states": states.to(p.device, p.dtype),
    }


def target_layers(unet: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of the layers the experts touch: suffix matches (peft's rule) or every ``nn.Linear``."""
    names = []
    for name, module in unet.named_modules():
        if targets == "all-linear":
            hit = isinstance(module, nn.Linear)
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets) and isinstance(
                module, (nn.Linear, nn.Conv2d)
            )
        if hit:
            names.append(name)
    return names


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def random_experts(unet: nn.Module, layers: Sequence[str], rank: int, seed: int = 1) -> dict[str, Expert]:
    """Two experts (``face``, ``hand``) of rank ``rank`` on ``layers``, random A and B, on the UNet's device."""
    p = next(unet.parameters())
    g = torch.Generator().manual_seed(seed)
    experts = {}
    for k, name in enumerate(("face", "hand")):
        weights = {}
        for layer in layers:
            d_in, d_out = _features(unet.get_submodule(layer))
            down = torch.randn(rank, d_in, generator=g) / d_in**0.5
            up = torch.randn(d_out, rank, generator=g) * 0.02
            weights[layer] = ExpertWeights(down.to(p.device, p.dtype), up.to(p.device, p.dtype), 0.25 * (k + 1))
        experts[name] = Expert(name, weights, source=f"random rank-{rank}")
    return experts


def _randomize_gates(unet: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mole_layers(unet).values():
            for gate in (layer.mole_local, layer.mole_global):
                if gate is not None:
                    gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.02)
                    gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))


class NaiveMoLELayer(nn.Module):
    """Eq. 5–8 as written, the released code's way: per expert, scale X by its local score, run the expert's
    own A then B module, scale by its global score and LoRA scale, add. Four matmuls per layer for two
    experts (plus the two gate layers), a 1×1 conv expert as two 1×1 convs.
    """

    def __init__(self, fused: MoLELayer, experts: Sequence[ExpertWeights]) -> None:
        super().__init__()
        self.base = fused.base_layer
        self.is_conv = fused.is_conv
        d_in, d_out = fused.in_features, fused.out_features
        p = fused.expert_down

        def proj(a: int, b: int) -> nn.Module:
            layer = nn.Conv2d(a, b, 1, bias=False) if self.is_conv else nn.Linear(a, b, bias=False)
            return layer.to(p.device, p.dtype)

        self.downs = nn.ModuleList(proj(d_in, e.rank) for e in experts)
        self.ups = nn.ModuleList(proj(e.rank, d_out) for e in experts)
        with torch.no_grad():
            for a, b, e in zip(self.downs, self.ups, experts, strict=True):
                a.weight.copy_(e.down.reshape(a.weight.shape))
                b.weight.copy_(e.up.reshape(b.weight.shape))
        self.scales = [e.scale for e in experts]
        self.local, self.glob = copy.deepcopy(fused.mole_local), copy.deepcopy(fused.mole_global)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        feats = x.movedim(1, -1) if self.is_conv else x  # [B, *tokens, d]
        s = torch.sigmoid(self.local(feats))  # [B, *tokens, N]
        pooled = feats if feats.dim() <= 2 else feats.flatten(1, -2).mean(dim=1)  # Pool(X) of eq. 6: [B, d]
        g = torch.sigmoid(self.glob(pooled))  # [B, N]; a 2-D input (time embedding) is its own pool
        if self.is_conv:
            s = s.movedim(-1, 1)  # [B, N, H, W]
        for i, (a, b) in enumerate(zip(self.downs, self.ups, strict=True)):
            s_i = s[:, i : i + 1] if self.is_conv else s[..., i : i + 1]
            g_i = g[:, i].reshape(-1, *([1] * (x.dim() - 1)))
            out = out + g_i * b(a(x * s_i)) * self.scales[i]
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def naive_from_mole(mole_unet: nn.Module, experts: Mapping[str, Expert]) -> nn.Module:
    """A copy of a MoLE UNet whose MoLE layers are replaced by :class:`NaiveMoLELayer` with the same gates."""
    naive = copy.deepcopy(mole_unet)
    for name, layer in mole_layers(naive).items():
        _set_submodule(naive, name, NaiveMoLELayer(layer, [e.layers[name] for e in experts.values()]))
    return naive


def peft_unet(base: nn.Module, experts: Mapping[str, Expert], weights: Sequence[float] = FIXED_WEIGHTS):
    """A copy of ``base`` with each expert as a peft LoRA adapter, mixed by ``set_adapters`` at ``weights``."""
    from peft import LoraConfig

    unet = copy.deepcopy(base)
    for expert in experts.values():
        layers = sorted(expert.layers)
        rank = next(iter(expert.layers.values())).rank
        scale = next(iter(expert.layers.values())).scale
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=layers, init_lora_weights=True),
            adapter_name=expert.name,
        )
        with torch.no_grad():
            for layer, w in expert.layers.items():
                module = unet.get_submodule(layer)
                a, b = module.lora_A[expert.name].weight, module.lora_B[expert.name].weight
                a.copy_(w.down.reshape(a.shape))
                b.copy_(w.up.reshape(b.shape))
    unet.set_adapters(list(experts), list(weights))
    return unet.eval().requires_grad_(False)


def build_variants(size: UNetSize, base: nn.Module, check: bool = True) -> tuple[dict[str, nn.Module], dict]:
    """The five models of :mod:`bench.peers` on ``base``'s device and dtype, and facts about them.

    With ``check``, runs each pair that computes the same function once and records the largest difference
    relative to the output's scale (it must be at rounding level, or the timings compare different work).
    """
    layers = target_layers(base, size.targets)
    experts = random_experts(base, layers, size.rank)
    mole = apply_mole(copy.deepcopy(base), experts, gate="both")
    _randomize_gates(mole)
    mole.requires_grad_(False)  # as `mole generate` loads it: frozen gates keep their stacked weights cached
    mole_fixed = apply_mole(
        copy.deepcopy(base), experts, gate="none", expert_weights=dict(zip(experts, FIXED_WEIGHTS, strict=True))
    )
    models = {
        "base": base,
        "mole": mole,
        "mole_fixed": mole_fixed,
        "naive": naive_from_mole(mole, experts),
        "peft": peft_unet(base, experts),
    }
    facts: dict[str, Any] = {"expert_layers": len(layers), "experts": 2, "rank": size.rank}
    if check:
        inputs = unet_inputs(size, base)
        with torch.inference_mode():
            out = {k: m(**inputs).sample.float() for k, m in models.items()}
        scale = out["base"].abs().max().item()
        facts["max_rel_diff"] = {
            "mole_vs_naive": (out["mole"] - out["naive"]).abs().max().item() / scale,
            "mole_fixed_vs_peft": (out["mole_fixed"] - out["peft"]).abs().max().item() / scale,
        }
        facts["expert_contribution_rel"] = (out["mole"] - out["base"]).abs().max().item() / scale
    return models, facts
