"""The gates file format (``mole-gates/1``) and the typed settings of a mixture.

A gates file is a safetensors file of the ``mole_*`` tensors, its settings (:class:`MoleSettings`) in its
metadata and beside it as JSON (``gates.json``). The same frozen settings object is what :func:`mole.inject.
apply_mole` attaches to the UNet (``unet.mole_settings``), what training writes, the registry logs and serving
reads: one typed description of a mixture instead of a dict each reader spells its own way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mole import atomic
from mole.layers import MOLE_PREFIX

logger = logging.getLogger(__name__)

GATES_FORMAT = "mole-gates/1"


@dataclass(frozen=True)
class MoleSettings:
    """What defines a trained mixture besides its tensors; frozen, so no reader can change it under another."""

    gate: str
    """``local``, ``global``, ``both`` or ``none`` (:data:`mole.layers.GATE_MODES`)."""
    experts: tuple[str, ...]
    """Expert names in gate order (the gate columns)."""
    target_modules: tuple[str, ...]
    """The wrapped layers, by UNet module name."""
    init_bias: float = 0.0
    """The gates' initial bias (recorded for reproducibility)."""
    condition: str = "none"
    """``none`` or ``timestep`` (:data:`mole.timestep.CONDITIONS`); files from before conditions say nothing."""

    def to_json(self) -> dict[str, Any]:
        """The JSON the gates file stores (its keys and order are the format)."""
        return {"format": GATES_FORMAT, "gate": self.gate, "condition": self.condition,
                "experts": list(self.experts), "target_modules": list(self.target_modules),
                "init_bias": self.init_bias}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "gates settings") -> MoleSettings:
        """Parse the stored JSON.

        Raises:
            ValueError: Another format, or a missing field (named).
        """
        if data.get("format") != GATES_FORMAT:
            raise ValueError(f"{source}: unsupported gates format {data.get('format')!r}, expected {GATES_FORMAT}")
        try:
            return cls(gate=str(data["gate"]), experts=tuple(data["experts"]),
                       target_modules=tuple(data["target_modules"]), init_bias=float(data.get("init_bias", 0.0)),
                       condition=str(data.get("condition", "none")))  # fmt: skip
        except KeyError as err:
            raise ValueError(f"{source}: no {err.args[0]!r} in the gates settings") from None


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
    settings = getattr(unet, "mole_settings", None)
    if settings is None:
        raise ValueError("this model has no MoLE layers (call apply_mole first)")
    return write_gates(gate_state_dict(unet), settings, path)


def write_gates(tensors: Mapping[str, torch.Tensor], settings: MoleSettings, path: str | os.PathLike[str]) -> Path:
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
    stored = settings.to_json()
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic.replace_together(_sidecar(path), path) as (settings_tmp, weights_tmp):
        settings_tmp.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
        save_file(cpu, str(weights_tmp), metadata={"mole": json.dumps(stored)})
    return path


def read_gate_settings(path: str | os.PathLike[str]) -> MoleSettings:
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
    return MoleSettings.from_json(embedded if embedded is not None else from_sidecar, str(path))


def load_gates(unet: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load gate weights into a UNet that :func:`apply_mole` wrapped with the same settings.

    Raises:
        ValueError: The gate mode or the expert order differs, or tensors are missing or unexpected.
    """
    own_settings = getattr(unet, "mole_settings", None)
    if own_settings is None:
        raise ValueError("this model has no MoLE layers (call apply_mole before load_gates)")
    settings = read_gate_settings(path)
    for key in ("gate", "condition", "experts"):
        theirs, ours = getattr(settings, key), getattr(own_settings, key)
        if theirs != ours:
            shown = (list(theirs), list(ours)) if key == "experts" else (theirs, ours)
            raise ValueError(f"gates file {path} has {key}={shown[0]!r}, this model has {shown[1]!r}")
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
