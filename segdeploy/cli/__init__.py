"""`segdeploy` command group.

Each sub-command lives in its own module and imports its heavy libraries
(torch, transformers, onnxruntime) inside the command function, so that
`segdeploy --help` is instant and `segdeploy infer` never loads torch.
"""

from __future__ import annotations

import logging
import sys

import click

from segdeploy import __version__
from segdeploy.cli.bench import bench
from segdeploy.cli.demo import demo
from segdeploy.cli.export import export
from segdeploy.cli.infer import infer
from segdeploy.cli.serve import serve
from segdeploy.cli.train import train
from segdeploy.cli.validate import validate
from segdeploy.errors import SegdeployError

log = logging.getLogger("segdeploy")


class _Group(click.Group):
    """Turns library errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SegdeployError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # a bug, not bad input: say so, keep the trace behind -v
            if log.isEnabledFor(logging.DEBUG):
                raise
            click.echo(
                f"error: unexpected {type(err).__name__}: {err} (run with -v for the traceback)",
                err=True,
            )
            ctx.exit(1)

    def list_commands(self, ctx):
        # The order a user meets them in, not alphabetical.
        return ["train", "export", "validate", "infer", "serve", "bench", "demo"]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="segdeploy")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (warnings and errors only).")
def main(verbose: int, quiet: int) -> None:
    """Fine-tune a segmentation model (any of the guide's eight families), export it to ONNX,
    prove the export faithful, deploy it fast.

    \b
    The usual path (offline, a few minutes on a laptop CPU):
      segdeploy train --model scratch:tiny --dataset synthetic:64 --image-size 64 \\
          --batch-size 8 --max-steps 300 -o models/tiny   # your data: --dataset DIR
      segdeploy export models/tiny                        # models/tiny/onnx + validation.json
      segdeploy infer --model models/tiny YOUR_PHOTOS/ -o masks --overlay

    `segdeploy demo` runs all of it offline on built-in synthetic data.
    """
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(
        level=max(logging.DEBUG, min(logging.ERROR, level)),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose < 2:
        # Third-party libraries are chatty at INFO; keep them at WARNING unless -vv.
        for name in ("transformers", "datasets", "optimum", "onnxruntime", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


for _command in (train, export, validate, infer, serve, bench, demo):
    main.add_command(_command)
