"""A study: the pairs people compare, built from `mole evaluate run` outputs (paper Fig. 5).

The paper samples 20 image pairs of MoLE and SD v1.5 and asks 50 people to pick the better image of each pair in
four aspects. Here a study is a folder: ``study.json`` (models, items, pairs, questions) and a copy of every shown
image under ``images/``, so the study does not depend on the evaluation folders staying where they were and the
server never reads a path a request names. Every run must have evaluated the same prompts with the same seeds
(``scores.csv`` row by row): then a pair shows two models on the same prompt from the same initial noise, and any
difference people see comes from the models.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from mole import atomic
from mole.evaluate.runner import load_report

logger = logging.getLogger(__name__)

STUDY_FILE = "study.json"
FORMAT_VERSION = 1

#: The four aspects of the paper's Fig. 5, asked of every pair by default.
DEFAULT_QUESTIONS: dict[str, str] = {
    "overall": "Which image is better overall?",
    "alignment": "Which image matches the prompt better?",
    "face": "Which image has the better faces?",
    "hand": "Which image has the better hands?",
}
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_QUESTION_CHARS = 200
#: Settings that change how an image looks without changing its prompt or seed: a difference is allowed (a study
#: may compare 25 against 50 steps) but logged.
_SAMPLER_KEYS = ("steps", "guidance", "width", "height")


class StudyError(ValueError):
    """The runs cannot make a study, or a study folder is not one; the message says what differs or is missing."""


@dataclass(frozen=True)
class Question:
    """One aspect people judge: ``key`` names it in the database and the report, ``text`` is what the page asks."""

    key: str
    text: str


@dataclass(frozen=True)
class Model:
    """One evaluated model: its label, the run folder it came from and that run's MLflow run id (when tracked)."""

    label: str
    run: str
    mlflow_run_id: str | None = None
    scorers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Item:
    """One prompt with its seed (a row of every run's ``scores.csv``) and the automatic scores of each model."""

    item: int
    repeat: int
    index: int
    prompt: str
    seed: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model label -> scorer -> score


@dataclass(frozen=True)
class Pair:
    """Two models on one item. ``a``/``b`` index :attr:`Study.models` with ``a < b``; the page shows them in a
    random order per rater, recorded with every vote."""

    pair: int
    item: int
    a: int
    b: int


@dataclass
class Study:
    """What ``study.json`` holds; see :func:`create_study`."""

    study_id: str
    title: str
    questions: list[Question]
    models: list[Model]
    items: list[Item]
    pairs: list[Pair]
    pairs_per_rater: int
    created: float
    root: Path = field(default=Path("."), compare=False)

    def image_path(self, model: int, item: int) -> Path:
        """The copy of ``model``'s image of ``item`` inside the study folder."""
        return self.root / "images" / f"m{model}" / f"{item:05d}.png"

    @property
    def question_keys(self) -> list[str]:
        return [q.key for q in self.questions]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data["format"] = FORMAT_VERSION
        return data


def parse_questions(specs: Sequence[str] | None) -> list[Question]:
    """``KEY=TEXT`` specs (or ``KEY`` alone for one of :data:`DEFAULT_QUESTIONS`); the defaults when empty."""
    if not specs:
        return [Question(k, v) for k, v in DEFAULT_QUESTIONS.items()]
    out: list[Question] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            if key not in DEFAULT_QUESTIONS:
                raise StudyError(f"question {key!r} needs a text (KEY=TEXT); only {list(DEFAULT_QUESTIONS)} have one")
            text = DEFAULT_QUESTIONS[key]
        if not _KEY.match(key):
            raise StudyError(f"question key {key!r} must be 1-32 lower-case letters, digits or _, starting a letter")
        if not text or len(text) > MAX_QUESTION_CHARS:
            raise StudyError(f"question {key!r}: the text must have 1-{MAX_QUESTION_CHARS} characters")
        if any(q.key == key for q in out):
            raise StudyError(f"question {key!r} is given twice")
        out.append(Question(key, text))
    return out


