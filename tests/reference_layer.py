"""The MoLE layer as it was before issue 16 (commit 73fe624 of src/mole/layers.py), kept as the reference the
faster layer is checked against, forward and backward (tests/test_layer_reference.py).

Its math is the paper's eq. 5–8 in its own, plainer order: H = X·Aᵀ and the gate logits X·[φ; ω]ᵀ from two
GEMMs, the global gate pooled by a mean, the coefficients gᵢ·sᵢ·scaleᵢ applied to H, then H·Bᵀ added to F(X).
Do not optimise it: its worth is that it is independent of the layer under test.

The MoLE layer: a frozen linear layer, frozen low-rank experts and learned sigmoid gates.

Paper §3.2, eq. 5–8. For a linear layer F with input X (n tokens × d features) and experts
Eᵢ(X) = Bᵢ(Aᵢ(X))·scaleᵢ (LoRA pairs as trained by peft, scaleᵢ = αᵢ/rᵢ):

    s = sigmoid(X·φ)            local gate, one score per token and expert       (eq. 5)
    g = sigmoid(Pool(X)·ω)      global gate, one scalar per sample and expert    (eq. 6)
    X' = F(X) + Σᵢ gᵢ·Eᵢ(X·sᵢ)                                                   (eq. 7–8)

Sigmoid, not softmax: the experts do not compete for a token.

Because Aᵢ is linear and sᵢ is one scalar per token, Aᵢ(X·sᵢ) = sᵢ·Aᵢ(X); and because Pool is a mean,
Pool(X)·ω = Pool(X·ω). So a layer is computed fused, in two matmuls whatever the number of experts instead of
2·N separate expert calls (the released code's way):

1. H = X·[A₁; …; A_N]ᵀ, all A's stacked (``[ΣR, d]``); the gate logits X·[φ; ω]ᵀ come from one more, 2N
   columns wide, which costs next to nothing;
2. each expert's block of H is scaled by cᵢ = gᵢ·sᵢ·scaleᵢ (a broadcast over ``[P, r]`` blocks when the
   ranks are equal, no per-row gather);
3. F(X) += H·[B₁ … B_N]ᵀ, accumulated by the GEMM into the base layer's output (in place when no gradient
   is recorded), so there is no separate add over the output.

A 1×1 conv is computed channels-first on its NCHW input (X as ``[B, d, H·W]``), so neither X nor the output
is transposed or copied. Step 1 is in :meth:`MoLELayer.forward`, steps 2–3 in :func:`mole_delta`; on a
mid-size UNet this keeps the time overhead at the FLOP overhead (``bench/results/latest.md``).

Everything trainable in a layer is named ``mole_*`` so that freezing, saving and loading filter on the
prefix (the same convention as peft's ``lora_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

GateMode = Literal["local", "global", "both", "none"]
#: ``none`` disables learned gates: each expert is applied at a fixed weight (the paper's Fig. 1 scales).
GATE_MODES: tuple[str, ...] = ("local", "global", "both", "none")
#: How a layer runs, so that one loaded model can be compared with itself (see :func:`mole.inject.mole_mode`):
#: ``mole`` with its gates (or fixed weights), ``experts`` every expert at weight 1 with the gates bypassed (the
#: paper's "+experts" row), ``base`` the wrapped layer alone.
RUN_MODES: tuple[str, ...] = ("mole", "experts", "base")

#: Prefix of every trainable parameter a MoLE layer adds.
MOLE_PREFIX = "mole_"


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's LoRA pair at one layer, in feature-last matrix form.

    Attributes:
        down: Aᵢ, ``[r, d_in]`` (peft's ``lora_A.weight``; a 1×1 conv's ``[r, d_in, 1, 1]`` is flattened).
        up: Bᵢ, ``[d_out, r]`` (peft's ``lora_B.weight``).
        scale: αᵢ/rᵢ (or αᵢ/√rᵢ with rsLoRA), as diffusers/peft would apply it.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def token_pool(x: torch.Tensor) -> torch.Tensor:
    """Pool(X) of eq. 6: mean over every token axis of a feature-last tensor.

    ``[B, d] -> [B, d]`` (one token per sample), ``[B, n, d] -> [B, d]``, ``[B, H, W, d] -> [B, d]``.
    """
    if x.dim() <= 2:
        return x
    return x.flatten(1, -2).mean(dim=1)


def mole_delta(
    hidden: torch.Tensor,
    coef: torch.Tensor,
    up: torch.Tensor,
    out: torch.Tensor,
    *,
    rank: int | None,
    channels_first: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """``out + Σᵢ Bᵢ·(cᵢ·Hᵢ)``: scale every expert's rows of H = A·X by its coefficient, then one GEMM that
    accumulates into ``out``.

    Args:
        hidden: H for all experts, rows in expert order: ``[B, T, R]`` (features last) or ``[B, R, T]``
            (channels first), R = Σᵢ rᵢ.
        coef: With ``rank`` set, one coefficient per expert (all of rank ``rank``), broadcastable to
            ``[B, T, P]`` / ``[B, P, T]``; with ``rank=None``, one per row, broadcastable to ``[B, T, R]`` /
            ``[B, R, T]``. For expert i it is gᵢ·sᵢ·scaleᵢ.
        up: All experts' B concatenated along columns: ``[m, R]``.
        out: The base layer's output to add to: ``[B, T, m]`` or ``[B, m, T]``, contiguous.
        rank: The common rank of the experts in ``hidden``, or None (coefficients are then per row).
        channels_first: Layout of ``hidden`` and ``out``.
        inplace: Accumulate into ``out`` itself (only where no gradient is recorded through it).

    Returns:
        ``out`` plus the experts' contribution, in ``out``'s layout.
    """
    coef = coef.to(hidden.dtype)
    if channels_first:
        scaled = (
            hidden * coef if rank is None else (hidden.unflatten(1, (-1, rank)) * coef.unsqueeze(-2)).flatten(1, 2)
        )
    else:
        scaled = hidden * coef if rank is None else (hidden.unflatten(-1, (-1, rank)) * coef.unsqueeze(-1)).flatten(-2)
    scaled, up = scaled.to(out.dtype), up.to(out.dtype)
    if channels_first:  # out[b] += B · scaled[b]: [m, R] @ [R, T]
        if out.shape[0] == 1:
            acc = out[0].addmm_(up, scaled[0]) if inplace else torch.addmm(out[0], up, scaled[0])
            return acc.unsqueeze(0)
        up = up.expand(out.shape[0], -1, -1)
        return out.baddbmm_(up, scaled) if inplace else torch.baddbmm(out, up, scaled)
    flat_out, flat = out.view(-1, out.shape[-1]), scaled.reshape(-1, scaled.shape[-1])  # [B·T, m], [B·T, R]
    acc = flat_out.addmm_(flat, up.t()) if inplace else torch.addmm(flat_out, flat, up.t())
    return acc.view(out.shape)


class TimeSource(Protocol):
    """Where a timestep-conditioned layer reads the UNet's timestep embedding (:mod:`mole.timestep`)."""

    def embedding(self) -> torch.Tensor | None:
        """The embedding of the UNet forward running now, ``[B, time_dim]``, or None outside one."""


