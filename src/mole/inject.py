"""Put MoLE layers into a UNet; load experts; save and load gates; record gate values.

Experts are LoRA files as peft and diffusers write them. The layouts understood here:

* raw ``get_peft_model_state_dict(unet)``: ``down_blocks.0....to_q.lora_A.weight``;
* diffusers ``save_lora_weights`` / ``unet.save_lora_adapter``: the same with a ``unet.`` prefix, and the
  LoRA config in the safetensors metadata under ``lora_adapter_metadata``;
* peft ``save_pretrained`` folders: ``base_model.model.`` prefix and ``adapter_config.json`` beside it;
* the older diffusers attention-processor layout: ``...to_q.lora.down.weight`` / ``lora.up.weight``;
* kohya / A1111 files: ``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` with ``.alpha`` tensors.

An expert's scale is computed the way diffusers computes it when loading the same file: α/r from the
stored config (``alpha_pattern``/``rank_pattern`` per layer, α/√r with rsLoRA), else the file's
``.alpha`` tensors, else 1.0 (diffusers' default: α = r).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mole import atomic
from mole.layers import GATE_MODES, MOLE_PREFIX, RUN_MODES, ExpertWeights, GateMode, MoLELayer
from mole.security import check_name
from mole.timestep import CONDITIONS, attach_timestep, detach_timestep, time_embedding_dim

logger = logging.getLogger(__name__)

GATES_FORMAT = "mole-gates/1"
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


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches names or suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def mole_layers(model: nn.Module) -> dict[str, MoLELayer]:
    """All MoLE layers of a model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLELayer)}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_mole(
    unet: nn.Module,
    experts: Mapping[str, str | os.PathLike[str] | Expert],
    gate: GateMode = "both",
    target_modules: str | Sequence[str] | None = None,
    *,
    init_bias: float = 0.0,
    expert_weights: Mapping[str, float] | None = None,
    condition: str = "none",
) -> nn.Module:
    """Wrap a UNet's linear layers and 1×1 convs with MoLE layers, in place.

    The whole UNet is frozen first; the only trainable parameters afterwards are the gates (``mole_*``).

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (any ``nn.Module`` works).
        experts: ``{name: path-or-Expert}``, in gate order (the order of the gate columns).
        gate: ``both`` (the paper), ``local``, ``global``, or ``none`` for fixed ``expert_weights``.
        target_modules: Restrict wrapping to these modules (peft semantics: a regex string, or a list of
            names/suffixes). Default: every layer that any expert touches.
        init_bias: Initial gate bias (see :class:`mole.layers.MoLELayer`).
        expert_weights: Fixed weights per expert name for ``gate="none"`` (default 1.0 each).
        condition: ``none`` (the paper) or ``timestep``: the gate logits also get a learned, zero-initialised
            projection of the UNet's timestep embedding (:mod:`mole.timestep`).

    Returns:
        The same ``unet``.

    Raises:
        ExpertError: An expert names a layer the UNet lacks, a layer that is neither ``nn.Linear`` nor a
            1×1 conv, or has shapes that do not fit.
        ValueError: Bad gate mode, no experts, or a UNet that already has MoLE layers.
    """
    if not experts:
        raise ValueError("apply_mole needs at least one expert")
    for name in experts:
        check_name(name)  # also guards names read from a gates file or the registry
    if gate not in GATE_MODES:
        raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "timestep" and gate == "none":
        raise ValueError("condition='timestep' conditions learned gates; gate='none' has none")
    time_dim = time_embedding_dim(unet) if condition == "timestep" else None
    if mole_layers(unet):
        raise ValueError("this UNet already has MoLE layers; build a fresh one to apply a new mixture")
    unknown_weights = set(expert_weights or {}) - set(experts)
    if unknown_weights:
        raise ValueError(f"expert_weights names unknown experts {sorted(unknown_weights)}; experts: {list(experts)}")

    modules = dict(unet.named_modules())
    loaded: list[Expert] = []
    for name, source in experts.items():
        if isinstance(source, Expert):
            loaded.append(source)
        else:
            loaded.append(load_expert(source, name, module_names=modules.keys()))
    names = list(experts)

    for expert in loaded:
        for layer in expert.layers:
            if layer not in modules:
                raise ExpertError(
                    f"expert {expert.name!r} ({expert.source}) has a layer {layer!r} that this UNet does not "
                    "have - was it trained on a different architecture?"
                )
            mod = modules[layer]
            if not (isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1))):
                raise ExpertError(
                    f"expert {expert.name!r}: layer {layer!r} is a {type(mod).__name__}"
                    f"{getattr(mod, 'kernel_size', '')}; MoLE mixes experts on nn.Linear and 1×1 Conv2d only"
                )

    touched = sorted({layer for e in loaded for layer in e.layers})
    targets = [t for t in touched if target_modules is None or _matches(t, target_modules)]
    if target_modules is not None:
        skipped = len(touched) - len(targets)
        if skipped:
            logger.info("%d expert layers are outside target_modules and stay un-mixed", skipped)
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} matches none of the {len(touched)} expert layers")

    weights = [float((expert_weights or {}).get(n, 1.0)) for n in names]
    wrapped: dict[str, MoLELayer] = {}
    for layer_name in targets:  # build every layer first: a bad expert leaves the UNet untouched
        try:
            wrapped[layer_name] = MoLELayer(
                modules[layer_name],
                [e.layers.get(layer_name) for e in loaded],
                names,
                gate=gate,
                init_bias=init_bias,
                expert_weights=weights,
                time_dim=time_dim,
            )
        except (ValueError, TypeError) as err:
            raise ExpertError(f"layer {layer_name!r}: {err}") from err
    for param in unet.parameters():
        param.requires_grad_(False)
    for layer_name, layer in wrapped.items():
        _set_submodule(unet, layer_name, layer)
    if time_dim is not None:
        attach_timestep(unet, list(wrapped.values()))
    unet.mole_config = {  # read by save_gates; a plain attribute, invisible to state_dict
        "gate": gate,
        "condition": condition,
        "experts": names,
        "target_modules": targets,
        "init_bias": init_bias,
        "expert_sources": {e.name: e.source for e in loaded},
    }
    logger.info("MoLE: %d layers wrapped, experts %s, gate=%s, condition=%s", len(targets), names, gate, condition)
    return unet