def _read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    report = load_report(path)
    scores = path / "scores.csv"
    if not scores.is_file():
        raise StudyError(f"{path} has no scores.csv: not a `mole evaluate run` output")
    with scores.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise StudyError(f"{scores} holds no rows")
    if "image" not in rows[0]:
        raise StudyError(f"{path} kept no images (evaluated with save_images off): nothing to show people")
    return report, rows


def _by_key(path: Path, rows: Sequence[Mapping[str, str]]) -> dict[tuple[int, int], Mapping[str, str]]:
    """The rows of one run by (repeat, index); a row without them is a broken ``scores.csv``, said so."""
    out = {}
    for n, r in enumerate(rows):
        try:
            key = (int(r["repeat"]), int(r["index"]))
            int(r["seed"])
        except (KeyError, TypeError, ValueError) as err:
            raise StudyError(f"{path}/scores.csv row {n + 2}: no integer repeat, index and seed ({err})") from err
        if key in out:
            raise StudyError(f"{path}/scores.csv holds repeat {key[0]} index {key[1]} twice")
        out[key] = r
    return out


def check_same_samples(
    runs: Sequence[Path], reports: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[Mapping[str, str]]]
) -> None:
    """Raise :class:`StudyError` naming the first difference in prompts or seeds between the runs.

    The rows are compared by (repeat, index): the same position must hold the same prompt and seed in every run.
    """
    first = _by_key(runs[0], rows[0])
    for path, run_rows in zip(runs[1:], rows[1:], strict=True):
        other = _by_key(path, run_rows)
        if set(other) != set(first):
            missing = sorted(set(first) - set(other))[:3]
            extra = sorted(set(other) - set(first))[:3]
            raise StudyError(
                f"{path} evaluated other samples than {runs[0]}: {len(other)} vs {len(first)} rows"
                + (f"; missing (repeat, index) {missing}" if missing else "")
                + (f"; extra {extra}" if extra else "")
                + " (evaluate both with the same --prompts --num-prompts --repeats --seed)"
            )
        for key in sorted(first):
            a, b = first[key], other[key]
            for what in ("prompt", "seed"):
                if a[what] != b[what]:
                    raise StudyError(
                        f"{path} differs from {runs[0]} at repeat {key[0]} index {key[1]}: {what} "
                        f"{b[what]!r} vs {a[what]!r} (a study compares models on the same prompts and seeds; "
                        "evaluate both with the same --prompts --num-prompts --repeats --seed)"
                    )
    settings = [r.get("settings", {}) for r in reports]
    for key in _SAMPLER_KEYS:
        values = {json.dumps(s.get(key)) for s in settings}
        if len(values) > 1:
            logger.warning("the runs differ in %s (%s): the pairs differ in it too", key, ", ".join(sorted(values)))


