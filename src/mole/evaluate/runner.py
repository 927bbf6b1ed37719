"""`mole evaluate`: generate for sampled benchmark prompts, score, report mean ± standard error (paper §4.2).

The paper samples 3k prompts, generates, scores with HPS and ImageReward, repeats three times, and reports
the mean over repeats and its standard error. Every prompt gets a seed derived from (seed, repeat, prompt),
so two models evaluated with the same settings see the same prompts with the same initial noise: the
stage and gate ablations (tables 2 and 3) compare like with like.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mole.uris import is_model_uri, parse_model_uri

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to evaluate and how."""

    model: str
    prompts: str
    experts: dict[str, str] = field(default_factory=dict)
    gates: str | None = None
    num_prompts: int = 3000
    repeats: int = 3
    scorers: list[str] = field(default_factory=lambda: ["clip"])
    scorer_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    batch_size: int = 4
    save_images: bool = True
    label: str | None = None
    #: Compile the UNet (:mod:`mole.compile`; eager with a warning on CPU or when compiling fails).
    compile_unet: bool = False

    def __post_init__(self) -> None:
        # The gates stage's output folder stands for its gates file (the model folder is resolved on loading,
        # so that a stage-1 folder keeps its own name as the report's label).
        if self.gates:
            from mole.outputs import gates_file

            self.gates = str(gates_file(self.gates))


def prompt_seed(seed: int, repeat: int, prompt: str) -> int:
    """A seed that depends only on (seed, repeat, prompt): stable across models, batch sizes and machines."""
    digest = hashlib.sha256(f"{seed}:{repeat}:{prompt}".encode()).hexdigest()
    return int(digest[:8], 16)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate(settings: EvalSettings, output: str | os.PathLike[str]) -> dict[str, Any]:
    """Run the evaluation; write images, ``scores.csv``, ``report.json`` and ``report.md`` under ``output``."""
    from tqdm.auto import tqdm

    from mole.evaluate.prompts import read_prompts, sample_prompts
    from mole.evaluate.scorers import build_scorer
    from mole.generate import generate, load_pipeline

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(settings.prompts)
    if not prompts:
        raise ValueError(f"{settings.prompts} holds no prompts")
    if not settings.scorers:
        raise ValueError("at least one scorer is needed (--scorers clip,hps_v1,...)")
    scorers = [build_scorer(name, settings.scorer_config.get(name, {})) for name in settings.scorers]
    if is_model_uri(settings.model):
        from mole.tracking import load_registered_pipeline

        pipe = load_registered_pipeline(settings.model)
        if settings.compile_unet:
            from mole.compile import compile_unet

            compile_unet(pipe.unet)
    else:
        pipe = load_pipeline(settings.model, settings.experts or None, settings.gates,
                             compile_unet=settings.compile_unet)  # fmt: skip
    n = min(settings.num_prompts, len(prompts))
    if n < settings.num_prompts:
        logger.warning("only %d prompts in %s; evaluating all of them", n, settings.prompts)
    rows: list[dict[str, Any]] = []
    per_repeat: dict[str, list[float]] = {s.name: [] for s in scorers}
    bar = tqdm(total=n * settings.repeats, desc="evaluate", unit="img")
    for repeat in range(settings.repeats):
        sample = sample_prompts(prompts, n, settings.seed, repeat)
        repeat_scores: dict[str, list[float]] = {s.name: [] for s in scorers}
        for start in range(0, n, settings.batch_size):
            batch = sample[start : start + settings.batch_size]
            seeds = [prompt_seed(settings.seed, repeat, p) for p in batch]
            images = generate(pipe, batch, seeds=seeds, steps=settings.steps, guidance=settings.guidance,
                              width=settings.width, height=settings.height).images  # fmt: skip
            batch_scores = {s.name: s.score(images, batch) for s in scorers}
            for k, (prompt, image) in enumerate(zip(batch, images, strict=True)):
                index = start + k
                row = {"repeat": repeat, "index": index, "prompt": prompt, "seed": seeds[k]}
                if settings.save_images:
                    path = out / "images" / f"r{repeat}" / f"{index:05d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    row["image"] = str(path.relative_to(out))
                for name, values in batch_scores.items():
                    row[name] = float(values[k])
                    repeat_scores[name].append(float(values[k]))
                rows.append(row)
            bar.update(len(batch))
        for name, values in repeat_scores.items():
            per_repeat[name].append(sum(values) / len(values))
    bar.close()
    summary = {}
    for name, means in per_repeat.items():
        mean, se = mean_stderr(means)
        summary[name] = {"mean": mean, "stderr": se, "per_repeat": means}
    report = {"label": settings.label or Path(settings.model).name, "settings": asdict(settings),
              "num_prompts": n, "repeats": settings.repeats, "scores": summary}  # fmt: skip
    if settings.gates:
        from mole.gates_io import read_gate_settings

        mix = read_gate_settings(settings.gates)
        report["mixture"] = {"gate": mix.gate, "condition": mix.condition, "experts": list(mix.experts)}
    _write_rows(out / "scores.csv", rows)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(compare_table([report]) + "\n", encoding="utf-8")
    return report


