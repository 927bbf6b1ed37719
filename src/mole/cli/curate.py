"""`mole curate ...`: raw images to training datasets; the quality filter's training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mole.cli.common import SetOpt, fail

curate_app = typer.Typer(
    help="Curate raw images into training datasets: crops, quality filters, captions, de-duplication.",
    no_args_is_help=True,
)


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
        raise fail(err) from err
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
        raise fail(err) from err
    typer.echo(f"quality classifier written to {output}: {json.dumps(metrics)}")
