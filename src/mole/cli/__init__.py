"""`mole ...`: the command line, one module per sub-app, each command one call into the library.

* :mod:`mole.cli.app`: the root app (logging, ``--version``);
* :mod:`mole.cli.models`: ``generate``, ``serve``, ``lineage``, ``promote``;
* :mod:`mole.cli.tiny`, :mod:`mole.cli.train`, :mod:`mole.cli.curate`, :mod:`mole.cli.prompts`,
  :mod:`mole.cli.evaluate`: their sub-apps; ``pipeline`` is :mod:`mole.pipeline.cli`, ``study``
  :mod:`mole.evaluate.study.cli`.
"""

from __future__ import annotations

from mole.cli import models  # noqa: F401  (registers generate, serve, lineage, promote on the root app)
from mole.cli.app import app
from mole.cli.common import parse_named
from mole.cli.curate import curate_app
from mole.cli.evaluate import evaluate_app
from mole.cli.prompts import prompts_app
from mole.cli.tiny import tiny_app
from mole.cli.train import train_app
from mole.evaluate.study.cli import study_app
from mole.pipeline.cli import pipeline_app

app.add_typer(tiny_app, name="tiny")
app.add_typer(train_app, name="train")
app.add_typer(curate_app, name="curate")
app.add_typer(prompts_app, name="prompts")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(study_app, name="study")

__all__ = ["app", "main", "parse_named"]


def main() -> None:
    """The ``mole`` console script."""
    app()
