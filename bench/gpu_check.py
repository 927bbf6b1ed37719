"""``make gpu-check``: the GPU path in one command, for a machine with one CUDA GPU and no network.

Runs, within a time budget (default 8 minutes), each check in turn and records each in ``bench/results/gpu.json``
— its figures, or its error — then copies the whole into the ``gpu`` section of ``bench/results/latest.json``
and re-renders ``latest.md``. A check that is missing or fails is recorded with its error and the next one
runs: one broken benchmark never hides the others. The exit status is 1 when any check failed.

Checks, most important first:

* ``pytest_gpu``: ``pytest -m gpu`` (the three stages at a small SD-shaped size in bf16, under DeepSpeed too,
  and generation with MoLE in bf16/fp16), counted from its JUnit report.
* ``training``: at SD1.5 size (random weights), 512², bf16, DeepSpeed ZeRO-2, one process: the plain
  diffusers-like stage-1 loop (gradient checkpointing, VAE every step, batch 8) against mole's stage 1 with
  configs/paper.yaml's speed settings at the largest micro-batch that fits (tried from ``--batches``, an
  out-of-memory run falls back to the next), then the expert and the gates stage (paper settings, batch 8):
  samples/s and peak memory each; then, each while 4 minutes of the budget are left, stage 1 with the one-A100-
  40GB settings (batch 8, gradient checkpointing: its peak memory) and without the latent cache (the VAE
  encoding every batch) to show what the cache adds. mole's stage 1 is paper.yaml's: VAE latents cached on
  disk with random flips (both orientations encoded once before training, not counted in samples/s), the
  paper's math.
* ``mole_cost``: ``python -m bench.mole_cost --sizes sd15 --batches 2 8 16 --dtype bf16`` (base, MoLE, naive,
  peft, fixed-weight MoLE and the FLOP bound), into gpu.json.
* ``generation``: ``python -m bench.generate_speed --size sd15 --batches 1 8 --steps 25``: images/s of base vs
  MoLE at 512², DDIM, CFG, into gpu.json.

``--smoke`` runs the same code on CPU at tiny sizes in well under a minute (what the test suite runs), writing
where ``--results`` / ``--latest`` say, so the script itself is proven without a GPU.

    python -m bench.gpu_check [--smoke] [--budget 480] [--results bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import LATEST_JSON, RESULTS_DIR, load_results, update_results
from bench.train_throughput import REPO, LaunchError, launch, launch_env

logger = logging.getLogger("bench.gpu_check")
GPU_JSON = RESULTS_DIR / "gpu.json"
SMOKE = REPO / "out" / "gpu-check-smoke"


class CheckError(RuntimeError):
    """A check did not produce its figures; the message says why (recorded, the run goes on)."""


class Budget:
    """The seconds left of the whole run; each check's timeout is its own cap or what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float:
        left = self.left()
        if left < 10:
            raise CheckError("time budget spent")
        return min(cap, left)


