"""One MoLE layer, fused vs naive (separate expert modules, as the released code), against the bare base layer.

Two SD1.5 layer shapes, two experts, local + global gates, forward only; interleaved medians. The UNet-level
figures are in :mod:`bench.mole_cost`; this isolates the layer. Writes ``layer`` in latest.json.

    python -m bench.layer_fused_vs_naive [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from bench.common import interleaved, median_ms, overhead_ratio, update_results
from bench.peers import NaiveMoLELayer
from mole.layers import ExpertWeights, MoLELayer

# (name, batch, tokens, d_in, d_out, rank): an attention projection at 64² latents' first level, and the
# mid-block feed-forward input at 8² tokens.
SHAPES = [
    ("sd15-attn-4096tok-320d-r64", 2, 4096, 320, 320, 64),
    ("sd15-ff-64tok-1280d-r256", 2, 64, 1280, 10240, 256),
]


def measure(batch: int, tokens: int, d_in: int, d_out: int, rank: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    experts = [ExpertWeights(torch.randn(rank, d_in) * 0.02, torch.randn(d_out, rank) * 0.02, 0.5) for _ in range(2)]
    fused = MoLELayer(base, experts, ["face", "hand"], gate="both").requires_grad_(False)  # served: frozen gates
    naive = NaiveMoLELayer(fused, experts)
    x = torch.randn(batch, tokens, d_in)
    with torch.inference_mode():
        times = interleaved({"base": lambda: base(x), "fused": lambda: fused(x), "naive": lambda: naive(x)}, repeats)
    med = {k: median_ms(v) for k, v in times.items()}
    return {
        **{f"{k}_ms": v for k, v in med.items()},
        "fused_over_base": med["fused"] / med["base"],
        "naive_over_base": med["naive"] / med["base"],
        "speedup_vs_naive": overhead_ratio(med["naive"], med["base"], med["fused"]),
        "flop_ratio": 1 + 2 * rank * 2 * (d_in + d_out) / (2 * d_in * d_out),  # two experts, gates ignored
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "repeats": args.repeats, "shapes": {}}
    for name, *shape in SHAPES:
        report["shapes"][name] = measure(*shape, repeats=args.repeats)
    update_results("layer", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
