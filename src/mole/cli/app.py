"""The root `mole` Typer app and its callback (logging, --version); sub-apps register in mole.cli."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from mole import __version__

app = typer.Typer(
    name="mole",
    help="MoLE: Mixture of Low-rank Experts for human-centric Stable Diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