def remove_mole(unet: nn.Module) -> nn.Module:
    """Undo :func:`apply_mole`: put every base layer back. Parameters stay frozen."""
    detach_timestep(unet, list(mole_layers(unet).values()))
    for name, layer in mole_layers(unet).items():
        _set_submodule(unet, name, layer.base_layer)
    if hasattr(unet, "mole_config"):
        del unet.mole_config
    return unet


def gate_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``mole_*`` tensor of the model, by full parameter name."""
    return {
        name: p.detach().contiguous()
        for name, p in unet.named_parameters()
        if any(part.startswith(MOLE_PREFIX) for part in name.split("."))
    }


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_gates(unet: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the gates: ``path`` (safetensors, the ``mole_*`` tensors) and ``path`` with ``.json`` (settings).

    The settings (gate mode, expert order, wrapped layers) are also stored in the safetensors metadata, so
    the weights file alone is enough to rebuild the mixture.
    """
    config = getattr(unet, "mole_config", None)
    if config is None:
        raise ValueError("this model has no MoLE layers (call apply_mole first)")
    return write_gates(gate_state_dict(unet), config, path)


def write_gates(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write gate tensors (``{param_name: tensor}``) with their settings, the two files committed together.

    Both are written in full under temporary names, then the JSON settings are renamed into place and the
    weights last: the weights file, which carries the same settings in its metadata, is the commit point, and
    :func:`read_gate_settings` trusts it over a sidecar that disagrees (a write interrupted between the renames).

    Separate from :func:`save_gates` because distributed training gathers the tensors itself (ZeRO-3
    partitions parameters, so ``named_parameters`` would hold only this process's shard).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    settings = {
        "format": GATES_FORMAT,
        "gate": config["gate"],
        "condition": config.get("condition", "none"),
        "experts": config["experts"],
        "target_modules": config["target_modules"],
        "init_bias": config["init_bias"],
    }
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic.replace_together(_sidecar(path), path) as (settings_tmp, weights_tmp):
        settings_tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        save_file(cpu, str(weights_tmp), metadata={"mole": json.dumps(settings)})
    return path


def read_gate_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a gates file: those in its safetensors metadata (written with the weights, in one file),
    else its JSON sidecar (gates files written by other tools may carry no metadata). A sidecar that disagrees
    with the metadata is stale (a write interrupted between its two renames): the metadata wins, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gates file not found: {path}")
    sidecar = _sidecar(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("mole")
    embedded = json.loads(raw) if raw is not None else None
    from_sidecar = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
    if embedded is None and from_sidecar is None:
        raise ValueError(f"{path} is not a MoLE gates file (no {sidecar.name} and no 'mole' metadata)")
    if embedded is not None and from_sidecar is not None and embedded != from_sidecar:
        logger.warning("%s disagrees with the settings inside %s (an interrupted write?): using the latter",
                       sidecar, path)  # fmt: skip
    settings = embedded if embedded is not None else from_sidecar
    if settings.get("format") != GATES_FORMAT:
        raise ValueError(f"{path}: unsupported gates format {settings.get('format')!r}, expected {GATES_FORMAT}")
    return settings


def load_gates(unet: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load gate weights into a UNet that :func:`apply_mole` wrapped with the same settings.

    Raises:
        ValueError: The gate mode or the expert order differs, or tensors are missing or unexpected.
    """
    config = getattr(unet, "mole_config", None)
    if config is None:
        raise ValueError("this model has no MoLE layers (call apply_mole before load_gates)")
    settings = {"condition": "none", **read_gate_settings(path)}  # files from before conditions: "none"
    for key in ("gate", "condition", "experts"):
        if settings[key] != config.get(key, "none"):
            raise ValueError(f"gates file {path} has {key}={settings[key]!r}, this model has {config.get(key)!r}")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = gate_state_dict(unet)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"gates file {path} does not match this model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return unet


def apply_mole_from_gates(
    unet: nn.Module, experts: Mapping[str, str | os.PathLike[str] | Expert], gates: str | os.PathLike[str]
) -> nn.Module:
    """Rebuild a trained mixture: the gate mode and condition, layers and expert order come from the gates file."""
    settings = read_gate_settings(gates)
    if set(experts) != set(settings["experts"]):
        raise ValueError(f"gates {gates} were trained with experts {settings['experts']}, got {sorted(experts)}")
    ordered = {n: experts[n] for n in settings["experts"]}
    apply_mole(unet, ordered, gate=settings["gate"], target_modules=settings["target_modules"],
               condition=settings.get("condition", "none"))  # fmt: skip
    return load_gates(unet, gates)


@dataclass
class GateTrace:
    """Gate values recorded over UNet calls (one entry per call, i.e. per denoising step under CFG).

    Attributes:
        experts: Expert names (the last axis of every array).
        local: Per call, the mean local score per expert over all layers, tokens and samples: ``[N]``.
        global_: Per call, the mean global score per expert over all layers and samples: ``[N]``.
        per_layer_global: Per call, ``{layer: [B, N]}`` global scores (for per-layer plots).
    """

    experts: list[str]
    local: list[list[float]] = field(default_factory=list)
    global_: list[list[float]] = field(default_factory=list)
    per_layer_global: list[dict[str, list[list[float]]]] = field(default_factory=list)


@contextmanager
def record_gates(unet: nn.Module) -> Iterator[GateTrace]:
    """Record gate values of every UNet forward inside the block (and pay nothing outside it)."""
    layers = mole_layers(unet)
    if not layers:
        raise ValueError("this model has no MoLE layers to record")
    trace = GateTrace(experts=next(iter(layers.values())).expert_names)

    def _after_forward(_module: nn.Module, _args: Any, _output: Any) -> None:
        local = [m.last_local.float().flatten(0, -2).mean(0) for m in layers.values() if m.last_local is not None]
        glob = {n: m.last_global.float() for n, m in layers.items() if m.last_global is not None}
        if local:
            trace.local.append(torch.stack(local).mean(0).tolist())
        if glob:
            trace.global_.append(torch.stack([g.mean(0) for g in glob.values()]).mean(0).tolist())
            trace.per_layer_global.append({n: g.tolist() for n, g in glob.items()})
        for m in layers.values():
            m.last_local = m.last_global = None

    for m in layers.values():
        m.record_gates = True
    handle = unet.register_forward_hook(_after_forward)
    try:
        yield trace
    finally:
        handle.remove()
        for m in layers.values():
            m.record_gates = False
            m.last_local = m.last_global = None


def set_mole_mode(unet: nn.Module, mode: str) -> str:
    """Run every MoLE layer of ``unet`` as ``mole``, ``experts`` or ``base`` (:data:`mole.layers.RUN_MODES`).

    One loaded model then serves the paper's three comparison rows without reloading: ``base`` (no expert
    contribution), ``experts`` (each expert at weight 1, gates bypassed) and ``mole`` (the learned gates).

    Returns:
        The mode the layers were in before (the first layer's), so that a caller can put it back.
    """
    if mode not in RUN_MODES:
        raise ValueError(f"mode must be one of {RUN_MODES}, got {mode!r}")
    layers = mole_layers(unet)
    if not layers and mode != "base":
        raise ValueError(f"mode {mode!r} needs MoLE layers; this model has none (only 'base' runs)")
    previous = next(iter(layers.values())).mode if layers else "base"
    for layer in layers.values():
        layer.mode = mode
    return previous


@contextmanager
def mole_mode(unet: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Inside the block every MoLE layer of ``unet`` runs in ``mode``; the previous mode comes back after it.

    The mode is state of the shared layers: do not run two modes on one UNet from two threads at once.
    """
    previous = set_mole_mode(unet, mode)
    try:
        yield unet
    finally:
        if mole_layers(unet):
            set_mole_mode(unet, previous)
