"""`mole train stage1|expert|gates`: the three stages, one call each into mole.train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mole.cli.common import SetOpt, fail, parse_named

train_app = typer.Typer(
    help="Train the three stages with one loop. Single process as is; for DDP or DeepSpeed ZeRO run it under "
    "`accelerate launch --config_file configs/accelerate/zero2.yaml -m mole train ...`.",
    no_args_is_help=True,
)


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
        raise fail(err) from err
    if result.result is not None:  # only the main process reports
        typer.echo(
            f"{result.stage}: {result.steps} steps (from {result.start_step}), final loss {result.final_loss:.4f}, "
            f"{result.seconds_per_step:.3f} s/step; result: {result.result}"
        )


@train_app.command(
    "stage1",
    help="Stage 1: fine-tune the UNet (and by default the text encoder) on the human-centric dataset.\n\n"
    "configs/paper.yaml caches the VAE latents of every image and its mirror (the same flips and math as without "
    "the cache) on disk in OUTPUT/../latent-cache: 64 KiB per image and orientation at 512², ~122 GiB for a million "
    "images. Move it with --set stage1.latent_cache_dir=DIR (a folder every process sees), or encode every step "
    "with --set stage1.cache_latents=false.",
)
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
