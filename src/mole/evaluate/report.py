"""One page a person looks at after a pipeline run: what was trained on, what each stage generates, how training
went, what the gates did and how the models scored.

:func:`build_report` reads a run's working folder (``<workspace>/runs/<job id>``, as the pipeline's steps leave it)
and writes ``report/index.html`` (self-contained: every image inline) beside the PNGs it is made of:

* training data samples of every dataset;
* base / stage 1 / + experts (weight 1) / MoLE at the same prompts and seeds (one fresh synthetic caption of every
  kind, so the kind the image should show is known);
* the loss curves of every stage (``metrics.jsonl``);
* the MoLE image's gate values over the denoising steps, per prompt;
* the scores table of the pipeline's evaluations, and caption retrieval by the trained tiny CLIP: for every
  generated image, is its own prompt the most similar of the page's prompts (chance 1 / prompts), and is the most
  similar prompt at least of the right kind (chance 1 / kinds)? That says whether the images show what was asked.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Seed of the fresh synthetic captions used as the report's prompts: apart from the data (0), the tiny CLIP's
#: (10_000, 10_001) and the tiny VAE's (20_000, 20_001).
PROMPT_SEED = 30_000
#: Columns of the image grid, in order.
COLUMNS = ("base", "stage 1", "+ experts", "MoLE")


def _datasets_of(params: Path) -> dict[str, Path]:
    """The local datasets a stage trained on, from its ``params.json`` (the pipeline's data steps write them
    outside the run folder, under content-keyed names such as ``data/faces-5d7b…``): kind -> folder."""
    if not params.is_file():
        return {}
    recorded = json.loads(params.read_text(encoding="utf-8"))
    data = (recorded.get(str(recorded.get("stage"))) or {}).get("data")
    named = data if isinstance(data, dict) else {Path(str(data)).name.split("-")[0]: data} if data else {}
    return {k: Path(v) for k, v in named.items() if (Path(v) / "dataset.json").is_file()}


@dataclass
class RunFolders:
    """Where a pipeline run left what the report shows (any of them may be missing)."""

    workdir: Path
    base: Path | None = None
    stage1: Path | None = None
    experts: dict[str, Path] = field(default_factory=dict)
    gates: Path | None = None
    clip: Path | None = None
    datasets: dict[str, Path] = field(default_factory=dict)
    stages: dict[str, Path] = field(default_factory=dict)  # stage label -> folder with metrics.jsonl
    evaluations: dict[str, Path] = field(default_factory=dict)  # label -> report.json

    @classmethod
    def find(cls, workdir: str | os.PathLike[str]) -> RunFolders:
        w = Path(workdir)
        found = cls(workdir=w)
        if (w / "embedded" / "model" / "model_index.json").is_file():
            found.base = w / "embedded" / "model"
        if (w / "embedded" / "clip" / "config.json").is_file():
            found.clip = w / "embedded" / "clip"
        if (w / "stage1" / "model" / "model_index.json").is_file():
            found.stage1 = w / "stage1" / "model"
        for folder in sorted(w.glob("expert-*")):
            lora = folder / "pytorch_lora_weights.safetensors"
            if lora.is_file():
                found.experts[folder.name.removeprefix("expert-")] = lora
        if (w / "gates" / "gates.safetensors").is_file():
            found.gates = w / "gates" / "gates.safetensors"
        for folder in [w / "stage1", *sorted(w.glob("expert-*")), w / "gates"]:
            for kind, path in _datasets_of(folder / "params.json").items():
                found.datasets.setdefault(kind, path)
        for folder in sorted((w / "data").glob("*")):
            if (folder / "dataset.json").is_file():
                found.datasets.setdefault(folder.name, folder)
        for folder in [w / "stage1", *sorted(w.glob("expert-*")), w / "gates"]:
            if (folder / "metrics.jsonl").is_file():
                found.stages[folder.name] = folder
        for label, name in (("stage 1", "evaluate-stage1"), ("MoLE", "evaluate")):
            if (w / name / "report.json").is_file():
                found.evaluations[label] = w / name / "report.json"
        return found


#: The synthetic kinds, in the report's order.
ALL_KINDS = ("faces", "hands", "feet", "scenes")


def trained_kinds(folders: RunFolders) -> tuple[str, ...]:
    """The synthetic kinds the run trained on (its datasets are named ``KIND`` or ``KIND-<digest>``), in the
    report's order; all of them when none is recognised. Prompts of a kind the run never saw (feet, when only
    scenes, faces and hands were trained) would measure nothing but the chance of guessing it."""
    names = {name.split("-", 1)[0] for name in folders.datasets}
    return tuple(kind for kind in ALL_KINDS if kind in names) or ALL_KINDS


def report_prompts(kinds: tuple[str, ...] = ALL_KINDS, per_kind: int = 3) -> list[tuple[str, str]]:
    """``per_kind`` fresh synthetic captions of every kind, kind by kind: ``[(kind, caption)]``."""
    from mole.data.synthetic import draw_sample

    return [(kind, draw_sample(kind, i, seed=PROMPT_SEED)[1]) for kind in kinds for i in range(per_kind)]


def caption_retrieval(clip_dir: Path, images: list, prompts: list[str], kinds: list[str]) -> dict[str, float]:
    """Top-1 caption retrieval of ``images[i]`` (made for ``prompts[i]``) among the distinct prompts, by the tiny
    CLIP's cosine; also whether the retrieved prompt is of the image's kind. Returns accuracies and chances."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    candidates = list(dict.fromkeys(prompts))
    kind_of = dict(zip(prompts, kinds, strict=True))
    with torch.no_grad():
        inputs = processor(text=candidates, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    best = (img @ txt.T).argmax(dim=1).tolist()
    hits = [candidates[b] == p for b, p in zip(best, prompts, strict=True)]
    kind_hits = [kind_of[candidates[b]] == kind_of[p] for b, p in zip(best, prompts, strict=True)]
    return {
        "top1": sum(hits) / len(hits),
        "top1_chance": 1 / len(candidates),
        "kind_top1": sum(kind_hits) / len(kind_hits),
        "kind_chance": 1 / len(set(kinds)),
        "images": len(images),
    }


def _png(image_or_fig: Any) -> str:
    """An inline ``data:`` URI of a PIL image or a matplotlib figure."""
    buf = io.BytesIO()
    if hasattr(image_or_fig, "savefig"):
        image_or_fig.savefig(buf, format="png", dpi=100)
    else:
        image_or_fig.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _img(uri: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{size}>'


def _data_section(folders: RunFolders, per_kind: int) -> str:
    from mole.data.shards import load_samples

    rows = []
    for kind, path in folders.datasets.items():
        samples = load_samples(path, limit=per_kind)
        cells = "".join(
            f"<figure>{_img(_png(s.image.resize((128, 128))), s.caption)}<figcaption>{html.escape(s.caption)}"
            "</figcaption></figure>"
            for s in samples
        )
        rows.append(f"<h3>{html.escape(kind)}</h3><div class='row'>{cells}</div>")
    return "".join(rows) or "<p>no datasets found</p>"


def _loss_figure(folders: RunFolders):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(folders.stages)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.6 * max(n, 1), 2.8), squeeze=False)
    for ax, (label, folder) in zip(axes[0], folders.stages.items(), strict=False):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    return fig


