"""``mole pipeline``: compile, run locally on the embedded default, submit to Kubeflow Pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

pipeline_app = typer.Typer(
    help="The Kubeflow pipeline: compile it, run the whole DAG locally (embedded default), submit it to a cluster.",
    no_args_is_help=True,
)

DEFAULT_PACKAGE = Path("pipelines/mole_pipeline.yaml")
ExpertsOpt = Annotated[
    list[str] | None,
    typer.Option("--expert", help="Expert as NAME or NAME=DATA_KIND (repeat); default face=faces, hand=hands."),
]


def _fail(err: Exception) -> typer.Exit:
    from mole.security import redact

    typer.secho(redact(f"error: {err}"), fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@pipeline_app.command("compile")
def compile_(
    output: Annotated[Path, typer.Option(help="Compiled pipeline YAML.")] = DEFAULT_PACKAGE,
    expert: ExpertsOpt = None,
) -> None:
    """Compile the pipeline (mole.pipeline.dsl; the same as `kfp dsl compile --py pipelines/mole_pipeline.py`)."""
    from mole.pipeline.run import compile_pipeline, parse_experts

    try:
        path = compile_pipeline(output, parse_experts(expert))
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(f"compiled {path}")


@pipeline_app.command("run-local")
def run_local(
    params: Annotated[
        list[str] | None, typer.Argument(help="Pipeline parameters as KEY=VALUE (JSON for dicts).")
    ] = None,
    workspace: Annotated[Path, typer.Option(help="Working folder of the run (data, models, reports).")] = Path(
        "out/pipeline"
    ),
    expert: ExpertsOpt = None,
) -> None:
    """Run the whole DAG here through kfp.local on the embedded default (tiny model, synthetic data, CPU).

    Tracks into mlruns/ (sqlite) unless MLFLOW_TRACKING_URI says otherwise. On the embedded default it ends with
    the run report (WORKSPACE/runs/JOB/report/index.html: data, every stage's images, losses, gates, scores).
    """
    import os

    from mole.pipeline.run import compile_pipeline, parse_experts, parse_params, pipeline_parameters

    try:
        experts = parse_experts(expert)
        package = compile_pipeline(workspace / "pipeline.yaml", experts)
        overrides = parse_params(params or [], pipeline_parameters(package))
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err
    from mole.pipeline.run import run_local as run

    try:
        result = run(workspace, overrides, experts)
    except RuntimeError as err:  # kfp.local: a task failed; its log is above
        raise _fail(err) from err
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns/mlflow.db"
    ws = Path(result["workspace"])
    images = sorted(ws.glob("runs/*/evaluate/images"))
    typer.echo(f"\npipeline finished in {result['seconds']:.0f} s; working folder {ws}")
    if os.environ.get("MOLE_TRACKING", "on").lower() not in ("0", "off", "false", "no"):
        experiment = result["params"].get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mole"
        typer.echo(f"MLflow runs (experiment '{experiment}') tracked at {uri}:")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            typer.echo("  make mlflow-ui   # then open http://127.0.0.1:5000 (runs, lineage, registered models)")
        typer.echo("  registered models: mole-stage1, mole-expert-*, mole (aliases candidate / champion)")
        if result.get("promotion"):
            typer.echo(f"  promotion: {result['promotion']}")
        typer.echo("  mole lineage --model models:/mole@candidate")
    if images:
        typer.echo(f"evaluation images: {images[-1]}  (report: {images[-1].parent / 'report.md'})")
    if result.get("report"):
        typer.echo(f"run report (data, images of every stage, losses, gates, scores): {result['report']}")


@pipeline_app.command("submit")
def submit(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline.")],
    params: Annotated[
        list[str] | None, typer.Argument(help="Pipeline parameters as KEY=VALUE (JSON for dicts).")
    ] = None,
    package: Annotated[Path, typer.Option(help="Compiled pipeline YAML.")] = DEFAULT_PACKAGE,
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "mole",
    run_name: Annotated[str | None, typer.Option(help="Run name.")] = None,
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user installs).")] = None,
) -> None:
    """Submit the compiled pipeline (like `kfp run create -e EXPERIMENT -f pipelines/mole_pipeline.yaml`).

    A bearer token, when the endpoint needs one, is read from KFP_TOKEN only.
    """
    from mole.pipeline.run import parse_params, pipeline_parameters
    from mole.pipeline.run import submit as submit_run

    try:
        if not package.is_file():
            raise FileNotFoundError(f"no compiled pipeline at {package} (run `mole pipeline compile`)")
        arguments = parse_params(params or [], pipeline_parameters(package))
        run_id = submit_run(host, package, arguments, experiment=experiment, run_name=run_name, namespace=namespace)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(f"submitted run {run_id} to {host} (experiment {experiment})")
