"""What every `mole` sub-app shares: NAME=VALUE options, the error exit, the --compile help."""

from __future__ import annotations

from typing import Annotated

import typer

COMPILE_HELP = (
    "Compile the UNet (torch.compile + CUDA graphs; the first call compiles). On CPU, or if compiling fails, "
    "it runs eager with a warning. Gate recording runs eager."
)


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


def fail(err: Exception) -> typer.Exit:
    """Print ``err`` (credentials masked) and return the exit to raise: code 2, a usage or input error."""
    from mole.security import redact

    typer.secho(redact(f"error: {err}"), fg=typer.colors.RED, err=True)  # messages quote URIs the user gave
    return typer.Exit(code=2)


SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Config override section.key=value; repeatable.")]
