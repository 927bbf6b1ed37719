"""Expert LoRA files: the key layouts peft, diffusers and kohya write, their file names, and the scale each implies.

The layouts understood here:

* raw ``get_peft_model_state_dict(unet)``: ``down_blocks.0....to_q.lora_A.weight``;
* diffusers ``save_lora_weights`` / ``unet.save_lora_adapter``: the same with a ``unet.`` prefix, and the
  LoRA config in the safetensors metadata under ``lora_adapter_metadata``;
* peft ``save_pretrained`` folders: ``base_model.model.`` prefix and ``adapter_config.json`` beside it;
* the older diffusers attention-processor layout: ``...to_q.lora.down.weight`` / ``lora.up.weight``;
* kohya / A1111 files: ``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` with ``.alpha`` tensors.

An expert's scale is computed the way diffusers computes it when loading the same file: α/r from the
stored config (``alpha_pattern``/``rank_pattern`` per layer, α/√r with rsLoRA), else the file's
``.alpha`` tensors, else 1.0 (diffusers' default: α = r). Wrapping a UNet with them is :mod:`mole.inject`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mole.layers import ExpertWeights

logger = logging.getLogger(__name__)

#: The file names an expert folder may hold (diffusers' ``save_lora_weights``, peft's ``save_pretrained``).
_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_UNET_PREFIXES = ("unet.", "base_model.model.", "model.")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


class ExpertError(ValueError):
    """An expert file is missing, unreadable, or does not fit the UNet."""


@dataclass
class Expert:
    """A LoRA expert read from disk: per-layer (A, B, scale), keyed by UNet module name.

    Attributes:
        name: The expert's name (``face``, ``hand``...), used as its gate column label.
        layers: ``{module_name: ExpertWeights}``.
        source: The file it was read from.
        config: The LoRA config found with the file (empty when none was stored).
        ignored: Keys present in the file but not used, with the reason (reported, never silent).
    """

    name: str
    layers: dict[str, ExpertWeights]
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)


def _resolve_weight_file(path: Path) -> Path:
    if path.is_dir():
        for candidate in _WEIGHT_FILES:
            if (path / candidate).is_file():
                return path / candidate
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise ExpertError(f"no LoRA weights in {path}: expected one of {_WEIGHT_FILES} or a single *.safetensors file")
    if not path.is_file():
        raise ExpertError(f"expert file not found: {path}")
    if path.suffix != ".safetensors":
        raise ExpertError(f"expert {path} is not a .safetensors file (pickled .bin files are not loaded)")
    return path


def _read_lora_config(weight_file: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The LoRA config stored with a file: safetensors metadata first, then adapter_config.json beside it."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ExpertError(f"{weight_file}: lora_adapter_metadata is not valid JSON ({err})") from err
        # Pipeline-level saves prefix every key with the component name ("unet.r").
        if any(k.startswith("unet.") for k in meta):
            meta = {k[len("unet.") :]: v for k, v in meta.items() if k.startswith("unet.")}
        return meta
    sidecar = weight_file.parent / "adapter_config.json"
    if sidecar.is_file():
        return json.loads(sidecar.read_text(encoding="utf-8"))
    return {}


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches the module name or a suffix of it."""
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


def _split_key(key: str) -> tuple[str, str] | None:
    """``...to_q.lora_A[.adapter].weight`` → (module, "down"|"up"); None for a non-LoRA key."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    kind = "down" if re.search(r"\.(lora_A|lora\.down|lora_down)(\.|$)", key[len(m["module"]) :]) else "up"
    return m["module"], kind


def load_expert(
    path: str | os.PathLike[str],
    name: str,
    module_names: Iterable[str] | None = None,
) -> Expert:
    """Read a LoRA expert from a safetensors file or a folder holding one.

    Args:
        path: File, or a folder with ``pytorch_lora_weights.safetensors`` (diffusers) or
            ``adapter_model.safetensors`` + ``adapter_config.json`` (peft).
        name: The expert's name.
        module_names: The UNet's module names; needed only to decode kohya-style keys, whose
            underscores are ambiguous without them.

    Raises:
        ExpertError: File missing, not safetensors, no UNet LoRA layers, or a layer with only A or B.
    """
    weight_file = _resolve_weight_file(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weight_file), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                tensors[key] = f.get_tensor(key)
    except (OSError, ValueError, RuntimeError) as err:  # safetensors raises SafetensorError(Exception)
        raise ExpertError(f"cannot read expert {weight_file}: {err}") from err
    except Exception as err:
        raise ExpertError(f"cannot read expert {weight_file}: {err}") from err
    config = _read_lora_config(weight_file, metadata)
    if config.get("use_dora"):
        raise ExpertError(f"{weight_file}: DoRA experts are not supported (use_dora=true in its LoRA config)")

    kohya_lookup = {n.replace(".", "_"): n for n in module_names} if module_names is not None else {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    ignored: dict[str, str] = {}
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_PREFIXES):
            ignored[key] = "text-encoder LoRA (MoLE experts live on the UNet only)"
            continue
        stripped = key
        for prefix in _UNET_PREFIXES:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
                break
        if stripped.startswith("lora_unet_"):  # kohya: lora_unet_<module_with_underscores>.<part>
            flat, _, rest = stripped[len("lora_unet_") :].partition(".")
            if flat not in kohya_lookup:
                ignored[key] = (
                    "kohya key with no matching UNet module"
                    if kohya_lookup
                    else ("kohya key (pass the UNet's module names to decode it)")
                )
                continue
            stripped = f"{kohya_lookup[flat]}.{rest}"
        if stripped.endswith(".alpha"):
            alphas[stripped[: -len(".alpha")]] = float(tensor.float().item())
            continue
        parsed = _split_key(stripped)
        if parsed is None:
            ignored[key] = "not a LoRA A/B weight (bias, magnitude or unknown tensor)"
            continue
        module, kind = parsed
        pairs.setdefault(module, {})[kind] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise ExpertError(f"expert {name!r} ({weight_file}): layer {module} has only {sorted(pair)} weights")
    if not pairs:
        raise ExpertError(f"expert {name!r} ({weight_file}) holds no UNet LoRA layers")

    r_default = config.get("r")
    alpha_default = config.get("lora_alpha")
    rslora = bool(config.get("use_rslora", False))
    layers: dict[str, ExpertWeights] = {}
    for module, pair in sorted(pairs.items()):
        rank = int(pair["down"].shape[0])
        if config:
            r = int(_pattern_value(config.get("rank_pattern"), module, r_default or rank))
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha_default or r))
            if r != rank:
                raise ExpertError(f"expert {name!r}: layer {module} has rank {rank} but its config says r={r}")
        else:
            alpha = alphas.get(module, float(rank))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        layers[module] = ExpertWeights(down=pair["down"], up=pair["up"], scale=scale)
    if ignored:
        reasons: dict[str, int] = {}
        for reason in ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        logger.warning("expert %r: %d keys of %s not used: %s", name, len(ignored), weight_file, reasons)
    return Expert(name=name, layers=layers, source=str(weight_file), config=config, ignored=ignored)
