"""Issue 16's benchmarks run and record what the GPU check reads: mole_cost's --batches/--dtype/--results, the
naive peer on 2-D inputs (SD1.5's time embedding), generate_speed's rows (tiny on CPU) and its sd15 skip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench.peers import NaiveMoLELayer
from mole.layers import ExpertWeights, MoLELayer


def test_naive_peer_takes_a_2d_input_like_the_time_embedding_linears() -> None:
    g = torch.Generator().manual_seed(0)
    experts = [ExpertWeights(torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), 0.5) for _ in "ab"]
    fused = MoLELayer(nn.Linear(12, 10), experts, ["a", "b"], gate="both")
    with torch.no_grad():
        for p in (fused.mole_local.weight, fused.mole_global.weight):
            p.normal_(generator=g)
    naive = NaiveMoLELayer(fused, experts)
    x = torch.randn(3, 12, generator=g)  # [B, d]: no token axis
    with torch.inference_mode():
        torch.testing.assert_close(naive(x), fused(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the sd15 rows are measured, not skipped")
def test_generate_speed_records_sd15_as_skipped_without_cuda(tmp_path) -> None:
    from bench.generate_speed import main

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"schema": "mole-bench/1", "generate_speed": {"tiny": {"kept": True}}}))
    main(["--size", "sd15", "--batches", "1", "8", "--steps", "25", "--compile", "--results", str(path)])
    section = json.loads(path.read_text())["generate_speed"]
    assert section["sd15"] == {"skipped": "no CUDA device", "batches": [1, 8], "steps": 25, "compile": True}
    assert section["tiny"] == {"kept": True}  # the other size's rows stay


@pytest.mark.slow
def test_generate_speed_runs_tiny_on_cpu_with_base_and_mole_rows(tmp_path) -> None:
    from bench.generate_speed import main

    path = tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        main(["--size", "tiny", "--batches", "1", "2", "--steps", "1", "--repeats", "1", "--compile",
              "--results", str(path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    tiny = json.loads(path.read_text())["generate_speed"]["tiny"]
    assert tiny["batches"] == [1, 2] and tiny["steps"] == 1
    for batch in ("1", "2"):
        row = tiny["modes"]["eager"][batch]
        assert row["images_per_second"]["base"] > 0 and row["images_per_second"]["mole"] > 0
        assert row["unet_batch"] == 2 * int(batch) and row["unet_mole_over_base"] > 0
    if not torch.cuda.is_available():
        assert "compiling is for CUDA" in tiny["modes"]["compiled"]["skipped"]


@pytest.mark.slow
def test_mole_cost_times_every_batch_into_the_given_results_file(tmp_path) -> None:
    from bench.mole_cost import main

    path = tmp_path / "gpu.json"
    main(["--sizes", "tiny", "--batches", "1", "3", "--quick", "--threads", "1", "--results", str(path)])
    tiny = json.loads(path.read_text())["mole_cost"]["tiny"]
    assert set(tiny["by_batch"]) == {"1", "3"} and tiny["batch"] == 1
    assert tiny["by_batch"]["3"]["batch"] == 3 and tiny["by_batch"]["3"]["mole_over_peft"] > 0
    assert tiny["by_batch"]["3"]["max_rel_diff"]["mole_vs_naive"] < 1e-4


def _gpu_row(time_ratio: float, mole_ms: float, peft_ms: float, dtype: str = "bfloat16") -> dict:
    return {"time_ratio": time_ratio, "flop_ratio": 1.389, "dtype": dtype,
            "time_ms": {"base": 10.0, "mole": mole_ms, "peft": peft_ms}}  # fmt: skip


def test_report_lists_issue_16_targets_as_not_measured_without_a_gpu_and_judges_them_with_one() -> None:
    from bench.report import issue16_targets, render

    skipped = {
        "mole_cost": {"sd15": {"skipped": "no CUDA device", "flop_ratio": 1.389}},
        "generate_speed": {"sd15": {"skipped": "no CUDA device", "batches": [1, 8], "steps": 25, "compile": True}},
    }
    rows = issue16_targets(skipped)
    assert len(rows) == 1 + 3 + 1 + 2 and all(r[1:] == ["not measured", "— (no CUDA device)"] for r in rows)
    assert "## MoLE at the speed of its FLOPs on a GPU (issue 16)" in render({"schema": "mole-bench/1", **skipped})

    measured = {
        "mole_cost": {"sd15": {"by_batch": {"2": _gpu_row(2.0, 20.0, 21.0), "8": _gpu_row(1.6, 16.0, 15.0),
                                            "16": _gpu_row(1.5, 15.0, 15.4)}}},
        "generate_speed": {"sd15": {"modes": {
            "eager": {"1": {"mole_over_base_images_per_second": 0.69, "unet_mole_over_base": 2.0},
                      "8": {"mole_over_base_images_per_second": 0.8, "unet_mole_over_base": 1.4}},
            "compiled": {"1": {"mole_over_base_images_per_second": 0.75, "unet_mole_over_base": 1.5},
                         "8": {"mole_over_base_images_per_second": 0.9, "unet_mole_over_base": 1.3},
                         "compile_failed": None}}}},
    }  # fmt: skip
    verdicts = {r[0]: r[2] for r in issue16_targets(measured)}
    assert verdicts["SD1.5, UNet batch 16, bf16: MoLE/base ≤ 1.1 × FLOP bound"] == "**met**"  # 1.5 <= 1.528
    assert verdicts["SD1.5, UNet batch 2: MoLE (gated) time ≤ peft's two-adapter mix"] == "**met**"
    assert verdicts["SD1.5, UNet batch 8: MoLE (gated) time ≤ peft's two-adapter mix"] == "**missed**"
    assert verdicts["SD1.5, compiled UNet at batch 2: MoLE/base ≤ 1.6"] == "**met**"
    assert verdicts["SD1.5, 25-step 512² generation, batch 1, eager: MoLE ≥ 0.7 × base images/s"] == "**missed**"
    assert verdicts["SD1.5, 25-step 512² generation, batch 8, compiled: MoLE ≥ 0.7 × base images/s"] == "**met**"


@pytest.mark.slow
def test_layer_before_after_times_the_replaced_layer_against_the_new_one(tmp_path) -> None:
    from bench.layer_before_after import main

    path = tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        main(["--size", "tiny", "--repeats", "1", "--threads", "1", "--results", str(path)])
    finally:
        torch.set_num_threads(threads)
    section = json.loads(path.read_text())["layer_before_after"]
    assert section["max_rel_diff_after_vs_before"] < 1e-5  # the same function is timed twice
    assert section["after_over_before"] > 0 and set(section["paired"]) == {"before_over_base", "after_over_base",
                                                                             "after_over_before"}  # fmt: skip
