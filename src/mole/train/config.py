"""Typed training configuration: one YAML file describes the base model and all three stages.

```yaml
model: {base: ..., resolution: 512}
stage1: {...}                # full fine-tune
experts: {face: {...}, hand: {...}}   # one LoRA expert each, trained separately
gates: {...}                 # the mixture
```

Every model rejects unknown keys, and errors name the field (``stage1.optimizer.lr``), so a typo in a
config fails before any training starts instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mole.pairs import split_pair
from mole.security import InvalidNameError, check_name

StageName = Literal["stage1", "expert", "gates"]


class ConfigError(ValueError):
    """A config file is missing, malformed, or has invalid values; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Strict):
    base: str = "runwayml/stable-diffusion-v1-5"
    """The model to start from: a local diffusers folder (or a hub id, downloaded by diffusers on a machine
    that may reach the hub). Stage 1 fine-tunes it; experts and gates build on stage 1's output."""
    resolution: int = Field(512, ge=8, multiple_of=8)
    """Training image side in pixels (multiple of 8: the VAE downsamples 8×)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the UNet predicts; default: the base model scheduler's setting."""


class OptimizerConfig(_Strict):
    name: Literal["adamw", "lion"] = "adamw"
    """``lion`` (lion-pytorch, the paper's stage 1) or ``adamw`` (stages 2 and 3)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/Lion betas (Lion's authors suggest (0.9, 0.99))."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping by global norm; null disables it."""
    foreach: bool = True
    """Multi-tensor optimizer step: lion-pytorch's foreach Lion, torch's fused AdamW. The same update as the
    per-parameter loop (same state, same checkpoints), in a few kernel launches instead of one per tensor."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


class TrainConfig(_Strict):
    """Settings shared by every stage: the one loop reads only these."""

    data: str | dict[str, str] | None = None
    """Dataset folder or s3:// URI in the mole-shards format (docs/data-format.md), or several by name
    (``{scenes: ..., faces: ..., hands: ...}``: the paper's human-centric dataset for stage 1 and the gates)."""
    data_weights: dict[str, float] = {}
    """Sampling weight of each named ``data`` source (e.g. ``{scenes: 0.6, faces: 0.2, hands: 0.2}``; they need
    not sum to 1). Empty: every sample equally likely, i.e. sources in proportion to their size (the paper
    trains on its dataset as a whole). A source left out of a non-empty mapping is not drawn."""
    output: str | None = None
    """Where the stage writes its result and checkpoints (overridden by ``--output``)."""
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train for."""
    batch_size: int = Field(1, ge=1)
    """Samples per device per micro-step; the effective batch is batch_size × grad_accum × processes."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimizer."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """Learning-rate schedule (the paper uses constant)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps for schedules that have one."""
    min_snr_gamma: float | None = Field(5.0, gt=0)
    """Min-SNR-γ loss weighting (Hang et al. 2023); null for the plain MSE."""
    noise_offset: float = Field(0.0, ge=0)
    """Offset noise strength (0 disables): helps very dark and very bright images."""
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of training on the empty caption, for classifier-free guidance."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Training precision. Under DDP / a single process: autocast over fp32 weights. Under DeepSpeed: the
    engine's 16-bit weights with fp32 master weights in the optimizer. Inputs are cast to the weights' dtype,
    losses are fp32, the frozen VAE runs in this dtype. bf16 runs on CPU too (DeepSpeed included); fp16 needs
    CUDA (CPU runs fall back to fp32)."""
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """dtype of the saved result (stage-1 model, expert LoRA, gates) whatever the training precision: fp32 by
    default, what diffusers and peft load without surprises. Under DeepSpeed 16-bit training the saved weights
    are the engine's 16-bit weights widened to this dtype (not its fp32 master copy)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the trained weights with this decay (saved as the result)."""
    cache_latents: bool = False
    """Encode every image with the VAE once, before training: its posterior mean and std, in both orientations
    with ``random_flip`` (the mirror encoded from mirrored pixels), sampled with fresh noise at every step. The
    same flips, caption dropouts and posterior sampling as without the cache, and no image is decoded while
    training. Needs ``center_crop`` (a random crop cannot be encoded once; curated data are square already).
    In memory unless ``latent_cache_dir`` is set."""
    latent_cache_dir: str | None = None
    """Keep the cached latents on disk in this folder, memory-mapped (float16 mean and std: 2 × 4 × (res/8)² × 2 bytes
    per sample and orientation, 64 KiB at 512², about 122 GiB (131 GB) for a million images with flips), in a
    sub-folder named by a key over the data, the VAE, resolution, crop and flips: a second run or a resumption with
    the same key reuses it. Relative: inside the stage's output folder. Multi-process runs need it on a folder every
    process sees (one node, or a ReadWriteMany volume). Unset: the cache is held in memory."""
    cache_text: bool = False
    """Encode every caption once (only when the text encoder is frozen)."""
    random_flip: bool = True
    """Horizontal flip augmentation."""
    center_crop: bool = True
    """Center-crop to a square after resizing (else random crop)."""
    checkpoint_every: int = Field(500, ge=1)
    """Save a resumable checkpoint every this many steps."""
    keep_checkpoints: int = Field(3, ge=1)
    """Keep only the newest N checkpoints."""
    validation_every: int | None = Field(None, ge=1)
    """Generate validation images every this many steps (null: only at the end if prompts are given)."""
    validation_prompts: list[str] = []
    """Prompts for validation images."""
    validation_steps: int = Field(25, ge=1)
    """Denoising steps for validation images."""
    log_every: int = Field(10, ge=1)
    """Log metrics every this many steps."""
    seed: int = 0
    """Seed of the data order, noise, timesteps and caption dropout."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    pin_memory: bool = False
    """Page-locked host batches for faster copies to the GPU (ignored without CUDA)."""
    channels_last: bool = False
    """UNet weights and inputs in channels-last memory layout: faster convolutions on tensor cores, same
    math."""
    compile: bool = False
    """``torch.compile`` the UNet (in place, so state-dict keys and checkpoints do not change). Pays a
    compilation of minutes at the first steps; worth it for long runs."""
    allow_tf32: bool = False
    """TF32 tensor cores for the fp32 matmuls and convolutions left (CUDA, Ampere and newer); bf16/fp16 math is
    unaffected."""

    @field_validator("latent_cache_dir")
    @classmethod
    def _cache_dir_is_local(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or not value.strip()):
            raise ValueError(f"must be a local (or mounted) folder: the cache is memory-mapped, got {value!r}")
        return value

    @model_validator(mode="after")
    def _weights_name_sources(self) -> TrainConfig:
        if any(w < 0 for w in self.data_weights.values()) or (
            self.data_weights and sum(self.data_weights.values()) <= 0
        ):
            raise ValueError(f"data_weights must be >= 0 with a positive sum, got {self.data_weights}")
        if self.data_weights and isinstance(self.data, dict):
            unknown = sorted(set(self.data_weights) - set(self.data))
            if unknown:
                raise ValueError(f"data_weights names {unknown}, which are not data sources ({sorted(self.data)})")
        return self


class Stage1Config(TrainConfig):
    train_text_encoder: bool = True
    """Fine-tune the CLIP text encoder with the UNet (the paper does; the released code does not)."""


class ExpertConfig(TrainConfig):
    rank: int = Field(256, ge=1)
    """LoRA rank r."""
    alpha: float = Field(64.0, gt=0)
    """LoRA alpha α; the expert's scale is α/r."""
    target_modules: list[str] | Literal["all-linear"] = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    ]
    """UNet modules that get a LoRA pair (peft names or suffixes), or ``all-linear``: every ``nn.Linear`` and
    1×1 ``nn.Conv2d`` of the UNet (the paper's "any linear layers", Fig. 4: time embedding, ResNet time
    projections and 1×1 shortcuts too). The gates stage mixes every layer the experts have."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""


class GatesConfig(TrainConfig):
    gate: Literal["local", "global", "both"] = "both"
    """Which gates to learn: the paper uses both (Table 3 ablates the others)."""
    condition: Literal["none", "timestep"] = "none"
    """What the gates see besides the features: ``none`` (the paper) or ``timestep``, a learned zero-initialised
    projection of the UNet's timestep embedding added to the gate logits, so the mixture can change over the
    denoising steps (Face-MoGLE's time-dependent gates). Saved with the gates; generation reads it from there."""
    experts: dict[str, str] = {}
    """Expert name → LoRA path, in gate order (overridden by ``--experts``); any number of experts. Names follow
    :data:`mole.security.NAME_PATTERN` (they become folder and registered-model names)."""

    @field_validator("experts")
    @classmethod
    def _expert_names(cls, value: dict[str, str]) -> dict[str, str]:
        return {check_name(k): v for k, v in value.items()}

    init_bias: float = 0.0
    """Initial gate bias; gates start at sigmoid(init_bias)."""


class MoleConfig(_Strict):
    """A whole training recipe."""

    model: ModelConfig = ModelConfig()
    """The base model."""
    stage1: Stage1Config = Stage1Config()
    """Stage 1: fine-tune on the human-centric dataset."""
    experts: dict[str, ExpertConfig] = {}
    """Stage 2: one LoRA expert per entry (face, hand, ...); names follow :data:`mole.security.NAME_PATTERN`."""

    @field_validator("experts")
    @classmethod
    def _expert_names(cls, value: dict[str, ExpertConfig]) -> dict[str, ExpertConfig]:
        return {check_name(k): v for k, v in value.items()}

    gates: GatesConfig = GatesConfig()
    """Stage 3: the soft mixture."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["stage1.optimizer.lr=1e-5"]`` → ``{"stage1.optimizer.lr": 1e-05}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        try:
            key, raw = split_pair(item, "override", "section.key=value", need_value=False)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        out[key] = yaml.safe_load(raw) if raw else None
    return out


_SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def parse_data(values: list[str] | str | None) -> str | dict[str, str] | None:
    """``--data`` values → one dataset URI, or named sources for a mixture.

    ``["DIR"]`` → ``"DIR"`` (one dataset, as always); ``["scenes=A", "faces=B"]`` → ``{"scenes": "A", "faces":
    "B"}``. A value may hold several ``;``-separated entries (``"scenes=A;faces=B"``: how the pipeline passes
    its data steps in one string). A prefix counts as a name only if it looks like one, so ``s3://b/x=1`` is a
    plain URI.

    Raises:
        ConfigError: several unnamed datasets, a mix of named and unnamed ones, a name given twice, or an
            empty entry.
    """
    if values is None:
        return None
    entries = [e.strip() for v in ([values] if isinstance(values, str) else values) for e in v.split(";")]
    if not entries or any(not e for e in entries):
        raise ConfigError(f"--data: empty dataset entry in {values!r}")
    named: dict[str, str] = {}
    plain: list[str] = []
    for entry in entries:
        name, sep, uri = entry.partition("=")
        if sep and _SOURCE_NAME.fullmatch(name.strip()):
            if not uri.strip():
                raise ConfigError(f"--data {entry!r}: no dataset after {name.strip()}=")
            if name.strip() in named:
                raise ConfigError(f"--data: source {name.strip()!r} is given twice")
            named[name.strip()] = uri.strip()
        else:
            plain.append(entry)
    if named and plain:
        raise ConfigError(f"--data: name every source of a mixture (NAME=DIR); unnamed: {plain}")
    if len(plain) > 1:
        raise ConfigError(f"--data: several datasets need names (scenes=DIR faces=DIR ...), got {plain}")
    return named or plain[0]


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); the one reader of config files. A
    ``configs/...`` name with no such file here is the preset the package ships (:mod:`mole.presets`).

    Raises:
        ConfigError: Missing file, not UTF-8 text (a binary file), invalid YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        from mole.presets import packaged

        try:  # `configs/paper.yaml` from any folder: the preset the package ships
            p = packaged(str(path))
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path} ({err})") from None
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {p} is not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {p} is not valid YAML: {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level")
    return loaded or {}


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` (``filters.blur.threshold``) in ``tree``, creating sections."""
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return tree


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> MoleConfig:
    """Read a YAML recipe, apply dotted overrides (``stage1.max_steps: 10``), validate.

    Raises:
        ConfigError: Missing file, bad YAML, unknown keys or invalid values, each naming the field.
    """
    tree = read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    apply_overrides(tree, overrides)
    try:
        return MoleConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def stage_config(config: MoleConfig, stage: StageName, expert: str | None = None) -> TrainConfig:
    """The section of ``config`` that a stage trains with."""
    if stage == "stage1":
        return config.stage1
    if stage == "gates":
        return config.gates
    if expert is None:
        raise ConfigError("the expert stage needs an expert name (--name)")
    try:
        check_name(expert, "--name")
    except InvalidNameError as err:
        raise ConfigError(str(err)) from None
    if expert not in config.experts:
        raise ConfigError(
            f"no experts.{expert} section in the config (it has {sorted(config.experts) or 'none'}); "
            f"`--set experts.{expert}.rank=R` creates it (rank R, the other settings at their defaults)"
        )
    return config.experts[expert]
