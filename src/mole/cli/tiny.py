"""`mole tiny ...`: the embedded default (tiny offline SD model, tiny CLIP, synthetic data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mole.cli.common import fail

tiny_app = typer.Typer(help="The embedded default: a tiny offline SD model and synthetic data.", no_args_is_help=True)


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
        raise fail(err) from err
    typer.echo(f"tiny model written to {path}")


@tiny_app.command("vae")
def tiny_vae(
    output: Annotated[Path, typer.Option(help="Weights file to write (safetensors; its report goes beside, .json).")],
    steps: Annotated[int | None, typer.Option(help="Optimizer steps. [4000]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step. [16]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (one-cycle schedule). [2e-3]")] = None,
    images_per_kind: Annotated[int | None, typer.Option(help="Synthetic training images per kind. [1024]")] = None,
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
        raise fail(err) from err
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
        raise fail(err) from err
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
        raise fail(err) from err
    typer.echo(f"{index.num_samples} {kind} samples in {len(index.shards)} shard(s) written to {output}")
