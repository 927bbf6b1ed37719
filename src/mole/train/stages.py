"""The three stages as specs for the one loop: what is trainable, and how the result is saved.

* ``stage1``: the UNet (and by default the text encoder) in full; the result is a diffusers folder.
* ``expert``: one peft LoRA on the UNet only; the result is a LoRA file that both ``mole.apply_mole`` and
  plain diffusers ``load_lora_weights`` read, with every trained layer present.
* ``gates``: only the ``mole_*`` gate parameters, on the frozen base with frozen experts; the result is a
  gates file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mole.gates_io import write_gates
from mole.inject import apply_mole
from mole.layers import MOLE_PREFIX
from mole.train.config import ExpertConfig, GatesConfig, ModelConfig, Stage1Config, TrainConfig
from mole.train.model import DiffusionModel

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class StageError(ValueError):
    """A stage cannot start: missing base model, experts that do not fit, bad settings."""


@dataclass
class Stage:
    """Everything the loop needs to know about one stage.

    Attributes:
        name: ``stage1``, ``expert:<name>`` or ``gates``.
        model: The module DeepSpeed/accelerate wraps (UNet + text encoder).
        vae: Frozen VAE used to encode images (kept outside ``model``).
        tokenizer: The base model's tokenizer.
        base: Folder of the base model (for the components the stage does not change).
        trainable: Names of the trainable parameters of ``model``, for checks and logging.
        save: ``save(state_dict, output_dir) -> result path`` writing the stage's result from the full
            (gathered) state dict of ``model``.
        info: Stage facts for the result file (expert name, rank, gate mode...).
    """

    name: str
    model: DiffusionModel
    vae: nn.Module
    tokenizer: Any
    base: Path
    trainable: list[str]
    save: Callable[[dict[str, torch.Tensor], Path], Path]
    info: dict[str, Any] = field(default_factory=dict)


def _check_base(base: str | os.PathLike[str]) -> Path:
    """The base model's diffusers folder: ``base`` itself or the ``model/`` of a stage-1 output folder."""
    from mole.outputs import model_folder

    try:
        return model_folder(base)
    except FileNotFoundError as err:
        raise StageError(f"base model: {err}") from None


def _load_components(base: Path, model_cfg: ModelConfig):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    prediction_type = model_cfg.prediction_type or scheduler.config.prediction_type
    if prediction_type != scheduler.config.prediction_type:
        scheduler.register_to_config(prediction_type=prediction_type)
    vae.requires_grad_(False).eval()
    return unet, text_encoder, vae, tokenizer, scheduler, prediction_type


