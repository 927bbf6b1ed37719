"""`mole ...`: the command line. Each subcommand parses its options and makes one call into the library."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from mole import __version__
from mole.evaluate.study.cli import study_app
from mole.pipeline.cli import pipeline_app

app = typer.Typer(
    name="mole",
    help="MoLE: Mixture of Low-rank Experts for human-centric Stable Diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tiny_app = typer.Typer(help="The embedded default: a tiny offline SD model and synthetic data.", no_args_is_help=True)
app.add_typer(tiny_app, name="tiny")
train_app = typer.Typer(
    help="Train the three stages with one loop. Single process as is; for DDP or DeepSpeed ZeRO run it under "
    "`accelerate launch --config_file configs/accelerate/zero2.yaml -m mole train ...`.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")
curate_app = typer.Typer(
    help="Curate raw images into training datasets: crops, quality filters, captions, de-duplication.",
    no_args_is_help=True,
)
app.add_typer(curate_app, name="curate")
prompts_app = typer.Typer(help="Build the human-centric prompt benchmarks of the paper (§4.1).", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
evaluate_app = typer.Typer(
    help="Evaluate a model on prompt benchmarks (mean ± standard error over repeats), compare runs, plot gates.",
    no_args_is_help=True,
)
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(study_app, name="study")

logger = logging.getLogger("mole")
COMPILE_HELP = (
    "Compile the UNet (torch.compile + CUDA graphs; the first call compiles). On CPU, or if compiling fails, "
    "it runs eager with a warning. Gate recording runs eager."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mole {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from rich.logging import RichHandler

    from mole.security import RedactingFilter

    if not verbose:
        # transformers and diffusers announce optional backends and loading progress on every start.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    handler = RichHandler(show_path=False, rich_tracebacks=False)
    handler.addFilter(RedactingFilter())  # no log line of any library prints a credential
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )
    for noisy in ("diffusers", "transformers", "urllib3", "PIL", "accelerate", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)


def parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    """``["face=/a", "hand=/b"]`` → ``{"face": "/a", "hand": "/b"}``, with errors that say what is wrong."""
    from mole.pairs import parse_pairs
    from mole.security import InvalidNameError, check_name, redact

    try:
        out = parse_pairs(values, what)
    except ValueError as err:
        raise typer.BadParameter(redact(str(err))) from None
    for name in out:
        try:
            check_name(name, f"{what}: name")  # every NAME here is an expert name: it becomes a folder
        except InvalidNameError as err:
            raise typer.BadParameter(str(err)) from None
    return out


def _fail(err: Exception) -> typer.Exit:
    from mole.security import redact

    typer.secho(redact(f"error: {err}"), fg=typer.colors.RED, err=True)  # messages quote URIs the user gave
    return typer.Exit(code=2)


@tiny_app.command("init")
def tiny_init(
    output: Annotated[Path, typer.Option(help="Folder to write the diffusers model to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model in OUTPUT.")] = False,
    vae_weights: Annotated[
        Path | None, typer.Option(help="Trained VAE weights from `mole tiny vae` (default: those shipped).")
    ] = None,
) -> None:
    """Write the tiny SD1.x model (UNet, trained VAE, CLIP text encoder + tokenizer, DDIM) as a diffusers folder."""
    from mole.tiny import init_tiny_model

    try:
        path = init_tiny_model(output, seed=seed, overwrite=overwrite, vae_weights=vae_weights)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise _fail(err) from err
    typer.echo(f"tiny model written to {path}")


@tiny_app.command("vae")
def tiny_vae(
    output: Annotated[Path, typer.Option(help="Weights file to write (safetensors; its report goes beside, .json).")],
    steps: Annotated[int | None, typer.Option(help="Optimizer steps. [1200]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step. [16]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (one-cycle schedule). [2e-3]")] = None,
    images_per_kind: Annotated[int | None, typer.Option(help="Synthetic training images per kind. [256]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the init, batch order and flips.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
) -> None:
    """Train the tiny model's VAE on synthetic images of every kind and write its weights: how the weights that
    ship with the package (src/mole/assets/tiny_vae.safetensors) were made. Prints the held-out reconstruction
    error as a share of the images' variance."""
    from mole.tiny_vae import write_vae_weights

    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "per_kind": images_per_kind}
    options = {k: v for k, v in given.items() if v is not None}  # None: the function's defaults
    try:
        report = write_vae_weights(output, overwrite=overwrite, seed=seed, **options)
    except (FileExistsError, ValueError) as err:
        raise _fail(err) from err
    heldout = report["heldout"]
    typer.echo(f"tiny VAE written to {output}: held-out MSE {heldout['mse']:.4f} = "
               f"{100 * heldout['mse_over_variance']:.1f} % of the images' variance")  # fmt: skip


