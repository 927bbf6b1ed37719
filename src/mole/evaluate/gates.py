"""Gate statistics over denoising steps (paper figure 7): what each expert is given, when, and where.

For groups of prompts (face close-ups, hand close-ups, feet close-ups for a third expert, both), the mean
global gate of each expert at every denoising step; and, for a few prompts, the local score maps of the 1×1
conv projections (which see the image as an H×W grid) averaged over layers and steps. Numbers are saved with
the plots. :func:`specialisation` reduces them to one number per expert: its mean global gate on the prompts
of its own group against the other groups' (an expert whose group shares its name).
"""

from __future__ import annotations

import json
import logging
import os
import re
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
#: Prompt groups for experts beyond the paper's two, used when an expert of that name is in the mixture.
EXTRA_GROUPS: dict[str, list[str]] = {
    "feet": ["a close-up photo of bare feet on a wooden floor", "a close-up photo of feet in red shoes on green grass",
             "a close-up photo of feet in blue socks on a white floor"],
}  # fmt: skip
EXTRA_GROUPS["foot"] = EXTRA_GROUPS["feet"]


def default_groups(experts: Sequence[str]) -> dict[str, list[str]]:
    """Figure 7's groups, plus a group for every further expert with known prompts (``feet``), before ``both``."""
    groups = {k: v for k, v in DEFAULT_GROUPS.items() if k != "both"}
    groups.update({e: EXTRA_GROUPS[e] for e in experts if e in EXTRA_GROUPS})
    return {**groups, "both": DEFAULT_GROUPS["both"]}


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
            "specialisation": specialisation(self),
            "local_maps": self.local_maps,
        }


def specialisation(stats: GateStats) -> dict[str, dict[str, float]]:
    """Per expert with a prompt group of its own name: its mean global gate on that group (``own``), on the
    other experts' groups (``others``, the mean over those groups; the mixed ``both`` group is left out) and
    ``own - others``. A specialised gate opens its expert on its own prompts more than on the others'."""
    own_groups = [e for e in stats.experts if e in stats.global_by_group]
    out: dict[str, dict[str, float]] = {}
    for e, expert in enumerate(stats.experts):
        if expert not in stats.global_by_group:
            continue
        own = stats.mean_global(expert)[e]
        others = [stats.mean_global(g)[e] for g in own_groups if g != expert]
        rest = sum(others) / len(others) if others else float("nan")
        out[expert] = {"own": own, "others": rest, "delta": own - rest}
    return out


def specialisation_table(rows: Mapping[str, GateStats]) -> str:
    """A Markdown table: one row per model, per expert ``own / others (Δ)`` of :func:`specialisation`."""
    experts: list[str] = []
    for stats in rows.values():
        experts += [e for e in specialisation(stats) if e not in experts]
    lines = ["| model | " + " | ".join(f"{e}: own / others (Δ)" for e in experts) + " |",
             "|---|" + "---|" * len(experts)]  # fmt: skip
    for label, stats in rows.items():
        spec = specialisation(stats)
        cells = [f"{spec[e]['own']:.3f} / {spec[e]['others']:.3f} ({spec[e]['delta']:+.3f})" if e in spec else "–"
                 for e in experts]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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

    experts = next(iter(mole_layers(pipe.unet).values())).expert_names
    groups = dict(groups or default_groups(experts))
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


def plot_gate_comparison(rows: Mapping[str, GateStats], output: str | os.PathLike[str]) -> list[Path]:
    """Several models' gates side by side (plain vs timestep gates): ``global_gates_compare.png`` (a panel per
    prompt group, a colour per expert, a line style per model), ``gate_specialisation.md`` and one folder of
    :func:`plot_gate_statistics` plots per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k, (label, stats) in enumerate(rows.items()):
        written += plot_gate_statistics(stats, out / f"{k}-{_slug(label)}")
    (out / "gate_specialisation.md").write_text(specialisation_table(rows) + "\n", encoding="utf-8")
    written.append(out / "gate_specialisation.md")
    groups = list(dict.fromkeys(g for stats in rows.values() for g in stats.global_by_group))
    if not groups:
        return written
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for m, (label, stats) in enumerate(rows.items()):
            if group not in stats.global_by_group:
                continue
            series = torch.tensor(stats.global_by_group[group])  # [steps, experts]
            for e, name in enumerate(stats.experts):
                ax.plot(range(1, series.shape[0] + 1), series[:, e].numpy(), linestyle=styles[m % len(styles)],
                        color=f"C{e}", marker="o", ms=2, label=f"{name} ({label})")  # fmt: skip
        ax.set_title(f"{group} prompts")
        ax.set_xlabel("denoising step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean global gate g")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "global_gates_compare.png", dpi=120)
    plt.close(fig)
    written.append(out / "global_gates_compare.png")
    return written


def _slug(label: str) -> str:
    """A folder name for a row label: ``MoLE + timestep gates`` -> ``MoLE-timestep-gates``."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", label).strip("-") or "model"
