"""Training throughput: samples/s of each stage on the tiny model on CPU; on a GPU, stage 1 on SD1.5's
architecture at 512² (bf16, ZeRO-2, batch 8, UNet + text encoder; mole with configs/paper.yaml's speed settings)
against a plain loop like diffusers' train_text_to_image (gradient checkpointing), with peak GPU memory.

The tiny stages run in this process through :func:`mole.train.train_stage` (what ``mole train`` calls), with
tracking off and no checkpoint or validation image inside the measured steps. Samples/s is the median over the
loop's own logging windows (``metrics.jsonl``), the first window (warm-up) left out.

The GPU comparison launches :mod:`bench.gpu_stage1` twice under ``accelerate launch`` with
``configs/accelerate/zero2.yaml`` (one process): once for mole's loop, once for the plain loop. ``--smoke``
runs that same comparison on CPU with the tiny model (fp32) to check the plumbing; its numbers are not kept.

    python -m bench.train_throughput [--quick] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import update_results, window_throughput

logger = logging.getLogger("bench.train_throughput")
REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
ZERO2 = REPO / "configs" / "accelerate" / "zero2.yaml"


def _stage_overrides(section: str, steps: int, log_every: int) -> dict[str, Any]:
    return {
        f"{section}.max_steps": steps,
        f"{section}.log_every": log_every,
        f"{section}.checkpoint_every": steps,  # the only checkpoint is after the last measured window
        f"{section}.validation_prompts": [],
    }


def tiny_stages(work: Path, steps: int, log_every: int = 5) -> dict[str, Any]:
    """The three stages on the embedded default, one after the other (stage 1 → two experts → gates)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MOLE_TRACKING"] = "off"
    from mole.data.synthetic import write_dataset
    from mole.tiny import init_tiny_model
    from mole.train import load_config, train_stage

    model = init_tiny_model(work / "model", overwrite=True)
    data = {}
    for kind, count in (("scenes", 64), ("faces", 32), ("hands", 32)):
        data[kind] = work / "data" / kind
        write_dataset(data[kind], kind, count, overwrite=True)
    overrides = {}
    for section in ("stage1", "experts.face", "experts.hand", "gates"):
        overrides.update(_stage_overrides(section, steps, log_every))
    recipe = load_config(TINY_CONFIG, overrides)
    runs = [
        ("stage1", {"data": str(data["scenes"]), "base": str(model)}),
        ("expert:face", {"data": str(data["faces"]), "base": str(work / "stage1" / "model"), "expert_name": "face"}),
        ("expert:hand", {"data": str(data["hands"]), "base": str(work / "stage1" / "model"), "expert_name": "hand"}),
        ("gates", {"data": str(data["scenes"]), "base": str(work / "stage1" / "model"),
                   "experts": {"face": str(work / "expert-face"), "hand": str(work / "expert-hand")}}),
    ]  # fmt: skip
    results: dict[str, Any] = {}
    for name, kwargs in runs:
        stage = name.split(":")[0]
        output = work / name.replace(":", "-")
        t0 = time.perf_counter()
        result = train_stage(stage, recipe, output=output, **kwargs)
        wall = time.perf_counter() - t0
        section = recipe.stage1 if stage == "stage1" else recipe.gates if stage == "gates" else None
        if section is None:
            section = recipe.experts[kwargs["expert_name"]]
        results[name] = {
            **window_throughput(output / "metrics.jsonl"),
            "batch_size": section.batch_size,
            "steps": result.steps,
            "wall_seconds": wall,  # model loading, the steps, the final checkpoint and result
        }
        logger.info("%s: %.1f samples/s", name, results[name]["samples_per_second"])
    return results


def launch_env() -> dict[str, str]:
    """The environment of a launched run: this one's, with the repository put in front of PYTHONPATH (never
    replacing it: on the GPU machine the packages live in /tmp/site through PYTHONPATH)."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MOLE_TRACKING": "off", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


class LaunchError(RuntimeError):
    """A launched run failed; ``oom`` says whether it ran out of GPU memory."""

    def __init__(self, message: str, oom: bool) -> None:
        super().__init__(message)
        self.oom = oom


def launch(
    which: str, model: Path, data: Path, out: Path, steps: int, batch: int, smoke: bool, *,
    name: str | None = None, stage: str = "stage1", extra: list[str] | None = None, timeout: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One :mod:`bench.gpu_stage1` run under ``accelerate launch`` (ZeRO-2, one process); its JSON result.

    Its output goes to ``out/<name>.log``. Raises:
        LaunchError: The run failed (the log's tail in the message) or timed out.
    """
    name = name or which
    result_file = out / f"{name}.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2), "--num_processes", "1",
        "-m", "bench.gpu_stage1", "--which", which, "--stage", stage, "--model", str(model), "--data", str(data),
        "--output", str(out / name), "--result", str(result_file), "--steps", str(steps), "--batch", str(batch),
        *(extra or []),
    ]  # fmt: skip
    if smoke:
        cmd += ["--smoke"]
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    try:
        with log.open("w", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{name}: no result within {timeout:.0f} s", oom=False) from None
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0 or not result_file.is_file():
        oom = "out of memory" in text.lower()
        raise LaunchError(f"{name}: exit {proc.returncode}: {text[-1500:]}", oom=oom)
    return json.loads(result_file.read_text(encoding="utf-8"))


def gpu_stage1(work: Path, steps: int, smoke: bool = False) -> dict[str, Any]:
    """Stage 1 on SD1.5's architecture (random weights) at 512²: mole's loop against the plain loop."""
    from bench.gpu_stage1 import write_model
    from mole.data.synthetic import write_dataset

    resolution, batch = (64, 4) if smoke else (512, 8)
    model = write_model(work / "model", tiny=smoke)
    data = work / "data"
    write_dataset(data, "scenes", 4 * batch, size=resolution, overwrite=True)
    runs = {}
    for k, which in enumerate(("plain", "mole", "plain", "mole")):  # interleaved, best of two (the GPU warms up)
        r = launch(which, model, data, work, steps, batch, smoke, name=f"{which}-{k}")
        if which not in runs or r["samples_per_second"] > runs[which]["samples_per_second"]:
            runs[which] = r
    return {
        "architecture": "tiny (smoke test on CPU)" if smoke else "SD1.5 (random weights)",
        "resolution": resolution,
        "batch_size": batch,
        "precision": "fp32" if smoke else "bf16",
        "zero_stage": 2,
        "trains": "UNet + text encoder",
        "plain_settings": "gradient checkpointing, VAE every step",
        "mole_settings": "configs/paper.yaml stage1 (speed switches on) at the same batch",
        "mole": runs["mole"],
        "plain": runs["plain"],
        "speed_vs_plain": runs["mole"]["samples_per_second"] / runs["plain"]["samples_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--smoke", action="store_true", help="run the GPU comparison on CPU, tiny (not recorded)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mole-bench-train-") as tmp:
        if args.smoke:
            print(json.dumps(gpu_stage1(Path(tmp), steps=10, smoke=True), indent=2))
            return
        report: dict[str, Any] = {
            "tiny_cpu": {"threads": args.threads, "stages": tiny_stages(Path(tmp) / "tiny", 15 if args.quick else 30)}
        }
        if torch.cuda.is_available():
            report["sd15_stage1_gpu"] = gpu_stage1(Path(tmp) / "sd15", steps=20 if args.quick else 40)
        else:
            report["sd15_stage1_gpu"] = {"skipped": "no CUDA device"}
    update_results("training", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
