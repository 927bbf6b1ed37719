"""``bench/results/latest.md``: the results file as Markdown, one table per section, each target of issue 10 with
its figure and whether it is met.

A section that was not measured (no GPU) says so and why; a section missing from the results file (never run)
is listed as such. Every section carries the time and load of the run that produced it, because sections can
come from different runs.

    python -m bench.report            # rewrite latest.md from latest.json
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import LATEST_JSON, LATEST_MD, load_results

#: Issue 10's targets: MoLE time over base time at most this many times the FLOP bound (mid on CPU, SD1.5 on GPU).
TIME_OVER_BOUND_MAX = 1.05
#: ``speedup_vs_naive`` at mid size at least this.
SPEEDUP_VS_NAIVE_MIN = 1.2
#: Stage 1 on the GPU: peak memory under this (bytes), and at least the plain loop's samples/s.
PEAK_MEMORY_MAX_BYTES = 40e9


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**missed**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _stamp(section: Mapping[str, Any]) -> str:
    m = section.get("machine", {})
    load = m.get("load_average") or [m.get("load_average_1m")]
    load_s = "/".join(_f(x, 2) for x in load if x is not None) or "—"
    return (
        f"_Measured {section.get('measured_at', '?')} on {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores), "
        f"load average (1/5/15 min) at the end: {load_s}; OMP_WAIT_POLICY={m.get('omp_wait_policy', '?')}._"
    )


_COST_HEADER = [
    "size", "device", "base ms", "MoLE/base", "paired", "FLOP bound", "w/o attention", "time/bound", "vs naive",
    "naive/base", "peft/base", "MoLE fixed/base", "notes",
]  # fmt: skip


def _cost_row(name: str, r: Mapping[str, Any]) -> list[str]:
    flops = [_f(r["flop_ratio"]), _f(r.get("flop_ratio_no_attention"))]
    if "time_ratio" not in r:
        return [name, "—", "—", "—", "—", *flops, *["—"] * 5, f"timing skipped: {r['skipped']}"]
    peers = r["peers"]
    device = f"{r['device']} ×{r['threads']}" if r.get("threads") else r["device"]
    load = f"{_f(r.get('load_average_1m_before'), 1)}→{_f(r.get('load_average_1m_after'), 1)}"
    return [
        name, device, _f(r["time_ms"]["base"], 1), _f(r["time_ratio"]), _f(r.get("time_ratio_paired")), *flops,
        _f(r["time_over_flop_bound"]), _f(r["speedup_vs_naive"], 2), _f(peers["naive"]["time_ratio"]),
        _f(peers["peft"]["time_ratio"]), _f(peers["mole_fixed"]["time_ratio"]), f"{r['repeats']} repeats, load {load}",
    ]  # fmt: skip


def _mole_cost(sec: Mapping[str, Any]) -> list[str]:
    rows = [_cost_row(name, sec[name]) for name in ("tiny", "mid", "sd15") if name in sec]
    targets = []
    for name, where in (("mid", "CPU"), ("sd15", "GPU")):
        r = sec.get(name)
        label = f"{name} ({where}): MoLE/base time ≤ {TIME_OVER_BOUND_MAX} × FLOP bound"
        if r is None or "time_ratio" not in r:
            reason = (r or {}).get("skipped", "not run")
            targets.append([label, "not measured", f"— ({reason})"])
        else:
            limit = TIME_OVER_BOUND_MAX * r["flop_ratio"]
            figure = f"{r['time_ratio']:.3f} vs {limit:.3f} ({r['time_over_flop_bound']:.3f} × bound)"
            targets.append([label, figure, _verdict(r["time_ratio"] <= limit)])
    mid = sec.get("mid")
    label = f"mid: speedup_vs_naive ≥ {SPEEDUP_VS_NAIVE_MIN}"
    if mid is None or "time_ratio" not in mid:
        targets.append([label, "not measured", "—"])
    else:
        s, paired = mid["speedup_vs_naive"], mid.get("speedup_vs_naive_paired")
        figure = _f(s, 2) + (f" (from per-round differences: {paired:.2f})" if paired is not None else "")
        targets.append([label, figure, _verdict(s is not None and s >= SPEEDUP_VS_NAIVE_MIN)])
    return [
        "## MoLE inference cost (`mole_cost`)",
        "",
        "UNet forward with two experts (local + global gates) over the base UNet's: MoLE/base is the ratio of "
        "the medians over interleaved repeats (the figure the targets use), paired the median of the per-round "
        "ratios; where they differ the machine's load drifted during the run. FLOP bound = MoLE FLOPs / base "
        "FLOPs (torch FlopCounterMode, attention included; w/o attention: as FlopCounterMode counts by itself on "
        "CPU, which has no formula for the CPU attention kernel). "
        "speedup vs naive = (naive − base) / (MoLE − base). Peers: naive MoLE (four matmuls per layer), peft "
        "mixing two LoRA adapters by `set_adapters`, and MoLE at the same fixed weights as peft.",
        "",
        *_table(_COST_HEADER, rows),
        *_table(["target", "figure", "verdict"], targets),
        _stamp(sec),
        "",
    ]


def _layer(sec: Mapping[str, Any]) -> list[str]:
    rows = [
        [name, _f(r["base_ms"], 2), _f(r["fused_over_base"]), _f(r["naive_over_base"]),
         _f(r["speedup_vs_naive"], 2), _f(r["flop_ratio"])]
        for name, r in sec.get("shapes", {}).items()
    ]  # fmt: skip
    return [
        "## One MoLE layer, fused vs naive (`layer`)",
        "",
        f"SD1.5 layer shapes, two experts, local + global gates, forward only, {sec.get('threads')} threads.",
        "",
        *_table(["shape", "base ms", "fused/base", "naive/base", "vs naive", "FLOP bound (no gates)"], rows),
        _stamp(sec),
        "",
    ]


#: Issue 16's GPU targets (SD1.5, measured by `make gpu-check`).
GPU_TIME_OVER_BOUND_MAX = 1.1  # MoLE/base at UNet batch 16, bf16, at most this × the FLOP bound
PEER_BATCHES = ("2", "8", "16")  # MoLE (gated) no slower than peft's two-adapter mix at these UNet batches
COMPILED_B2_MAX = 1.6  # compiled UNet at batch 2: MoLE/base at most this
GENERATION_MIN = 0.7  # 25-step 512² generation: MoLE images/s at least this × base


def issue16_targets(results: Mapping[str, Any]) -> list[list[str]]:
    """Issue 16's targets, each met, missed, or not measured with the reason (no GPU)."""
    cost = (results.get("mole_cost") or {}).get("sd15") or {}
    speed = (results.get("generate_speed") or {}).get("sd15") or {}
    reason = cost.get("skipped") or speed.get("skipped") or "not run"
    by_batch = cost.get("by_batch") or {}
    rows = []
    label = f"SD1.5, UNet batch 16, bf16: MoLE/base ≤ {GPU_TIME_OVER_BOUND_MAX} × FLOP bound"
    b16 = by_batch.get("16")
    if b16 is None or b16.get("dtype") != "bfloat16":
        rows.append([label, "not measured", f"— ({reason if b16 is None else 'not bf16'})"])
    else:
        limit = GPU_TIME_OVER_BOUND_MAX * b16["flop_ratio"]
        rows.append([label, f"{b16['time_ratio']:.3f} vs {limit:.3f}", _verdict(b16["time_ratio"] <= limit)])
    for batch in PEER_BATCHES:
        label = f"SD1.5, UNet batch {batch}: MoLE (gated) time ≤ peft's two-adapter mix"
        r = by_batch.get(batch)
        if r is None:
            rows.append([label, "not measured", f"— ({reason})"])
        else:
            ratio = r["time_ms"]["mole"] / r["time_ms"]["peft"]
            rows.append([label, f"MoLE/peft {ratio:.3f}", _verdict(ratio <= 1.0)])
    compiled = (speed.get("modes") or {}).get("compiled") or {}
    label = f"SD1.5, compiled UNet at batch 2: MoLE/base ≤ {COMPILED_B2_MAX}"
    row = compiled.get("1")  # one image under guidance = UNet batch 2
    if row is None or compiled.get("compile_failed"):
        why = compiled.get("skipped") or (f"compile failed: {compiled['compile_failed']}" if compiled else reason)
        rows.append([label, "not measured", f"— ({why})"])
    else:
        rows.append([label, _f(row["unet_mole_over_base"]), _verdict(row["unet_mole_over_base"] <= COMPILED_B2_MAX)])
    for mode, table in ((speed.get("modes") or {}).items()) or [("eager", {})]:
        for batch in ("1", "8"):
            label = f"SD1.5, 25-step 512² generation, batch {batch}, {mode}: MoLE ≥ {GENERATION_MIN} × base images/s"
            row = table.get(batch)
            if row is None:
                rows.append([label, "not measured", f"— ({table.get('skipped') or reason})"])
            else:
                ratio = row["mole_over_base_images_per_second"]
                rows.append([label, _f(ratio), _verdict(ratio >= GENERATION_MIN)])
    return rows


