"""`python -m segdeploy` (and `torchrun -m segdeploy train ...`) run the CLI."""

from segdeploy.cli import main

main(prog_name="segdeploy")