def _state_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_stage1(cfg: Stage1Config, model_cfg: ModelConfig, base: str | os.PathLike[str]) -> Stage:
    base_path = _check_base(base)
    unet, text_encoder, vae, tokenizer, scheduler, prediction = _load_components(base_path, model_cfg)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    model = DiffusionModel(unet, text_encoder, scheduler, prediction, cfg.train_text_encoder, cfg.noise_offset)

    def save(state: dict[str, torch.Tensor], output: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        # The modules may hold the engine's 16-bit weights (DeepSpeed converts in place): give them the
        # state's dtype (the configured save_dtype) first, else load_state_dict would copy back into bf16.
        # A frozen text encoder is taken from the base as it was (not from the engine's 16-bit copy).
        dtype = _state_dtype(state)
        unet.to(dtype=dtype)
        unet.load_state_dict(_strip(state, "unet."))
        parts: dict[str, nn.Module] = {"unet": unet}
        if cfg.train_text_encoder:
            text_encoder.to(dtype=dtype)
            text_encoder.load_state_dict(_strip(state, "text_encoder."), strict=False)
            parts["text_encoder"] = text_encoder
        pipe = StableDiffusionPipeline.from_pretrained(base_path, dtype=dtype, **parts)
        pipe.scheduler.register_to_config(prediction_type=prediction)
        target = output / "model"
        pipe.save_pretrained(target, safe_serialization=True)
        return target

    return Stage(
        "stage1", model, vae, tokenizer, base_path, _trainable(model), save,
        {"train_text_encoder": cfg.train_text_encoder, "prediction_type": prediction},
    )  # fmt: skip


def linear_targets(unet: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` and 1×1 ``nn.Conv2d`` in ``unet``: what ``target_modules: all-linear`` means.

    peft's own ``"all-linear"`` skips convolutions (and a model's output layer), so the list is built here and
    given to peft by full name; a 1×1 conv is a linear layer over channels, which the MoLE layer supports.
    """
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1)
    ]


def build_expert(cfg: ExpertConfig, model_cfg: ModelConfig, base: str | os.PathLike[str], name: str) -> Stage:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base_path = _check_base(base)
    unet, text_encoder, vae, tokenizer, scheduler, prediction = _load_components(base_path, model_cfg)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    targets = linear_targets(unet) if cfg.target_modules == "all-linear" else cfg.target_modules
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    try:
        unet.add_adapter(lora, adapter_name=name)
    except ValueError as err:
        raise StageError(
            f"expert {name!r}: target_modules {cfg.target_modules!r} do not fit this UNet: {err}"
        ) from err
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = DiffusionModel(unet, text_encoder, scheduler, prediction, False, cfg.noise_offset)
    n_layers = sum(1 for n, _ in unet.named_parameters() if n.endswith(f"lora_A.{name}.weight"))

    def save(state: dict[str, torch.Tensor], output: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        # The raw peft state dict: diffusers' convert_state_dict_to_diffusers drops conv proj layers on reload.
        lora_state = get_peft_model_state_dict(unet, state_dict=_strip(state, "unet."), adapter_name=name)
        metadata = unet.peft_config[name].to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        StableDiffusionPipeline.save_lora_weights(
            output,
            unet_lora_layers=lora_state,
            unet_lora_adapter_metadata=metadata,
            weight_name=LORA_WEIGHT_NAME,
        )
        saved_layers = sum(1 for k in lora_state if "lora_A" in k)
        if saved_layers != n_layers:
            raise StageError(f"expert {name!r}: trained {n_layers} LoRA layers but saved {saved_layers}")
        return output / LORA_WEIGHT_NAME

    info = {"expert": name, "rank": cfg.rank, "alpha": cfg.alpha, "lora_layers": n_layers,
            "target_modules": cfg.target_modules}  # fmt: skip
    return Stage(f"expert:{name}", model, vae, tokenizer, base_path, _trainable(model), save, info)


def build_gates(
    cfg: GatesConfig, model_cfg: ModelConfig, base: str | os.PathLike[str], experts: Mapping[str, str]
) -> Stage:
    from mole.experts import ExpertError

    base_path = _check_base(base)
    if not experts:
        raise StageError("the gates stage needs experts: --experts NAME=PATH (or gates.experts in the config)")
    unet, text_encoder, vae, tokenizer, scheduler, prediction = _load_components(base_path, model_cfg)
    text_encoder.requires_grad_(False)
    try:
        apply_mole(unet, experts, gate=cfg.gate, init_bias=cfg.init_bias, condition=cfg.condition)
    except (ExpertError, FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from err
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = DiffusionModel(unet, text_encoder, scheduler, prediction, False, cfg.noise_offset)
    trainable = _trainable(model)
    not_gates = [n for n in trainable if not any(p.startswith(MOLE_PREFIX) for p in n.split("."))]
    if not_gates:  # a guard, not an assert: it must hold under `python -O` too
        raise StageError(f"the gates stage would train non-gate parameters: {not_gates[:3]}")
    settings = unet.mole_settings

    def save(state: dict[str, torch.Tensor], output: Path) -> Path:
        gates = {k: v for k, v in _strip(state, "unet.").items() if f".{MOLE_PREFIX}" in k}
        return write_gates(gates, settings, output / "gates.safetensors")

    info = {"gate": cfg.gate, "condition": cfg.condition, "experts": dict(experts),
            "mole_layers": len(settings.target_modules)}  # fmt: skip
    return Stage("gates", model, vae, tokenizer, base_path, trainable, save, info)


def _trainable(model: nn.Module) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise StageError("nothing to train: no parameter requires grad")
    return names


def build_stage(
    stage: str,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    base: str | os.PathLike[str],
    expert_name: str | None = None,
    experts: Mapping[str, str] | None = None,
) -> Stage:
    """Dispatch to the stage builders (the CLI's single entry)."""
    wanted = {"stage1": Stage1Config, "expert": ExpertConfig, "gates": GatesConfig}.get(stage)
    if wanted is None:
        raise StageError(f"unknown stage {stage!r}")
    if not isinstance(cfg, wanted):
        raise StageError(f"the {stage} stage needs its own config section ({wanted.__name__}), "
                         f"got {type(cfg).__name__}")  # fmt: skip
    if isinstance(cfg, Stage1Config):
        return build_stage1(cfg, model_cfg, base)
    if isinstance(cfg, ExpertConfig):
        if not expert_name:
            raise StageError("the expert stage needs an expert name (--name)")
        return build_expert(cfg, model_cfg, base, expert_name)
    return build_gates(cfg, model_cfg, base, experts or cfg.experts)


def write_result(output: Path, payload: dict[str, Any]) -> Path:
    """``result.json``: what a stage produced, for the next stage and the pipeline."""
    from mole import atomic

    return atomic.write_json(output / "result.json", payload, default=str)
