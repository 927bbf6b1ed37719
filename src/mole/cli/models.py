"""`mole generate|serve|lineage|promote`: commands on one model (a folder or a registered version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mole.cli.app import app
from mole.cli.common import COMPILE_HELP, fail, parse_named


@app.command()
def generate(
    model: Annotated[Path, typer.Option(help="A diffusers Stable Diffusion folder, or stage 1's --output folder.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt; repeat for several.")],
    output: Annotated[Path, typer.Option(help="PNG path (x.png, or x-0.png... for several) or a folder.")],
    experts: Annotated[list[str] | None, typer.Option(help="Expert LoRA as NAME=PATH; repeat for several.")] = None,
    gates: Annotated[
        Path | None, typer.Option(help="Gates file from stage 3, or that stage's --output folder: full MoLE.")
    ] = None,
    expert_scale: Annotated[
        list[str] | None, typer.Option(help="Fixed scale NAME=FLOAT for an expert when no gates are given.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k uses seed+k.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    width: Annotated[int | None, typer.Option(help="Width in pixels, multiple of 8 (default: native).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels, multiple of 8 (default: native).")] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    gate_trace: Annotated[
        Path | None, typer.Option(help="With --gates: write the gate values per denoising step as JSON.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    compile_unet: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Generate images with the base model, with experts at fixed scales, or with full MoLE (--gates)."""
    from mole.generate import generate as run_generate
    from mole.generate import load_pipeline, output_paths

    expert_paths = parse_named(experts, "--experts")
    scales_raw = parse_named(expert_scale, "--expert-scale")
    try:
        scales = {k: float(v) for k, v in scales_raw.items()}
    except ValueError as err:
        raise typer.BadParameter(f"--expert-scale needs numbers: {err}") from err
    if gate_trace is not None and gates is None:
        raise typer.BadParameter("--gate-trace needs --gates")
    try:
        pipe = load_pipeline(model, expert_paths or None, gates, scales or None, device=device,
                             compile_unet=compile_unet)  # fmt: skip
        result = run_generate(
            pipe,
            prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            num_images=num_images,
            record=gate_trace is not None,
        )
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from err
    paths = output_paths(output, len(result.images))
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    if gate_trace is not None and result.gate_trace is not None:
        gate_trace.parent.mkdir(parents=True, exist_ok=True)
        gate_trace.write_text(json.dumps(result.gate_trace.__dict__, indent=1), encoding="utf-8")
    typer.echo(f"wrote {len(paths)} image(s): {', '.join(str(p) for p in paths)}")


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="A registered model (models:/mole@champion) or a diffusers Stable Diffusion folder.")
    ],
    experts: Annotated[
        list[str] | None, typer.Option(help="With a folder: expert LoRA as NAME=PATH; repeat for several.")
    ] = None,
    gates: Annotated[
        Path | None,
        typer.Option(help="With a folder and --experts: the gates file or the gates stage's folder (full MoLE)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 inside a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    concurrency: Annotated[int, typer.Option(min=1, help="Generations running at once (worker threads).")] = 1,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Accepted requests that may wait for a worker; beyond them 429 + Retry-After.")
    ] = 8,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds from acceptance to answer (queue included); then 504.")
    ] = 300.0,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0.0, help="On SIGTERM/SIGINT, seconds that requests in flight get to finish.")
    ] = 60.0,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    follow_alias: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="With models:/NAME@ALIAS: check the alias every SECONDS; when it moved, finish "
            "requests in flight and exit 75 so the orchestrator restarts on the new version (0: off).",
        ),
    ] = 0.0,
    compile_unet: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Serve text-to-image over HTTP: POST /v1/generate (mode base, experts or mole), a comparison page at /,
    /healthz, /readyz and Prometheus /metrics."""
    from mole.serve import ServiceSettings, make_loader, run_server

    try:
        settings = ServiceSettings(concurrency=concurrency, max_queue=max_queue, request_timeout=request_timeout)
        loader = make_loader(model, parse_named(experts, "--experts") or None, gates, device=device,
                             compile_unet=compile_unet)  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from err
    code = run_server(loader, host=host, port=port, settings=settings, description=model,
                      shutdown_timeout=shutdown_timeout, follow_alias=follow_alias)  # fmt: skip
    if code:
        raise typer.Exit(code=code)


@app.command()
def lineage(model_uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS.")]) -> None:
    """Print the chain from a registered model back to its datasets: stages, run ids, experts, digests."""
    from mole import tracking

    try:
        chain = tracking.lineage(model_uri)
    except Exception as err:  # MlflowException: unknown model, version or alias
        raise fail(err) from err
    typer.echo(tracking.format_lineage(chain))


@app.command()
def promote(
    metric: Annotated[str, typer.Option(help="Metric to compare (a run metric or a mole.metric.* version tag).")],
    name: Annotated[str, typer.Option(help="Registered model.")] = "mole",
    baseline: Annotated[
        str | None, typer.Option(help="With no champion yet, the version to beat, e.g. models:/mole-stage1/3.")
    ] = None,
    lower_is_better: Annotated[bool, typer.Option(help="Smaller metric values are better.")] = False,
    version: Annotated[
        str | None, typer.Option(help="The version to promote (default: the one the candidate alias points to).")
    ] = None,
) -> None:
    """Move the champion alias to the candidate only if it beats the champion (or the baseline)."""
    from mole import tracking

    moved, why = tracking.promote(metric, name=name, baseline=baseline, higher_is_better=not lower_is_better,
                                  version=version)  # fmt: skip
    typer.echo(("promoted: " if moved else "not promoted: ") + why)
