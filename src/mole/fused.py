"""The kernels of a MoLE layer's forward: one projection of X for the experts and both gates, the token pool of
the global gate, and the up-projection accumulated into the base output.

Kept apart from :mod:`mole.layers` (which decides what to compute) because these functions are the place a
faster kernel plugs in, and because the projection has its own autograd rule:

* :func:`project` computes ``Y = X·Sᵀ + b`` with S the layer's stacked down-projection ``[A₁; …; A_N; φ; ω]``
  (``[K, d]``, K = R + 2N) and b its stacked bias ``[0…0, b_φ, b_ω]``, in one GEMM whatever the number of experts:
  X is read once for the experts and both gates.
* When gradients are recorded (gates training), :class:`GatedProjection` computes the same Y from the same cached
  S, and gives back gradients for X and for the gate rows only (φ, ω and their biases): the experts are frozen, so
  their rows never get a gradient, and S is never rebuilt by a concatenation that autograd would have to track.
* :func:`pool_tokens` is Pool(·) of eq. 6 as one small batched GEMM with a ``1/T`` vector (``Pool(X)·ω =
  Pool(X·ω)`` because Pool is a mean and the product is linear), instead of a reduction that CPU torch runs as
  five ops.
* :func:`accumulate` adds ``H'·B'ᵀ`` into the base output with one ``addmm``/``baddbmm`` (in place when no
  gradient is recorded).

Layouts: features last, X ``[B, T, d]`` → Y ``[B, T, K]``; channels first (a 1×1 conv's NCHW input viewed as
``[B, d, T]``) → Y ``[B, K, T]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# 1/T vectors for the token pool, by (T, dtype, device, layout): built once, shared by every layer.
_POOL_VECTORS: dict[tuple[int, torch.dtype, torch.device, bool], torch.Tensor] = {}


def project(feats: torch.Tensor, stack: torch.Tensor, bias: torch.Tensor | None, channels_first: bool) -> torch.Tensor:
    """``X·Sᵀ + b``: ``[B, T, d] -> [B, T, K]`` or ``[B, d, T] -> [B, K, T]``, one GEMM.

    Args:
        feats: X in either layout (features last may be any contiguous-reshapable ``[B, T, d]``).
        stack: S, ``[K, d]``.
        bias: ``[K]`` or None.
        channels_first: The layout of ``feats`` and of the result.
    """
    return _shaped(_gemm(feats, stack, bias, channels_first), feats.shape[0], channels_first)


def _gemm(feats: torch.Tensor, stack: torch.Tensor, bias: torch.Tensor | None, channels_first: bool) -> torch.Tensor:
    """The GEMM of :func:`project`, its result not yet viewed as ``[B, T, K]`` / ``[B, K, T]``."""
    batch = feats.shape[0]
    if channels_first:
        if batch == 1:  # one [K, d] @ [d, T]
            return torch.addmm(bias[:, None], stack, feats[0]) if bias is not None else torch.mm(stack, feats[0])
        weights = stack.expand(batch, -1, -1)
        return torch.baddbmm(bias[None, :, None], weights, feats) if bias is not None else torch.bmm(weights, feats)
    flat = feats.reshape(-1, feats.shape[-1])  # [B·T, d]
    return torch.addmm(bias, flat, stack.t()) if bias is not None else torch.mm(flat, stack.t())


def _shaped(raw: torch.Tensor, batch: int, channels_first: bool) -> torch.Tensor:
    if channels_first:
        return raw.unsqueeze(0) if raw.dim() == 2 else raw
    return raw.view(batch, -1, raw.shape[-1])


class GatedProjection(torch.autograd.Function):
    """:func:`project` with gradients for X and the gate rows of S only (gates training).

    The forward reads S and b as cached by the layer (their gate rows refreshed from the gate parameters just
    before, see :meth:`mole.layers.MoLELayer.forward`); the gate parameters are passed too, only so that autograd
    routes their gradients: ``∂L/∂φ = (∂L/∂Y_φ)ᵀ·X``, ``∂L/∂b_φ = Σ ∂L/∂Y_φ``, likewise for ω; ``∂L/∂X = ∂L/∂Y·S``.

    S is kept on the context without ``save_for_backward``: the layer refreshes its gate rows in place in every
    forward, with the same values until the optimizer steps, which happens after the backward.
    """

    @staticmethod
    def forward(ctx, feats, stack, bias, channels_first, row_starts, block, *gate_params):
        ctx.stack, ctx.channels_first, ctx.row_starts, ctx.block = stack, channels_first, row_starts, block
        ctx.save_for_backward(feats)
        # Not a view: the layer may shift the gate logits in place (timestep gates), which autograd forbids on a
        # view made inside a custom Function.
        return _gemm(feats, stack, bias, channels_first)

    @staticmethod
    def backward(ctx, grad):
        (feats,) = ctx.saved_tensors
        stack, channels_first = ctx.stack, ctx.channels_first
        dtype = stack.dtype  # compute in the weights' dtype (autocast may have made Y another)
        grad, x = _shaped(grad, feats.shape[0], channels_first).to(dtype), feats.to(dtype)
        grad_feats = None
        if ctx.needs_input_grad[0]:
            if channels_first:
                grad_feats = torch.matmul(stack.t(), grad)  # [d, K] @ [B, K, T] -> [B, d, T]
            else:
                grad_feats = torch.mm(grad.reshape(-1, grad.shape[-1]), stack).view(feats.shape)
            grad_feats = grad_feats.to(feats.dtype)
        gate_grads: list[torch.Tensor | None] = []
        params = ctx.needs_input_grad[6:]
        for k, start in enumerate(ctx.row_starts):
            w_needed, b_needed = params[2 * k], params[2 * k + 1]
            if not (w_needed or b_needed):
                gate_grads += [None, None]
                continue
            if channels_first:
                rows = grad.narrow(1, start, ctx.block)  # [B, n, T]
                gw = torch.matmul(rows, x.transpose(1, 2)).sum(0) if w_needed else None  # [n, d]
                gb = rows.sum((0, 2)) if b_needed else None
            else:
                rows = grad.reshape(-1, grad.shape[-1]).narrow(1, start, ctx.block)  # [B·T, n]
                gw = torch.mm(rows.t(), x.reshape(-1, x.shape[-1])) if w_needed else None
                gb = rows.sum(0) if b_needed else None
            gate_grads += [gw, gb]
        return (grad_feats, None, None, None, None, None, *gate_grads)


def gated_project(
    feats: torch.Tensor,
    stack: torch.Tensor,
    bias: torch.Tensor,
    channels_first: bool,
    row_starts: Sequence[int],
    block: int,
    gate_params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """:func:`project` through :class:`GatedProjection`.

    Args:
        row_starts: First row in S of each gate block (φ's, then ω's), ``block`` rows each.
        gate_params: Weight and bias of each block, in the same order.
    """
    raw = GatedProjection.apply(feats, stack, bias, channels_first, tuple(row_starts), block, *gate_params)
    return _shaped(raw, feats.shape[0], channels_first)


def pool_tokens(logits: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Mean over tokens as one batched GEMM: ``[B, T, n] -> [B, 1, n]`` or ``[B, n, T] -> [B, n, 1]``.

    A strided slice of Y is fine (its last axis is contiguous, which the GEMM reads with a leading dimension).
    """
    tokens = logits.shape[-1] if channels_first else logits.shape[-2]
    if tokens == 1:
        return logits
    shape = (tokens, 1) if channels_first else (1, tokens)
    if torch.compiler.is_compiling():  # a constant of the graph
        vector = torch.full(shape, 1.0 / tokens, dtype=logits.dtype, device=logits.device)
    else:
        key = (tokens, logits.dtype, logits.device, channels_first)
        vector = _POOL_VECTORS.get(key)
        if vector is None:
            with torch.inference_mode(False):  # a normal tensor, usable with and without autograd
                vector = torch.full(shape, 1.0 / tokens, dtype=logits.dtype, device=logits.device)
            _POOL_VECTORS[key] = vector
    return torch.matmul(logits, vector) if channels_first else torch.matmul(vector, logits)


