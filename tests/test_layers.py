"""The MoLE layer against a written-out evaluation of the paper's eq. 5–8."""

from __future__ import annotations

import pytest
import torch
from tests.reference_layer import token_pool  # Pool(X) of eq. 6 written plainly: the check
from torch import nn

from mole.layers import ExpertWeights, MoLELayer

D_IN, D_OUT = 12, 10


def _experts(n: int, seed: int = 0) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    ranks = [3, 5, 2][:n]  # unequal ranks: the fused stacking must keep rows with their expert
    return [
        ExpertWeights(
            down=torch.randn(r, D_IN, generator=g) * 0.3,
            up=torch.randn(D_OUT, r, generator=g) * 0.3,
            scale=0.5 + i,
        )
        for i, r in enumerate(ranks)
    ]


def _randomize_gates(layer: MoLELayer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("mole_"):
                p.copy_(torch.randn(p.shape, generator=g))


def naive_mole(x_feat: torch.Tensor, base_out_feat: torch.Tensor, layer: MoLELayer, experts) -> torch.Tensor:
    """Eq. 5–8 written out: one separate expert call per expert, gates applied to the input."""
    out = base_out_feat.clone()
    for i, e in enumerate(experts):
        if layer.mole_local is not None:
            s_i = torch.sigmoid(x_feat @ layer.mole_local.weight[i] + layer.mole_local.bias[i]).unsqueeze(-1)
        else:
            s_i = torch.ones_like(x_feat[..., :1])
        if layer.mole_global is not None:
            pooled = x_feat.reshape(x_feat.shape[0], -1, x_feat.shape[-1]).mean(1)  # [B, d]
            g_i = torch.sigmoid(pooled @ layer.mole_global.weight[i] + layer.mole_global.bias[i])  # [B]
            g_i = g_i.reshape(-1, *([1] * (x_feat.dim() - 1)))
        else:
            g_i = torch.ones(())
        expert_out = ((x_feat * s_i) @ e.down.T) @ e.up.T * e.scale  # E_i(X · s_i)
        out = out + g_i * expert_out  # Y_i = g_i · E_i(X · s_i)
    return out


@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("gate", ["local", "global", "both"])
@pytest.mark.parametrize(
    "shape", [(2, 7, D_IN), (3, D_IN), (2, 3, 5, D_IN)], ids=["tokens", "one-token", "two-token-axes"]
)
def test_linear_matches_naive_equations(n_experts: int, gate: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    experts = _experts(n_experts)
    layer = MoLELayer(base, experts, [f"e{i}" for i in range(n_experts)], gate=gate)
    _randomize_gates(layer)
    x = torch.randn(*shape)
    expected = naive_mole(x, base(x), layer, experts)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("gate", ["local", "global", "both"])
def test_pointwise_conv_matches_naive_equations(n_experts: int, gate: str) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(D_IN, D_OUT, kernel_size=1)
    experts = _experts(n_experts)
    # A conv expert is stored as peft stores it: [r, d, 1, 1] and [m, r, 1, 1].
    conv_experts = [ExpertWeights(e.down[..., None, None], e.up[..., None, None], e.scale) for e in experts]
    layer = MoLELayer(base, conv_experts, [f"e{i}" for i in range(n_experts)], gate=gate)
    _randomize_gates(layer)
    x = torch.randn(2, D_IN, 3, 5)  # non-square spatial grid: 15 tokens
    x_feat = x.movedim(1, -1)  # [B, H, W, d]
    expected = naive_mole(x_feat, base(x).movedim(1, -1), layer, experts).movedim(-1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_fixed_weights_without_gates() -> None:
    base = nn.Linear(D_IN, D_OUT)
    experts = _experts(2)
    layer = MoLELayer(base, experts, ["a", "b"], gate="none", expert_weights=[0.3, 1.7])
    x = torch.randn(4, 6, D_IN)
    weights = [0.3, 1.7]
    expected = base(x) + sum(w * (x @ e.down.T @ e.up.T) * e.scale for w, e in zip(weights, experts, strict=True))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not [p for n, p in layer.named_parameters() if n.startswith("mole_")]


def test_expert_missing_at_a_layer_contributes_nothing() -> None:
    base = nn.Linear(D_IN, D_OUT)
    e = _experts(2)
    layer = MoLELayer(base, [e[0], None], ["a", "b"], gate="both")
    only_a = MoLELayer(base, [e[0]], ["a"], gate="both")
    x = torch.randn(2, 4, D_IN)
    torch.testing.assert_close(layer(x), only_a(x))
    assert layer.mole_local.out_features == 2  # the gate column of the absent expert is kept


def test_zero_up_weights_give_base_output_exactly() -> None:
    base = nn.Linear(D_IN, D_OUT)
    experts = [ExpertWeights(torch.randn(4, D_IN), torch.zeros(D_OUT, 4), 2.0) for _ in range(2)]
    layer = MoLELayer(base, experts, ["a", "b"], gate="both")
    _randomize_gates(layer)
    x = torch.randn(3, 5, D_IN)
    assert torch.equal(layer(x), base(x))


def test_gate_parameters_are_the_only_parameters_added() -> None:
    base = nn.Linear(D_IN, D_OUT)
    layer = MoLELayer(base, _experts(2), ["a", "b"], gate="both")
    added = {n for n, _ in layer.named_parameters()} - {f"base_layer.{n}" for n, _ in base.named_parameters()}
    assert added == {"mole_local.weight", "mole_local.bias", "mole_global.weight", "mole_global.bias"}
    # Expert weights are buffers that never reach a state dict (they belong to their own files).
    assert not any(k.startswith("expert_") for k in layer.state_dict())


def test_initial_gates_are_sigmoid_of_init_bias() -> None:
    layer = MoLELayer(nn.Linear(D_IN, D_OUT), _experts(2), ["a", "b"], gate="both", init_bias=1.5)
    coef = layer.gates(torch.randn(2, 3, D_IN))
    expected = torch.sigmoid(torch.tensor(1.5)) ** 2
    torch.testing.assert_close(coef, torch.full_like(coef, expected.item()))


@pytest.mark.parametrize(
    "base, message",
    [
        (nn.Conv2d(D_IN, D_OUT, kernel_size=3), "pointwise"),
        (nn.Conv2d(D_IN, D_OUT, kernel_size=1, stride=2), "pointwise"),
        (nn.Embedding(5, D_IN), "nn.Linear"),
    ],
)
def test_rejects_layers_it_cannot_wrap(base: nn.Module, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        MoLELayer(base, _experts(1), ["a"])


def test_rejects_expert_of_wrong_shape() -> None:
    bad = ExpertWeights(torch.randn(4, D_IN + 1), torch.randn(D_OUT, 4), 1.0)
    with pytest.raises(ValueError, match="does not fit a layer of 12→10"):
        MoLELayer(nn.Linear(D_IN, D_OUT), [bad], ["bad"])


def test_token_pool_shapes() -> None:
    assert token_pool(torch.ones(2, 5)).shape == (2, 5)
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(token_pool(x), x.mean(1))
    assert token_pool(torch.ones(2, 3, 4, 5)).shape == (2, 5)


def test_records_gates_only_when_asked() -> None:
    layer = MoLELayer(nn.Linear(D_IN, D_OUT), _experts(2), ["a", "b"], gate="both")
    layer(torch.randn(2, 3, D_IN))
    assert layer.last_local is None and layer.last_global is None
    layer.record_gates = True
    layer(torch.randn(2, 3, D_IN))
    assert layer.last_local.shape == (2, 3, 2) and layer.last_global.shape == (2, 2)


# --- the fused forward's other paths: equal ranks (block scaling), conv batch 1, channels_last, gradients ------


def _equal_rank_experts(n: int, rank: int = 4, conv: bool = False, seed: int = 3) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        down, up = torch.randn(rank, D_IN, generator=g) * 0.3, torch.randn(D_OUT, rank, generator=g) * 0.3
        if conv:
            down, up = down[..., None, None], up[..., None, None]
        experts.append(ExpertWeights(down, up, scale=0.25 * (i + 1)))
    return experts


@pytest.mark.parametrize("gate", ["local", "global", "both"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equal_rank_conv_matches_naive_equations(gate: str, batch: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(D_IN, D_OUT, kernel_size=1)
    conv_experts = _equal_rank_experts(2, conv=True)
    experts = [ExpertWeights(e.down[..., 0, 0], e.up[..., 0, 0], e.scale) for e in conv_experts]
    layer = MoLELayer(base, conv_experts, ["a", "b"], gate=gate)
    assert layer.block_rank == 4
    _randomize_gates(layer)
    x = torch.randn(batch, D_IN, 3, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = naive_mole(x.movedim(1, -1), base(x).movedim(1, -1), layer, experts).movedim(-1, 1)
    with torch.no_grad():  # accumulates into the base output in place
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 7, D_IN), (3, D_IN), (1, 3, 5, D_IN)])
def test_equal_rank_linear_matches_naive_with_and_without_grad(shape: tuple[int, ...]) -> None:
    base = nn.Linear(D_IN, D_OUT)
    experts = _equal_rank_experts(3)
    layer = MoLELayer(base, experts, ["a", "b", "c"], gate="both")
    _randomize_gates(layer)
    x = torch.randn(*shape)
    expected = naive_mole(x, base(x), layer, experts)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()  # gradients reach both gates
    assert layer.mole_local.weight.grad.abs().sum() > 0 and layer.mole_global.weight.grad.abs().sum() > 0


def test_equal_rank_fixed_weights_and_absent_expert() -> None:
    base = nn.Linear(D_IN, D_OUT)
    a, _, c = _equal_rank_experts(3)
    layer = MoLELayer(base, [a, None, c], ["a", "b", "c"], gate="none", expert_weights=[0.3, 5.0, 1.7])
    assert layer.block_rank == 4 and not layer.all_present
    x = torch.randn(2, 6, D_IN)
    expected = base(x) + sum(w * (x @ e.down.T @ e.up.T) * e.scale for w, e in ((0.3, a), (1.7, c)))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_records_conv_gates_features_last() -> None:
    layer = MoLELayer(nn.Conv2d(D_IN, D_OUT, 1), _equal_rank_experts(2, conv=True), ["a", "b"], gate="both")
    _randomize_gates(layer)
    layer.record_gates = True
    x = torch.randn(2, D_IN, 3, 5)
    layer(x)
    feats = x.movedim(1, -1)
    torch.testing.assert_close(layer.last_local, torch.sigmoid(layer.mole_local(feats)))
    torch.testing.assert_close(layer.last_global, torch.sigmoid(layer.mole_global(token_pool(feats))))
