"""MoLE's inference cost: UNet forward time with two experts over the base UNet's, against the FLOP bound and
against two peers (a naive MoLE and peft mixing two LoRA adapters), on the same inputs.

Sizes (:data:`bench.peers.SIZES`): ``tiny`` (the embedded default) and ``mid`` on CPU; ``sd15`` (SD1.5's UNet
with random weights at 512², fp16) on a GPU when there is one. Without a GPU the SD1.5 FLOP bound is still
counted, on CPU, and its timings are recorded as skipped.

Per size, in ``mole_cost.<size>`` of ``bench/results/latest.json``:

* ``time_ratio``: MoLE time / base time (medians over interleaved repeats);
* ``flop_ratio``: MoLE FLOPs / base FLOPs (torch's FlopCounterMode, attention included) — the bound the time
  ratio is held to; ``flop_ratio_no_attention`` leaves the attention kernels out, as FlopCounterMode does by
  itself on CPU, where it has no formula for the CPU SDPA kernel;
* ``speedup_vs_naive``: (naive − base) / (MoLE − base), how much less the fused layers add than naive ones;
  ``speedup_vs_naive_paired`` takes the same ratio from per-round differences (robust to drifting load);
* ``peers``: time ratios of ``naive``, ``peft`` and ``mole_fixed`` (MoLE with fixed weights, peft's peer);
* ``load_average_1m_before`` / ``_after``: how busy the (shared) machine was around the timing.

Idle OpenMP threads wait passively (see :mod:`bench`): with spin-waiting, a loaded 2-core machine turns every
parallel region into a scheduling stall and the ratios measure op counts instead of work.

    python -m bench.mole_cost [--sizes tiny mid sd15] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bench.common import (
    interleaved,
    load_average_1m,
    median_ms,
    overhead_ratio,
    paired_overhead_ratio,
    paired_ratio,
    update_results,
)
from bench.peers import SIZES, UNetSize, build_unet, build_variants, target_layers, unet_inputs

logger = logging.getLogger("bench.mole_cost")

REPEATS = {"tiny": 60, "mid": 30, "sd15": 30}
QUICK_REPEATS = {"tiny": 15, "mid": 8, "sd15": 8}
VARIANTS = ("base", "mole", "mole_fixed", "naive", "peft")


def _attention_ops() -> dict:
    """FlopCounterMode formulas for SDPA kernels it has none for (the CPU flash kernel)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    ops = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        ops[cpu_flash] = sdpa
    return ops


def count_flops(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one forward: ``total`` (matmuls, convs and attention) and its ``attention`` part.

    Two gaps of FlopCounterMode are closed: the CPU SDPA kernel gets SDPA's formula, and the forward runs in
    grad mode with nothing requiring grad, because a MoLE layer accumulates its experts with in-place
    ``addmm_``/``baddbmm_`` when no gradient is recorded and FlopCounterMode has no formula for in-place ops
    (in grad mode it takes the out-of-place path: the same FLOPs, now counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False, custom_mapping=_attention_ops())
    try:
        with torch.enable_grad(), counter:
            model(**inputs)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in per_op.items() if "attention" in str(op))
    return {"total": int(counter.get_total_flops()), "attention": int(attention)}


def _flop_fields(flops: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    base, mole = flops["base"], flops["mole"]
    return {
        "flop_ratio": mole["total"] / base["total"],
        "flop_ratio_no_attention": (mole["total"] - mole["attention"]) / (base["total"] - base["attention"]),
        "gflops": {k: v["total"] / 1e9 for k, v in flops.items()},
        "attention_gflops": base["attention"] / 1e9,
    }


def measure(size: UNetSize, device: str, dtype: torch.dtype, repeats: int, warmup: int = 2) -> dict[str, Any]:
    """Time the five variants of one size, interleaved (after ``warmup`` untimed rounds), and count their FLOPs."""
    load_before = load_average_1m()
    base = build_unet(size, device, dtype)
    models, facts = build_variants(size, base)
    inputs = unet_inputs(size, base)
    flops = {k: count_flops(m, inputs) for k, m in models.items()}
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.inference_mode():
        fns = {k: (lambda m=m: m(**inputs)) for k, m in models.items()}
        times = interleaved(fns, repeats, warmup=warmup, sync=sync)
    med = {k: median_ms(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "unet": dict(size.unet) if size.unet is not None else "mole.tiny (embedded default)",
        "latent": size.latent,
        "batch": size.batch,
        "text_tokens": size.text_len,
        **facts,
        "repeats": repeats,
        "time_ms": med,
        "time_ratio": med["mole"] / med["base"],
        "time_ratio_paired": paired_ratio(times["mole"], times["base"]),
        **_flop_fields(flops),
        "speedup_vs_naive": overhead_ratio(med["naive"], med["base"], med["mole"]),
        "speedup_vs_naive_paired": paired_overhead_ratio(times["naive"], times["base"], times["mole"]),
        "peers": {
            k: {"time_ratio": med[k] / med["base"], "flop_ratio": flops[k]["total"] / flops["base"]["total"]}
            for k in ("naive", "peft", "mole_fixed")
        },
    }
    result["time_over_flop_bound"] = result["time_ratio"] / result["flop_ratio"]
    result["load_average_1m_before"], result["load_average_1m_after"] = load_before, load_average_1m()
    del models, base
    gc.collect()
    return result


def sd15_flops_only(reason: str) -> dict[str, Any]:
    """The SD1.5 FLOP bound without timing: one base and one MoLE forward on CPU at batch 1 (the ratio does not
    depend on the batch)."""
    import copy

    from bench.peers import random_experts
    from mole.inject import apply_mole

    size = SIZES["sd15"]
    base = build_unet(size)
    inputs = unet_inputs(size, base, batch=1)
    layers = target_layers(base, size.targets)
    mole = apply_mole(copy.deepcopy(base), random_experts(base, layers, size.rank), gate="both")
    flops = {"base": count_flops(base, inputs), "mole": count_flops(mole, inputs)}
    del mole, base
    gc.collect()
    return {
        "skipped": reason,
        "unet": dict(size.unet),
        "latent": size.latent,
        "flop_batch": 1,
        "expert_layers": len(layers),
        "experts": 2,
        "rank": size.rank,
        **_flop_fields(flops),
    }


def run(sizes: list[str], quick: bool, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    repeats = QUICK_REPEATS if quick else REPEATS
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {}
    for name in sizes:
        logger.info("mole_cost: %s", name)
        if name == "sd15":
            if cuda:
                out[name] = measure(SIZES[name], "cuda", torch.float16, repeats[name])
            else:
                out[name] = sd15_flops_only("no CUDA device")
        else:
            out[name] = measure(SIZES[name], "cpu", torch.float32, repeats[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid", "sd15"], choices=sorted(SIZES))
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's setting: 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(args.sizes, args.quick, args.threads)
    update_results("mole_cost", results)
    for name, r in results.items():
        if "time_ratio" in r:
            logger.info(
                "%s: time %.3f, FLOP bound %.3f, vs naive %.2f, peft %.3f, naive %.3f",
                name, r["time_ratio"], r["flop_ratio"], r["speedup_vs_naive"] or float("nan"),
                r["peers"]["peft"]["time_ratio"], r["peers"]["naive"]["time_ratio"],
            )  # fmt: skip
        else:
            logger.info("%s: FLOP bound %.3f (%s)", name, r["flop_ratio"], r.get("skipped"))


if __name__ == "__main__":
    main()
