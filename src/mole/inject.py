"""Put MoLE layers into a UNet, switch their run modes, record gate values; rebuild a mixture from its gates.

Split the way peft splits a tuner: the layer math is :mod:`mole.layers`, reading expert LoRA files (every key
layout, their file names) is :mod:`mole.experts`, the gates file and the mixture's typed settings are
:mod:`mole.gates_io`. This module wraps: it attaches the settings to the UNet as ``unet.mole_settings``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mole.experts import Expert, ExpertError, load_expert
from mole.gates_io import MoleSettings, load_gates, read_gate_settings
from mole.layers import GATE_MODES, RUN_MODES, GateMode, MoLELayer
from mole.security import check_name
from mole.timestep import CONDITIONS, attach_timestep, detach_timestep, time_embedding_dim

logger = logging.getLogger(__name__)


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
    # A plain attribute, invisible to state_dict: what save_gates writes, training registers and serving reads.
    unet.mole_settings = MoleSettings(gate=gate, experts=tuple(names), target_modules=tuple(targets),
                                      init_bias=float(init_bias), condition=condition)  # fmt: skip
    logger.info("MoLE: %d layers wrapped, experts %s, gate=%s, condition=%s", len(targets), names, gate, condition)
    return unet


def remove_mole(unet: nn.Module) -> nn.Module:
    """Undo :func:`apply_mole`: put every base layer back. Parameters stay frozen."""
    detach_timestep(unet, list(mole_layers(unet).values()))
    for name, layer in mole_layers(unet).items():
        _set_submodule(unet, name, layer.base_layer)
    if hasattr(unet, "mole_settings"):
        del unet.mole_settings
    return unet


def apply_mole_from_gates(
    unet: nn.Module, experts: Mapping[str, str | os.PathLike[str] | Expert], gates: str | os.PathLike[str]
) -> nn.Module:
    """Rebuild a trained mixture: the gate mode and condition, layers and expert order come from the gates file."""
    settings = read_gate_settings(gates)
    if set(experts) != set(settings.experts):
        raise ValueError(f"gates {gates} were trained with experts {list(settings.experts)}, got {sorted(experts)}")
    ordered = {n: experts[n] for n in settings.experts}
    apply_mole(unet, ordered, gate=settings.gate, target_modules=list(settings.target_modules),
               condition=settings.condition)  # fmt: skip
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
