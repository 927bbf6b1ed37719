"""End-to-end generation speed: images/s of the base model vs MoLE, eager and compiled (``--compile``).

Issue 16's target: with MoLE a 25-step 512² generation (DDIM, classifier-free guidance) keeps at least 0.7× the
base model's images/s; and with the compiled path the UNet at batch 2 (one image under guidance) costs MoLE/base
≤ 1.6. Both models are built from SD1.5's configs with random weights (no download): UNet, VAE and a ViT-L/14-sized
CLIP text encoder; MoLE adds two rank-256 experts on all 184 ``nn.Linear`` of the UNet with local + global gates
(:mod:`bench.peers`), frozen as ``mole generate`` loads them.

Per batch (images per prompt call), for each mode (``eager``, and ``compiled`` with ``--compile``):

* ``images_per_second``: batch / median seconds of a whole ``mole.generate.generate`` call (text encoding,
  ``steps`` UNet calls at batch 2·B, VAE decode), base and MoLE interleaved after a warm-up call each;
* ``unet_ms``: the median UNet call alone at the generation's shapes (UNet batch 2·B), base and MoLE;
* ``mole_over_base`` for both.

``--size sd15`` needs CUDA; without it the rows are recorded as skipped with the reason. ``--size tiny`` (the
embedded default at its native 64², on CPU or GPU) shows the script works anywhere. Writes
``generate_speed.<size>`` into the results file (other sizes' rows are kept).

    python -m bench.generate_speed --size sd15 --batches 1 8 --steps 25 [--compile] [--results PATH]
    python -m bench.generate_speed --size tiny --batches 1 --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import LATEST_JSON, interleaved, load_average_1m, load_results, median_ms, update_results

logger = logging.getLogger("bench.generate_speed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "a close-up photo of a smiling woman waving her hand"
GUIDANCE = 7.5


def sd15_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    """SD1.5's pipeline from its configs with random weights: UNet, VAE, CLIP ViT-L/14 text encoder, DDIM."""
    import tempfile

    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench.peers import SIZES, build_unet
    from mole.tiny import build_tiny_pipeline
    from mole.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))  # the BPE pieces; ids fit any CLIP vocab
    scheduler = build_tiny_pipeline(seed).scheduler  # DDIM with SD1.5's schedule
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
    unet = build_unet(SIZES["sd15"], seed=seed)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def tiny_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    from mole.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def mole_twin(pipe, size: str):
    """The same pipeline with a MoLE UNet: two random experts (bench.peers), local + global gates, frozen."""
    from bench.peers import SIZES, _randomize_gates, random_experts, target_layers
    from mole.inject import apply_mole

    spec = SIZES[size]
    unet = pipe.unet
    experts = random_experts(unet, target_layers(unet, spec.targets), spec.rank)
    mole_unet = apply_mole(copy.deepcopy(unet), experts, gate="both")
    _randomize_gates(mole_unet)
    mole_unet.requires_grad_(False)
    twin = copy.copy(pipe)  # shares the VAE, text encoder, tokenizer and scheduler
    twin.register_modules(unet=mole_unet)
    return twin


def _unet_call(pipe, batch: int, height: int, width: int):
    """One UNet call at a generation's shapes: latents and text states of a guided batch (2·B)."""
    unet = pipe.unet
    p = next(unet.parameters())
    latents = torch.randn(2 * batch, unet.config.in_channels, height // 8, width // 8, generator=torch.Generator())
    states = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=torch.Generator())
    inputs = {"sample": latents.to(p.device, p.dtype), "timestep": torch.tensor(500, device=p.device),
              "encoder_hidden_states": states.to(p.device, p.dtype)}  # fmt: skip
    return lambda: unet(**inputs)