def _issue16(results: Mapping[str, Any]) -> list[str]:
    speed = (results.get("generate_speed") or {}).get("tiny")
    lines = [
        "## MoLE at the speed of its FLOPs on a GPU (issue 16)",
        "",
        "Measured by `make gpu-check` (`bench.mole_cost --sizes sd15 --batches 2 8 16 --dtype bf16`, "
        "`bench.generate_speed --size sd15 --batches 1 8 --steps 25 [--compile]`) into its results file; "
        "here, what the file this report renders holds.",
        "",
        *_table(["target", "figure", "verdict"], issue16_targets(results)),
    ]
    if speed and "modes" in speed:
        rows = [
            [mode, batch, _f(r["images_per_second"]["base"], 2), _f(r["images_per_second"]["mole"], 2),
             _f(r["mole_over_base_images_per_second"]), _f(r["unet_mole_over_base"])]
            for mode, table in speed["modes"].items() for batch, r in table.items() if isinstance(r, dict)
            and "images_per_second" in r
        ]  # fmt: skip
        lines += [
            f"Tiny model ({speed['device']}, {speed['steps']} steps, {speed['resolution']}²), `generate_speed --size "
            "tiny`: the script's proof, not a target.",
            "",
            *_table(["mode", "batch", "base img/s", "MoLE img/s", "MoLE/base img/s", "UNet MoLE/base"], rows),
        ]
    return lines


