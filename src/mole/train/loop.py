"""ONE loop for the three stages. Stages differ only in what is trainable (the Stage), the loss weighting and
the schedule (the TrainConfig); everything else — data order, noise, accumulation, clipping, EMA,
checkpoints, resume, validation, metrics — is here once.

Runs single-process as is, and multi-process under ``accelerate launch`` (DDP or DeepSpeed ZeRO-2/3; on a
CPU the process group is gloo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mole.data.shards import read_index
from mole.train import checkpoint as ckpt
from mole.train.config import OptimizerConfig, TrainConfig
from mole.train.data import ImageCaptionDataset, MixtureSampler, ResumableSampler, collate
from mole.train.latent_cache import (
    FeatureCache,
    build_in_memory,
    encode_latents,
    key_inputs,
    open_disk_cache,
    resolve_cache_dir,
)
from mole.train.metrics import JsonlLogger, MetricsLogger, NullLogger
from mole.train.model import diffusion_loss, min_snr_weights
from mole.train.stages import Stage, StageError, write_result

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    stage: str
    result: Path | None
    steps: int
    start_step: int
    final_loss: float
    seconds_per_step: float
    samples_per_second: float
    rejected: dict[str, int] = field(default_factory=dict)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Lion or AdamW; with ``cfg.foreach`` their multi-tensor forms (same update, same state layout)."""
    if cfg.name == "lion":
        if cfg.foreach:
            from lion_pytorch.foreach import Lion
        else:
            from lion_pytorch import Lion

        return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    # fused: one kernel for the whole update (CUDA and CPU); else torch picks its default (foreach on CUDA).
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=cfg.foreach or None
    )


def apply_speed_settings(stage: Stage, cfg: TrainConfig, deepspeed: bool = False) -> None:
    """The config's speed switches that act on the modules: channels-last, torch.compile, TF32.

    None changes the math beyond floating-point reassociation (a test checks the loss with and without
    channels-last). Called before ``accelerator.prepare``. Under DeepSpeed only the UNet's inputs go
    channels-last (convolutions then run and return channels-last): the engine views every parameter as
    flat bytes, which a channels-last weight (last stride not 1) refuses.
    """
    unet = stage.model.unet
    if cfg.channels_last:
        if not deepspeed:
            unet.to(memory_format=torch.channels_last)
        stage.model.channels_last = True
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.compile:
        unet.compile()  # in place: the module (and its state-dict keys) stay the same


def resolve_precision(requested: str, cuda: bool, deepspeed: bool) -> str:
    """The mixed precision a run really uses: the requested one, except fp16 without CUDA.

    bf16 runs on CPU too: under DeepSpeed the CPU accelerator holds bf16 weights exactly as a GPU engine does
    (so the dtype path the GPU takes is the one the CPU tests take), and without DeepSpeed accelerate runs CPU
    autocast in bf16. fp16 has neither a CPU autocast worth using nor DeepSpeed CPU support: fp32 then.
    """
    if requested == "fp16" and not cuda:
        logger.info("no CUDA: training in float32 instead of fp16 (bf16 runs on CPU%s)",
                    ", DeepSpeed included" if deepspeed else "")  # fmt: skip
        return "no"
    return requested


def _deepspeed_launched() -> bool:
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this machine: gloo on CPU, the configured mixed precision (see resolve_precision)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.mixed_precision, cuda, _deepspeed_launched())
    # Under a launcher (accelerate launch, torchrun: WORLD_SIZE is set) a CPU process group must be gloo;
    # a plain single process has no process group at all.
    launched = "WORLD_SIZE" in os.environ
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not cuda else []
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision, kwargs_handlers=handlers
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # Our config is the source of truth; otherwise DeepSpeed's defaults silently win at prepare().
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.optimizer.max_grad_norm or 0.0
    return accelerator


