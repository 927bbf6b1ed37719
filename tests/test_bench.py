"""The benchmark code runs and reports what the issue asks for; no timing is asserted (the machines are noisy)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.common import load_results, overhead_ratio, paired_overhead_ratio, update_results
from bench.report import render

REQUIRED = ("time_ratio", "flop_ratio", "speedup_vs_naive", "speedup_vs_naive_paired", "time_over_flop_bound")


def _cost(time_ratio: float, flop_ratio: float, speedup: float | None) -> dict:
    peers = {k: {"time_ratio": 1.4, "flop_ratio": 1.2} for k in ("naive", "peft", "mole_fixed")}
    return {
        "device": "cpu", "threads": 2, "repeats": 3, "time_ms": {"base": 100.0}, "time_ratio": time_ratio,
        "flop_ratio": flop_ratio, "time_over_flop_bound": time_ratio / flop_ratio, "speedup_vs_naive": speedup,
        "peers": peers, "load_average_1m_before": 1.0, "load_average_1m_after": 1.5,
    }  # fmt: skip


@pytest.mark.slow
def test_mole_cost_measure_on_tiny_has_the_issue_fields_and_agrees_with_naive():
    from bench.mole_cost import measure
    from bench.peers import SIZES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure(SIZES["tiny"], "cpu", torch.float32, repeats=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    assert all(k in result for k in REQUIRED)
    assert set(result["peers"]) == {"naive", "peft", "mole_fixed"}
    # The FLOP bound is above 1 (the experts add work) and the peers compute what MoLE computes.
    assert 1.0 < result["flop_ratio"] < 2.0
    assert result["max_rel_diff"]["mole_vs_naive"] < 1e-4
    assert result["max_rel_diff"]["mole_fixed_vs_peft"] < 1e-4
    assert result["expert_contribution_rel"] > 1e-3  # the experts change the output: the comparison is not vacuous
    json.dumps(result)  # what goes into latest.json must serialise


def test_overhead_ratio_is_naive_added_time_over_mole_added_time():
    assert overhead_ratio(naive=1.5, base=1.0, mole=1.25) == pytest.approx(2.0)
    assert overhead_ratio(naive=1.5, base=1.0, mole=0.99) is None
    # Per round: base drifts 1 -> 3, the added times stay 0.5 (naive) and 0.25 (MoLE).
    assert paired_overhead_ratio([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], [1.25, 2.25, 3.25]) == pytest.approx(2.0)


def test_update_results_keeps_other_sections_and_stamps_the_machine(tmp_path):
    path = tmp_path / "latest.json"
    update_results("curation", {"threads": 1}, path)
    data = update_results("mole_cost", {"mid": _cost(1.3, 1.27, 1.6)}, path)
    assert set(data) >= {"schema", "curation", "mole_cost", "machine", "versions"}
    assert "load_average_1m" in data["mole_cost"]["machine"]
    assert load_results(path)["curation"]["threads"] == 1


def test_report_gives_targets_verdicts_and_skips():
    results = {
        "schema": "mole-bench/1",
        "mole_cost": {
            "tiny": _cost(1.6, 1.2, 1.1),
            "mid": _cost(1.30, 1.27, 1.7),  # 1.30 <= 1.05 * 1.27: met; 1.7 >= 1.2: met
            "sd15": {"skipped": "no CUDA device", "flop_ratio": 1.46},
        },
        "training": {
            "tiny_cpu": {
                "threads": 2,
                "stages": {"stage1": {"samples_per_second": 9.0, "batch_size": 4, "steps": 30, "wall_seconds": 20.0}},
            },
            "sd15_stage1_gpu": {"skipped": "no CUDA device"},
        },
    }
    md = render(results)
    assert "| mid (CPU): MoLE/base time ≤ 1.05 × FLOP bound | 1.300 vs 1.334 (1.024 × bound) | **met** |" in md
    assert "| mid: speedup_vs_naive ≥ 1.2 | 1.70 | **met** |" in md
    assert "| sd15 | — | — | — | — | 1.460 |" in md  # the FLOP bound is counted without a GPU
    # SD1.5 timing, stage-1 speed, stage-1 memory, and issue 16's seven GPU targets
    assert md.count("not measured | — (no CUDA device)") == 3 + 7
    assert "## `demo`\n\nNot run yet." in md

    results["mole_cost"]["mid"] = _cost(1.45, 1.27, 1.1)
    md = render(results)
    assert "(1.142 × bound) | **missed** |" in md
    assert "| mid: speedup_vs_naive ≥ 1.2 | 1.10 | **missed** |" in md
