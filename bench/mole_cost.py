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

``--batches 2 8 16`` times each size at several UNet batches (one set of models, built once): the size's section
then holds the first batch's figures as above and ``by_batch`` (``{"2": {...}, "8": {...}}``) with every batch's.
``--dtype`` sets the GPU dtype (default fp16; the CPU sizes always run fp32); ``--results PATH`` writes the
``mole_cost`` section into another results file (default ``bench/results/latest.json``).

Idle OpenMP threads wait passively (see :mod:`bench`): with spin-waiting, a loaded 2-core machine turns every
parallel region into a scheduling stall and the ratios measure op counts instead of work.

    python -m bench.mole_cost [--sizes tiny mid sd15] [--batches 2 8 16] [--dtype bf16|fp16] [--quick]
                              [--threads 2] [--results PATH]
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import (
    LATEST_JSON,
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def measure(
    size: UNetSize,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    warmup: int = 2,
    batches: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Time the five variants of one size, interleaved (after ``warmup`` untimed rounds), and count their FLOPs.

    With ``batches``, the models are built once and timed at each UNet batch: the result is the first batch's,
    with every batch's under ``by_batch``.
    """
    base = build_unet(size, device, dtype)
    models, facts = build_variants(size, base)
    by_batch = {}
    for batch in batches or [size.batch]:
        logger.info("mole_cost: %s at batch %d", size.name, batch)
        by_batch[str(batch)] = _measure_batch(size, models, facts, device, dtype, repeats, warmup, batch)
    del models, base
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    first = next(iter(by_batch.values()))
    return {**first, "by_batch": by_batch} if batches else first


def _measure_batch(
    size: UNetSize,
    models: Mapping[str, nn.Module],
    facts: Mapping[str, Any],
    device: str,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    batch: int,
) -> dict[str, Any]:
    load_before = load_average_1m()
    inputs = unet_inputs(size, models["base"], batch=batch)
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
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "unet": dict(size.unet) if size.unet is not None else "mole.tiny (embedded default)",
        "latent": size.latent,
        "batch": batch,
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
        "mole_over_peft": med["mole"] / med["peft"],
    }
    result["time_over_flop_bound"] = result["time_ratio"] / result["flop_ratio"]
    result["load_average_1m_before"], result["load_average_1m_after"] = load_before, load_average_1m()
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


def run(
    sizes: list[str],
    quick: bool,
    threads: int,
    batches: Sequence[int] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Every size in ``sizes``: CPU sizes in fp32, ``sd15`` on CUDA in ``dtype`` (default fp16) or FLOPs only."""
    torch.set_num_threads(threads)
    repeats = QUICK_REPEATS if quick else REPEATS
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {}
    for name in sizes:
        logger.info("mole_cost: %s", name)
        if name == "sd15":
            if cuda:
                out[name] = measure(SIZES[name], "cuda", DTYPES[dtype or "fp16"], repeats[name], batches=batches)
            else:
                out[name] = sd15_flops_only("no CUDA device")
                if batches:
                    out[name]["batches_asked"] = list(batches)
        else:
            out[name] = measure(SIZES[name], "cpu", torch.float32, repeats[name], batches=batches)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid", "sd15"], choices=sorted(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, help="UNet batches to time (default: each size's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="GPU dtype (default fp16; CPU sizes run fp32)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's setting: 2)")
    parser.add_argument("--results", type=Path, default=LATEST_JSON, help="results file (its mole_cost section)")
    args = parser.parse_args(argv)
    if args.batches and any(b < 1 for b in args.batches):
        parser.error("--batches must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(args.sizes, args.quick, args.threads, args.batches, args.dtype)
    update_results("mole_cost", results, args.results)
    for name, r in results.items():
        for batch, b in (r.get("by_batch") or ({str(r["batch"]): r} if "time_ratio" in r else {})).items():
            logger.info(
                "%s batch %s: time %.3f, FLOP bound %.3f, vs naive %.2f, peft %.3f, naive %.3f",
                name, batch, b["time_ratio"], b["flop_ratio"], b["speedup_vs_naive"] or float("nan"),
                b["peers"]["peft"]["time_ratio"], b["peers"]["naive"]["time_ratio"],
            )  # fmt: skip
        if "time_ratio" not in r:
            logger.info("%s: FLOP bound %.3f (%s)", name, r["flop_ratio"], r.get("skipped"))


if __name__ == "__main__":
    main()
