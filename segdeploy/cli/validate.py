"""`segdeploy validate`: compare an exported ONNX graph with its PyTorch model, by mean IoU."""

from __future__ import annotations

from pathlib import Path

import click

from segdeploy.cli.options import validation_options
from segdeploy.folders import VARIANT_FILES


@click.command()
@click.argument("onnx_dir", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="PyTorch model folder to compare with. Default: the folder that holds ONNX_DIR "
    "(where `segdeploy export` puts it).",
)
@click.option("--graph", metavar="FILE", help="Graph file in ONNX_DIR. Default: model.onnx.")
@click.option(
    "--variant",
    type=click.Choice(list(VARIANT_FILES)),
    help="Shorthand for --graph: "
    + ", ".join(f"{k} = {v}" for k, v in VARIANT_FILES.items())
    + ".",
)
@validation_options
def validate(
    onnx_dir: Path, model_dir: Path | None, graph: str | None, variant: str | None, **opts
):
    """Check that an exported ONNX graph segments like its PyTorch model.

    Runs both on the same preprocessed images, upsamples both sets of logits to
    the label size the same way, and compares mean IoU against the ground truth,
    per-class IoU, pixel agreement and logit differences. The report is written
    beside the graph (validation.json for model.onnx, validation_fp16.json for
    model_fp16.onnx, ...) and printed as a table. Exit status 1 when a rule fails
    (named in the last line and in the report's "failed_rules"): mean IoU changes by
    more than --tolerance; label maps agree with PyTorch's on fewer pixels than the
    precision's floor (fp32 99.99%, fp16 99.9%, int8 99%); an fp32 graph's logits
    differ by more than --logit-tolerance.

    \b
    Examples:
      segdeploy validate models/tiny/onnx
      segdeploy validate models/tiny/onnx --variant fp16 --provider cuda
      segdeploy validate out/onnx --model models/tiny --dataset data/camvid --split val
    """
    from segdeploy.cli.options import exit_if_failed, settings_from, warn
    from segdeploy.validate import ValidationSettings, validate_export
    from segdeploy.validate.tables import print_outcome

    settings = settings_from(ValidationSettings, opts)
    report = validate_export(
        onnx_dir,
        settings,
        model_dir=model_dir,
        graph=graph,
        variant=variant,
        warn=warn,
        progress=True,
    )
    print_outcome([report])
    exit_if_failed([report])
