"""Issue 16's CPU proof: one MoLE layer's forward runs at most 8 compute ops beyond its base layer (16 before),
counted by the benchmark's own counter, which is first checked to give the issue's 16 on the layer it replaced."""

from __future__ import annotations

import json

import pytest
from tests.reference_layer import ExpertWeights as RefExpert
from tests.reference_layer import MoLELayer as ReferenceLayer

from bench.layer_ops import MAX_OPS, layer_input, ops_beyond_base, tiny_mole_unet
from mole.inject import mole_layers


@pytest.fixture(scope="module")
def to_q():
    unet = tiny_mole_unet("both")
    layer = next(m for n, m in mole_layers(unet).items() if n.endswith("to_q"))
    return layer.requires_grad_(False)


def _reference_of(layer) -> ReferenceLayer:
    """The pre-issue-16 layer with the same experts (scales already in B) and gates."""
    rank = layer.block_rank
    experts = [
        RefExpert(layer.expert_down[i * rank : (i + 1) * rank], layer.expert_up[:, i * rank : (i + 1) * rank], 1.0)
        for i in range(layer.num_experts)
    ]
    reference = ReferenceLayer(layer.base_layer, experts, layer.expert_names, gate=layer.gate)
    reference.load_state_dict(layer.state_dict())
    return reference.requires_grad_(False)


def test_the_counter_gives_the_issue_count_on_the_layer_it_replaced(to_q) -> None:
    ops = ops_beyond_base(_reference_of(to_q), layer_input(to_q))
    assert sum(ops.values()) == 16, ops
    assert ops["aten::mm"] == 2 and ops["aten::cat"] == 1 and ops["aten::mean"] == 1


def test_a_frozen_local_global_layer_runs_at_most_8_ops_beyond_its_base(to_q) -> None:
    x = layer_input(to_q)
    ops = ops_beyond_base(to_q, x)
    assert sum(ops.values()) <= MAX_OPS, ops
    assert "aten::cat" not in ops and "aten::mean" not in ops  # no weight concatenation, no five-op CPU mean
    assert ops["aten::addmm"] == 1 and ops["aten::addmm_"] == 1  # X read once; B' accumulated into F(X)


@pytest.mark.slow
def test_the_benchmark_records_the_count(tmp_path) -> None:
    from bench.common import update_results
    from bench.layer_ops import run

    result = run()
    assert result["ops"] == result["cases"]["to_q_both_frozen"]["ops"] <= MAX_OPS and result["met"]
    assert result["cases"]["to_q_none_fixed_weights"]["ops"] <= 3
    path = tmp_path / "results.json"
    update_results("layer_ops", result, path)
    assert json.loads(path.read_text())["layer_ops"]["ops"] == result["ops"]