#: Config names of the training / saving precisions → torch dtypes.
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def stage_loss(stage: Stage, model, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """The objective of every stage: (Min-SNR weighted) MSE on the model's prediction target."""
    inner = stage.model
    pred, target, timesteps = model(batch)
    weights = None
    if cfg.min_snr_gamma is not None:
        weights = min_snr_weights(
            inner.noise_scheduler.alphas_cumprod, timesteps, cfg.min_snr_gamma, inner.prediction_type
        )
    return diffusion_loss(pred, target, weights)


def _validate(stage: Stage, accelerator, model, cfg: TrainConfig, output: Path, step: int, log: MetricsLogger):
    if not cfg.validation_prompts or not accelerator.is_main_process:
        return
    if _zero_stage(accelerator) == 3:
        logger.warning("validation images are skipped under ZeRO-3 (parameters are partitioned)")
        return
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mole.generate import generate

    inner = accelerator.unwrap_model(model)
    pipe = StableDiffusionPipeline(
        vae=stage.vae,
        text_encoder=inner.text_encoder,
        tokenizer=stage.tokenizer,
        unet=inner.unet,
        scheduler=DDIMScheduler.from_pretrained(stage.base, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    inner.eval()
    # The VAE runs in the training precision, the UNet in fp32 (autocast) or 16 bits (DeepSpeed): autocast
    # makes the mix meet, as the training forward does.
    precision = accelerator.mixed_precision
    amp = torch.autocast(accelerator.device.type, dtype=DTYPES[precision], enabled=precision != "no")
    try:
        with amp:
            images = generate(pipe, cfg.validation_prompts, seed=cfg.seed, steps=cfg.validation_steps).images
    finally:
        inner.train()
    folder = output / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        path = folder / f"step-{step:08d}-{k}.png"
        image.save(path)
        log.log_artifact(path, "validation_image")


def _sampler(dataset: ImageCaptionDataset, cfg: TrainConfig, start: int, rank: int, world: int):
    """Weighted by source when ``data_weights`` names several sources, else every sample equally likely."""
    if cfg.data_weights and len(dataset.sources) > 1:
        weights = [float(cfg.data_weights.get(name, 0.0)) for name, _, _ in dataset.sources]
        logger.info("data mixture: %s", {name: w for (name, _, _), w in zip(dataset.sources, weights, strict=True)})
        return MixtureSampler([n for _, _, n in dataset.sources], weights, cfg.seed, start, rank, world)
    if cfg.data_weights:
        logger.warning("data_weights %s ignored: one dataset, nothing to weigh", cfg.data_weights)
    return ResumableSampler(len(dataset), cfg.seed, start, rank, world)


def _apply_new_hyperparameters(optimizer: Any, lr_scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """After ``load_state`` restored the old optimizer and schedule: put this run's hyperparameters back (the
    optimizer's param groups and the schedule's base learning rates come from the checkpoint otherwise, so a run
    resumed with a new lr trained with the old one while recording the new one)."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler
    groups = optimizer.param_groups
    for group, new in zip(groups, fresh, strict=True):
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
    inner.base_lrs = [new.get("initial_lr", new["lr"]) for new in fresh]
    for group, base, factor in zip(groups, inner.base_lrs, inner.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in groups]


def _data_digest(data: str | dict[str, str]) -> str:
    """The dataset's digest, or for a mixture one digest over every named source's (what a resume must match)."""
    if isinstance(data, str):
        return read_index(data).digest
    digests = {name: read_index(path).digest for name, path in sorted(data.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def run_training(
    stage: Stage,
    cfg: TrainConfig,
    data: str | dict[str, str],
    output: Path,
    *,
    resolution: int,
    resume: str | None = None,
    metrics: MetricsLogger | None = None,
    params: dict[str, Any] | None = None,
    resume_changed: bool = False,
) -> TrainResult:
    """Train ``stage`` for ``cfg.max_steps`` optimizer steps and save its result under ``output``.

    Args:
        data: Local dataset folder, or several by name (S3 URIs are resolved by the caller).
        resume: ``latest`` (newest complete checkpoint under ``output``, or a fresh start if none) or a path.
        metrics: Where metrics go; default ``output/metrics.jsonl`` on the main process.
        params: The resolved configuration, logged once.
        resume_changed: Resume even when the data or the settings differ from the checkpoint's run (otherwise
            refused); the new settings (learning rate included) then apply from the resumed step on.
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    accelerator = make_accelerator(cfg)
    output.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process
    # A resumption must continue the same work (same data, same settings) or say it does not: checked before
    # anything is recorded, so params.json and MLflow always hold what runs.
    data_digest = _data_digest(data)  # also the latent cache's key
    guard = ckpt.resume_guard(data_digest, params if params is not None else cfg.model_dump())
    resume_from = ckpt.resolve_resume(output, resume)
    changed = ckpt.check_resume(resume_from, guard, allow_changed=resume_changed) if resume_from is not None else []
    if changed:
        logger.warning("resuming %s with changes: %s", resume_from, "; ".join(changed))
        params = {**(params or {}), "resume_changed": changed}
    log = metrics or (JsonlLogger(output) if main else NullLogger())
    if params is not None:
        log.log_params(params)
    if cfg.ema_decay is not None and _zero_stage(accelerator) == 3:
        raise StageError("ema_decay is not supported under ZeRO-3 (the EMA would need the partitioned weights)")
    if cfg.cache_latents and not cfg.center_crop:
        raise StageError(
            "cache_latents needs center_crop: true: a random crop is drawn anew at every position, so it cannot be "
            "encoded once (random flips can: both orientations are cached). Curated data are square at the "
            "training resolution already, so the centre crop loses nothing"
        )
    if cfg.cache_text and stage.model.train_text_encoder:
        raise StageError("cache_text needs a frozen text encoder (set train_text_encoder: false)")

    dataset = ImageCaptionDataset(
        data, stage.tokenizer, resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
        caption_dropout=cfg.caption_dropout, seed=cfg.seed, with_pixels=not cfg.cache_latents,
    )  # fmt: skip
    set_seed(cfg.seed + accelerator.process_index)  # noise and timesteps differ between processes
    apply_speed_settings(stage, cfg, deepspeed=_deepspeed(accelerator))
    trainable = [p for p in stage.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.optimizer)
    n_proc = accelerator.num_processes
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * n_proc,
        num_training_steps=cfg.max_steps * n_proc,
    )
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=cfg.ema_decay)
    # The frozen VAE only encodes: it runs in the training precision, as diffusers' training scripts do.
    stage.vae.to(accelerator.device, dtype=DTYPES.get(accelerator.mixed_precision, torch.float32))
    cache = None
    if cfg.cache_latents or cfg.cache_text:
        stage.model.text_encoder.to(accelerator.device)
        latents = None
        if cfg.cache_latents and cfg.latent_cache_dir:
            root = resolve_cache_dir(cfg.latent_cache_dir, output)
            inputs = key_inputs(data_digest, stage.vae, dataset)
            latents = open_disk_cache(root, inputs, stage.vae, dataset, accelerator, cfg.batch_size)
        elif cfg.cache_latents:
            latents = build_in_memory(stage.vae, dataset, cfg.batch_size, accelerator.device)
        cache = FeatureCache(stage, dataset, latents, cfg.cache_text, accelerator.device)
    model, optimizer, lr_scheduler = accelerator.prepare(stage.model, optimizer, lr_scheduler)
    compute_dtype = stage.model.compute_dtype
    how = f"DeepSpeed ZeRO-{_zero_stage(accelerator)}" if _deepspeed(accelerator) else "no DeepSpeed"
    logger.info("%s: mixed precision %s, weights in %s, %s, %d process(es)", stage.name,
                accelerator.mixed_precision, compute_dtype, how, accelerator.num_processes)  # fmt: skip
    if ema is not None:
        ema.to(accelerator.device)  # saved by ckpt.save_ema, not register_for_checkpointing (a pickle)

    start_step = int(ckpt.read_state(resume_from)["step"]) if resume_from is not None else 0
    per_step = cfg.batch_size * cfg.grad_accum * n_proc
    sampler = _sampler(dataset, cfg, start_step * per_step, accelerator.process_index, n_proc)
    # The loader gets its own generator: creating its iterator must not draw from the global RNG, whose
    # state is part of the checkpoint (and is restored just below).
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = iter(loader)
    if resume_from is not None:
        ckpt.refuse_pickles(resume_from)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        accelerator.load_state(str(resume_from))
        if changed:
            _apply_new_hyperparameters(optimizer, lr_scheduler, fresh)
        if ema is not None:
            ckpt.load_ema(ema, resume_from)
            ema.to(accelerator.device)
        logger.info("resumed from %s at step %d", resume_from, start_step)
    if start_step >= cfg.max_steps:
        logger.info("already at step %d of %d: nothing to train", start_step, cfg.max_steps)
    model.train()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not main, desc=stage.name, dynamic_ncols=True)
    loss_value, t_start, window_start, window_steps = math.nan, time.perf_counter(), time.perf_counter(), 0
    step = start_step
    while step < cfg.max_steps:
        losses = []
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                if cache is not None:
                    inputs = cache.inputs(batch, stage, accelerator.device)
                else:
                    inputs = {
                        "latents": encode_latents(stage.vae, batch["pixel_values"]),
                        "input_ids": batch["input_ids"].to(accelerator.device),
                    }
                loss = stage_loss(stage, model, inputs, cfg)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.optimizer.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optimizer.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        step += 1
        window_steps += 1
        if ema is not None:
            ema.step(trainable)
        loss_value = accelerator.gather(torch.stack(losses).mean()).mean().item()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            stats = {
                "loss": loss_value,
                "lr": lr_scheduler.get_last_lr()[0],
                "samples_per_second": window_steps * per_step / max(elapsed, 1e-9),
                "seconds_per_step": elapsed / window_steps,
            }
            if grad_norm is not None:
                stats["grad_norm"] = float(grad_norm)
            log.log_metrics(stats, step)
            bar.set_postfix(
                loss=f"{loss_value:.4f}", lr=f"{stats['lr']:.2e}", sps=f"{stats['samples_per_second']:.1f}"
            )
            window_start, window_steps = time.perf_counter(), 0
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            accelerator.save_state(str(ckpt.temp_path(output, step)))
            accelerator.wait_for_everyone()
            if main:
                if ema is not None:
                    ckpt.save_ema(ema, ckpt.temp_path(output, step))
                state = {"stage": stage.name, "loss": loss_value, ckpt.GUARD_KEY: guard}
                ckpt.finalize(output, step, state, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
        if cfg.validation_every and step % cfg.validation_every == 0:
            _validate(stage, accelerator, model, cfg, output, step, log)
    bar.close()
    trained_steps = step - start_step
    seconds_per_step = (time.perf_counter() - t_start) / max(trained_steps, 1)

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)  # the result is the averaged model
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    save_dtype = DTYPES[cfg.save_dtype]
    result_path = None
    if main:  # (under ZeRO-3 only the main process holds the gathered state)
        state = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state.items()}
        result_path = stage.save(state, output)
        if cfg.validation_prompts and not cfg.validation_every:
            _validate(stage, accelerator, model, cfg, output, step, log)
        write_result(
            output,
            {
                "stage": stage.name,
                "result": str(result_path),
                "base": str(stage.base),
                "data": data,
                "steps": step,
                "final_loss": loss_value,
                "seconds_per_step": seconds_per_step,
                "processes": n_proc,
                "zero_stage": _zero_stage(accelerator),
                "mixed_precision": accelerator.mixed_precision,
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "save_dtype": cfg.save_dtype,
                "rejected_samples": dict(dataset.rejected),
                **stage.info,
            },
        )
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return TrainResult(
        stage=stage.name,
        result=result_path,
        steps=step,
        start_step=start_step,
        final_loss=loss_value,
        seconds_per_step=seconds_per_step,
        samples_per_second=per_step / seconds_per_step if trained_steps else 0.0,
        rejected=dict(dataset.rejected),
    )
