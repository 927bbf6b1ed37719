"""The MoLE layer against the layer it replaced (tests/reference_layer.py), forward and backward: every gate mode,
Linear and 1×1 conv bases, N experts, equal and unequal ranks, timestep gates, fp32 to rounding and bf16 to bf16
tolerance; and the cached stacked weight seeing every way the gates change."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference_layer import MoLELayer as ReferenceLayer
from torch import nn

from mole.fused import GatedProjection
from mole.layers import ExpertWeights, MoLELayer
from mole.timestep import timestep_embedding

D_IN, D_OUT, TIME = 12, 10, 6


def _experts(ranks: list[int | None], conv: bool, seed: int = 0) -> list[ExpertWeights | None]:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i, r in enumerate(ranks):
        if r is None:
            experts.append(None)
            continue
        down, up = torch.randn(r, D_IN, generator=g) * 0.3, torch.randn(D_OUT, r, generator=g) * 0.3
        if conv:
            down, up = down[..., None, None], up[..., None, None]
        experts.append(ExpertWeights(down, up, scale=0.5 + 0.75 * i))
    return experts


def _pair(gate: str, conv: bool, ranks: list[int | None], time: bool = False, dtype=torch.float32, seed: int = 0):
    """The layer under test and the reference on one base layer, with the same random gates."""
    torch.manual_seed(seed)
    base = (nn.Conv2d(D_IN, D_OUT, 1) if conv else nn.Linear(D_IN, D_OUT)).to(dtype)
    experts = _experts(ranks, conv)
    names = [f"e{i}" for i in range(len(ranks))]
    kwargs = {"gate": gate, "expert_weights": [0.7, 1.3, 0.4][: len(ranks)], "time_dim": TIME if time else None}
    layer, reference = MoLELayer(base, experts, names, **kwargs), ReferenceLayer(base, experts, names, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("mole_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    reference.load_state_dict(layer.state_dict())
    return layer.to(dtype), reference.to(dtype)


def _input(conv: bool, shape: str, dtype=torch.float32, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if conv:
        x = torch.randn(2 if shape != "batch1" else 1, D_IN, 3, 5, generator=g)
        if shape == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn({"tokens": (2, 7, D_IN), "one_token": (3, D_IN), "batch1": (1, 4, D_IN),
                         "channels_last": (2, 3, 5, D_IN)}[shape], generator=g)  # fmt: skip
    return x.to(dtype)


def _forward_backward(layer: nn.Module, x: torch.Tensor, emb: torch.Tensor | None):
    """Output, and the gradients of a fixed loss for the input and every gate parameter."""
    x = x.detach().clone().requires_grad_(True)
    with timestep_embedding([layer], emb) if emb is not None else torch.enable_grad():
        out = layer(x)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if n.startswith("mole_")}
    return out.detach(), x.grad.clone(), grads


RANKS = {"equal2": [4, 4], "unequal3": [3, 5, 2], "absent": [4, None, 4], "one": [4]}


@pytest.mark.parametrize("gate", ["both", "local", "global", "none"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("ranks", list(RANKS))
@pytest.mark.parametrize("shape", ["tokens", "batch1", "channels_last", "one_token"])
def test_matches_the_reference_forward_and_backward_in_fp32(gate: str, conv: bool, ranks: str, shape: str) -> None:
    if conv and shape == "one_token":
        pytest.skip("a conv input always has a spatial grid")
    layer, reference = _pair(gate, conv, RANKS[ranks])
    x = _input(conv, shape)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)
    out, gx, grads = _forward_backward(layer, x, None)
    ref_out, ref_gx, ref_grads = _forward_backward(reference, x, None)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and (gate == "none") == (not grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("gate", ["both", "local", "global"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_timestep_gates_match_the_reference_with_gradients_for_mole_time(gate: str, conv: bool) -> None:
    layer, reference = _pair(gate, conv, [4, 4, 4], time=True)
    x = _input(conv, "tokens")
    emb = torch.randn(x.shape[0], TIME, generator=torch.Generator().manual_seed(9))
    out, gx, grads = _forward_backward(layer, x, emb)
    ref_out, ref_gx, ref_grads = _forward_backward(reference, x, emb)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    assert "mole_time.weight" in grads and grads["mole_time.weight"].abs().sum() > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("gate", ["both", "local", "global", "none"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_matches_the_reference_in_bf16(gate: str, conv: bool) -> None:
    """bf16 weights and input, as the GPU path and DeepSpeed's bf16 engine run it: within bf16's rounding."""
    layer, reference = _pair(gate, conv, [4, 4], dtype=torch.bfloat16)
    x = _input(conv, "tokens", dtype=torch.bfloat16)
    out, gx, grads = _forward_backward(layer, x, None)
    ref_out, ref_gx, ref_grads = _forward_backward(reference, x, None)
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16

    def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale, msg=what)

    close(out, ref_out, "output")
    close(gx, ref_gx, "input gradient")
    for name in grads:
        assert grads[name].dtype == torch.bfloat16
        close(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("channels_first", [False, True])
def test_gated_projection_gradients_pass_gradcheck(channels_first: bool) -> None:
    g = torch.Generator().manual_seed(0)
    rank, n, batch, tokens = 3, 2, 2, 4
    stack = torch.randn(rank + 2 * n, D_IN, generator=g, dtype=torch.float64)
    bias = torch.randn(rank + 2 * n, generator=g, dtype=torch.float64)
    shape = (batch, D_IN, tokens) if channels_first else (batch, tokens, D_IN)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    params = [stack[rank:rank + n].clone().requires_grad_(), bias[rank:rank + n].clone().requires_grad_(),
              stack[rank + n:].clone().requires_grad_(), bias[rank + n:].clone().requires_grad_()]  # fmt: skip

    def fn(x, *p):
        with torch.no_grad():  # the layer's refresh: the gate rows of S and b are copies of the parameters
            s, b = torch.cat([stack[:rank], p[0], p[2]]), torch.cat([bias[:rank], p[1], p[3]])
        return GatedProjection.apply(x, s, b, channels_first, (rank, rank + n), n, *p)

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_experts_never_get_a_gradient_and_the_gates_do() -> None:
    layer, _ = _pair("both", False, [4, 4])
    out = layer(_input(False, "tokens"))
    out.square().sum().backward()
    assert not layer.stacked_down.requires_grad and layer.stacked_down.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in layer.named_parameters() if "mole_" in n)


# --- the cached stack sees every change of the gates -------------------------------------------------------------


def _check(layer: MoLELayer, reference: ReferenceLayer, x: torch.Tensor) -> None:
    reference.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)


def test_frozen_gates_changed_by_copy_load_state_dict_or_to_are_seen() -> None:
    layer, reference = _pair("both", False, [4, 4])
    x = _input(False, "tokens")
    layer.requires_grad_(False)
    _check(layer, reference, x)
    with torch.no_grad():
        layer.mole_local.weight.copy_(torch.randn_like(layer.mole_local.weight))
    _check(layer, reference, x)
    other, _ = _pair("both", False, [4, 4], seed=5)
    layer.load_state_dict(other.state_dict())
    _check(layer, reference, x)
    layer.to(torch.float64)
    reference.to(torch.float64)
    _check(layer, reference, x.double())
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.mole_global.bias.add_(1.0)
    _check(twin, copy.deepcopy(reference), x.double())
    _check(layer, reference, x.double())  # the copy's change is not the original's


def test_trainable_gates_written_through_data_are_seen_and_an_optimizer_step_too() -> None:
    layer, reference = _pair("both", True, [4, 4])
    x = _input(True, "tokens")
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        layer(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        _check(layer, reference, x)
    layer.mole_local.weight.data.mul_(-2.0)  # what DeepSpeed and EMA copies do: no version bump
    _check(layer, reference, x)
    # Frozen afterwards: the first frozen call refreshes, so a .data write made while trainable is not lost.
    layer.mole_global.weight.data.add_(0.25)
    layer.requires_grad_(False)
    _check(layer, reference, x)


def test_frozen_gates_written_through_data_need_refresh() -> None:
    layer, reference = _pair("global", False, [4, 4])
    layer.requires_grad_(False)
    x = _input(False, "tokens")
    _check(layer, reference, x)
    layer.mole_global.bias.data.add_(3.0)  # invisible to the version counter: documented, refresh() makes it seen
    layer.refresh()
    _check(layer, reference, x)