def _before_after(sec: Mapping[str, Any]) -> list[str]:
    paired = sec.get("paired", {})
    row = [sec.get("size", "?"), _f(sec["time_ms"]["base"], 1), _f(sec["before_over_base"]),
           _f(sec["after_over_base"]), _f(sec["after_over_before"]), _f(paired.get("after_over_before")),
           f"{_f(sec.get('load_average_1m_before'), 1)}→{_f(sec.get('load_average_1m_after'), 1)}"]  # fmt: skip
    return [
        "## The MoLE layer before and after issue 16 (`layer_before_after`)",
        "",
        "One UNet, its MoLE layers as before issue 16 (tests/reference_layer.py) and as now, with the same experts "
        "and gates, timed interleaved with the base in one process.",
        "",
        *_table(["size", "base ms", "before/base", "after/base", "after/before", "paired", "load"], [row]),
        _stamp(sec),
        "",
    ]


def _layer_ops(sec: Mapping[str, Any]) -> list[str]:
    rows = [
        [name, str(case["ops"]), ", ".join(f"{op.removeprefix('aten::')} ×{k}" for op, k in case["by_name"].items())]
        for name, case in sec.get("cases", {}).items()
    ]
    label = f"compute ops of one MoLE layer beyond its base (to_q, local + global, frozen) ≤ {sec.get('max_ops')}"
    figure = f"{sec.get('ops')} (before issue 16: {sec.get('before_issue_16')})"
    return [
        "## One MoLE layer's ops (`layer_ops`)",
        "",
        f"{sec.get('method', '')}; the embedded default's UNet, two rank-8 experts. On a GPU every op is a kernel "
        "launch, so this is what a launch-bound UNet pays per layer.",
        "",
        *_table(["case", "ops", "which"], rows),
        *_table(["target", "figure", "verdict"], [[label, figure, _verdict(sec.get("met"))]]),
        _stamp(sec),
        "",
    ]


