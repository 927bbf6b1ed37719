"""`mole prompts ...`: the paper's human-centric prompt benchmarks (§4.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mole.cli.common import fail

prompts_app = typer.Typer(help="Build the human-centric prompt benchmarks of the paper (§4.1).", no_args_is_help=True)


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
        raise fail(err) from err


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
        raise fail(err) from err
