"""Click options shared by several commands, with their defaults read from the settings
dataclasses (the one source of each default) and help that says what they do."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

import click

from segdeploy.runtime.providers import PROVIDERS
from segdeploy.runtime.ray_session import DEFAULT_CONNECT_TIMEOUT_S
from segdeploy.validate.settings import ValidationSettings

T = TypeVar("T")

_VALIDATION = ValidationSettings()


def settings_from(cls: type[T], options: dict[str, Any], **extra: Any) -> T:
    """An instance of the dataclass `cls` from the parsed options that name its fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names}, **extra)


def threads_option(help: str, default: int | None = None):
    return click.option(
        "--threads", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def provider_option(help: str, default: str = _VALIDATION.provider):
    return click.option(
        "--provider", type=click.Choice(PROVIDERS), default=default, show_default=True, help=help
    )


def fallback_option():
    return click.option(
        "--fallback",
        is_flag=True,
        default=_VALIDATION.fallback,
        help="If --provider is missing or fails to start, use the next one "
        "(tensorrt -> cuda -> cpu) with a warning, instead of stopping.",
    )


def batch_size_option(help: str, default: int = _VALIDATION.batch_size):
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def tile_options(func):
    """--tile, --stride, --overlap, --blend (segdeploy.runtime.tiles.TileOptions), shared by
    infer, validate, export and bench."""
    from segdeploy.runtime.tiles import BLENDS, TileOptions

    d = TileOptions()
    options = [
        click.option(
            "--tile",
            metavar="auto|SIZE|HxW",
            default=d.tile,
            help="Sliding-window inference for large images: cut each image into windows of "
            "this size (auto: the model's input size) at its own resolution, instead of "
            "resizing it to the model's input, and blend their logits as MMSegmentation's "
            "slide mode does (see docs/tiles.md).",
        ),
        click.option(
            "--stride",
            metavar="S|HxW",
            default=d.stride,
            help="With --tile: pixels between window starts  [default: 2/3 of the tile].",
        ),
        click.option(
            "--overlap",
            type=click.FloatRange(0, 1, max_open=True),
            default=d.overlap,
            help="With --tile, instead of --stride: share of the tile neighbouring windows "
            "overlap  [default: 1/3].",
        ),
        click.option(
            "--blend",
            type=click.Choice(BLENDS),
            default=d.blend,
            show_default=True,
            help="With --tile: mean (MMSegmentation's average) or gaussian (windows weighted "
            "towards their centre, as MONAI does: fewer seams).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def ray_address_option(help: str = ""):
    """--ray-address: the Ray a command runs on (segdeploy.runtime.ray_session)."""
    return click.option(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help=f"{help}The Ray cluster to join: auto (the one `ray start --head` started on "
        "this machine), HOST:PORT of its head, or ray://HOST:PORT (Ray Client)  [default: "
        "$RAY_ADDRESS, else a private Ray for this command alone, on 127.0.0.1 with this "
        "process's cores].",
    )


def ray_timeout_option(help: str = ""):
    """--ray-timeout: how long joining a cluster may wait for it to answer."""
    return click.option(
        "--ray-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_CONNECT_TIMEOUT_S,
        show_default=True,
        metavar="SECONDS",
        help=f"{help}How long to wait for the cluster of --ray-address to answer before "
        "giving up (exit status 2).",
    )


def validation_options(func):
    """Options shared by `export` and `validate` (ValidationSettings): which data, how
    strict, where to run."""
    d = _VALIDATION
    options = [
        click.option(
            "--dataset",
            metavar="NAME",
            default=d.dataset,
            help="Validate on this dataset: a local folder (images/<split>/ + "
            "annotations/<split>/), a datasets.save_to_disk folder, a Hub id, or synthetic[:SIZE]. "
            "Without --split, its held-out part as `segdeploy train` carves it. Default: the "
            "dataset recorded by train in MODEL_DIR/train_args.json.",
        ),
        click.option(
            "--split",
            metavar="SPLIT",
            default=d.split,
            help="Validate on this whole split, e.g. 'val' or 'validation[:200]' (unlike "
            "train's --split, which names the training rows). Default: the evaluation split "
            "that train used.",
        ),
        click.option(
            "--reduce-labels/--no-reduce-labels",
            default=d.reduce_labels,
            help="Map label 0 to the ignore index and shift the others down (ADE20K style). "
            "Default: as recorded, else the dataset's default.",
        ),
        click.option(
            "--ignore-index",
            type=click.IntRange(0, 255),
            default=d.ignore_index,
            help="Label value left out of the mean IoU. Default: as recorded, else 255.",
        ),
        click.option(
            "--id2label",
            "id2label_file",
            type=click.Path(dir_okay=False),
            default=d.id2label_file,
            help='JSON file of class names {"0": "road", ...}. Default: id2label.json beside the data.',
        ),
        click.option(
            "--max-images",
            type=click.IntRange(min=1),
            default=d.max_images,
            help="Use at most this many images of the split (the first ones). Default: all.",
        ),
        click.option(
            "--tolerance",
            type=click.FloatRange(min=0),
            default=d.tolerance,
            help="Largest allowed change of mean IoU, absolute, either way. Default: 0.001 for "
            "fp32 graphs, 0.005 for fp16, 0.01 for int8.",
        ),
        click.option(
            "--logit-tolerance",
            type=click.FloatRange(min=0),
            default=d.logit_tolerance,
            help="Largest max |logit difference|, relative to the largest |logit| (at least 1), "
            "for fp32 graphs always and for every graph without labelled data. "
            "Default: 1e-3 fp32, 2e-2 fp16, 0.1 int8.",
        ),
        provider_option("ONNX Runtime provider for the ONNX side (PyTorch runs on the CPU)."),
        fallback_option(),
        batch_size_option("Images per forward pass."),
        threads_option(
            "CPU threads for PyTorch and onnxruntime. Default: theirs (all cores). On a "
            "busy machine, --threads 1 can be several times faster.",
            default=d.threads,
        ),
        click.option(
            "--random-inputs",
            type=click.IntRange(min=1),
            default=d.random_inputs,
            show_default=True,
            help="Without labelled data: how many random images to compare logits on.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return tile_options(func)


def warn(message: str) -> None:
    """A warning on stderr, as every command prints them."""
    click.echo(f"warning: {message}", err=True)


def exit_if_failed(reports) -> None:
    """Exit status 1 when any validation report failed (skipped graphs do not count)."""
    from segdeploy.validate.report import failed

    if failed(reports):
        raise SystemExit(1)
