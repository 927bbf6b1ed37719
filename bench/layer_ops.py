"""The compute ops one MoLE layer's forward runs beyond its base layer, counted with torch.profiler on CPU.

Issue 16's CPU proof that the gates cost next to nothing: on a GPU every op is at least one kernel launch, and at
small batches the UNet is launch-bound, so the op count of a layer is what the GPU pays for it there. Counted on a
``to_q`` layer of the embedded default's UNet (two rank-8 experts, local + global gates, the layer's real input
``[2, 64, 32]``), in inference mode, as the multiset difference between the ops of the MoLE layer and those of its
base layer alone, leaving out what launches no kernel (views, ``linear``/``matmul`` wrappers that call ``mm``/``bmm``,
no-op ``to``, allocations). Nested ops count, as the issue counted them (a CPU ``mean`` is ``mean`` + ``sum`` +
``fill_`` + ``div_`` + ``copy_``). Before issue 16 the count was 16.

The gates are counted frozen (``requires_grad=False``, as ``mole generate``/``evaluate``/``serve`` load them) and
trainable (gates training's validation: the gate rows of the stacked weight are then copied anew in every call).
Other gate modes and a 1×1 conv ``proj_in`` are recorded for reference. Writes ``layer_ops`` in the results file.

    python -m bench.layer_ops [--results PATH]
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import LATEST_JSON, update_results

logger = logging.getLogger("bench.layer_ops")

#: The issue's target: at most this many compute ops beyond the base layer (local + global gates, frozen).
MAX_OPS = 8
#: Ops that launch no kernel of their own: views, wrappers of the GEMM they call, no-op casts, allocations.
NON_COMPUTE = frozenset(
    f"aten::{name}"
    for name in (
        "view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose", "as_strided", "narrow", "slice",
        "select", "unsqueeze", "squeeze", "expand", "permute", "movedim", "unflatten", "flatten", "detach", "alias",
        "linear", "matmul", "mT", "resolve_conj", "resolve_neg", "to", "_to_copy", "empty", "empty_strided",
        "empty_like", "contiguous", "lift_fresh", "split", "chunk", "unbind", "expand_as", "view_as",
    )
)  # fmt: skip


def compute_ops(fn, *args) -> Counter:
    """The compute ops of one call of ``fn(*args)`` (after one untimed call), by name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*args)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in NON_COMPUTE)


def ops_beyond_base(layer: nn.Module, x: torch.Tensor) -> Counter:
    """Compute ops of ``layer(x)`` that its ``base_layer(x)`` does not run."""
    return compute_ops(layer, x) - compute_ops(layer.base_layer, x)


def tiny_mole_unet(gate: str = "both", condition: str = "none") -> nn.Module:
    """The embedded default's UNet with two random rank-8 experts on its attention, feed-forward and 1×1 convs."""
    from bench.peers import SIZES, build_unet, random_experts, target_layers
    from mole.inject import apply_mole

    size = SIZES["tiny"]
    base = build_unet(size)
    experts = random_experts(base, target_layers(base, size.targets), size.rank)
    return apply_mole(copy.deepcopy(base), experts, gate=gate, condition=condition)


def layer_input(layer: nn.Module, batch: int = 2, latent: int = 8, seed: int = 0) -> torch.Tensor:
    """The input the layer gets in the tiny UNet's first block: ``[B, 64 tokens, d]`` or ``[B, d, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    if layer.is_conv:
        return torch.randn(batch, layer.in_features, latent, latent, generator=g)
    return torch.randn(batch, latent * latent, layer.in_features, generator=g)


def count(gate: str = "both", suffix: str = "to_q", frozen: bool = True, condition: str = "none") -> dict[str, Any]:
    """The op count of the first ``suffix`` layer of a tiny MoLE UNet."""
    from mole.inject import mole_layers
    from mole.timestep import timestep_embedding

    unet = tiny_mole_unet(gate, condition)
    name, layer = next((n, m) for n, m in mole_layers(unet).items() if n.endswith(suffix))
    layer.requires_grad_(not frozen and gate != "none")
    if not frozen:  # trainable gates, as apply_mole leaves them
        for p in layer.base_layer.parameters():
            p.requires_grad_(False)
    x = layer_input(layer)
    if condition == "timestep":
        emb = torch.randn(x.shape[0], layer.mole_time.in_features)
        with timestep_embedding([layer], emb):
            ops = ops_beyond_base(layer, x)
    else:
        ops = ops_beyond_base(layer, x)
    return {"layer": name, "input": list(x.shape), "gate": gate, "condition": condition, "frozen": frozen,
            "ops": sum(ops.values()), "by_name": dict(sorted(ops.items()))}  # fmt: skip


def run() -> dict[str, Any]:
    torch.set_num_threads(1)
    cases = {
        "to_q_both_frozen": count("both"),
        "to_q_both_trainable": count("both", frozen=False),
        "to_q_local_frozen": count("local"),
        "to_q_global_frozen": count("global"),
        "to_q_none_fixed_weights": count("none"),
        "to_q_both_timestep_frozen": count("both", condition="timestep"),
        "proj_in_conv_both_frozen": count("both", suffix="proj_in"),
    }
    headline = cases["to_q_both_frozen"]["ops"]
    return {
        "method": "torch.profiler CPU events of one inference-mode forward, minus the base layer's, views excluded",
        "before_issue_16": 16,
        "max_ops": MAX_OPS,
        "ops": headline,
        "met": headline <= MAX_OPS,
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=LATEST_JSON, help="results file (a section is replaced)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run()
    update_results("layer_ops", result, args.results)
    for name, case in result["cases"].items():
        logger.info("%s: %d ops %s", name, case["ops"], case["by_name"])


if __name__ == "__main__":
    main()
