"""Timestep-aware gates: bring the UNet's timestep embedding to its MoLE layers without touching diffusers.

The paper's gates see only the features (§3.2), yet its figure 7 shows them drifting over the denoising steps;
Face-MoGLE's gates are told the step. With ``condition="timestep"`` every MoLE layer gets ``mole_time``, a
zero-initialised ``Linear(emb_dim, k·N)`` of the UNet's timestep embedding ``emb`` (the output of
``unet.time_embedding``, ``[B, 4·block_out_channels[0]]``) added to its local and global gate logits.

Diffusers' UNet does not pass ``emb`` to the attention layers, so it travels through a :class:`TimestepContext`
shared by the UNet's MoLE layers: a forward pre-hook on the UNet clears it, a forward hook on
``unet.time_embedding`` stores ``emb`` (computed before any block runs), and the layers read it. Because it hooks
the UNet's own forward it works for training and for generation with any scheduler, and under classifier-free
guidance (``emb`` is per sample, so the doubled batch carries its own rows).

The embedding is kept per thread, so that the service's worker threads sharing one UNet each see their own.
A thread that has not run the UNet forward itself (autograd's, when gradient checkpointing recomputes a block
in the backward pass on a GPU) sees the embedding last set in any thread: right for training, which runs one
forward at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: The gate conditions: ``none`` (the paper) or ``timestep``.
CONDITIONS: tuple[str, ...] = ("none", "timestep")


class TimestepContext:
    """The timestep embedding of the UNet forward in progress, per thread (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._last: torch.Tensor | None = None

    def embedding(self) -> torch.Tensor | None:
        """``[B, emb_dim]`` of this thread's running UNet forward (else the last one set), or None."""
        emb = getattr(self._local, "emb", None)
        return emb if emb is not None else self._last

    def set(self, emb: torch.Tensor | None) -> None:
        self._local.emb = emb
        self._last = emb

    def clear(self) -> None:
        """Forget this thread's embedding (called at the start of every UNet forward)."""
        self._local.emb = None

    # Hooks as bound methods: a deep copy of the UNet copies them with their context, and the copied layers
    # point at that same copy (deepcopy's memo), so a copied UNet conditions on its own forwards.
    def _before_unet(self, _module: nn.Module, _args: Any) -> None:
        self.clear()

    def _after_time_embedding(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        self.set(output)

    def __deepcopy__(self, memo: dict[int, Any]) -> TimestepContext:
        return TimestepContext()  # the state is per forward: a copy starts empty

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, _state: dict[str, Any]) -> None:
        self.__init__()


def time_embedding_dim(unet: nn.Module) -> int:
    """Width of ``unet.time_embedding``'s output (``4·block_out_channels[0]`` for SD 1.x/2.x UNets).

    Raises:
        ValueError: The model has no diffusers-style ``time_embedding`` with a ``linear_2`` output layer.
    """
    module = getattr(unet, "time_embedding", None)
    out = getattr(module, "linear_2", None)
    if not isinstance(out, nn.Linear):
        raise ValueError(
            "condition='timestep' needs a diffusers UNet with a time_embedding module (TimestepEmbedding); "
            f"{type(unet).__name__} has none"
        )
    return int(out.out_features)


def attach_timestep(unet: nn.Module, layers: Iterator[nn.Module] | list[nn.Module]) -> TimestepContext:
    """Hook ``unet`` so that ``layers`` (MoLE layers with ``mole_time``) read each forward's timestep embedding.

    The hook handles are kept on the UNet (``unet._mole_timestep_hooks``) for :func:`detach_timestep`.
    """
    if getattr(unet, "_mole_timestep_hooks", None):
        raise ValueError("this UNet already has timestep hooks")
    time_embedding_dim(unet)
    context = TimestepContext()
    handles = [
        unet.register_forward_pre_hook(context._before_unet),
        unet.time_embedding.register_forward_hook(context._after_time_embedding),
    ]
    for layer in layers:
        layer.time_context = context
    unet._mole_timestep_hooks = handles
    return context


def detach_timestep(unet: nn.Module, layers: Iterator[nn.Module] | list[nn.Module]) -> None:
    """Undo :func:`attach_timestep` (a no-op on a UNet without the hooks)."""
    for handle in getattr(unet, "_mole_timestep_hooks", None) or []:
        handle.remove()
    if hasattr(unet, "_mole_timestep_hooks"):
        del unet._mole_timestep_hooks
    for layer in layers:
        layer.time_context = None


@contextmanager
def timestep_embedding(layers: Iterator[nn.Module] | list[nn.Module], emb: torch.Tensor) -> Iterator[None]:
    """Run MoLE layers outside a UNet forward with a given timestep embedding ``[B, emb_dim]`` (tests, tools)."""
    layers = list(layers)
    previous = [layer.time_context for layer in layers]
    context = TimestepContext()
    context.set(emb)
    for layer in layers:
        layer.time_context = context
    try:
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.time_context = old
