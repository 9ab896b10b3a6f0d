"""`segdeploy export`: ONNX export of a trained model of any family, validated against PyTorch."""

from __future__ import annotations

from pathlib import Path

import click

from segdeploy.cli.options import validation_options
from segdeploy.export import ExportSettings

_DEFAULTS = ExportSettings()  # segdeploy.export imports torch and optimum only when run


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="ONNX folder to write (replaced as a whole once complete): a new or empty folder, or "
    "an earlier export, whose other graphs are kept if made from the same model.onnx. "
    "Default: MODEL_DIR/onnx.",
)
@click.option(
    "--opset",
    type=int,
    default=_DEFAULTS.opset,
    help="ONNX opset to write, up to what both the installed onnx and torch's exporter write "
    "(23 with torch 2.13)  [default: the lowest the model's family needs that keeps LayerNorm "
    "one node: 17 for SegFormer, DPT, MobileNetV2, MobileViT; 18 for BEiT, Data2VecVision, "
    "MobileViTV2, UPerNet, which torch's dynamo exporter writes]. A lower opset than the "
    "family needs is refused, saying why.",
)
@click.option(
    "--fp16",
    is_flag=True,
    default=_DEFAULTS.fp16,
    help="Also write model_fp16.onnx: fp16 weights and compute, fp32 inputs and outputs "
    "(for GPUs; validated on --provider when onnxruntime can run it there).",
)
@click.option(
    "--optimize",
    is_flag=True,
    default=_DEFAULTS.optimize,
    help="Also write model_optimized.onnx: the graph after onnxruntime's optimisations "
    "(fusions, constant folding), so that sessions start faster.",
)
@click.option(
    "--fuse-argmax",
    is_flag=True,
    default=_DEFAULTS.fuse_argmax,
    help="Also write model_fused.onnx (and model_fp16_fused.onnx with --fp16): bilinear "
    "upsampling and argmax inside the graph, so a GPU returns label maps instead of logits "
    "(`segdeploy infer --variant fused`). Validated by pixel agreement (>= 99.9%) and mean IoU.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=_DEFAULTS.quantize,
    help="Also write model_int8.onnx: static int8 quantization (QDQ; per-channel int8 weights "
    "in 7 bits, so that CPUs without VNNI compute them exactly; the family's float op types "
    "kept in float: Softmax and LayerNorm for the transformers, none for MobileNetV2) for "
    "CPUs, calibrated on images of the training split recorded by `segdeploy train`; "
    "validated like the others (default tolerance 0.01 mean IoU). The settings and what "
    "stayed in float go to quantization_int8.json.",
)
@click.option(
    "--calibration-images",
    type=click.IntRange(min=1),
    default=_DEFAULTS.calibration_images,
    show_default=True,
    help="Training images that set the int8 activation ranges (about 20 s for 64 at 512x512).",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(0.0, 1.0),
    default=_DEFAULTS.max_drop,
    help="With --quantize int8: accuracy-aware int8. Measure the int8 graph's disagreement "
    "with the fp32 graph (1 - mean IoU) on held-out training images and, while it exceeds "
    "this limit, keep in float the blocks of nodes measured to hurt most (bounded number of "
    "re-quantizations; minutes on a large model). What stayed float, and each block's "
    "measured effect, go to quantization_int8.json. Example: --max-drop 0.01.",
)
@click.option(
    "--int8-engine",
    "int8_engines",
    type=click.Choice(["onnxruntime", "openvino"]),
    multiple=True,
    default=_DEFAULTS.int8_engines,
    show_default=True,
    help="With --quantize int8: who makes the int8 graph (repeat for both). onnxruntime: "
    "model_int8.onnx (above). openvino: model_openvino_int8.xml/.bin, NNCF's post-training "
    "int8 as OpenVINO IR, calibrated on the same images (with --max-drop, NNCF's accuracy "
    "control, the same drop measure), for `segdeploy infer --provider openvino --variant "
    "openvino_int8`; validated like the others (validation_openvino_int8.json), its settings "
    "in quantization_openvino_int8.json. Needs pip install 'segdeploy[openvino]'.",
)
@click.option(
    "--rewrite/--no-rewrite",
    default=_DEFAULTS.rewrite,
    show_default=True,
    help="Export after the family's exact rewrites: the same logits with less work in every "
    "graph made (SegFormer: the decode head's 1x1 fuse convolution and batch norm folded "
    "into each stage's projection before its upsampling, about 1.7x the images/s on CPU). "
    "Validation compares the graphs with the unmodified PyTorch model either way; the "
    "rewrites applied are named in validation.json. --no-rewrite: the model as "
    "transformers defines it.",
)
@click.option(
    "--validate/--no-validate",
    default=_DEFAULTS.validate,
    show_default=True,
    help="Compare every graph written with the PyTorch model (mean IoU on the data, "
    "see `segdeploy validate --help`).",
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write a Triton model repository here: DIR/NAME/1/model.onnx (the fp32 graph), "
    "config.pbtxt (onnxruntime backend, dynamic batching, TensorRT fp16 with an engine cache; "
    "inputs and outputs from the graph) and preprocessing.md (what a client does). NAME is "
    "the model folder's. Written only when validation passes.",
)
@validation_options
def export(
    model_dir: Path,
    output: Path | None,
    opset: int | None,
    fp16: bool,
    optimize: bool,
    fuse_argmax: bool,
    quantize: str | None,
    calibration_images: int,
    max_drop: float | None,
    int8_engines: tuple[str, ...],
    rewrite: bool,
    validate: bool,
    triton_repo: Path | None,
    **opts,
) -> None:
    """Export a trained model folder to ONNX and prove it faithful.

    Every family of the Hugging Face segmentation guide: SegFormer, DPT and MobileViT
    through Optimum, MobileNetV2 through Optimum's custom OnnxConfig, BEiT,
    Data2VecVision, MobileViTV2 and UPerNet through torch's dynamo exporter (opset 18).
    Writes model.onnx (dynamic batch; dynamic height and width where the family's graph
    is right at every size, else fixed at the size the model was trained at) with
    config.json and preprocessor_config.json beside it, so that `segdeploy infer` and
    optimum's ORTModelForSemanticSegmentation load the folder as it is. Then validates each
    graph against the PyTorch model on the evaluation split recorded by `segdeploy
    train` (or --dataset/--split), writes validation.json, prints a table, and
    exits with status 1 when a validation rule fails (see `segdeploy validate --help`).

    \b
    Examples:
      segdeploy export models/tiny
      segdeploy export models/tiny --opset 18 --fp16 --optimize --max-images 100
      segdeploy export models/tiny --fp16 --fuse-argmax   # for the GPU path
      segdeploy export models/tiny --quantize int8         # for CPUs
      segdeploy export models/tiny --quantize int8 --int8-engine openvino
      segdeploy export models/tiny --dataset data/camvid --split val
      segdeploy export models/tiny --triton-repo triton/  # for Triton on a GPU
    """
    from segdeploy.cli.options import exit_if_failed, settings_from, warn
    from segdeploy.export import export_model
    from segdeploy.export.folder import readd_options
    from segdeploy.validate import ValidationSettings
    from segdeploy.validate.report import failed
    from segdeploy.validate.tables import print_outcome

    settings = ExportSettings(
        opset=opset,
        fp16=fp16,
        optimize=optimize,
        fuse_argmax=fuse_argmax,
        quantize=quantize,
        calibration_images=calibration_images,
        max_drop=max_drop,
        int8_engines=tuple(dict.fromkeys(int8_engines)),
        rewrite=rewrite,
        validate=validate,
        validation=settings_from(ValidationSettings, opts),
    )
    result = export_model(model_dir, output, settings, warn=warn, progress=True)
    graphs = ", ".join(p.name for p in result.graphs.values())
    click.echo(
        f"export: {graphs} (opset {result.opset}, {result.route} route) in "
        f"{result.export_seconds:.1f} s -> {result.output}"
    )
    reports = list(result.reports.values())
    if result.kept:
        click.echo(f"kept from the earlier export (same model.onnx): {', '.join(result.kept)}")
    if result.dropped:
        again = readd_options(result.dropped)
        warn(
            f"dropped {', '.join(result.dropped)} of the earlier export: made from its "
            "model.onnx, which this export changed"
            + (f"; add {again} to make them again" if again else "")
        )
    if validate:
        print_outcome(reports, seconds=result.validation_seconds)
    if triton_repo is not None and not failed(reports):
        from segdeploy.export.triton import write_triton_repo

        target = write_triton_repo(result.output, triton_repo, name=model_dir.resolve().name)
        click.echo(f"triton: {target} (config.pbtxt, 1/model.onnx, preprocessing.md)")
    if validate:
        exit_if_failed(reports)
