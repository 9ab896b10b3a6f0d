"""`segdeploy validate`: compare an exported ONNX graph with its PyTorch model, by mean IoU."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from segdeploy.export import VARIANTS
from segdeploy.runtime.providers import PROVIDERS

log = logging.getLogger("segdeploy")


def validation_options(func):
    """Options shared by `export` and `validate`: which data, how strict, where to run."""
    options = [
        click.option(
            "--dataset",
            metavar="NAME",
            help="Validate on this dataset: a local folder (images/<split>/ + "
            "annotations/<split>/), a datasets.save_to_disk folder, a Hub id, or synthetic[:SIZE]. "
            "Without --split, its held-out part as `segdeploy train` carves it. Default: the "
            "dataset recorded by train in MODEL_DIR/train_args.json.",
        ),
        click.option(
            "--split",
            metavar="SPLIT",
            help="Validate on this whole split, e.g. 'val' or 'validation[:200]' (unlike "
            "train's --split, which names the training rows). Default: the evaluation split "
            "that train used.",
        ),
        click.option(
            "--reduce-labels/--no-reduce-labels",
            default=None,
            help="Map label 0 to the ignore index and shift the others down (ADE20K style). "
            "Default: as recorded, else the dataset's default.",
        ),
        click.option(
            "--ignore-index",
            type=click.IntRange(0, 255),
            default=None,
            help="Label value left out of the mean IoU. Default: as recorded, else 255.",
        ),
        click.option(
            "--id2label",
            "id2label_file",
            type=click.Path(dir_okay=False),
            help='JSON file of class names {"0": "road", ...}. Default: id2label.json beside the data.',
        ),
        click.option(
            "--max-images",
            type=click.IntRange(min=1),
            default=None,
            help="Use at most this many images of the split (the first ones). Default: all.",
        ),
        click.option(
            "--tolerance",
            type=click.FloatRange(min=0),
            default=None,
            help="Largest allowed change of mean IoU, absolute, either way. Default: 0.001 for "
            "fp32 graphs, 0.005 for fp16, 0.01 for int8.",
        ),
        click.option(
            "--logit-tolerance",
            type=click.FloatRange(min=0),
            default=None,
            help="Largest max |logit difference|, relative to the largest |logit| (at least 1), "
            "for fp32 graphs always and for every graph without labelled data. "
            "Default: 1e-3 fp32, 2e-2 fp16, 0.1 int8.",
        ),
        click.option(
            "--provider",
            type=click.Choice(PROVIDERS),
            default="cpu",
            show_default=True,
            help="ONNX Runtime provider for the ONNX side (PyTorch runs on the CPU).",
        ),
        click.option(
            "--fallback",
            is_flag=True,
            help="If --provider is missing or fails to start, use the next one "
            "(tensorrt -> cuda -> cpu) with a warning, instead of stopping.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="Images per forward pass.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads for PyTorch and onnxruntime. Default: theirs (all cores). On a "
            "busy machine, --threads 1 can be several times faster.",
        ),
        click.option(
            "--random-inputs",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="Without labelled data: how many random images to compare logits on.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_data_for(model_dir: Path, opts: dict):
    """Resolve and load the validation data from the options; None -> random inputs (said so)."""
    from segdeploy.export import num_labels_of, read_segformer_config
    from segdeploy.validation import load_validation_data, resolve_dataset

    spec = resolve_dataset(
        model_dir,
        dataset=opts["dataset"],
        split=opts["split"],
        reduce_labels=opts["reduce_labels"],
        ignore_index=opts["ignore_index"],
        id2label_file=opts["id2label_file"],
    )
    if spec is None:
        click.echo(
            f"warning: no dataset given and none recorded in {model_dir / 'train_args.json'}: "
            "checking logits on random inputs only, which proves less (pass --dataset)",
            err=True,
        )
        return None
    num_labels = num_labels_of(read_segformer_config(model_dir, need_weights=True))
    return load_validation_data(spec, num_labels=num_labels)


def validation_kwargs(opts: dict) -> dict:
    return {
        "max_images": opts["max_images"],
        "tolerance": opts["tolerance"],
        "logit_tolerance": opts["logit_tolerance"],
        "provider": opts["provider"],
        "fallback": opts["fallback"],
        "batch_size": opts["batch_size"],
        "random_inputs": opts["random_inputs"],
        "threads": opts["threads"],
    }


def finish(reports: list[dict], seconds: float | None = None) -> None:
    """Print the tables, the validation time (`seconds`, else the report's); exit 1 on a failure."""
    from segdeploy.validation import print_reports, validation_path

    print_reports(reports)
    for r in reports:
        if r.get("skipped"):
            click.echo(f"warning: {r['graph']} not validated: {r['reason']}", err=True)
    ran = [r for r in reports if not r.get("skipped")]
    if ran:
        seconds = ran[0]["timings"]["total_s"] if seconds is None else seconds
        click.echo(f"validation: {ran[0]['images']} images in {seconds:.1f} s")
    for r in reports:
        if r.get("onnx_dir"):
            click.echo(f"report: {validation_path(Path(r['onnx_dir']) / r['graph'])}")
    if any(r.get("passed") is False for r in reports):
        raise SystemExit(1)


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
    type=click.Choice(list(VARIANTS)),
    help="Shorthand for --graph: " + ", ".join(f"{k} = {v}" for k, v in VARIANTS.items()) + ".",
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
      segdeploy validate models/segformer/onnx
      segdeploy validate models/segformer/onnx --variant fp16 --provider cuda
      segdeploy validate out/onnx --model models/segformer --dataset ../data/camvid --split val
    """
    from segdeploy.errors import SegdeployError
    from segdeploy.export import WEIGHT_FILES, check_provider, graph_path, read_segformer_config
    from segdeploy.validation import load_graph, validate_onnx

    if graph and variant:
        raise SegdeployError("--graph", "give --graph or --variant, not both")
    read_segformer_config(onnx_dir, need_weights=False)
    onnx_path = Path(onnx_dir) / graph if graph else graph_path(onnx_dir, variant or "fp32")
    load_graph(onnx_path)  # a missing or corrupt graph is reported before any data is loaded
    if model_dir is None:
        parent = onnx_dir.resolve().parent
        if not any((parent / name).is_file() for name in WEIGHT_FILES):
            raise SegdeployError(
                onnx_dir, f"no PyTorch model in {parent} to compare with: pass --model MODEL_DIR"
            )
        model_dir = parent
    read_segformer_config(model_dir, need_weights=True)
    check_provider(opts["provider"], opts["fallback"])
    data = load_data_for(model_dir, opts)
    report = validate_onnx(
        onnx_path, model_dir, data=data, progress=True, **validation_kwargs(opts)
    )
    finish([report])
