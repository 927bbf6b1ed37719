"""Gate statistics over denoising steps and their plots (paper figure 7) on the tiny model."""

from __future__ import annotations

import json

import torch

from mole.evaluate.gates import gate_statistics, plot_gate_statistics
from mole.gates_io import save_gates
from mole.generate import load_pipeline


def test_gate_statistics_and_plots(tiny_model_dir, write_expert, tmp_path) -> None:
    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    # Gates with a known preference: the face expert's global gate open (bias +3), the hand expert's
    # closed (bias -3), whatever the input; the statistics must recover exactly that.
    from diffusers import UNet2DConditionModel

    from mole.inject import apply_mole

    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("mole_global.bias"):
                p.copy_(torch.tensor([3.0, -3.0]))
    gates = save_gates(unet, tmp_path / "gates.safetensors")
    pipe = load_pipeline(tiny_model_dir, experts, gates)
    groups = {"face": ["a close-up photo of a face"], "hand": ["a hand making a fist", "a hand waving"]}
    stats = gate_statistics(pipe, groups, steps=3, map_size=8)
    assert stats.experts == ["face", "hand"]
    assert len(stats.global_by_group["hand"]) == 3  # one entry per denoising step
    face, hand = stats.mean_global("face")
    assert abs(face - torch.sigmoid(torch.tensor(3.0)).item()) < 1e-4 and hand < 0.1
    maps = stats.local_maps["a close-up photo of a face"]
    assert len(maps) == 2 and len(maps[0]) == 8 and all(0.0 < v < 1.0 for row in maps[0] for v in row)
    written = plot_gate_statistics(stats, tmp_path / "plots")
    assert {p.name for p in written} == {"gate_stats.json", "global_gates.png", "local_maps.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    saved = json.loads((tmp_path / "plots" / "gate_stats.json").read_text())
    assert saved["mean_global_by_group"]["face"][0] > saved["mean_global_by_group"]["face"][1]