def run_command(cmd: list[str], log: Path, timeout: float) -> str:
    """Run ``cmd`` (keeping PYTHONPATH) with its output in ``log``; its output, or CheckError with the tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CheckError(f"timed out after {timeout:.0f} s: {' '.join(cmd[1:])}") from None
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise CheckError(f"exit {proc.returncode}: {' '.join(cmd[1:])}\n{text[-2000:]}")
    return text


def gpu_test_files() -> list[str]:
    """The test modules with ``gpu``-marked tests, relative to the repository."""
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if "mark.gpu" in path.read_text(encoding="utf-8")
    )


def check_pytest(ctx: dict[str, Any]) -> dict[str, Any]:
    """``pytest -m gpu``: passed / failed / skipped from the JUnit report (skips are failures of the check on
    a GPU machine: they mean the GPU was not seen)."""
    junit = ctx["work"] / "pytest-gpu.xml"
    # Only the modules that hold gpu tests: the others import what the GPU machine lacks (mlflow, kfp, ...).
    targets = ["tests/test_gpu.py"] if ctx["smoke"] else gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--continue-on-collection-errors", *targets]  # fmt: skip
    try:
        run_command(cmd, ctx["work"] / "pytest-gpu.log", ctx["budget"].timeout(ctx["caps"]["pytest_gpu"]))
        error = None
    except CheckError as err:  # failing tests still leave a report to count
        error = str(err)
    if not junit.is_file():
        raise CheckError(error or "pytest wrote no JUnit report")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    result = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
              "failed_tests": failed, "command": " ".join(cmd[1:])}  # fmt: skip
    update_results("pytest_gpu", result, ctx["results"])
    if error or counts["failures"] or counts["errors"]:
        raise CheckError(f"{counts['failures'] + counts['errors']} gpu test(s) failed: {failed[:5]}")
    return result


def _stage_run(ctx: dict[str, Any], name: str, which: str, batch: int, keep: bool = False, **kw: Any) -> dict:
    """One launched run; its output folder is removed afterwards unless ``keep`` (SD1.5 stage-1 checkpoints
    are ~12 GB)."""
    work: Path = ctx["work"] / "train"
    try:
        steps = ctx["steps"]
        return launch(which, ctx["model"], ctx["data"], work, steps, batch, ctx["smoke"], name=name,
                      timeout=ctx["budget"].timeout(ctx["caps"]["training_run"]), **kw)  # fmt: skip
    finally:
        if not keep:
            shutil.rmtree(work / name, ignore_errors=True)


def check_training(ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (mole vs plain), expert and gates at SD1.5 size: samples/s and peak memory."""
    from bench.gpu_stage1 import write_model
    from mole.data.synthetic import write_dataset

    smoke = ctx["smoke"]
    resolution = 64 if smoke else 512
    ctx["model"] = write_model(ctx["work"] / "model", tiny=smoke)
    ctx["data"] = ctx["work"] / "data"
    write_dataset(ctx["data"], "scenes", 4 * max(ctx["batches"]), size=resolution, overwrite=True)
    runs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        runs["stage1_plain"] = _stage_run(ctx, "stage1-plain", "plain", ctx["plain_batch"])
    except (LaunchError, CheckError) as err:
        errors["stage1_plain"] = str(err)
    for batch in ctx["batches"]:  # the largest micro-batch that fits
        try:
            runs["stage1_mole"] = _stage_run(ctx, f"stage1-mole-b{batch}", "mole", batch)
            break
        except LaunchError as err:
            errors[f"stage1_mole_b{batch}"] = str(err)[-600:]
            if not err.oom:
                break
        except CheckError as err:
            errors["stage1_mole"] = str(err)
            break
    expert_file = ctx["work"] / "train" / "expert" / "pytorch_lora_weights.safetensors"
    try:
        runs["expert"] = _stage_run(ctx, "expert", "mole", ctx["plain_batch"], keep=True, stage="expert")
    except (LaunchError, CheckError) as err:
        errors["expert"] = str(err)
    if expert_file.is_file():
        experts = ["--experts", f"face={expert_file}", f"hand={expert_file}"]
        try:
            runs["gates"] = _stage_run(ctx, "gates", "mole", ctx["plain_batch"], stage="gates", extra=experts)
        except (LaunchError, CheckError) as err:
            errors["gates"] = str(err)
    else:
        errors["gates"] = "no expert to mix (the expert run failed)"
    # The paper's machine, one A100 40 GB: batch 8 with gradient checkpointing (README); its peak memory.
    if not smoke and ctx["budget"].left() > ctx["caps"]["reserve_after_training"]:  # (smoke: --set is tried below)
        a100 = ["--set", "stage1.gradient_checkpointing=true"]
        try:
            runs["stage1_mole_a100_40g"] = _stage_run(ctx, "stage1-mole-a100", "mole", ctx["plain_batch"], extra=a100)
        except (LaunchError, CheckError) as err:
            errors["stage1_mole_a100_40g"] = str(err)
    # What the latent cache adds (paper.yaml caches with flips, the same math either way): the same run with
    # the VAE encoding every batch, when time is left for the benchmarks after this one.
    fitted = runs.get("stage1_mole", {}).get("batch_size")
    if fitted and ctx["budget"].left() > ctx["caps"]["reserve_after_training"]:
        uncached = ["--set", "stage1.cache_latents=false"]
        try:
            runs["stage1_mole_uncached"] = _stage_run(ctx, "stage1-mole-uncached", "mole", fitted, extra=uncached)
        except (LaunchError, CheckError) as err:
            errors["stage1_mole_uncached"] = str(err)
    plain, mole = runs.get("stage1_plain"), runs.get("stage1_mole")
    result: dict[str, Any] = {
        "architecture": "tiny (smoke test on CPU)" if smoke else "SD1.5 (random weights)",
        "resolution": resolution,
        "precision": "fp32 (smoke)" if smoke else "bf16",
        "launcher": "accelerate launch, DeepSpeed ZeRO-2, 1 process",
        "steps_per_run": ctx["steps"],
        "plain_settings": f"gradient checkpointing, VAE every step, batch {ctx['plain_batch']}",
        "mole_settings": "configs/paper.yaml (speed switches, latents cached with flips), the largest batch that fits",
        "runs": runs,
        "errors": errors,
        "speed_vs_plain": mole["samples_per_second"] / plain["samples_per_second"] if plain and mole else None,
    }
    if plain and "stage1_mole_uncached" in runs:
        sps = runs["stage1_mole_uncached"]["samples_per_second"]
        result["speed_vs_plain_uncached"] = sps / plain["samples_per_second"]
    update_results("training", result, ctx["results"])
    if (errors and not all(k.startswith("stage1_mole_b") for k in errors)) or not mole:
        raise CheckError("; ".join(f"{k}: {v[-300:]}" for k, v in errors.items()) or "no mole stage-1 run")
    return result


