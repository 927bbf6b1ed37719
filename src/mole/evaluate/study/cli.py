"""``mole study``: build a pairwise preference study from evaluation runs, serve its page, report its votes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

study_app = typer.Typer(
    help="The paper's user study (Fig. 5): people pick the better image of two models' pairs, per aspect.",
    no_args_is_help=True,
)

DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        envvar="MOLE_STUDY_DATABASE",
        help="SQLAlchemy URL of the votes database: postgresql://USER@HOST/DB (psycopg 3) or sqlite:///FILE; "
        "default STUDY/votes.db. Prefer the environment variable for a URL with a password.",
    ),
]


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@study_app.command("create")
def create(
    runs: Annotated[list[Path], typer.Option("--runs", help="A `mole evaluate run` output folder; repeat (≥ 2).")],
    output: Annotated[Path, typer.Option(help="The study folder to write (study.json + images/).")],
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated model names (default: the runs' labels).")
    ] = None,
    question: Annotated[
        list[str] | None,
        typer.Option(
            "--question",
            help="KEY=TEXT asked of every pair (repeat); default: overall, alignment, face, "
            "hand. A default key alone keeps its text.",
        ),
    ] = None,
    max_items: Annotated[
        int | None, typer.Option(help="Sample this many prompts (the paper: 20); default all.")
    ] = None,
    pairs_per_rater: Annotated[int | None, typer.Option(help="Pairs one rater gets at most (default all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-items sample.")] = 0,
    title: Annotated[str, typer.Option(help="Heading of the page.")] = "Which image is better?",
    overwrite: Annotated[bool, typer.Option(help="Replace a study in OUTPUT (its votes database stays).")] = False,
) -> None:
    """Build a study from evaluation runs of the same prompts and seeds (checked; the error names a difference)."""
    from mole.evaluate.study.design import StudyError, create_study, parse_questions

    try:
        study = create_study(
            runs,
            output,
            labels=[x.strip() for x in labels.split(",")] if labels else None,
            questions=parse_questions(question),
            max_items=max_items,
            pairs_per_rater=pairs_per_rater,
            seed=seed,
            title=title,
            overwrite=overwrite,
        )
    except (StudyError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(
        f"study {study.study_id}: {len(study.models)} models, {len(study.items)} prompts, "
        f"{len(study.pairs)} pairs, questions {', '.join(study.question_keys)} in {output}"
    )


@study_app.command("serve")
def serve(
    study: Annotated[Path, typer.Argument(help="The study folder (`mole study create`).")],
    database: DatabaseOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    requests_per_minute: Annotated[float, typer.Option(min=1, help="Sustained requests per rater; then 429.")] = 240,
    burst: Annotated[int, typer.Option(min=1, help="Requests allowed at once above that rate.")] = 60,
    new_raters_per_hour: Annotated[int, typer.Option(min=1, help="Raters one client address may get.")] = 30,
    secure_cookie: Annotated[bool, typer.Option(help="Mark the rater cookie Secure (behind HTTPS).")] = False,
) -> None:
    """Serve the rating page: one prompt, two images in random order, one question per aspect."""
    from mole.evaluate.study.app import StudySettings, run_study_server
    from mole.evaluate.study.design import StudyError, load_study
    from mole.evaluate.study.store import StoreError, VoteStore, database_url

    try:
        s = load_study(study)
        store = VoteStore(database_url(database, s.root), s.study_id)
    except (StudyError, StoreError, FileNotFoundError) as err:
        raise _fail(err) from err
    settings = StudySettings(
        requests_per_minute=requests_per_minute,
        burst=burst,
        new_raters_per_hour=new_raters_per_hour,
        secure_cookie=secure_cookie,
    )
    try:
        run_study_server(s, store, host=host, port=port, settings=settings)
    finally:
        store.close()


@study_app.command("report")
def report(
    study: Annotated[Path, typer.Argument(help="The study folder.")],
    database: DatabaseOpt = None,
    output: Annotated[Path | None, typer.Option(help="Report folder (default STUDY/report).")] = None,
    track: Annotated[
        bool, typer.Option(help="Log onto the evaluation runs' MLflow runs (when tracking is on).")
    ] = True,
) -> None:
    """Win/tie/loss rates with Wilson 95 % intervals, Krippendorff's alpha, people vs scorers; Markdown + plot."""
    from mole.evaluate.study.design import StudyError, load_study
    from mole.evaluate.study.report import report_markdown, write_report
    from mole.evaluate.study.store import StoreError, VoteStore, database_url

    try:
        s = load_study(study)
        store = VoteStore(database_url(database, s.root), s.study_id)
        try:
            result = write_report(s, store.all_votes(), output, track=track)
        finally:
            store.close()
    except (StudyError, StoreError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(report_markdown(result))