def evaluate_tracked(settings: EvalSettings, output: str | os.PathLike[str]) -> dict[str, Any]:
    """Evaluate inside an ``evaluate`` MLflow run; scores also go onto the registered version evaluated."""

    from mole import tracking

    output = Path(output)

    if not tracking.enabled():
        return evaluate(settings, output)
    with tracking.StageRun("evaluate") as run:
        run.log_params({"evaluate": {k: v for k, v in settings.__dict__.items() if k != "scorer_config"}})
        info = tracking.source_of(settings.model if "://" in settings.model else settings.gates or settings.model)
        run.log_upstream("model", info.get("mlflow_run_id"), info.get("model_id"))
        report = evaluate(settings, output)
        # The run id in report.json: what later reads this output (a user study) logs onto this run.
        report["mlflow_run_id"] = run.run_id
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        for name, s in report["scores"].items():
            run.log_metrics({name: s["mean"], f"{name}_stderr": s["stderr"]}, step=0)
        for artifact in ("report.md", "report.json", "scores.csv"):
            run.log_artifact(output / artifact, "evaluation")
        ref = parse_model_uri(settings.model)
        version = (
            (ref.name, ref.version or tracking.alias_version(ref.name, ref.alias))
            if ref
            else (info.get("registered"), info.get("version"))
        )
        if version[0] and version[1]:
            for name, s in report["scores"].items():
                tracking.set_model_metric(version[0], version[1], name, s["mean"])
    return report


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no evaluation report at {p} (run `mole evaluate` first)")
    return json.loads(p.read_text(encoding="utf-8"))


#: Settings that fix which prompts a run samples, their seeds and the sampler: runs compared side by side should
#: agree on all of them (then every prompt gets the same initial noise in every run).
SAMPLE_KEYS = ("prompts", "num_prompts", "repeats", "seed", "steps", "guidance", "width", "height")


def sample_mismatches(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """The :data:`SAMPLE_KEYS` on which the runs differ (empty when they saw the same prompts and seeds)."""
    settings = [r.get("settings", {}) for r in reports]
    return [k for k in SAMPLE_KEYS if len({json.dumps(s.get(k)) for s in settings}) > 1]


def _mixture(report: Mapping[str, Any]) -> str:
    mix = report.get("mixture")
    if not mix:
        return "–"
    return f"{len(mix['experts'])} experts, {mix['gate']}" + (
        f", {mix['condition']}" if mix.get("condition", "none") != "none" else ""
    )


def compare_table(reports: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> str:
    """A Markdown table, one row per run and one column per scorer: ``mean ± stderr`` (tables 1–3); with a
    ``gates`` column (experts, gate mode, condition) when any run is a MoLE mixture."""
    names: list[str] = []
    for r in reports:
        names += [n for n in r["scores"] if n not in names]
    mixtures = any(r.get("mixture") for r in reports)
    columns = (["gates"] if mixtures else []) + names
    header = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    lines = [header]
    for i, r in enumerate(reports):
        label = labels[i] if labels else r.get("label", f"run {i}")
        cells = [_mixture(r)] if mixtures else []
        for n in names:
            s = r["scores"].get(n)
            cells.append(f"{s['mean']:.3f} ± {s['stderr']:.3f}" if s else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_csv(reports: Sequence[Mapping[str, Any]], path: Path, labels: Sequence[str] | None = None) -> None:
    names: list[str] = []
    for r in reports:
        names += [n for n in r["scores"] if n not in names]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model"] + [f"{n}_{k}" for n in names for k in ("mean", "stderr")])
        for i, r in enumerate(reports):
            label = labels[i] if labels else r.get("label", f"run {i}")
            row = [label]
            for n in names:
                s = r["scores"].get(n)
                row += [s["mean"], s["stderr"]] if s else ["", ""]
            writer.writerow(row)


def compare_gates(
    reports: Sequence[Mapping[str, Any]],
    labels: Sequence[str] | None,
    output: str | os.PathLike[str],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:  # label -> mole.evaluate.gates.GateStats
    """Gate statistics of every compared run that is a MoLE mixture, on the same prompt groups with the same
    seeds, plotted side by side (:func:`mole.evaluate.gates.plot_gate_comparison`): plain vs timestep gates.

    Args:
        steps: Denoising steps (default: each run's own evaluation steps).
    """
    from mole.evaluate.gates import gate_statistics, plot_gate_comparison
    from mole.generate import load_pipeline
    from mole.inject import mole_layers

    rows = {}
    for i, r in enumerate(reports):
        label = labels[i] if labels else r.get("label", f"run {i}")
        s = r.get("settings", {})
        if is_model_uri(s.get("model", "")):
            from mole.tracking import load_registered_pipeline

            pipe = load_registered_pipeline(s["model"])
            if not mole_layers(pipe.unet):
                logger.info("%s has no gates: no gate plots for it", label)
                continue
        elif s.get("gates"):
            pipe = load_pipeline(s["model"], s["experts"], s["gates"])
        else:
            logger.info("%s has no gates: no gate plots for it", label)
            continue
        rows[label] = gate_statistics(pipe, groups, steps=steps or s.get("steps", 25), seed=s.get("seed", 0),
                                      guidance=s.get("guidance", 7.5))  # fmt: skip
    if not rows:
        raise ValueError("none of the compared runs is a MoLE mixture (no gates): nothing to plot")
    plot_gate_comparison(rows, output)
    return rows