def create_study(
    runs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    questions: Sequence[Question] | None = None,
    max_items: int | None = None,
    pairs_per_rater: int | None = None,
    seed: int = 0,
    title: str = "Which image is better?",
    overwrite: bool = False,
) -> Study:
    """Build a study from two or more evaluation runs: every pair of models on every (sampled) item.

    Args:
        runs: ``mole evaluate run`` output folders (``report.json``, ``scores.csv``, ``images/``).
        labels: Model names in the report (default: each run's own label); never shown to raters.
        questions: The aspects asked of every pair (default :data:`DEFAULT_QUESTIONS`).
        max_items: Sample this many items (prompt + seed) with ``seed`` (the paper: 20); default all.
        pairs_per_rater: How many pairs one rater is given at most (default: all).
        overwrite: Replace an existing study in ``output`` (its votes database is left alone).

    Raises:
        StudyError: Fewer than two runs, runs with other prompts or seeds (the message names the first
            difference), a missing image, or an existing study in ``output``.
    """
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise StudyError("a study compares at least two evaluation runs (--runs A --runs B)")
    reports, all_rows = [], []
    for p in paths:
        report, rows = _read_run(p)
        reports.append(report)
        all_rows.append(rows)
    check_same_samples(paths, reports, all_rows)
    names = list(labels) if labels else [str(r.get("label") or p.name) for r, p in zip(reports, paths, strict=True)]
    if len(names) != len(paths):
        raise StudyError(f"{len(names)} labels for {len(paths)} runs")
    if len(set(names)) != len(names):
        raise StudyError(f"model labels must differ, got {names} (give --labels)")
    out = Path(output)
    if (out / STUDY_FILE).exists() and not overwrite:
        raise StudyError(f"{out} already holds a study (--overwrite replaces it; its votes stay in the database)")
    by_key = [_by_key(p, rows) for p, rows in zip(paths, all_rows, strict=True)]
    keys = sorted(by_key[0])
    if max_items is not None:
        if max_items < 1:
            raise StudyError("--max-items must be at least 1")
        keys = sorted(random.Random(seed).sample(keys, min(max_items, len(keys))))
    fixed = {"repeat", "index", "prompt", "seed", "image"}
    scorers = [tuple(k for k in rows[0] if k not in fixed) for rows in all_rows]
    items: list[Item] = []
    for i, key in enumerate(keys):
        row = by_key[0][key]
        scores = {}
        for name, rows, cols in zip(names, by_key, scorers, strict=True):
            try:
                scores[name] = {c: float(rows[key][c]) for c in cols if rows[key][c] not in ("", None)}
            except ValueError as err:
                raise StudyError(
                    f"run {name!r}, repeat {key[0]} index {key[1]}: a score is not a number ({err})"
                ) from err
        items.append(Item(i, key[0], key[1], row["prompt"], int(row["seed"]), scores))
    models = [
        Model(n, str(p.resolve()), r.get("mlflow_run_id"), s)
        for n, p, r, s in zip(names, paths, reports, scorers, strict=True)
    ]
    model_pairs = list(combinations(range(len(models)), 2))
    pairs = [Pair(n, it.item, a, b) for n, (it, (a, b)) in enumerate((it, ab) for it in items for ab in model_pairs)]
    study = Study(
        study_id=secrets.token_hex(8),
        title=title,
        questions=list(questions or parse_questions(None)),
        models=models,
        items=items,
        pairs=pairs,
        pairs_per_rater=min(pairs_per_rater or len(pairs), len(pairs)),
        created=time.time(),
        root=out,
    )
    if study.pairs_per_rater < 1:
        raise StudyError("--pairs-per-rater must be at least 1")
    staging = out / "images.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for m, (p, rows) in enumerate(zip(paths, by_key, strict=True)):
        for it in items:
            src = p / rows[(it.repeat, it.index)]["image"]
            if not src.is_file():
                raise StudyError(f"{src} is missing (image of repeat {it.repeat} index {it.index} in {p})")
            dst = staging / f"m{m}" / f"{it.item:05d}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    shutil.rmtree(out / "images", ignore_errors=True)
    staging.rename(out / "images")
    atomic.write_json(out / STUDY_FILE, study.to_json())
    logger.info(
        "study %s: %d models, %d items, %d pairs, %d questions in %s",
        study.study_id,
        len(models),
        len(items),
        len(pairs),
        len(study.questions),
        out,
    )
    return study


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read a study folder written by :func:`create_study`."""
    root = Path(path)
    file = root / STUDY_FILE if root.is_dir() else root
    if not file.is_file():
        raise StudyError(f"no study at {root} (no {STUDY_FILE}; `mole study create` writes one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StudyError(f"{file} is not readable JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        found = data.get("format") if isinstance(data, dict) else None
        raise StudyError(f"{file}: format {found!r}, this mole reads {FORMAT_VERSION}")
    try:
        return _study_from(data, file.parent)
    except (KeyError, TypeError) as err:
        raise StudyError(f"{file} is not a complete study ({type(err).__name__}: {err})") from err


def _study_from(data: dict[str, Any], root: Path) -> Study:
    return Study(
        study_id=data["study_id"],
        title=data["title"],
        questions=[Question(**q) for q in data["questions"]],
        models=[
            Model(m["label"], m["run"], m.get("mlflow_run_id"), tuple(m.get("scorers", ()))) for m in data["models"]
        ],
        items=[Item(**it) for it in data["items"]],
        pairs=[Pair(**p) for p in data["pairs"]],
        pairs_per_rater=data["pairs_per_rater"],
        created=data["created"],
        root=root,
    )