def _training(sec: Mapping[str, Any]) -> list[str]:
    tiny = sec.get("tiny_cpu", {})
    rows = [
        [name, _f(r["samples_per_second"], 2), str(r["batch_size"]), str(r["steps"]), _f(r["wall_seconds"], 1)]
        for name, r in tiny.get("stages", {}).items()
    ]
    lines = [
        "## Training throughput (`training`)",
        "",
        f"Tiny model on CPU ({tiny.get('threads', '?')} threads), each stage through `mole.train.train_stage`: "
        "samples/s is the median over logging windows, the first left out.",
        "",
        *_table(["stage", "samples/s", "batch", "steps", "wall s (incl. load + checkpoint)"], rows),
    ]
    gpu = sec.get("sd15_stage1_gpu", {})
    speed_label = "stage 1 on GPU (SD1.5, 512², bf16, ZeRO-2): samples/s ≥ plain loop's"
    mem_label = "stage 1 on GPU, UNet + text encoder at batch 8 (bf16): peak memory < 40 GB"
    if "skipped" in gpu or not gpu:
        reason = gpu.get("skipped", "not run")
        lines.append(
            f"Stage 1 on SD1.5's architecture on a GPU against a plain diffusers-like loop: skipped ({reason})."
        )
        lines.append("")
        targets = [[speed_label, "not measured", f"— ({reason})"], [mem_label, "not measured", f"— ({reason})"]]
    else:
        mole, plain = gpu["mole"], gpu["plain"]
        lines += _table(
            ["loop", "samples/s", "peak memory GiB"],
            [["mole", _f(mole["samples_per_second"], 2), _f(mole.get("peak_memory_gib"), 1)],
             ["plain (diffusers-like)", _f(plain["samples_per_second"], 2), _f(plain.get("peak_memory_gib"), 1)]],
        )  # fmt: skip
        peak = mole.get("peak_memory_gib")
        targets = [
            [speed_label, f"{gpu['speed_vs_plain']:.3f} × plain", _verdict(gpu["speed_vs_plain"] >= 1.0)],
            [
                mem_label,
                f"{_f(peak, 1)} GiB",
                _verdict(None if peak is None else peak * 2**30 < PEAK_MEMORY_MAX_BYTES),
            ],
        ]
    return [*lines, *_table(["target", "figure", "verdict"], targets), _stamp(sec), ""]


def _curation(sec: Mapping[str, Any]) -> list[str]:
    rows = [
        [kind, "×".join(map(str, r["input_size"])), str(r["images"]), _f(r["images_per_second_per_core"], 2),
         _f(r["images_per_wall_second"], 2), f"{r['kept']} kept, {r['samples']} samples", r["filters"]]
        for kind in ("scenes", "faces") if (r := sec.get(kind))
    ]  # fmt: skip
    return [
        "## Curation throughput (`curation`)",
        "",
        "`curate` with one worker, one torch and one OpenCV thread; images/s/core is per second of this "
        "process's CPU time. No target in the issue: reported as measured.",
        "",
        *_table(["kind", "input", "images", "img/s/core", "img/s wall", "output", "filters"], rows),
        _stamp(sec),
        "",
    ]


def _demo(sec: Mapping[str, Any]) -> list[str]:
    status = f"failed: {sec['error'][:200]}" if sec.get("error") else "ok"
    return [
        "## End to end (`demo`)",
        "",
        "Wall time of `make demo` into a temporary folder (setup not timed). No target in the issue.",
        "",
        *_table(
            ["command", "wall s", "status"], [[f"`{sec.get('command')}`", _f(sec.get("wall_seconds"), 1), status]]
        ),
        _stamp(sec),
        "",
    ]


def _run(sec: Mapping[str, Any]) -> list[str]:
    left_out = sec.get("left_out", {})
    rows = [
        [name, r.get("finished_at", "?") + (f" (left out now: {left_out[name]})" if name in left_out else ""),
         _f(r["seconds"], 0), str(r["returncode"]),
         f"{_f(r['load_average_1m_before'], 2)} → {_f(r['load_average_1m_after'], 2)}"]
        for name, r in sec.get("benchmarks", {}).items()
    ]  # fmt: skip
    return [
        "## Runs (`run`)",
        "",
        f"`python -m bench.run_all{' --quick' if sec.get('quick') else ''}`, one process per benchmark; a "
        "benchmark left out of the last run keeps the record of the run that wrote its section.",
        "",
        *_table(["benchmark", "finished", "seconds", "exit", "load average 1 min (before → after)"], rows),
        _stamp(sec),
        "",
    ]


#: Stage 1 on one GPU (issue 15): mole's samples/s at least this many times the plain loop's.
STAGE1_SPEEDUP_MIN = 2.0


def _flat(value: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, str]]:
    """Numeric and short text leaves of a nested result, as (dotted key, value) rows."""
    if isinstance(value, Mapping) and depth > 0:
        rows: list[tuple[str, str]] = []
        for k, v in value.items():
            if k not in ("machine", "versions", "measured_at"):
                rows += _flat(v, f"{prefix}.{k}" if prefix else str(k), depth - 1)
        return rows
    if isinstance(value, bool) or value is None:
        return [(prefix, str(value))]
    if isinstance(value, int | float):
        return [(prefix, _f(float(value), 3))]
    if isinstance(value, str) and len(value) <= 80:
        return [(prefix, value)]
    return []


