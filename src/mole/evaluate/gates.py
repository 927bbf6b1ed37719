"""Gate statistics over denoising steps (paper figure 7): what each expert is given, when, and where.

For groups of prompts (face close-ups, hand close-ups, both), the mean global gate of each expert at every
denoising step; and, for a few prompts, the local score maps of the 1×1 conv projections (which see the
image as an H×W grid) averaged over layers and steps. Numbers are saved with the plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mole.inject import mole_layers

logger = logging.getLogger(__name__)

#: Prompt groups of figure 7, used when no groups are given.
DEFAULT_GROUPS: dict[str, list[str]] = {
    "face": ["a close-up photo of the face of a smiling woman", "a close-up photo of the face of a man with a beard",
             "a close-up photo of the face of a child with short brown hair"],
    "hand": ["a close-up photo of a hand making a peace sign", "a close-up photo of a hand holding a red flower",
             "a close-up photo of a hand making a thumbs up"],
    "both": ["a woman waving her hand", "a man holding a cup next to his face", "a child pointing at the camera"],
}  # fmt: skip


@dataclass
class GateStats:
    """Per group: global gates ``[steps][experts]``; per prompt: local maps ``[experts][H][W]``."""

    experts: list[str]
    global_by_group: dict[str, list[list[float]]] = field(default_factory=dict)
    local_maps: dict[str, list[list[list[float]]]] = field(default_factory=dict)

    def mean_global(self, group: str) -> list[float]:
        """Each expert's global gate averaged over steps, for one group."""
        steps = torch.tensor(self.global_by_group[group])
        return steps.mean(0).tolist()

    def to_json(self) -> dict[str, Any]:
        return {
            "experts": self.experts,
            "global_by_group": self.global_by_group,
            "mean_global_by_group": {g: self.mean_global(g) for g in self.global_by_group},
            "local_maps": self.local_maps,
        }


class _Recorder:
    """Collects, per UNet call, the mean global gate per expert (conditional half of the CFG batch) and the
    running sum of conv-layer local maps resized to one grid."""

    def __init__(self, unet, map_size: int, cfg_batch: bool) -> None:
        self.layers = mole_layers(unet)
        if not self.layers:
            raise ValueError("the model has no MoLE layers: give experts and gates")
        self.unet, self.map_size, self.cfg_batch = unet, map_size, cfg_batch
        self.globals: list[list[float]] = []
        self.map_sum: torch.Tensor | None = None
        self.map_count = 0

    def _cond(self, t: torch.Tensor) -> torch.Tensor:
        return t[t.shape[0] // 2 :] if self.cfg_batch and t.shape[0] > 1 else t

    def hook(self, _module, _args, _output) -> None:
        glob = [self._cond(m.last_global).float().mean(0) for m in self.layers.values() if m.last_global is not None]
        if glob:
            self.globals.append(torch.stack(glob).mean(0).tolist())
        for m in self.layers.values():
            if m.is_conv and m.last_local is not None:
                local = self._cond(m.last_local).float().mean(0).permute(2, 0, 1)[None]  # [1, N, H, W]
                local = F.interpolate(local, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
                self.map_sum = local[0] if self.map_sum is None else self.map_sum + local[0]
                self.map_count += 1
            m.last_local = m.last_global = None

    def __enter__(self) -> _Recorder:
        for m in self.layers.values():
            m.record_gates = True
        self.handle = self.unet.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        for m in self.layers.values():
            m.record_gates = False
            m.last_local = m.last_global = None


def gate_statistics(
    pipe,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    map_prompts: Sequence[str] | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    map_size: int = 32,
) -> GateStats:
    """Generate every prompt of every group with gate recording on; average per group and step."""
    from mole.generate import generate

    groups = dict(groups or DEFAULT_GROUPS)
    experts = next(iter(mole_layers(pipe.unet).values())).expert_names
    stats = GateStats(experts=experts)
    for group, prompts in groups.items():
        per_prompt = []
        for k, prompt in enumerate(prompts):
            with _Recorder(pipe.unet, map_size, guidance > 1.0) as rec:
                generate(pipe, [prompt], seed=seed + k, steps=steps, guidance=guidance)
            per_prompt.append(rec.globals)
        if per_prompt and per_prompt[0]:
            stats.global_by_group[group] = torch.tensor(per_prompt).mean(0).tolist()  # [steps, experts]
    for k, prompt in enumerate(map_prompts or [p for ps in groups.values() for p in ps[:1]]):
        with _Recorder(pipe.unet, map_size, guidance > 1.0) as rec:
            generate(pipe, [prompt], seed=seed + k, steps=steps, guidance=guidance)
        if rec.map_sum is not None:
            stats.local_maps[prompt] = (rec.map_sum / rec.map_count).tolist()
    return stats


def plot_gate_statistics(stats: GateStats, output: str | os.PathLike[str]) -> list[Path]:
    """Write ``global_gates.png`` (one panel per group, a line per expert over the steps),
    ``local_maps.png`` (prompt × expert heat maps) and ``gate_stats.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    (out / "gate_stats.json").write_text(json.dumps(stats.to_json(), indent=1) + "\n", encoding="utf-8")
    written.append(out / "gate_stats.json")
    if stats.global_by_group:
        n = len(stats.global_by_group)
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), sharey=True, squeeze=False)
        for ax, (group, values) in zip(axes[0], stats.global_by_group.items(), strict=True):
            series = torch.tensor(values)  # [steps, experts]
            for e, name in enumerate(stats.experts):
                ax.plot(range(1, series.shape[0] + 1), series[:, e].numpy(), marker="o", ms=3, label=name)
            ax.set_title(f"{group} prompts")
            ax.set_xlabel("denoising step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("mean global gate g")
        axes[0][-1].legend()
        fig.tight_layout()
        fig.savefig(out / "global_gates.png", dpi=120)
        plt.close(fig)
        written.append(out / "global_gates.png")
    if stats.local_maps:
        rows = len(stats.local_maps)
        fig, axes = plt.subplots(rows, len(stats.experts), figsize=(2.6 * len(stats.experts), 2.4 * rows),
                                 squeeze=False)  # fmt: skip
        for r, (prompt, maps) in enumerate(stats.local_maps.items()):
            for e, name in enumerate(stats.experts):
                ax = axes[r][e]
                ax.imshow(maps[e], cmap="magma", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"local s ({name})", fontsize=9)
                if e == 0:
                    ax.set_ylabel(prompt[:28] + ("…" if len(prompt) > 28 else ""), fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "local_maps.png", dpi=120)
        plt.close(fig)
        written.append(out / "local_maps.png")
    return written
