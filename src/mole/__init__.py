"""MoLE: Mixture of Low-rank Experts for human-centric Stable Diffusion.

The public entry point is :func:`apply_mole`, which wraps a diffusers UNet's linear layers with MoLE
layers (frozen base + frozen LoRA experts + learned local/global sigmoid gates).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "apply_mole", "load_gates", "save_gates"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import mole.data` or `mole --help` do not pay for importing torch and diffusers.
    homes = {"apply_mole": "mole.inject", "load_gates": "mole.gates_io", "save_gates": "mole.gates_io"}
    if name in homes:
        import importlib

        return getattr(importlib.import_module(homes[name]), name)
    raise AttributeError(f"module 'mole' has no attribute {name!r}")