def _gates_figure(traces: list[tuple[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(3.6 * len(traces), 2.8), sharey=True, squeeze=False)
    for ax, (kind, trace) in zip(axes[0], traces, strict=True):
        values = torch.tensor(trace.global_)  # [steps, experts]
        n = len(trace.experts)
        for e, name in enumerate(trace.experts):  # widest first, so coinciding lines all stay visible
            ax.plot(
                range(1, values.shape[0] + 1),
                values[:, e].numpy(),
                lw=1.5 + 2 * (n - 1 - e),
                marker="o",
                ms=2 + 2 * (n - 1 - e),
                color=f"C{e}",
                label=f"{name} (global)",
            )
        ax.set_title(f"{kind} prompt", fontsize=10)
        ax.set_xlabel("denoising step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean global gate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _scores_table(folders: RunFolders, retrieval: dict[str, dict[str, float]]) -> str:
    rows = []
    for label, path in folders.evaluations.items():
        report = json.loads(path.read_text(encoding="utf-8"))
        scores = ", ".join(f"{k} {v['mean']:.3f} ± {v.get('stderr', 0):.3f}" for k, v in report["scores"].items())
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td>{html.escape(scores)}</td>"
            f"<td>{report.get('num_prompts', '')} prompts × {report.get('repeats', '')}</td></tr>"
        )
    table = (
        (
            "<table><tr><th>model</th><th>scores (mean ± standard error)</th><th>evaluated on</th></tr>"
            + "".join(rows)
            + "</table>"
        )
        if rows
        else "<p>no evaluation reports found</p>"
    )
    if retrieval:
        any_r = next(iter(retrieval.values()))
        head = (
            f"<tr><th>model</th><th>own prompt retrieved (chance {any_r['top1_chance']:.0%})</th>"
            f"<th>prompt of the right kind retrieved (chance {any_r['kind_chance']:.0%})</th></tr>"
        )
        body = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{r['top1']:.0%}</td><td>{r['kind_top1']:.0%}</td></tr>"
            for k, r in retrieval.items()
        )
        table += (
            f"<h3>Caption retrieval by the trained tiny CLIP ({any_r['images']} images a model)</h3>"
            f"<table>{head}{body}</table>"
        )
    return table


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1rem; margin: .8rem 0 .3rem; }
.row { display: flex; gap: .6rem; flex-wrap: wrap; }
figure { margin: 0; width: 128px; } figcaption { font-size: .7rem; color: #555; }
img { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: .4rem 0; } td, th { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f4f4f4; text-align: left; } td.prompt { max-width: 18rem; font-size: .8rem; }
.note { color: #555; font-size: .85rem; }
"""


def build_report(
    workdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = 20,
    guidance: float = 7.5,
    data_per_kind: int = 6,
    prompts_per_kind: int = 3,
) -> Path:
    """Write ``OUTPUT/index.html`` (default ``WORKDIR/report``) for the pipeline run in ``workdir``.

    Every model available in the run is generated at the same prompts (``prompts_per_kind`` fresh synthetic
    captions of every kind the run trained on, :func:`trained_kinds`) and ``seeds``; the page shows the first
    prompt of every kind, the caption retrieval uses them all. What the run did not make (no experts, no gates)
    is left out of the page.

    Returns:
        The path of ``index.html``.
    """
    from mole.generate import generate, load_pipeline

    folders = RunFolders.find(workdir)
    out = Path(output) if output is not None else folders.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    prompts = report_prompts(trained_kinds(folders), per_kind=prompts_per_kind)
    shown = {prompts[k * prompts_per_kind] for k in range(len(prompts) // prompts_per_kind)}  # first of every kind
    models: dict[str, Any] = {}
    if folders.base:
        models["base"] = lambda: load_pipeline(folders.base, device="cpu")
    if folders.stage1:
        models["stage 1"] = lambda: load_pipeline(folders.stage1, device="cpu")
        if folders.experts:
            models["+ experts"] = lambda: load_pipeline(folders.stage1, folders.experts, device="cpu")
            if folders.gates:
                models["MoLE"] = lambda: load_pipeline(folders.stage1, folders.experts, folders.gates, device="cpu")
    images: dict[str, list] = {}
    traces: list[tuple[str, Any]] = []
    for label, load in models.items():
        pipe = load()
        images[label] = []
        for kind, prompt in prompts:
            gen = generate(
                pipe,
                [prompt],
                seeds=list(seeds),
                num_images=len(seeds),
                steps=steps,
                guidance=guidance,
                record=label == "MoLE",
            )
            images[label] += gen.images
            if gen.gate_trace is not None and (kind, prompt) in shown:
                traces.append((kind, gen.gate_trace))
    flat_prompts = [p for _, p in prompts for _ in seeds]
    flat_kinds = [k for k, _ in prompts for _ in seeds]
    retrieval = {}
    if folders.clip:
        retrieval = {
            label: caption_retrieval(folders.clip, imgs, flat_prompts, flat_kinds) for label, imgs in images.items()
        }
    grid_head = "<tr><th>prompt</th><th>seed</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in images) + "</tr>"
    grid_rows = []
    for i, prompt in enumerate(flat_prompts):
        if (flat_kinds[i], prompt) not in shown:
            continue
        cells = "".join(
            f"<td>{_img(_png(imgs[i].resize((128, 128))), f'{label}: {prompt}')}</td>"
            for label, imgs in images.items()
        )
        grid_rows.append(
            f"<tr><td class='prompt'>{html.escape(prompt)}</td><td>{seeds[i % len(seeds)]}</td>{cells}</tr>"
        )
    for label, imgs in images.items():
        for i, image in enumerate(imgs):
            image.save(out / f"{label.replace(' ', '').replace('+', 'plus-')}-{i}.png")
    sections = [
        "<h1>MoLE pipeline run: what it learned</h1>",
        f"<p class='note'>run folder {html.escape(str(folders.workdir))}; images at {steps} DDIM steps, guidance "
        f"{guidance}, the same prompt and seed across each row.</p>",
        "<h2>Training data (samples)</h2>",
        _data_section(folders, data_per_kind),
        "<h2>Generated images: base, stage 1, + experts, MoLE</h2>",
        f"<table>{grid_head}{''.join(grid_rows)}</table>" if images else "<p>no models found</p>",
    ]
    if folders.stages:
        fig = _loss_figure(folders)
        fig.savefig(out / "losses.png", dpi=100)
        sections += ["<h2>Training loss per stage</h2>", _img(_png(fig), "training loss per stage")]
        _close(fig)
    if traces:
        fig = _gates_figure(traces)
        fig.savefig(out / "gates.png", dpi=100)
        sections += [
            "<h2>MoLE gates over the denoising steps</h2>",
            "<p class='note'>mean global gate per expert over every MoLE layer and the seeds, one panel per prompt "
            "(the prompts of the images above)</p>",
            _img(_png(fig), "global gates over the steps"),
        ]
        _close(fig)
    sections += ["<h2>Scores</h2>", _scores_table(folders, retrieval)]
    page = out / "index.html"
    page.write_text(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>MoLE run report</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n",
        encoding="utf-8",
    )
    (out / "report.json").write_text(
        json.dumps({"prompts": prompts, "seeds": list(seeds), "steps": steps, "retrieval": retrieval}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    logger.info("run report written to %s", page)
    return page