def _logit_bias(bias: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """A gate bias ``[N]`` (or per sample ``[B, N]``) shaped to add to ``[B, N, T]`` / ``[B, T, N]`` logits."""
    return bias.unsqueeze(-1) if channels_first else bias.unsqueeze(-2)


class MoLELayer(nn.Module):
    """A ``nn.Linear`` or 1×1 ``nn.Conv2d`` with frozen LoRA experts mixed by local/global sigmoid gates.

    The wrapped layer stays available as ``base_layer`` and is called unchanged, so with all Bᵢ = 0 the
    output is bit-identical to the base layer's. Expert weights are non-persistent buffers: frozen by
    construction, moved with ``.to()``, and never part of a saved gate file. The gates are the only
    parameters, ``mole_local`` (φ) and ``mole_global`` (ω), ``nn.Linear(d, N)`` each.

    Shapes are not assumed beyond "features last" for Linear and "channels second" for conv: any batch,
    any number of token axes, any spatial size.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        experts: Sequence[ExpertWeights | None],
        expert_names: Sequence[str],
        gate: GateMode = "both",
        init_bias: float = 0.0,
        expert_weights: Sequence[float] | None = None,
        time_dim: int | None = None,
    ) -> None:
        """Wrap ``base_layer``.

        Args:
            base_layer: The layer F. A Conv2d must be pointwise (1×1 kernel, stride 1, no padding, groups 1).
            experts: One entry per expert, in gate order; ``None`` for an expert that does not touch this
                layer (it contributes nothing here but keeps its gate column, so all layers share one
                expert order).
            expert_names: Names in the same order (for error messages and plots).
            gate: ``local``, ``global``, ``both`` (the paper) or ``none`` (fixed ``expert_weights``).
            init_bias: Initial gate bias; gate weights start at zero, so every gate starts at
                sigmoid(init_bias) for every input (0.5 by default) and training moves it from there.
            expert_weights: Fixed per-expert weights, used only when ``gate == "none"`` (default 1.0).
            time_dim: Width of the UNet's timestep embedding, to condition the gates on the diffusion step:
                ``mole_time``, a ``nn.Linear(time_dim, k·N)`` (k = 1 or 2 gate kinds), adds a per-sample term
                to the local and global gate logits. Zero-initialised (weights and bias), so the gates start
                exactly as without it. The embedding is read from ``time_context`` (see
                :mod:`mole.timestep`) during the UNet's forward. None: the paper's step-blind gates.
        """
        super().__init__()
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
        if len(experts) != len(expert_names) or not experts:
            raise ValueError("experts and expert_names must be non-empty and of the same length")
        if isinstance(base_layer, nn.Conv2d):
            if (
                base_layer.kernel_size != (1, 1)
                or base_layer.stride != (1, 1)
                or base_layer.padding not in ((0, 0), "valid")
                or base_layer.groups != 1
            ):
                raise TypeError("MoLELayer wraps only pointwise (1×1, stride 1, unpadded, ungrouped) Conv2d")
            d_in, d_out = base_layer.in_channels, base_layer.out_channels
            self.is_conv = True
        elif isinstance(base_layer, nn.Linear):
            d_in, d_out = base_layer.in_features, base_layer.out_features
            self.is_conv = False
        else:
            raise TypeError(f"MoLELayer wraps nn.Linear or a 1×1 nn.Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.expert_names = list(expert_names)
        self.gate = gate
        self.in_features, self.out_features = d_in, d_out
        n = len(experts)

        ref = base_layer.weight
        downs, ups, row_expert, row_scale = [], [], [], []
        for i, expert in enumerate(experts):
            if expert is None:
                continue
            down = expert.down.reshape(expert.down.shape[0], -1)
            up = expert.up.reshape(expert.up.shape[0], -1)
            if down.shape[1] != d_in or up.shape[0] != d_out or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"expert {expert_names[i]!r} does not fit a layer of {d_in}→{d_out} features: "
                    f"A is {tuple(expert.down.shape)}, B is {tuple(expert.up.shape)}"
                )
            downs.append(down)
            ups.append(up)
            row_expert += [i] * down.shape[0]
            row_scale += [float(expert.scale)] * down.shape[0]
        factory = {"device": ref.device, "dtype": ref.dtype}
        self.register_buffer(
            "expert_down", torch.cat(downs).to(**factory) if downs else torch.zeros(0, d_in, **factory), False
        )
        self.register_buffer(
            "expert_up",
            torch.cat(ups, dim=1).to(**factory) if ups else torch.zeros(d_out, 0, **factory),
            False,
        )
        # Which expert each rank row belongs to, and that expert's LoRA scale.
        self.register_buffer("row_expert", torch.tensor(row_expert, dtype=torch.long, device=ref.device), False)
        self.register_buffer("row_scale", torch.tensor(row_scale, **factory), False)
        weights = [1.0] * n if expert_weights is None else [float(w) for w in expert_weights]
        if len(weights) != n:
            raise ValueError(f"expert_weights has {len(weights)} entries for {n} experts")
        self.register_buffer("expert_weight", torch.tensor(weights, **factory), False)
        # Per-expert LoRA scale (0 for an expert absent here), and the layout of the rows of A: when every
        # expert present has the same rank, the rows are scaled as [P, r] blocks by P per-expert coefficients
        # (the `present` ones) instead of gathering a coefficient for each of the R rows.
        scales = dict(zip(row_expert, row_scale, strict=True))
        self.register_buffer("expert_scale", torch.tensor([scales.get(i, 0.0) for i in range(n)], **factory), False)
        present = sorted(scales)
        ranks = {row_expert.count(i) for i in present}
        self.block_rank: int | None = ranks.pop() if len(ranks) == 1 else None
        self.all_present = len(present) == n
        self.register_buffer("present", torch.tensor(present, dtype=torch.long, device=ref.device), False)

        self.mole_local: nn.Linear | None = None
        self.mole_global: nn.Linear | None = None
        if gate in ("local", "both"):
            self.mole_local = self._gate_linear(d_in, n, init_bias, factory)
        if gate in ("global", "both"):
            self.mole_global = self._gate_linear(d_in, n, init_bias, factory)
        self.mole_time: nn.Linear | None = None
        #: Gives the current timestep embedding ``[B, time_dim]``: set by :func:`mole.timestep.attach_timestep`.
        self.time_context: TimeSource | None = None
        if time_dim is not None:
            if self.mole_local is None and self.mole_global is None:
                raise ValueError("timestep-conditioned gates need learned gates (local, global or both), not 'none'")
            kinds = (self.mole_local is not None) + (self.mole_global is not None)
            self.mole_time = self._gate_linear(time_dim, kinds * n, 0.0, factory)  # zero weights and bias

        #: Set by :func:`mole.inject.record_gates`; when true the last forward's gates are kept.
        self.record_gates = False
        self.last_local: torch.Tensor | None = None  # [B, *tokens, N]
        self.last_global: torch.Tensor | None = None  # [B, N]
        #: One of :data:`RUN_MODES`; set by :func:`mole.inject.mole_mode`.
        self.mode = "mole"

    @staticmethod
    def _gate_linear(d_in: int, n: int, init_bias: float, factory: dict) -> nn.Linear:
        layer = nn.Linear(d_in, n, **factory)
        nn.init.zeros_(layer.weight)
        nn.init.constant_(layer.bias, init_bias)
        return layer

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def extra_repr(self) -> str:
        return (
            f"experts={self.expert_names}, gate={self.gate}, ranks={self.expert_down.shape[0]}, "
            f"features={self.in_features}→{self.out_features}"
        )

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert coefficients gᵢ·sᵢ (or the fixed weights), features-last input.

        Args:
            x: ``[B, *tokens, d]``.

        Returns:
            ``[B, *tokens, N]`` for local/both, ``[B, 1.., N]`` (broadcastable) for global/none.
        """
        if self.mode == "experts":
            return torch.ones(self.num_experts, dtype=x.dtype, device=x.device)  # [N]
        if self.mole_local is None and self.mole_global is None:
            return self.expert_weight.to(x.dtype)  # [N]
        feats = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, d]
        coef = self._gate_values(feats, channels_first=False, tokens=x.shape[1:-1])  # [B, T or 1, N]
        if self.mole_local is not None:
            return coef.reshape(*x.shape[:-1], coef.shape[-1])
        return coef.reshape(x.shape[0], *([1] * (x.dim() - 2)), coef.shape[-1])

    def _time_logits(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The timestep term of the gate logits: ``mole_time(emb)``, ``[B, k·N]`` (local columns, then global)."""
        emb = self.time_context.embedding() if self.time_context is not None else None
        if emb is None:
            raise RuntimeError(
                "this MoLE layer has timestep-conditioned gates but no timestep embedding: run it inside the UNet "
                "forward (mole.timestep.attach_timestep hooks the UNet's time_embedding)"
            )
        if emb.shape[0] not in (1, batch):
            raise RuntimeError(f"timestep embedding has batch {emb.shape[0]}, the layer input has batch {batch}")
        weight, bias = self.mole_time.weight.to(dtype), self.mole_time.bias.to(dtype)
        return F.linear(emb.to(dtype), weight, bias).expand(batch, -1)  # [B, kN]

    def _gate_values(self, feats: torch.Tensor, channels_first: bool, tokens: Sequence[int]) -> torch.Tensor:
        """gᵢ·sᵢ from one matmul of X with [φ; ω] (eq. 5–6): ``[B, T, N]`` / ``[B, N, T]`` with a local gate,
        ``[B, 1, N]`` / ``[B, N, 1]`` with the global one alone.

        Args:
            feats: ``[B, T, d]`` (features last) or ``[B, d, T]`` (channels first).
            channels_first: The layout of ``feats``.
            tokens: The token axes' sizes (T's factors), for the recorded local gates ``[B, *tokens, N]``.
        """
        gate_layers = [g for g in (self.mole_local, self.mole_global) if g is not None]
        weight = torch.cat([g.weight for g in gate_layers]) if len(gate_layers) > 1 else gate_layers[0].weight
        weight = weight.to(feats.dtype)
        logits = torch.matmul(weight, feats) if channels_first else F.linear(feats, weight)  # [B, 2N, T] / [B, T, 2N]
        expert_dim, token_dim = (-2, -1) if channels_first else (-1, -2)
        n, offset, coef = self.num_experts, 0, None
        # With timestep gates each sample's bias is shifted by its own step's term: [N] -> [B, N].
        time = self._time_logits(feats.shape[0], feats.dtype) if self.mole_time is not None else None
        if self.mole_local is not None:
            bias = self.mole_local.bias.to(feats.dtype)
            if time is not None:
                bias = bias + time[:, :n]  # [B, N]
            local = torch.sigmoid(logits.narrow(expert_dim, 0, n) + _logit_bias(bias, channels_first))
            if self.record_gates:
                as_last = local.movedim(-2, -1) if channels_first else local  # [B, T, N]
                self.last_local = as_last.reshape(feats.shape[0], *tokens, n).detach()
            coef, offset = local, n
        if self.mole_global is not None:
            bias = self.mole_global.bias.to(feats.dtype)
            if time is not None:
                bias = bias + time[:, offset : offset + n]  # [B, N]
            pooled = logits.narrow(expert_dim, offset, n).mean(token_dim, keepdim=True)  # Pool(X·ω) = Pool(X)·ω
            glob = torch.sigmoid(pooled + _logit_bias(bias, channels_first))  # [B, 1, N] / [B, N, 1]
            if self.record_gates:
                self.last_global = glob.reshape(feats.shape[0], n).detach()
            coef = glob if coef is None else coef * glob
        return coef

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.expert_down.shape[0] == 0 or self.mode == "base":
            return out
        batch = x.shape[0]
        # A contiguous NCHW conv input is already [B, d, T]: work channels-first, copying nothing.
        channels_first = self.is_conv and x.is_contiguous() and out.is_contiguous()
        down = self.expert_down.to(x.dtype)
        if channels_first:
            feats, tokens = x.view(batch, self.in_features, -1), x.shape[2:]  # [B, d, T]
            hidden = torch.matmul(down, feats)  # [B, R, T]
            acc = out.view(batch, self.out_features, -1)  # [B, m, T]
        else:
            feats = x.movedim(1, -1) if self.is_conv else x  # [B, *tokens, d]
            tokens = feats.shape[1:-1]
            feats = feats.reshape(batch, -1, self.in_features)  # [B, T, d]
            hidden = F.linear(feats, down)  # [B, T, R]
            acc = out.movedim(1, -1) if self.is_conv else out  # [B, *tokens, m]
            acc = acc.contiguous().view(batch, -1, self.out_features)  # [B, T, m]
        expert_dim = -2 if channels_first else -1
        # Per-expert coefficients cᵢ = gᵢ·sᵢ·scaleᵢ, [N] for fixed weights (a column [N, 1] channels-first).
        if self.mode == "experts" or (self.mole_local is None and self.mole_global is None):
            weights = self.expert_weight if self.mode != "experts" else torch.ones_like(self.expert_weight)
            coef = weights * self.expert_scale
            coef = coef[:, None] if channels_first else coef
        else:
            coef = self._gate_values(feats, channels_first, tokens) * (
                self.expert_scale[:, None] if channels_first else self.expert_scale
            )
        if self.block_rank is None:
            coef = coef.index_select(expert_dim, self.row_expert)  # one coefficient per row of A
        elif not self.all_present:
            coef = coef.index_select(expert_dim, self.present)
        acc = mole_delta(
            hidden, coef, self.expert_up, acc, rank=self.block_rank, channels_first=channels_first,
            inplace=not torch.is_grad_enabled(),
        )  # fmt: skip
        if channels_first:
            return acc.view(out.shape)
        acc = acc.view(*out.shape[:1], *tokens, self.out_features)
        return acc.movedim(-1, 1) if self.is_conv else acc
