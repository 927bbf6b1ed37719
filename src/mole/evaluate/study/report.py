"""`mole study report`: win/tie/loss rates per model pair and question, rater agreement, people vs scorers.

Every number is recomputed from the stored votes (nothing is kept between reports), written as ``report.json``,
``report.md`` and ``win_rates.png`` (the paper's Fig. 5: one bar per aspect, split into the first model's wins,
ties and the second model's wins), and logged onto each evaluation run's MLflow run when tracking is on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from mole.evaluate.study.design import Study
from mole.evaluate.study.stats import krippendorff_alpha_nominal, pairwise_agreement, wilson

logger = logging.getLogger(__name__)

CI_METHOD = "Wilson score interval, 95 %, votes taken as independent"
AGREEMENT_METHOD = "Krippendorff's alpha (nominal; unit = pair × question; values = model chosen or tie)"


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"count": k, "rate": k / n if n else None, "ci95": [lo, hi]}


def study_report(study: Study, votes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report of ``study`` from its ``votes`` (:meth:`VoteStore.all_votes`); see the module docstring."""
    pairs = {p.pair: p for p in study.pairs}
    items = {it.item: it for it in study.items}
    labels = [m.label for m in study.models]
    qkeys = study.question_keys
    unknown = Counter(v["question"] for v in votes if v["question"] not in qkeys or v["pair_id"] not in pairs)
    if unknown:  # a database shared with an older version of the study: counted, explained, left out
        logger.warning(
            "%d votes name a question or pair this study does not have: left out (%s)",
            sum(unknown.values()),
            dict(unknown),
        )
    votes = [v for v in votes if v["question"] in qkeys and v["pair_id"] in pairs]
    raters = sorted({v["rater_id"] for v in votes})
    by_key: dict[tuple[int, int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for v in votes:
        p = pairs[v["pair_id"]]
        by_key[(p.a, p.b, v["question"])].append(v)

    win_rates = []
    for a, b in combinations(range(len(labels)), 2):
        for q in qkeys:
            vs = by_key.get((a, b, q), [])
            n = len(vs)
            wins = sum(v["winner"] == a for v in vs)
            losses = sum(v["winner"] == b for v in vs)
            ties = n - wins - losses
            win_rates.append(
                {
                    "a": labels[a],
                    "b": labels[b],
                    "question": q,
                    "votes": n,
                    "pairs": len({v["pair_id"] for v in vs}),
                    "a_wins": _rate(wins, n),
                    "ties": _rate(ties, n),
                    "b_wins": _rate(losses, n),
                }
            )

    agreement: dict[str, Any] = {}
    for q in [*qkeys, None]:
        units: dict[tuple[int, str], list[Any]] = defaultdict(list)
        for v in votes:
            if q is None or v["question"] == q:
                units[(v["pair_id"], v["question"])].append("tie" if v["winner"] is None else v["winner"])
        percent, rater_pairs = pairwise_agreement(units)
        agreement[q or "all"] = {
            "alpha": krippendorff_alpha_nominal(units),
            "percent": percent,
            "rater_pairs": rater_pairs,
            "units_with_2plus": sum(len(x) >= 2 for x in units.values()),
        }

    decided = [v for v in votes if v["winner"] is not None]
    left = sum(v["choice"] == "left" for v in decided)

    scorers: list[dict[str, Any]] = []
    for a, b in combinations(range(len(labels)), 2):
        shared = [s for s in study.models[a].scorers if s in study.models[b].scorers]
        for s in shared:
            prefer: dict[int, int] = {}  # pair -> model the scorer prefers
            for p in study.pairs:
                if (p.a, p.b) != (a, b):
                    continue
                sa = items[p.item].scores.get(labels[a], {}).get(s)
                sb = items[p.item].scores.get(labels[b], {}).get(s)
                if sa is not None and sb is not None and sa != sb:
                    prefer[p.pair] = a if sa > sb else b
            for q in qkeys:
                vs = [v for v in by_key.get((a, b, q), []) if v["winner"] is not None and v["pair_id"] in prefer]
                agree = sum(v["winner"] == prefer[v["pair_id"]] for v in vs)
                majority: dict[int, Counter[int]] = defaultdict(Counter)
                for v in vs:
                    majority[v["pair_id"]][v["winner"]] += 1
                decided_pairs = {
                    pid: c.most_common(1)[0][0]
                    for pid, c in majority.items()
                    if len(c) == 1 or c.most_common(2)[0][1] > c.most_common(2)[1][1]
                }
                pair_agree = sum(w == prefer[pid] for pid, w in decided_pairs.items())
                scorers.append(
                    {
                        "a": labels[a],
                        "b": labels[b],
                        "scorer": s,
                        "question": q,
                        "scorer_prefers_a": sum(m == a for m in prefer.values()),
                        "scored_pairs": len(prefer),
                        "votes": _rate(agree, len(vs)),
                        "majority_pairs": _rate(pair_agree, len(decided_pairs)),
                    }
                )
    return {
        "study_id": study.study_id,
        "title": study.title,
        "models": labels,
        "questions": {q.key: q.text for q in study.questions},
        "votes": len(votes),
        "raters": len(raters),
        "answered_pairs": len({(v["rater_id"], v["pair_id"]) for v in votes}),
        "left_out_votes": sum(unknown.values()),
        "ci_method": CI_METHOD,
        "agreement_method": AGREEMENT_METHOD,
        "win_rates": win_rates,
        "agreement": agreement,
        "position": {"decided_votes": len(decided), "left": _rate(left, len(decided))},
        "scorer_agreement": scorers,
    }


def _pct(r: Mapping[str, Any]) -> str:
    if r["rate"] is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] ({r['count']})"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: win rates, rater agreement, position bias, people vs automatic scorers."""
    lines = [
        f"# {report['title']} (study {report['study_id']})",
        "",
        f"{report['votes']} votes from {report['raters']} rater(s) on {report['answered_pairs']} shown pairs. "
        f"Rates with their {report['ci_method']}; (n) counts votes.",
        "",
        "## Win rates",
        "",
        "| model A | model B | question | votes | A wins | tie | B wins |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["win_rates"]:
        lines.append(
            f"| {r['a']} | {r['b']} | {r['question']} | {r['votes']} | {_pct(r['a_wins'])} | "
            f"{_pct(r['ties'])} | {_pct(r['b_wins'])} |"
        )
    lines += [
        "",
        "## Agreement between raters",
        "",
        f"{report['agreement_method']}; percent agreement over all "
        "pairs of raters who answered the same pair and question.",
        "",
        "| question | alpha | percent agreement | rater pairs | units with ≥ 2 raters |",
        "|---|---|---|---|---|",
    ]
    for q, a in report["agreement"].items():
        pct = "–" if a["percent"] is None else f"{100 * a['percent']:.1f} %"
        lines.append(f"| {q} | {_num(a['alpha'])} | {pct} | {a['rater_pairs']} | {a['units_with_2plus']} |")
    pos = report["position"]
    lines += [
        "",
        f"Position: the left image was chosen in {_pct(pos['left'])} of {pos['decided_votes']} votes "
        "that were not ties (50 % = no position bias).",
    ]
    lines += ["", "## People and automatic scorers", ""]
    if not report["scorer_agreement"]:
        lines.append("No automatic scorer is shared by the compared evaluation runs.")
    else:
        lines += [
            "Share of non-tie votes (and of pairs with a clear majority) that chose the image the scorer "
            "scores higher.",
            "",
            "| model A | model B | scorer | question | scorer prefers A | votes agreeing | pairs agreeing |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in report["scorer_agreement"]:
            lines.append(
                f"| {s['a']} | {s['b']} | {s['scorer']} | {s['question']} | "
                f"{s['scorer_prefers_a']}/{s['scored_pairs']} | {_pct(s['votes'])} | "
                f"{_pct(s['majority_pairs'])} |"
            )
    if report["left_out_votes"]:
        lines += ["", f"{report['left_out_votes']} votes named a question or pair not in this study: left out."]
    return "\n".join(lines) + "\n"


def plot_win_rates(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Fig. 5 of the paper: per model pair and question, a bar split into A wins / tie / B wins, with the
    Wilson interval of A's win rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["win_rates"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [f"{r['a']} vs {r['b']}: {r['question']}" for r in rows]
    y = list(range(len(rows)))[::-1]
    rate = [(r["a_wins"]["rate"] or 0.0, r["ties"]["rate"] or 0.0, r["b_wins"]["rate"] or 0.0) for r in rows]
    a = [x[0] for x in rate]
    t = [x[1] for x in rate]
    ax.barh(y, a, color="#2b6cb0", label="A wins")
    ax.barh(y, t, left=a, color="#bbbbbb", label="tie")
    ax.barh(y, [x[2] for x in rate], left=[p + q for p, q in zip(a, t, strict=True)], color="#dd6b20", label="B wins")
    err = [
        [max(0.0, x - r["a_wins"]["ci95"][0]) for x, r in zip(a, rows, strict=True)],
        [max(0.0, r["a_wins"]["ci95"][1] - x) for x, r in zip(a, rows, strict=True)],
    ]
    ax.errorbar(a, y, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="black", lw=0.5, ls=":")
    ax.set_xlabel(f"share of votes (n per bar: {', '.join(str(r['votes']) for r in rows)})")
    ax.set_title(f"{report['title']}: {report['votes']} votes, {report['raters']} raters")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120]


def write_report(
    study: Study,
    votes: Sequence[Mapping[str, Any]],
    output: str | os.PathLike[str] | None = None,
    *,
    track: bool = True,
) -> dict[str, Any]:
    """Compute the report and write ``report.json``, ``report.md`` and ``win_rates.png`` under ``output``
    (default ``STUDY/report``); with tracking on, log them and the win rates onto every evaluation run's MLflow
    run (``study.<question>.win_vs.<other model>`` and the like)."""
    report = study_report(study, votes)
    out = Path(output) if output else study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    plot_win_rates(report, out / "win_rates.png")
    from mole import tracking

    if track and tracking.enabled():
        for model in study.models:
            if not model.mlflow_run_id:
                logger.info("%s has no MLflow run in its report.json: the study is not logged onto it", model.label)
                continue
            metrics: dict[str, float] = {}
            for r in report["win_rates"]:
                if model.label not in (r["a"], r["b"]) or not r["votes"]:
                    continue
                own, other = ("a_wins", r["b"]) if r["a"] == model.label else ("b_wins", r["a"])
                prefix = _metric_name(f"study.{r['question']}")
                metrics[f"{prefix}.win_vs.{_metric_name(other)}"] = r[own]["rate"]
                metrics[f"{prefix}.tie_vs.{_metric_name(other)}"] = r["ties"]["rate"]
                metrics[f"{prefix}.votes_vs.{_metric_name(other)}"] = float(r["votes"])
            for q, a in report["agreement"].items():
                if a["alpha"] is not None:
                    metrics[_metric_name(f"study.{q}.rater_alpha")] = a["alpha"]
            tracking.log_to_run(
                model.mlflow_run_id,
                metrics,
                [out / "report.md", out / "report.json", out / "win_rates.png"],
                f"study/{study.study_id}",
                {"mole.study": study.study_id},
            )
            logger.info("study report logged onto MLflow run %s (%s)", model.mlflow_run_id, model.label)
    return report