@tiny_app.command("clip")
def tiny_clip(
    output: Annotated[Path, typer.Option(help="Folder to write the transformers CLIP model to.")],
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and training.")] = 5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model in OUTPUT.")] = False,
    train_steps: Annotated[
        int | None, typer.Option(help="Contrastive training steps on synthetic pairs; 0 leaves it random. [250]")
    ] = None,
    samples_per_kind: Annotated[
        int | None, typer.Option(help="Synthetic training pairs per kind (faces, hands, feet, scenes). [96]")
    ] = None,
) -> None:
    """Write a tiny CLIP model for the CLIP-score scorer (`mole evaluate run --scorers clip`), trained on synthetic
    image–caption pairs so its score says whether an image shows its caption (~20 s on 2 CPU cores)."""
    from mole.tiny import init_tiny_clip

    try:
        given = {"train_steps": train_steps, "samples_per_kind": samples_per_kind}
        options = {k: v for k, v in given.items() if v is not None}  # None: the function's defaults
        path = init_tiny_clip(output, seed=seed, overwrite=overwrite, **options)
    except (FileExistsError, ValueError) as err:
        raise _fail(err) from err
    typer.echo(f"tiny CLIP model written to {path}")


@tiny_app.command("data")
def tiny_data(
    output: Annotated[Path, typer.Option(help="Dataset folder to write (dataset.json + tar shards).")],
    kind: Annotated[str, typer.Option(help="faces, hands, feet or scenes.")] = "faces",
    count: Annotated[int, typer.Option(help="Number of image–caption pairs.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical data.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in OUTPUT.")] = False,
) -> None:
    """Write synthetic human-centric image–caption data in the training data format (docs/data-format.md)."""
    from mole.data.synthetic import write_dataset

    try:
        index = write_dataset(output, kind, count, seed=seed, size=size, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        raise _fail(err) from err
    typer.echo(f"{index.num_samples} {kind} samples in {len(index.shards)} shard(s) written to {output}")


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
        raise _fail(err) from err
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
        raise _fail(err) from err
    code = run_server(loader, host=host, port=port, settings=settings, description=model,
                      shutdown_timeout=shutdown_timeout, follow_alias=follow_alias)  # fmt: skip
    if code:
        raise typer.Exit(code=code)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Recipe YAML (configs/tiny.yaml, configs/paper.yaml).")
]
DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Dataset folder or s3:// URI (overrides the config); repeat as NAME=DIR for a mixture "
        "(--data scenes=DIR --data faces=DIR --data hands=DIR, weighted by data_weights)."
    ),
]
OutputOpt = Annotated[Path | None, typer.Option(help="Folder for the result, checkpoints and metrics.")]
StepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps (overrides the config).")]
ResumeOpt = Annotated[
    str | None,
    typer.Option(help="'latest' (newest checkpoint in OUTPUT, or a fresh start) or a checkpoint path."),
]
ResumeChangedOpt = Annotated[
    bool,
    typer.Option(
        "--resume-changed",
        help="Resume even though the data or settings differ from the checkpoint's run (refused otherwise); the "
        "new ones apply from the resumed step on.",
    ),
]
BaseOpt = Annotated[
    str | None,
    typer.Option(help="Model to start from: a diffusers folder or stage 1's --output folder (overrides model.base)."),
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Config override section.key=value; repeatable.")]


def _train(stage: str, config: Path | None, overrides: list[str] | None, **kwargs) -> None:
    from mole.data.shards import DatasetError
    from mole.storage import StorageError
    from mole.train import ConfigError, load_config, train_stage
    from mole.train.checkpoint import CheckpointError
    from mole.train.config import parse_data, parse_overrides
    from mole.train.stages import StageError

    try:
        recipe = load_config(config, parse_overrides(overrides))
        kwargs["data"] = parse_data(kwargs.get("data"))
        result = train_stage(stage, recipe, **kwargs)
    except (ConfigError, StageError, CheckpointError, DatasetError, StorageError, FileNotFoundError) as err:
        raise _fail(err) from err
    if result.result is not None:  # only the main process reports
        typer.echo(
            f"{result.stage}: {result.steps} steps (from {result.start_step}), final loss {result.final_loss:.4f}, "
            f"{result.seconds_per_step:.3f} s/step; result: {result.result}"
        )


@train_app.command("stage1")
def train_stage1(
    config: ConfigOpt = None,
    data: DataOpt = None,
    output: OutputOpt = None,
    max_steps: StepsOpt = None,
    resume: ResumeOpt = None,
    resume_changed: ResumeChangedOpt = False,
    base: BaseOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 1: fine-tune the UNet (and by default the text encoder) on the human-centric dataset."""
    _train("stage1", config, set_, output=output, data=data, base=base, max_steps=max_steps, resume=resume,
           resume_changed=resume_changed)  # fmt: skip


@train_app.command("expert")
def train_expert(
    name: Annotated[
        str,
        typer.Option(
            help="Expert to train: the experts.<name> section of the config (any name: face, hand, feet...; "
            "--set experts.NAME.rank=... adds a section)."
        ),
    ],
    config: ConfigOpt = None,
    data: DataOpt = None,
    output: OutputOpt = None,
    max_steps: StepsOpt = None,
    resume: ResumeOpt = None,
    resume_changed: ResumeChangedOpt = False,
    base: BaseOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 2: one LoRA expert on the stage-1 UNet (run once per expert; they are independent)."""
    _train(
        "expert", config, set_, output=output, data=data, base=base, max_steps=max_steps, resume=resume,
        expert_name=name, resume_changed=resume_changed,
    )  # fmt: skip


@train_app.command("gates")
def train_gates(
    experts: Annotated[
        list[str] | None, typer.Option(help="Expert LoRA as NAME=PATH, in gate order; repeat for any number.")
    ] = None,
    gate: Annotated[str | None, typer.Option(help="local, global or both (the paper).")] = None,
    condition: Annotated[
        str | None,
        typer.Option(
            help="What the gates see besides the features: none (the paper) or timestep (a learned, "
            "zero-initialised projection of the diffusion timestep added to the gate logits)."
        ),
    ] = None,
    config: ConfigOpt = None,
    data: DataOpt = None,
    output: OutputOpt = None,
    max_steps: StepsOpt = None,
    resume: ResumeOpt = None,
    resume_changed: ResumeChangedOpt = False,
    base: BaseOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 3: freeze base and experts; learn the local and global gates of every MoLE layer.

    Any number of experts: repeat --experts (face=DIR hand=DIR feet=DIR ...); their order is the gate order.
    """
    _train(
        "gates", config, set_, output=output, data=data, base=base, max_steps=max_steps, resume=resume,
        experts=parse_named(experts, "--experts") or None, gate=gate, condition=condition,
        resume_changed=resume_changed,
    )  # fmt: skip


def _curate(kind: str, input_: str, output: str, config: Path | None, overrides: list[str] | None, **kw) -> None:
    from mole.data.curate import CurateConfig, curate_tracked
    from mole.data.shards import DatasetError
    from mole.storage import StorageError, localize
    from mole.train.config import (
        ConfigError,
        apply_overrides,
        format_validation_error,
        parse_overrides,
        read_yaml_mapping,
    )

    try:
        tree = apply_overrides(read_yaml_mapping(config) if config else {}, parse_overrides(overrides))
        try:
            cfg = CurateConfig.model_validate(tree or {})
        except Exception as err:  # pydantic ValidationError
            raise ConfigError(format_validation_error(err, str(config or "--set"))) from None
        local_in = localize(input_, Path(".cache") / "curate-input")
        stats = curate_tracked(kind, input_, output, local_in, cfg, **kw)
    except (ConfigError, DatasetError, StorageError, ValueError, FileNotFoundError, FileExistsError) as err:
        raise _fail(err) from err
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["rejected_by_reason"].items()) or "none"
    typer.echo(
        f"{stats['inputs']} inputs: {stats['kept']} kept, {stats['rejected']} rejected ({reasons}); "
        f"{stats['samples']} samples written to {output}"
    )


InputOpt = Annotated[str, typer.Option("--input", help="Folder of raw images, or an s3:// prefix.")]
CurOutOpt = Annotated[str, typer.Option(help="Dataset folder or s3:// prefix to write.")]
CurConfigOpt = Annotated[Path | None, typer.Option("--config", help="Curation YAML (see configs/curate.yaml).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Worker processes (default: one per core).")]
AttrOpt = Annotated[Path | None, typer.Option(help="CSV/JSON table by file name: per-sample attributes.")]
SourcesOpt = Annotated[Path | None, typer.Option(help="CSV/JSON table by file name: license and provenance.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Start over instead of resuming an interrupted run.")]


def _curate_command(kind: str, doc: str):
    def command(
        input_: InputOpt,
        output: CurOutOpt,
        config: CurConfigOpt = None,
        set_: SetOpt = None,
        workers: WorkersOpt = None,
        attributes: AttrOpt = None,
        sources: SourcesOpt = None,
        overwrite: OverwriteOpt = False,
    ) -> None:
        _curate(kind, input_, output, config, set_, workers=workers, attributes=attributes, sources=sources,
                overwrite=overwrite)  # fmt: skip

    command.__doc__ = doc
    return command


curate_app.command("scenes")(
    _curate_command("scenes", "Human-in-the-scene photos: sliding-window crops resized, blur and person filters.")
)
curate_app.command("faces")(
    _curate_command(
        "faces",
        "Close-up faces: detected and square-cropped with a margin; aligned datasets (CelebA-HQ, FFHQ): "
        "--set aligned=true resizes them as they are.",
    )
)
curate_app.command("hands")(
    _curate_command("hands", "Close-up hands (11k Hands layout, or a hand detector model): square crops.")
)


@curate_app.command("train-filter")
def curate_train_filter(
    positives: Annotated[Path, typer.Option(help="Folder of images to keep.")],
    negatives: Annotated[Path, typer.Option(help="Folder of images to reject.")],
    output: Annotated[Path, typer.Option(help="Checkpoint file to write.")],
    backbone: Annotated[Path | None, typer.Option(help="Local backbone checkpoint (default: a small CNN).")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train the binary quality classifier (the paper trains VGG19 for blur and "no person" cases)."""
    from mole.data.quality import train_quality_classifier

    try:
        metrics = train_quality_classifier(positives, negatives, output, backbone=backbone, epochs=epochs, seed=seed)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(f"quality classifier written to {output}: {json.dumps(metrics)}")


@app.command()
def lineage(model_uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS.")]) -> None:
    """Print the chain from a registered model back to its datasets: stages, run ids, experts, digests."""
    from mole import tracking

    try:
        chain = tracking.lineage(model_uri)
    except Exception as err:  # MlflowException: unknown model, version or alias
        raise _fail(err) from err
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


def _write_prompts(prompt_set, output: Path) -> None:
    prompt_set.write(output)
    counts = ", ".join(f"{k}: {v}" for k, v in prompt_set.counts.items())
    typer.echo(f"{len(prompt_set)} prompts written to {output} ({counts})")


@prompts_app.command("coco")
def prompts_coco(
    input_: Annotated[Path, typer.Option("--input", help="COCO captions JSON, e.g. captions_val2014.json.")],
    output: Annotated[Path, typer.Option(help="Text file to write, one prompt per line.")],
) -> None:
    """COCO Human Prompts: COCO captions that mention a person (whole words, any case)."""
    from mole.evaluate.prompts import build_coco_prompts

    try:
        _write_prompts(build_coco_prompts(input_), output)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err


@prompts_app.command("diffusiondb")
def prompts_diffusiondb(
    input_: Annotated[Path, typer.Option("--input", help="DiffusionDB metadata.parquet.")],
    output: Annotated[Path, typer.Option(help="Text file to write, one prompt per line.")],
    prompt_nsfw_max: Annotated[float, typer.Option(help="Drop prompts whose prompt_nsfw is above this.")] = 0.5,
    image_nsfw_max: Annotated[
        float, typer.Option(help="Drop prompts with an image whose image_nsfw is above this.")
    ] = 0.5,
) -> None:
    """DiffusionDB Human Prompts: safe prompts, without special symbols, that mention a person."""
    from mole.evaluate.prompts import build_diffusiondb_prompts

    try:
        result = build_diffusiondb_prompts(input_, prompt_nsfw_max=prompt_nsfw_max, image_nsfw_max=image_nsfw_max)
        _write_prompts(result, output)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err


@evaluate_app.command("run")
def evaluate_run(
    model: Annotated[str, typer.Option(help="A diffusers folder, or a registered model (models:/mole@candidate).")],
    prompts: Annotated[Path, typer.Option(help="Prompt file from `mole prompts`.")],
    output: Annotated[Path, typer.Option(help="Folder for images, scores.csv, report.json, report.md.")],
    experts: Annotated[list[str] | None, typer.Option(help="Expert LoRA as NAME=PATH.")] = None,
    gates: Annotated[str | None, typer.Option(help="Gates file or the gates stage's folder (full MoLE).")] = None,
    num_prompts: Annotated[int, typer.Option(help="Prompts sampled per repeat.")] = 3000,
    repeats: Annotated[int, typer.Option(help="Repeats (mean ± standard error over them).")] = 3,
    scorers: Annotated[str, typer.Option(help="Comma-separated: clip, hps_v1, hps_v2, imagereward.")] = "clip",
    scorer_config: Annotated[
        Path | None, typer.Option(help="YAML: scorer name -> options (checkpoint paths).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample and the per-prompt seeds.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="Images generated and scored together.")] = 4,
    label: Annotated[str | None, typer.Option(help="Row label in comparison tables.")] = None,
    compile_unet: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Generate for sampled benchmark prompts and score them (the paper's tables 1-3)."""
    import yaml

    from mole.evaluate.runner import EvalSettings, evaluate_tracked

    try:
        conf = yaml.safe_load(scorer_config.read_text(encoding="utf-8")) if scorer_config else {}
        settings = EvalSettings(
            model=model, prompts=str(prompts), experts=parse_named(experts, "--experts"), gates=gates,
            num_prompts=num_prompts, repeats=repeats, scorers=[x.strip() for x in scorers.split(",") if x.strip()],
            scorer_config=conf or {}, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size, label=label,
            compile_unet=compile_unet,
        )  # fmt: skip
        report = evaluate_tracked(settings, output)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise _fail(err) from err
    typer.echo((output / "report.md").read_text(encoding="utf-8"))
    del report


@evaluate_app.command("compare")
def evaluate_compare(
    runs: Annotated[list[Path], typer.Argument(help="Evaluation output folders (or report.json files).")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated row labels, one per run.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the table as OUTPUT.md and OUTPUT.csv.")] = None,
    gate_plots: Annotated[
        Path | None,
        typer.Option(
            help="Also plot the gates of every MoLE run side by side (e.g. plain vs timestep gates) into this "
            "folder, with each expert's specialisation (own prompts vs the others'); loads the runs' models."
        ),
    ] = None,
    groups: Annotated[
        Path | None, typer.Option(help="With --gate-plots: JSON/YAML prompt groups (default: one per expert).")
    ] = None,
    gate_steps: Annotated[
        int | None, typer.Option(help="With --gate-plots: denoising steps (default: each run's own).")
    ] = None,
) -> None:
    """Lay runs side by side: base vs stage 1 vs + experts vs MoLE (table 2), local vs global vs both (table 3),
    MoLE vs MoLE with timestep gates. Runs should share prompts, seeds and sampler settings (a warning says
    which differ); --gate-plots adds their gate plots."""
    import yaml

    from mole.evaluate.runner import compare_csv, compare_gates, compare_table, load_report, sample_mismatches

    try:
        reports = [load_report(r) for r in runs]
    except FileNotFoundError as err:
        raise _fail(err) from err
    names = [x.strip() for x in labels.split(",")] if labels else None
    if names is not None and len(names) != len(reports):
        raise typer.BadParameter(f"{len(names)} labels for {len(reports)} runs")
    table = compare_table(reports, names)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
        compare_csv(reports, output.with_suffix(".csv"), names)
    typer.echo(table)
    differing = sample_mismatches(reports)
    if differing:
        typer.secho(f"warning: the runs differ in {', '.join(differing)}: not the same prompts and seeds",
                    fg=typer.colors.YELLOW, err=True)  # fmt: skip
    if gate_plots is not None:
        from mole.evaluate.gates import specialisation_table

        try:
            prompt_groups = yaml.safe_load(groups.read_text(encoding="utf-8")) if groups else None
            rows = compare_gates(reports, names, gate_plots, groups=prompt_groups, steps=gate_steps)
        except (ValueError, FileNotFoundError) as err:
            raise _fail(err) from err
        typer.echo("\nGate specialisation (mean global gate on the expert's own prompts / on the others'):")
        typer.echo(specialisation_table(rows))
        typer.echo(f"gate plots in {gate_plots}")


@evaluate_app.command("gates")
def evaluate_gates(
    model: Annotated[Path, typer.Option(help="The base (stage-1) diffusers folder, or stage 1's --output folder.")],
    experts: Annotated[list[str], typer.Option(help="Expert LoRA as NAME=PATH.")],
    gates: Annotated[Path, typer.Option(help="Gates file or the gates stage's --output folder.")],
    output: Annotated[Path, typer.Option(help="Folder for global_gates.png, local_maps.png, gate_stats.json.")],
    groups: Annotated[
        Path | None,
        typer.Option(
            help="JSON/YAML: group name -> list of prompts (default: face, hand, feet for a feet expert, both); "
            "a group named like an expert is its own prompts for the specialisation numbers."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Gate values over denoising steps per prompt group, and local score maps (the paper's figure 7)."""
    import yaml

    from mole.evaluate.gates import gate_statistics, plot_gate_statistics, specialisation
    from mole.generate import load_pipeline

    try:
        prompt_groups = yaml.safe_load(groups.read_text(encoding="utf-8")) if groups else None
        pipe = load_pipeline(model, parse_named(experts, "--experts"), gates)
        stats = gate_statistics(pipe, prompt_groups, steps=steps, seed=seed)
        written = plot_gate_statistics(stats, output)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from err
    for group in stats.global_by_group:
        means = ", ".join(f"{e} {v:.3f}" for e, v in zip(stats.experts, stats.mean_global(group), strict=True))
        typer.echo(f"{group} prompts: mean global gate {means}")
    for expert, spec in specialisation(stats).items():
        typer.echo(f"{expert} expert: own prompts {spec['own']:.3f}, others' {spec['others']:.3f} "
                   f"({spec['delta']:+.3f})")  # fmt: skip
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
