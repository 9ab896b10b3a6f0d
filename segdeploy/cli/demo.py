"""`segdeploy demo`: thin Click layer over segdeploy.demo.run_demo."""

from __future__ import annotations

import click


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "-o",
    "--output-dir",
    default="models/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for everything the demo makes; a rerun replaces its contents.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A smoke run in well under a minute: 32 px images, 4 training steps, a 2-backend "
    "bench. The model does not learn anything; use it to check an installation.",
)
def demo(output_dir: str, quick: bool) -> None:
    """Train, export, validate, infer and benchmark, offline, on built-in synthetic data.

    \b
    1. trains scratch:tiny on synthetic shapes until its validation mean IoU
       is above 0.5 (`segdeploy train`),
    2. exports it to ONNX at opset 17 and validates it against PyTorch
       (`segdeploy export`),
    3. writes the validation images as PNG files,
    4. segments them with overlays (`segdeploy infer --overlay`),
    5. benchmarks segdeploy against torch, the transformers pipeline, optimum
       and OpenVINO on more synthetic images (`segdeploy bench`: each row turns
       image files into label files),
    then prints what it did and where each output is, and, last, the fastest
    validated row and its lead over the fastest other library. About 2 minutes on
    two CPU cores; nothing is downloaded.

    \b
    Example:
      segdeploy demo                      # outputs under models/demo/
      segdeploy demo -o /tmp/demo --quick

    Exits with status 1 if the model did not learn or the export failed validation.
    """
    import os

    # Nothing here needs the Hub; make sure no library tries it and waits on a network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.markup import escape

    from segdeploy.demo import DemoSettings, closing_line, run_demo, summary_table

    console = Console()
    if not console.is_terminal:
        console = Console(width=130)
    settings = DemoSettings.quick() if quick else DemoSettings()
    result = run_demo(output_dir, settings, console=console)
    console.print(summary_table(result, settings))
    line = closing_line(result)
    if line:
        console.print(escape(line))
    if result.learned is False or not result.validation.get("passed"):
        raise SystemExit(1)
