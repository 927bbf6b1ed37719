"""`python -m mole` (and `accelerate launch -m mole ...`) runs the CLI."""

from mole.cli import main

main()
