"""The MoLE layer: a frozen linear layer, frozen low-rank experts and learned sigmoid gates.

Paper §3.2, eq. 5–8. For a linear layer F with input X (n tokens × d features) and experts
Eᵢ(X) = Bᵢ(Aᵢ(X))·scaleᵢ (LoRA pairs as trained by peft, scaleᵢ = αᵢ/rᵢ):

    s = sigmoid(X·φ)            local gate, one score per token and expert       (eq. 5)
    g = sigmoid(Pool(X)·ω)      global gate, one scalar per sample and expert    (eq. 6)
    X' = F(X) + Σᵢ gᵢ·Eᵢ(X·sᵢ)                                                   (eq. 7–8)

Sigmoid, not softmax: the experts do not compete for a token.

Because Aᵢ is linear and sᵢ is one scalar per token, Aᵢ(X·sᵢ) = sᵢ·Aᵢ(X); and because Pool is a mean and the
product is linear, Pool(X)·ω + b = Pool(X·ω + b). So the gates cost next to nothing (:mod:`mole.fused`):

1. Y = X·Sᵀ + b, one GEMM: S = ``[A₁; …; A_N; φ; ω]`` stacks every expert's down-projection and both gates'
   weights (``[R + 2N, d]``), b = ``[0…0, b_φ, b_ω]``: X is read once, for the experts and both gates;
2. s = sigmoid(Y_φ), g = sigmoid(Pool(Y_ω)) (the pool a ``1/T`` GEMV), c = s·g, and each expert's block of
   H = Y_A scaled by its cᵢ (a broadcast over ``[N, r]`` blocks when the ranks are equal);
3. F(X) += H'·B'ᵀ with B' = ``[B₁·scale₁ … B_N·scale_N]`` (the LoRA scales folded in once), accumulated by the
   GEMM into the base layer's output (in place when no gradient is recorded).

On CPU that is 8 ops beyond the base layer for local + global gates, 16 before (``bench/layer_ops.py`` counts
them; a test keeps it so). S and b are buffers built once; their gate rows are copies of φ and ω, refreshed when those
change: always before a forward while the gates are trainable (an optimizer may write them any way it likes,
``.data`` included), and, once frozen (``requires_grad=False``, as generation and serving load them), only when
a gate tensor's version or storage changed (``copy_``, ``load_state_dict``, :func:`mole.inject.load_gates`,
``.to()``). Writing frozen gates through ``.data`` is not seen: call :meth:`MoLELayer.refresh` after it.
Gradients (gates training) go through :class:`mole.fused.GatedProjection`, which gives X and the gate rows
their gradients from the same cached S and never one to the frozen experts.

A 1×1 conv is computed channels-first on its NCHW input (X as ``[B, d, H·W]``), so neither X nor the output
is transposed or copied.

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

from mole.fused import accumulate, gated_project, pool_tokens, project

GateMode = Literal["local", "global", "both", "none"]
#: ``none`` disables learned gates: each expert is applied at a fixed weight (the paper's Fig. 1 scales).
GATE_MODES: tuple[str, ...] = ("local", "global", "both", "none")
RunMode = Literal["base", "experts", "mole"]
#: How a layer runs, so that one loaded model can be compared with itself (see :func:`mole.inject.mole_mode`):
#: ``base`` the wrapped layer alone, ``experts`` every expert at weight 1 with the gates bypassed (the paper's
#: "+experts" row), ``mole`` with its gates (or fixed weights). Ordered from the poorest to the richest: the
#: generation service offers a prefix of it and defaults to its last. The one list of mode names.
RUN_MODES: tuple[RunMode, ...] = ("base", "experts", "mole")

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


class TimeSource(Protocol):
    """Where a timestep-conditioned layer reads the UNet's timestep embedding (:mod:`mole.timestep`)."""

    def embedding(self) -> torch.Tensor | None:
        """The embedding of the UNet forward running now, ``[B, time_dim]``, or None outside one."""


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
        factory = {"device": ref.device, "dtype": ref.dtype}
        downs, ups, row_expert = [], [], []
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
            downs.append(down.to(**factory))
            ups.append(up.to(**factory) * float(expert.scale))  # B·scale: the LoRA scale folded in once
            row_expert += [i] * down.shape[0]
        #: Σᵢ rᵢ, the rank rows of S (and columns of B').
        self.rank_rows = len(row_expert)

        self.mole_local: nn.Linear | None = None
        self.mole_global: nn.Linear | None = None
        if gate in ("local", "both"):
            self.mole_local = self._gate_linear(d_in, n, init_bias, factory)
        if gate in ("global", "both"):
            self.mole_global = self._gate_linear(d_in, n, init_bias, factory)
        gates = [g for g in (self.mole_local, self.mole_global) if g is not None]
        # S = [A₁; …; A_N; φ; ω] and b = [0…0, b_φ, b_ω] (module docstring); the gate rows are filled by refresh().
        parts = [*downs, *(torch.zeros(n, d_in, **factory) for _ in gates)]
        stacked = torch.cat(parts) if parts else torch.zeros(0, d_in, **factory)
        self.register_buffer("stacked_down", stacked, False)
        self.register_buffer("stacked_bias", torch.zeros(self.stacked_down.shape[0], **factory), False)
        #: B' = [B₁·scale₁ … B_N·scale_N], ``[m, R]``.
        self.register_buffer("expert_up", torch.cat(ups, dim=1) if ups else torch.zeros(d_out, 0, **factory), False)
        # Which expert each rank row belongs to; when every expert present has the same rank, H is scaled as
        # [P, r] blocks by P per-expert coefficients (the `present` ones) instead of one per row.
        self.register_buffer("row_expert", torch.tensor(row_expert, dtype=torch.long, device=ref.device), False)
        present = sorted(set(row_expert))
        ranks = {row_expert.count(i) for i in present}
        self.block_rank: int | None = ranks.pop() if len(ranks) == 1 else None
        self.all_present = len(present) == n
        self.register_buffer("present", torch.tensor(present, dtype=torch.long, device=ref.device), False)
        weights = [1.0] * n if expert_weights is None else [float(w) for w in expert_weights]
        if len(weights) != n:
            raise ValueError(f"expert_weights has {len(weights)} entries for {n} experts")
        self.register_buffer("expert_weight", torch.tensor(weights, **factory), False)
        self._unit_weights = all(w == 1.0 for w in weights)

        self.mole_time: nn.Linear | None = None
        #: Gives the current timestep embedding ``[B, time_dim]``: set by :func:`mole.timestep.attach_timestep`.
        self.time_context: TimeSource | None = None
        if time_dim is not None:
            if not gates:
                raise ValueError("timestep-conditioned gates need learned gates (local, global or both), not 'none'")
            self.mole_time = self._gate_linear(time_dim, len(gates) * n, 0.0, factory)  # zero weights and bias

        #: What the gate rows of S were last copied from (storage and version of every source), or None.
        self._stack_key: tuple | None = None
        #: Set by :func:`mole.inject.record_gates`; when true the last forward's gates are kept.
        self.record_gates = False
        self.last_local: torch.Tensor | None = None  # [B, *tokens, N]
        self.last_global: torch.Tensor | None = None  # [B, N]
        #: One of :data:`RUN_MODES`; set by :func:`mole.inject.mole_mode`.
        self.mode = "mole"
        self.refresh()

    @staticmethod
    def _gate_linear(d_in: int, n: int, init_bias: float, factory: dict) -> nn.Linear:
        layer = nn.Linear(d_in, n, **factory)
        nn.init.zeros_(layer.weight)
        nn.init.constant_(layer.bias, init_bias)
        return layer

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def has_gates(self) -> bool:
        return self.mole_local is not None or self.mole_global is not None

    @property
    def expert_down(self) -> torch.Tensor:
        """A₁…A_N stacked, ``[R, d]`` (a view of the first rows of S)."""
        return self.stacked_down[: self.rank_rows]

    def extra_repr(self) -> str:
        return (
            f"experts={self.expert_names}, gate={self.gate}, ranks={self.rank_rows}, "
            f"features={self.in_features}→{self.out_features}"
        )

    def _gate_layers(self) -> list[nn.Linear]:
        return [g for g in (self.mole_local, self.mole_global) if g is not None]

    def _sources(self) -> list[torch.Tensor]:
        return [t for g in self._gate_layers() for t in (g.weight, g.bias)]

    def refresh(self) -> None:
        """Copy φ, ω and their biases into the gate rows of S and b (see the module docstring for when)."""
        sources = self._sources()
        if not sources:
            return
        n, rows = self.num_experts, self.rank_rows
        with torch.no_grad():
            for k, gate in enumerate(self._gate_layers()):
                self.stacked_down[rows + k * n : rows + (k + 1) * n].copy_(gate.weight)
                self.stacked_bias[rows + k * n : rows + (k + 1) * n].copy_(gate.bias)
        self._stack_key = self._key(sources)

    def _key(self, sources: list[torch.Tensor]) -> tuple | None:
        tensors = (self.stacked_down, *sources)
        if any(t.is_inference() for t in tensors):
            return None  # inference tensors keep no version: refresh every time
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)

    def _fresh_stack(self) -> None:
        """Make the gate rows of S current: every call while a gate is trainable, else only when they changed."""
        if torch.compiler.is_compiling():
            return  # a compiled UNet reads S as refreshed before it was compiled (mole.compile freezes the gates)
        sources = self._sources()
        if any(t.requires_grad for t in sources):
            self.refresh()
            self._stack_key = None  # values written through .data since are not seen: refresh again once frozen
        else:
            key = self._key(sources)
            if key is None or key != self._stack_key:
                self.refresh()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert coefficients gᵢ·sᵢ (or the fixed weights), features-last input.

        Args:
            x: ``[B, *tokens, d]``.

        Returns:
            ``[B, *tokens, N]`` for local/both, ``[B, 1.., N]`` (broadcastable) for global/none.
        """
        if self.mode == "experts":
            return torch.ones(self.num_experts, dtype=x.dtype, device=x.device)  # [N]
        if not self.has_gates:
            return self.expert_weight.to(x.dtype)  # [N]
        feats = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, d]
        logits = self._project(feats, channels_first=False, gated=True)
        coef = self._coefficients(logits, channels_first=False, tokens=x.shape[1:-1])  # [B, T or 1, N]
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

    def _project(self, feats: torch.Tensor, channels_first: bool, gated: bool) -> torch.Tensor:
        """Y = X·Sᵀ + b (with the gate rows when ``gated``, else H = X·Aᵀ alone): ``[B, T, K]`` / ``[B, K, T]``."""
        if not gated:
            return project(feats, self.expert_down.to(feats.dtype), None, channels_first)
        self._fresh_stack()
        stack, bias = self.stacked_down.to(feats.dtype), self.stacked_bias.to(feats.dtype)
        params = self._sources()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            n, rows = self.num_experts, self.rank_rows
            starts = [rows + k * n for k in range(len(params) // 2)]
            return gated_project(feats, stack, bias, channels_first, starts, n, params)
        return project(feats, stack, bias, channels_first)

    def _coefficients(self, logits: torch.Tensor, channels_first: bool, tokens: Sequence[int]) -> torch.Tensor:
        """gᵢ·sᵢ from the gate columns of Y (eq. 5–6): ``[B, T, N]`` / ``[B, N, T]`` with a local gate,
        ``[B, 1, N]`` / ``[B, N, 1]`` with the global one alone.

        Args:
            logits: Y, ``[B, T, R + kN]`` (features last) or ``[B, R + kN, T]`` (channels first).
            channels_first: The layout of ``logits``.
            tokens: The token axes' sizes (T's factors), for the recorded local gates ``[B, *tokens, N]``.
        """
        axis = 1 if channels_first else -1
        n, offset, coef = self.num_experts, self.rank_rows, None
        batch = logits.shape[0]
        # With timestep gates each sample's logits are shifted by its own step's term: [B, kN].
        time = self._time_logits(batch, logits.dtype) if self.mole_time is not None else None

        def shift(part: torch.Tensor, k: int, inplace: bool) -> torch.Tensor:
            if time is None:
                return part
            term = time[:, k * n : (k + 1) * n]  # [B, N]
            term = term[:, :, None] if channels_first else term[:, None, :]
            # In place on Y's strided slice: the sigmoid then runs on the same layout as without the time term,
            # so a zero term gives bit-identical gates (CPU kernels round differently on other layouts).
            return part.add_(term) if inplace else part + term

        kind = 0
        if self.mole_local is not None:
            local = torch.sigmoid(shift(logits.narrow(axis, offset, n), kind, inplace=True))  # [B, T, N] / [B, N, T]
            if self.record_gates:
                as_last = local.movedim(1, -1) if channels_first else local  # [B, T, N]
                self.last_local = as_last.reshape(batch, *tokens, n).detach()
            coef, offset, kind = local, offset + n, 1
        if self.mole_global is not None:
            omega = logits.narrow(axis, offset, n)  # [B, T, N] / [B, N, T]
            pooled = pool_tokens(omega, channels_first)  # Pool(X·ω + b) = Pool(X)·ω + b: [B, 1, N] / [B, N, 1]
            # With one token the pool is Y's slice itself: shifted in place, like the local logits.
            glob = torch.sigmoid(shift(pooled, kind, inplace=pooled is omega))
            if self.record_gates:
                self.last_global = glob.reshape(batch, n).detach()
            coef = glob if coef is None else coef * glob
        return coef

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.rank_rows == 0 or self.mode == "base":
            return out
        batch = x.shape[0]
        # A contiguous NCHW conv input is already [B, d, T]: work channels-first, copying nothing.
        channels_first = self.is_conv and x.is_contiguous() and out.is_contiguous()
        if channels_first:
            feats, tokens = x.view(batch, self.in_features, -1), x.shape[2:]  # [B, d, T]
            acc = out.view(batch, self.out_features, -1)  # [B, m, T]
        else:
            feats = x.movedim(1, -1) if self.is_conv else x  # [B, *tokens, d]
            tokens = feats.shape[1:-1]
            feats = feats.reshape(batch, -1, self.in_features)  # [B, T, d]
            acc = out.movedim(1, -1) if self.is_conv else out  # [B, *tokens, m]
            acc = acc.contiguous().view(batch, -1, self.out_features)  # [B, T, m]
        gated = self.mode == "mole" and self.has_gates
        logits = self._project(feats, channels_first, gated)  # [B, T, K] / [B, K, T]
        axis = 1 if channels_first else -1
        hidden = logits.narrow(axis, 0, self.rank_rows) if gated else logits  # H = X·Aᵀ: [B, T, R] / [B, R, T]
        # Per-expert coefficients cᵢ = gᵢ·sᵢ, or the fixed weights ([N]; none at all when they are all 1).
        if gated:
            coef = self._coefficients(logits, channels_first, tokens)  # [B, T|1, N] / [B, N, T|1]
        elif self.mode == "experts" or self._unit_weights:
            coef = None
        else:
            coef = self.expert_weight.to(hidden.dtype)
            coef = coef[:, None] if channels_first else coef
        if coef is not None:
            hidden = self._scale_rows(hidden, coef, channels_first)
        acc = accumulate(
            hidden, self.expert_up, acc, channels_first=channels_first, inplace=not torch.is_grad_enabled()
        )
        if channels_first:
            return acc.view(out.shape)
        acc = acc.view(*out.shape[:1], *tokens, self.out_features)
        return acc.movedim(-1, 1) if self.is_conv else acc

    def _scale_rows(self, hidden: torch.Tensor, coef: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """Every expert's rows of H times its coefficient: one broadcast multiply over ``[N, r]`` blocks."""
        axis = -2 if channels_first else -1  # the expert axis of [B, N, T|1] or [N, 1]; of [B, T|1, N] or [N]
        coef = coef.to(hidden.dtype)
        if self.block_rank is None:  # unequal ranks: one coefficient per row
            return hidden * coef.index_select(axis, self.row_expert)
        if not self.all_present:
            coef = coef.index_select(axis, self.present)
        rank = self.block_rank
        if channels_first:  # [B, P, r, T] * [B, P, 1, T|1]
            return (hidden.unflatten(1, (-1, rank)) * coef.unsqueeze(-2)).flatten(1, 2)
        return (hidden.unflatten(-1, (-1, rank)) * coef.unsqueeze(-1)).flatten(-2)  # [B, T, P, r] * [B, T|1, P, 1]