def accumulate(
    hidden: torch.Tensor, up: torch.Tensor, out: torch.Tensor, *, channels_first: bool, inplace: bool
) -> torch.Tensor:
    """``out + H'·B'ᵀ`` in one GEMM, in ``out``'s layout.

    Args:
        hidden: H' (the rank rows, already scaled by the gates): ``[B, T, R]`` or ``[B, R, T]``.
        up: B' (every expert's B with its LoRA scale folded in), ``[m, R]``.
        out: The base output, ``[B, T, m]`` or ``[B, m, T]``, contiguous.
        inplace: Accumulate into ``out`` itself (only where no gradient is recorded through it).
    """
    hidden, up = hidden.to(out.dtype), up.to(out.dtype)
    if channels_first:  # out[b] += B' · H'[b]: [m, R] @ [R, T]
        if out.shape[0] == 1:
            acc = out[0].addmm_(up, hidden[0]) if inplace else torch.addmm(out[0], up, hidden[0])
            return acc.unsqueeze(0)
        up = up.expand(out.shape[0], -1, -1)
        return out.baddbmm_(up, hidden) if inplace else torch.baddbmm(out, up, hidden)
    flat_out, flat = out.view(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1])  # [B·T, m], [B·T, R]
    acc = flat_out.addmm_(flat, up.t()) if inplace else torch.addmm(flat_out, flat, up.t())
    return acc.view(out.shape)
