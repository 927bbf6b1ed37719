"""The MoLE layer before and after issue 16 on one UNet, interleaved in one process: is the CPU path as fast?

The layer it replaced is kept as the tests' reference (``tests/reference_layer.py``); here a copy of the MoLE UNet
has every layer swapped for it, with the same experts and gates, and base, before and after are timed in turn
(A B C A B C ...), so that the machine's load, which on a shared 2-core machine swings between runs, falls on all
three alike. Writes ``layer_before_after`` in the results file: medians, per-round (paired) ratios, load average.

    python -m bench.layer_before_after [--size mid] [--repeats 20] [--threads 2] [--results PATH]
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch

from bench.common import LATEST_JSON, interleaved, load_average_1m, median_ms, paired_ratio, update_results
from bench.peers import SIZES, _randomize_gates, _set_submodule, build_unet, random_experts, target_layers, unet_inputs

logger = logging.getLogger("bench.layer_before_after")


def measure(size_name: str, repeats: int) -> dict[str, Any]:
    from tests.reference_layer import MoLELayer as Before

    from mole.inject import apply_mole, mole_layers

    size = SIZES[size_name]
    base = build_unet(size)
    experts = random_experts(base, target_layers(base, size.targets), size.rank)
    after = apply_mole(copy.deepcopy(base), experts, gate="both")
    _randomize_gates(after)
    after.requires_grad_(False)
    before = copy.deepcopy(after)
    for name, layer in mole_layers(before).items():
        old = Before(layer.base_layer, [e.layers[name] for e in experts.values()], list(experts), gate="both")
        old.load_state_dict(layer.state_dict())
        _set_submodule(before, name, old.requires_grad_(False))
    inputs = unet_inputs(size, base)
    load_before = load_average_1m()
    with torch.inference_mode():
        outs = {k: m(**inputs).sample for k, m in (("base", base), ("before", before), ("after", after))}
        fns = {k: (lambda m=m: m(**inputs)) for k, m in (("base", base), ("before", before), ("after", after))}
        times = interleaved(fns, repeats)
    med = {k: median_ms(v) for k, v in times.items()}
    diff = ((outs["after"] - outs["before"]).abs().max() / outs["base"].abs().max()).item()
    return {
        "size": size_name, "threads": torch.get_num_threads(), "repeats": repeats, "time_ms": med,
        "max_rel_diff_after_vs_before": diff,
        "before_over_base": med["before"] / med["base"], "after_over_base": med["after"] / med["base"],
        "after_over_before": med["after"] / med["before"],
        "paired": {"before_over_base": paired_ratio(times["before"], times["base"]),
                   "after_over_base": paired_ratio(times["after"], times["base"]),
                   "after_over_before": paired_ratio(times["after"], times["before"])},
        "load_average_1m_before": load_before, "load_average_1m_after": load_average_1m(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "mid"], default="mid")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=LATEST_JSON)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    result = measure(args.size, args.repeats)
    update_results("layer_before_after", result, args.results)
    logger.info("%s: before/base %.3f, after/base %.3f, after/before %.3f (paired %.3f), load %s -> %s",
                args.size, result["before_over_base"], result["after_over_base"], result["after_over_before"],
                result["paired"]["after_over_before"], result["load_average_1m_before"],
                result["load_average_1m_after"])  # fmt: skip


if __name__ == "__main__":
    main()