def _sub_benchmark(module: str, args: list[str], cap_name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A benchmark of its own module (issue 16's) that writes its section into ``--results``."""

    def run(ctx: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, "-m", module, *args, "--results", str(ctx["results"])]
        run_command(cmd, ctx["work"] / f"{module}.log", ctx["budget"].timeout(ctx["caps"][cap_name]))
        return {"command": " ".join(cmd[1:])}

    return run


def checks(smoke: bool) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    if smoke:
        cost = ["--sizes", "tiny", "--batches", "2", "--dtype", "fp32", "--quick"]
        gen = ["--size", "tiny", "--batches", "1", "--steps", "2"]
    else:
        cost = ["--sizes", "sd15", "--batches", "2", "8", "16", "--dtype", "bf16"]
        gen = ["--size", "sd15", "--batches", "1", "8", "--steps", "25"]
    return {
        "pytest_gpu": check_pytest,
        "training": check_training,
        "mole_cost": _sub_benchmark("bench.mole_cost", cost, "mole_cost"),
        "generation": _sub_benchmark("bench.generate_speed", gen, "generation"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: proves the script, not the GPU")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--results", type=Path, help=f"the GPU results file (default {GPU_JSON}; smoke: {SMOKE})")
    parser.add_argument(
        "--latest", type=Path,
        help=f"results file whose `gpu` section gets a copy, latest.md rendered next to it (default {LATEST_JSON})",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", help="run only these checks")
    parser.add_argument("--batches", type=int, nargs="+", help="stage-1 micro-batches to try, largest first")
    args = parser.parse_args(argv)
    # A smoke run's tiny CPU figures never land in the committed results.
    args.results = args.results or (SMOKE / "gpu.json" if args.smoke else GPU_JSON)
    args.latest = args.latest or (SMOKE / "latest.json" if args.smoke else LATEST_JSON)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        logger.error("no CUDA device: make gpu-check needs one (python -m bench.gpu_check --smoke runs on CPU)")
        return 2
    todo = checks(args.smoke)
    names = [n for n in todo if not args.only or n in args.only]
    t0 = time.monotonic()
    summary: dict[str, Any] = {"smoke": args.smoke, "budget_seconds": args.budget, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="mole-gpu-check-") as tmp:
        ctx: dict[str, Any] = {
            "smoke": args.smoke,
            "work": Path(tmp),
            "results": args.results,
            "budget": Budget(args.budget),
            "steps": 10 if args.smoke else 15,
            "plain_batch": 2 if args.smoke else 8,
            "batches": args.batches or ([4, 2] if args.smoke else [32, 16, 8]),
            # Each check's own cap (seconds); the budget's remainder bounds them too.
            "caps": {
                "pytest_gpu": 180,
                "training_run": 150,
                "mole_cost": 150,
                "generation": 120,
                "reserve_after_training": 0 if args.smoke else 240,
            },
        }
        for name in names:
            logger.info("== %s", name)
            start = time.monotonic()
            try:
                figures = todo[name](ctx)
                record: dict[str, Any] = {"status": "ok"}
                if "command" in figures:
                    record["command"] = figures["command"]
            except Exception as err:  # any failure is recorded; the next check runs
                logger.error("%s failed: %s", name, str(err)[-1500:])
                record = {"status": "failed", "error": f"{type(err).__name__}: {str(err)[-3000:]}"}
            record["seconds"] = round(time.monotonic() - start, 1)
            summary["checks"][name] = record
            update_results("gpu_check", {**summary, "total_seconds": round(time.monotonic() - t0, 1)}, args.results)
    copy_to_latest(args.results, args.latest)
    failed = [n for n, r in summary["checks"].items() if r["status"] != "ok"]
    logger.info("gpu check: %d ok, %d failed (%s) in %.0f s; %s", len(names) - len(failed), len(failed),
                ", ".join(failed) or "none", time.monotonic() - t0, args.results)  # fmt: skip
    return 1 if failed else 0


def copy_to_latest(results: Path, latest: Path) -> None:
    """The GPU results as the ``gpu`` section of ``latest`` (its other sections kept), and its Markdown."""
    from bench.report import write_report

    gpu = {k: v for k, v in load_results(results).items() if k not in ("schema", "machine", "versions")}
    update_results("gpu", gpu, latest)
    write_report(latest, latest.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