def _gpu(sec: Mapping[str, Any]) -> list[str]:
    check = sec.get("gpu_check", {})
    rows = [
        [name, r["status"], _f(r.get("seconds"), 0), (r.get("error") or "").splitlines()[0][:160] if r.get("error")
         else r.get("command", "")]
        for name, r in check.get("checks", {}).items()
    ]  # fmt: skip
    lines = [
        "## GPU check (`make gpu-check`, bench/results/gpu.json)",
        "",
        f"{'Smoke run on CPU (tiny sizes: proves the script, not the GPU). ' if check.get('smoke') else ''}"
        f"Total {_f(check.get('total_seconds'), 0)} s of a {_f(check.get('budget_seconds'), 0)} s budget.",
        "",
        *_table(["check", "status", "seconds", "command / error"], rows),
    ]
    train = sec.get("training", {})
    runs = train.get("runs", {})
    if runs:
        lines += _table(
            ["run", "batch", "samples/s", "peak memory GiB", "weights"],
            [[name, str(r.get("batch_size", "—")), _f(r.get("samples_per_second"), 2),
              _f(r.get("peak_memory_gib"), 1), str(r.get("compute_dtype", "—"))] for name, r in runs.items()],
        )  # fmt: skip
        speed = train.get("speed_vs_plain")
        res, prec = train.get("resolution"), train.get("precision")
        label = f"stage 1 on one GPU ({train.get('architecture')}, {res}², {prec}): ≥ {STAGE1_SPEEDUP_MIN} × plain"
        uncached = train.get("speed_vs_plain_uncached")
        figure = f"{_f(speed, 2)} × plain" + (f" ({_f(uncached, 2)} × without the latent cache)" if uncached else "")
        verdict = _verdict(None if speed is None else speed >= STAGE1_SPEEDUP_MIN)
        targets = [[label, figure, verdict]]
        a100 = runs.get("stage1_mole_a100_40g", {}).get("peak_memory_gib")
        targets.append(["stage 1, one-A100-40GB settings (batch 8, gradient checkpointing): peak < 40 GB",
                        f"{_f(a100, 1)} GiB", _verdict(None if a100 is None
                                                       else a100 * 2**30 < PEAK_MEMORY_MAX_BYTES)])  # fmt: skip
        lines += _table(["target", "figure", "verdict"], targets)
    tests = sec.get("pytest_gpu")
    if tests:
        lines += [f"`pytest -m gpu`: {tests.get('passed')} passed, {tests.get('failures', 0) + tests.get('errors', 0)}"
                  f" failed, {tests.get('skipped')} skipped.", ""]  # fmt: skip
    for name in ("mole_cost", "generation"):
        if name in sec:
            flat = _flat(sec[name])[:60]
            lines += [f"`{name}` (written by its own benchmark):", "", *_table(["figure", "value"],
                                                                               [list(r) for r in flat])]  # fmt: skip
    return [*lines, _stamp(check or sec), ""]


SECTIONS = {
    "mole_cost": _mole_cost,
    "layer": _layer,
    "layer_ops": _layer_ops,
    "layer_before_after": _before_after,
    "training": _training,
    "curation": _curation,
    "demo": _demo,
    "run": _run,
    "gpu": _gpu,
}


def render(results: Mapping[str, Any]) -> str:
    """The Markdown summary of a results file's contents."""
    versions = results.get("versions", {})
    lines = [
        "# Benchmarks (issue 10)",
        "",
        "Written by `make bench` (`python -m bench.run_all`) from `bench/results/latest.json`. Figures are ratios "
        "measured within one run, on a shared machine: see each section's load average.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    for name, fn in SECTIONS.items():
        if name in results:
            lines += fn(results[name])
        else:
            lines += [f"## `{name}`", "", "Not run yet.", ""]
    lines += _issue16(results)
    return "\n".join(lines).rstrip() + "\n"


def write_report(json_path: Path = LATEST_JSON, md_path: Path = LATEST_MD) -> Path:
    md_path.write_text(render(load_results(json_path)), encoding="utf-8")
    return md_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print(write_report())


if __name__ == "__main__":
    main()