def _rows(pipes: dict, batches: Sequence[int], steps: int, side: int, repeats: int, device: str) -> dict[str, Any]:
    from mole.generate import generate

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows: dict[str, Any] = {}
    for batch in batches:
        load_before = load_average_1m()
        gen = {k: (lambda p=p, b=batch: generate(p, [PROMPT], steps=steps, guidance=GUIDANCE, width=side,
                                                 height=side, num_images=b)) for k, p in pipes.items()}  # fmt: skip
        seconds: dict[str, list[float]] = {k: [] for k in pipes}
        for fn in gen.values():  # warm-up (and, compiled, the compile) of this batch's shapes
            fn()
        for _ in range(repeats):
            for k, fn in gen.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                seconds[k].append(time.perf_counter() - t0)
        ips = {k: batch / statistics.median(v) for k, v in seconds.items()}
        with torch.inference_mode():
            calls = {k: _unet_call(p, batch, side, side) for k, p in pipes.items()}
            unet_times = interleaved(calls, max(3, 2 * repeats), warmup=1, sync=sync)
        unet_ms = {k: median_ms(v) for k, v in unet_times.items()}
        rows[str(batch)] = {
            "images_per_second": ips,
            "mole_over_base_images_per_second": ips["mole"] / ips["base"],
            "unet_batch": 2 * batch,
            "unet_ms": unet_ms,
            "unet_mole_over_base": unet_ms["mole"] / unet_ms["base"],
            "repeats": repeats,
            "load_average_1m_before": load_before,
            "load_average_1m_after": load_average_1m(),
        }
        logger.info("batch %d: base %.3f img/s, MoLE %.3f img/s (%.3f); UNet MoLE/base %.3f", batch, ips["base"],
                    ips["mole"], rows[str(batch)]["mole_over_base_images_per_second"],
                    rows[str(batch)]["unet_mole_over_base"])  # fmt: skip
    return rows


def measure(
    size: str, batches: Sequence[int], steps: int, compile_unet: bool, repeats: int, dtype: str | None, device: str
) -> dict[str, Any]:
    """Eager rows, then (with ``compile_unet``) the same models compiled in place and measured again."""
    from mole.compile import compile_unet as compile_

    torch_dtype = DTYPES[dtype or ("fp16" if device == "cuda" else "fp32")]
    base = (sd15_pipeline if size == "sd15" else tiny_pipeline)(device, torch_dtype)
    pipes = {"base": base, "mole": mole_twin(base, size)}
    side = base.unet.config.sample_size * base.vae_scale_factor
    result: dict[str, Any] = {
        "device": device, "dtype": str(torch_dtype).removeprefix("torch."), "resolution": side, "steps": steps,
        "sampler": type(base.scheduler).__name__, "guidance": GUIDANCE, "batches": list(batches),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "modes": {"eager": _rows(pipes, batches, steps, side, repeats, device)},
    }  # fmt: skip
    if compile_unet:
        wrappers = {k: compile_(p.unet) for k, p in pipes.items()}  # eager, with a warning, off CUDA
        if all(w is None for w in wrappers.values()):
            result["modes"]["compiled"] = {"skipped": f"compiling is for CUDA; the UNet is on {device}"}
        else:
            rows = _rows(pipes, batches, steps, side, repeats, device)
            failed = {k: w.failed for k, w in wrappers.items() if w is not None and w.failed}
            calls = {k: w.compiled_calls if w is not None else 0 for k, w in wrappers.items()}
            result["modes"]["compiled"] = {**rows, "compile_failed": failed or None, "compiled_calls": calls}
    del pipes, base
    gc.collect()
    return result


def run(size: str, batches: Sequence[int], steps: int, compile_unet: bool, repeats: int, dtype: str | None):
    cuda = torch.cuda.is_available()
    if size == "sd15" and not cuda:
        return {"skipped": "no CUDA device", "batches": list(batches), "steps": steps, "compile": compile_unet}
    return measure(size, batches, steps, compile_unet, repeats, dtype, "cuda" if cuda else "cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="images per generation call")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--compile", dest="compile_unet", action="store_true", help="also time the compiled UNet")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per model and batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--results", type=Path, default=LATEST_JSON, help="results file (generate_speed section)")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches) or args.steps < 1 or args.repeats < 1:
        parser.error("--batches, --steps and --repeats must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    row = run(args.size, args.batches, args.steps, args.compile_unet, args.repeats, args.dtype)
    section = {k: v for k, v in load_results(args.results).get("generate_speed", {}).items()
               if k in ("sd15", "tiny")}  # fmt: skip
    update_results("generate_speed", {**section, args.size: row}, args.results)
    if "skipped" in row:
        logger.info("%s: skipped (%s)", args.size, row["skipped"])


if __name__ == "__main__":
    main()
