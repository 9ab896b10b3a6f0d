"""`segdeploy bench`: thin Click layer over segdeploy.bench.run_bench."""

from __future__ import annotations

import shlex

import click

from segdeploy.bench.run import BenchSettings
from segdeploy.cli.options import threads_option, tile_options
from segdeploy.errors import SegdeployError


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SegdeployError(
            option, f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise SegdeployError(option, f"expected positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))


def command_line(ctx: click.Context) -> str:
    """The command as the user gave it (options that were not left at their default)."""
    from click.core import ParameterSource

    words = ctx.command_path.split()
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or param.opts)[0]
            words.append(flag)
        else:
            words += [max(param.opts, key=len), str(value)]
    return shlex.join(words)


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--model",
    default=None,
    type=click.Path(file_okay=False),
    help="Trained model folder (PyTorch weights, its export in onnx/), or an ONNX folder alone "
    "(then torch and hf-pipeline are skipped)  [default: the newest export under models/, "
    "as for `segdeploy infer`, named on stderr].",
)
@click.option(
    "--onnx",
    type=click.Path(file_okay=False),
    default=None,
    help="ONNX folder to benchmark  [default: MODEL/onnx].",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False),
    default=None,
    help="Benchmark on this folder of images (searched recursively, as `segdeploy infer` does).",
)
@click.option(
    "--labels",
    type=click.Path(file_okay=False),
    default=None,
    help="With --images: label PNGs with the same relative names (photos/a/frame.000.jpg -> "
    "LABELS/a/frame.000.png), for mean IoU; read with the recorded dataset's ignore index and "
    "label reduction unless --ignore-index or --reduce-labels say otherwise.",
)
@click.option(
    "--dataset",
    default=None,
    help="Benchmark on the evaluation split of this dataset (synthetic[:SIZE], a local folder, "
    "a save_to_disk folder or a Hub id)  [default: the one recorded in MODEL/train_args.json].",
)
@click.option(
    "--split", default=None, help="The split to use as a whole, e.g. val or validation[:50]."
)
@click.option(
    "--reduce-labels/--no-reduce-labels",
    default=None,
    help="Label 0 means 'other' (ignored) and v is class v-1  [default: as recorded].",
)
@click.option(
    "--ignore-index",
    type=click.IntRange(0, 255),
    default=None,
    help="Label value left out of the mean IoU  [default: as recorded, else 255].",
)
@click.option(
    "--max-images", type=click.IntRange(min=1), default=None, help="Use only the first N images."
)
@click.option(
    "--backends",
    default=None,
    help="Comma-separated: torch, hf-pipeline, optimum, onnx-cpu, onnx-cuda, onnx-tensorrt, "
    "onnx-openvino (segdeploy infer --provider openvino), onnx-<provider>-<variant> (e.g. "
    "onnx-cpu-int8, onnx-openvino-openvino_int8), openvino, openvino-int8 (OpenVINO's own "
    "pipeline on the CPU, fp32 or NNCF int8; these need the openvino extra)  [default: all "
    "but openvino and openvino-int8, with every variant in the ONNX folder].",
)
@click.option(
    "--batch-sizes",
    default="1,8",
    show_default=True,
    help="Comma-separated batch sizes; every backend runs at each.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Timed end-to-end passes over all images (after one warm-up pass); the median counts.",
)
@click.option(
    "--model-runs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed forward calls for the model-only latency (after 2 warm-up calls).",
)
@threads_option(
    "Threads for torch and onnxruntime  [default: each library's own, all cores].",
    default=BenchSettings.threads,
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="Give up on a backend after this many seconds (it is then listed as failed).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Report file (JSON); the Markdown table and PNG chart go beside it with .md and .png  "
    "[default: MODEL/bench.json].",
)
@click.option(
    "--targets/--no-targets",
    default=BenchSettings.targets,
    show_default=True,
    help="Judge segdeploy's speed and fidelity targets (set for a trained SegFormer at "
    "512x512, e.g. CamVid b0); --no-targets for models they mean nothing for.",
)
@click.option(
    "--in-memory",
    is_flag=True,
    default=BenchSettings.in_memory,
    help="The other libraries' rows keep their label maps in memory instead of writing label "
    "PNGs (segdeploy infer's rows always write theirs): a lighter job than infer's, marked "
    '"(in memory)" in the table.  [default: every row writes its label PNGs]',
)
@click.option("--keep-work", is_flag=True, help="Keep the work folder (label maps, worker logs).")
@tile_options
def bench(
    model: str | None,
    onnx: str | None,
    images: str | None,
    labels: str | None,
    dataset: str | None,
    split: str | None,
    reduce_labels: bool | None,
    ignore_index: int | None,
    max_images: int | None,
    backends: str | None,
    batch_sizes: str,
    runs: int,
    model_runs: int,
    threads: int | None,
    timeout: float | None,
    output: str | None,
    targets: bool,
    in_memory: bool,
    keep_work: bool,
    tile: str | None,
    stride: str | None,
    overlap: float | None,
    blend: str,
) -> None:
    """Compare segdeploy's ONNX Runtime inference with the pipelines users would pick instead.

    For each backend and batch size, in a fresh process: end-to-end images/s
    (image files in, label PNG files out, the same job for every row: for onnx-*
    that is `segdeploy infer` on the folder, for the others their own pipeline with
    the label maps written by Pillow), split into a steady rate and a fixed start-up
    per pass; model-only latency p50/p95 (the forward pass on preprocessed batches),
    peak memory, and with labels the mean IoU and the share of pixels whose label
    equals the `torch` backend's. Then the fastest validated path here (provider and
    variant of `segdeploy infer`, its graph's validation passed). Backends that
    cannot run here are listed as skipped, with the reason.

    \b
    Examples:
      segdeploy bench                                       # newest export, recorded eval split
      segdeploy bench --model models/tiny --images photos/ --backends torch,onnx-cpu
      segdeploy bench --model models/camvid --dataset data/camvid --split val --batch-sizes 1

    Prints a table and writes JSON (with machine, versions, date and command),
    Markdown and a PNG bar chart. An image that cannot be decoded is listed in the
    report ("failed_images") and left out of every row. Exits with status 1 when
    a backend failed or an image could not be decoded.
    """

    from rich.console import Console

    from segdeploy.bench.run import InputOptions, bench_model, failed

    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=130)
    settings = BenchSettings(
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        runs=runs,
        model_runs=model_runs,
        threads=threads,
        timeout_s=timeout,
        targets=targets,
        tile=tile,
        stride=stride,
        overlap=overlap,
        blend=blend,
        in_memory=in_memory,
        inputs=InputOptions(
            images=images,
            labels=labels,
            dataset=dataset,
            split=split,
            reduce_labels=reduce_labels,
            ignore_index=ignore_index,
            max_images=max_images,
        ),
    )
    report = bench_model(
        model,
        settings,
        onnx=onnx,
        backends=None
        if backends is None
        else [b.strip() for b in backends.split(",") if b.strip()],
        output=output,
        command=command_line(click.get_current_context()),
        console=console,
        keep_work=keep_work,
        announce=lambda line: click.echo(line, err=True),
    )
    if failed(report):
        raise SystemExit(1)
