"""`segdeploy infer`: thin Click layer over segdeploy.runtime.infer.run_infer (torch-free)."""

from __future__ import annotations

import click

from segdeploy.cli.options import (
    ray_address_option,
    ray_timeout_option,
    settings_from,
    tile_options,
)
from segdeploy.runtime.clips import VideoSettings
from segdeploy.runtime.providers import PROVIDERS
from segdeploy.runtime.video_out import LABEL_MODES, OVERLAY_CODECS

_VIDEO = VideoSettings()


def video_options(func):
    """Options for clips among the inputs and for --stream (VideoSettings)."""
    options = [
        click.option(
            "--stream",
            "streams",
            multiple=True,
            default=_VIDEO.streams,
            metavar="URL",
            help="Segment a stream: anything FFmpeg opens (rtsp://, http://, a file being "
            "written as file:PATH); outputs go to OUTPUT/<URL as a name>/. Repeatable.",
        ),
        click.option(
            "--every",
            type=click.IntRange(min=1),
            default=_VIDEO.every,
            show_default=True,
            help="Clips and streams: segment every Nth frame.",
        ),
        click.option(
            "--start",
            type=click.FloatRange(min=0),
            default=_VIDEO.start,
            show_default=True,
            metavar="SECONDS",
            help="Clips and streams: begin at this time.",
        ),
        click.option(
            "--end",
            type=click.FloatRange(min=0),
            default=_VIDEO.end,
            metavar="SECONDS",
            help="Clips and streams: stop at this time  [default: the end].",
        ),
        click.option(
            "--max-fps",
            type=click.FloatRange(min=0, min_open=True),
            default=_VIDEO.max_fps,
            metavar="FPS",
            help="Clips and streams: take at most this many frames per second of video.",
        ),
        click.option(
            "--video-labels",
            "video_labels",
            type=click.Choice(LABEL_MODES),
            default=_VIDEO.labels,
            show_default=True,
            help="How a clip's label maps are written, both lossless: png = one label PNG per "
            "frame (frames/<index>_<seconds>s.png); ffv1 = one FFV1 stream, labels.mkv.",
        ),
        click.option(
            "--overlay-codec",
            type=click.Choice(sorted(OVERLAY_CODECS)),
            default=_VIDEO.overlay_codec,
            show_default=True,
            help="With --overlay, a clip's overlay video: h264 (overlay.mp4), vp9 "
            "(overlay.webm) or ffv1 (overlay.mkv, lossless).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=False, metavar="INPUT...")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Exported model: an ONNX folder (model.onnx, config.json, preprocessor_config.json) "
    "or a trained model folder with its export in onnx/. Default: the newest export under "
    "models/.",
)
@click.option(
    "-o",
    "--output",
    default="segdeploy-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder; it mirrors the inputs (folder photos/ -> OUTPUT/photos/...). It is "
    "never read as input and must not hold the inputs: a run that would write over an input, "
    "over a file segdeploy did not write (see --overwrite) or outside OUTPUT exits with "
    "status 2 before writing anything.",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS, case_sensitive=False),
    default="auto",
    show_default=True,
    help="Where the graph runs: ONNX Runtime's cpu, cuda or tensorrt, or openvino (OpenVINO's "
    "runtime on the CPU: pip install 'segdeploy[openvino]'; runs model.onnx and every variant, "
    "and the NNCF int8 --variant openvino_int8); auto = CUDA if installed, else ONNX Runtime's "
    "CPU (TensorRT and OpenVINO only on request; `segdeploy bench` says which is fastest here).",
)
@click.option(
    "--fallback",
    is_flag=True,
    help="If the provider is missing or fails, step down TensorRT -> CUDA -> CPU with a warning "
    "instead of exiting with status 2.",
)
@click.option(
    "--variant",
    default="fp32",
    show_default=True,
    help="Graph to run: fp32 (model.onnx), fp16, optimized, int8, or NAME for model_NAME.onnx.",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Half precision: TensorRT builds fp16 engines; CUDA/CPU run the fp16 graph (= --variant fp16).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images (with --tile: windows) per model call, and TensorRT's largest profile  "
    "[default: 4 on CPU, 16 on GPU; with --tile, 1 on onnxruntime's CPU provider].",
)
@click.option(
    "--trt-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for TensorRT engines and timing cache; later runs reuse them instead of "
    "rebuilding (minutes).",
)
@click.option(
    "--ov-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="With --provider openvino: folder for compiled models, reused by later runs (each "
    "file named by the graph's hash, OpenVINO's version, the CPU and the settings)  "
    "[default: $XDG_CACHE_HOME/segdeploy/openvino, else ~/.cache/segdeploy/openvino].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Model threads (ONNX Runtime's intra-op, OpenVINO's inference threads)  [default: the cores this process may use, from its "
    "CPU affinity (taskset, cgroup cpuset)].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Worker processes that decode, preprocess, upsample and write (the model runs in "
    "the main process); 0 runs everything in-process (the reference, for debugging)  "
    "[default: the cores this process may use].",
)
@click.option(
    "--overlay",
    is_flag=True,
    help="Also write <stem>_overlay.jpg: the image blended with the class colours.",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Skip images whose outputs this model already wrote (checked by the mark segdeploy "
    "puts in each output, the model's fingerprint and the photo's size): resumes an "
    "interrupted or killed run.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace files at output paths that segdeploy did not write (or that changed "
    "since). Without it such a file stops the run before any work, with exit status 2.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse images larger than this many pixels, decoded or as the image processor "
    "resizes them (memory guard: a 1-pixel-high strip can become billions of pixels)  "
    "[default: Pillow's, about 89 million].",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),  # the keys of ENGINES below
    default="local",
    show_default=True,
    help="local: processes on this machine. ray: Ray Data (pip install 'segdeploy[ray]'), "
    "on a private Ray here or on the cluster of --ray-address, where OUTPUT and the inputs "
    "must be paths every node reaches.",
)
@ray_address_option("With --engine ray. ")
@ray_timeout_option("With --engine ray. ")
@click.option(
    "--actors",
    default=None,
    metavar="N|MIN-MAX",
    help="With --engine ray: model actors (one Segmenter each; one GPU each with --provider "
    "cuda/tensorrt); MIN-MAX lets Ray scale the pool  [default: one per GPU, else one per node].",
)
@video_options
@tile_options
def infer(
    inputs: tuple[str, ...],
    model_dir: str | None,
    output: str,
    provider: str,
    fallback: bool,
    variant: str,
    fp16: bool,
    batch_size: int | None,
    trt_cache: str | None,
    ov_cache: str | None,
    threads: int | None,
    workers: int | None,
    overlay: bool,
    skip_existing: bool,
    overwrite: bool,
    max_pixels: int | None,
    engine: str,
    ray_address: str | None,
    ray_timeout: float,
    actors: str | None,
    tile: str | None,
    stride: str | None,
    overlap: float | None,
    blend: str,
    **video_opts,
) -> None:
    """Segment images with an exported model on ONNX Runtime; no torch needed.

    An ONNX folder of any family of the guide runs (SegFormer, DPT, BEiT, Data2VecVision,
    MobileNetV2, MobileViT, MobileViTV2, UPerNet), with the image processor its
    preprocessor_config.json names. INPUT is any mix of image files, folders
    (searched recursively; non-image files are ignored) and quoted globs
    ('photos/**/*.jpg'). For each image a label PNG at the image's own size
    (8-bit, 16-bit above 256 classes; the logits are upsampled to the whole
    photo even where the processor center-cropped it) is written under OUTPUT, mirroring the inputs, with OUTPUT/summary.json
    (per image: size, classes present and their pixel share, time; failures;
    totals and images/s).

    \b
    Example:
      segdeploy infer --model models/tiny photos/ -o masks --overlay
      segdeploy infer --provider cuda --batch-size 32 'data/**/*.jpg'
      segdeploy infer --engine ray --ray-address HEAD:6379 /shared/in -o /shared/out
      segdeploy infer --model models/tiny scene.tif -o masks --tile auto --blend gaussian

    Video clips among the inputs (mp4, mkv, mov, avi, webm) and --stream URLs are
    segmented frame by frame into OUTPUT/<clip file name>/ (docs/video.md).

    An image that cannot be read or run is reported and skipped: exit status 1 (also
    when nothing was segmented). A missing model, provider or input, no image at all,
    or a file at an output path that segdeploy did not write: status 2, nothing written.
    Ctrl-C and SIGTERM leave only complete files and summary.json ("interrupted":
    true), status 130; rerun with --skip-existing. A full disk stops the run: status 1.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from segdeploy.folders import newest_export
    from segdeploy.runtime.image_io import MAX_PIXELS
    from segdeploy.runtime.tiles import TileOptions

    video = settings_from(VideoSettings, video_opts, labels=video_opts["video_labels"])
    tiling = TileOptions.from_text(tile, stride, overlap, blend)

    engine_opts = _engine_options(engine, workers, video, ray_address, ray_timeout, actors, tiling)
    if model_dir is None:
        model_dir = newest_export()
        click.echo(f"model: {model_dir} (the newest export under models/)", err=True)

    with logging_redirect_tqdm():
        result = _engine(engine)(
            inputs,
            model_dir,
            output,
            provider=provider.lower(),
            variant=variant,
            fallback=fallback,
            batch_size=batch_size,
            threads=threads,
            trt_cache=trt_cache,
            ov_cache=ov_cache,
            fp16=fp16,
            overlay=overlay,
            skip_existing=skip_existing,
            overwrite=overwrite,
            max_pixels=max_pixels or MAX_PIXELS,
            **engine_opts,
        )
    _report(result)


def _engine_options(engine: str, workers, video, ray_address, ray_timeout, actors, tiling) -> dict:
    """The engine's own keyword arguments; another engine's options are refused (--tile is
    the local engine's: a tiled image's windows are one batch, in one process)."""
    from segdeploy.errors import SegdeployError

    if engine == "local":
        given = click.get_current_context().get_parameter_source("ray_timeout")
        ray_timeout_given = None if given is click.core.ParameterSource.DEFAULT else ray_timeout
        for name, value in (
            ("--ray-address", ray_address), ("--ray-timeout", ray_timeout_given),
            ("--actors", actors),
        ):  # fmt: skip
            if value is not None:
                raise SegdeployError(name, "only with --engine ray")
        opts: dict = {"workers": workers, "video": video}
        if tiling.enabled:
            opts["tiling"] = tiling
        return opts
    from segdeploy.runtime.ray_engine import parse_actors

    if tiling.enabled:
        raise SegdeployError("--tile", "only with --engine local")

    if workers is not None:
        raise SegdeployError("--workers", "only with --engine local (Ray sizes its tasks)")
    return {
        "address": ray_address,
        "actors": parse_actors(actors),
        "ray_timeout": ray_timeout,
        "video": video,
    }


def _report(result: dict) -> None:
    """The run's two lines on stdout; exit status 1 when an input failed."""
    from segdeploy.errors import shown

    t = result["totals"]
    frames = f" and {t['frames']} video frames ({t['frames_per_s']:.2f}/s)" if t["frames"] else ""
    click.echo(
        f"segmented {t['images']} images ({t['skipped']} skipped, {t['failed']} failed){frames} "
        f"in {t['seconds']:.1f} s on {result['provider']}"
        + (f", {t['images_per_s']:.2f} images/s" if t["images"] and t["images_per_s"] else "")
        + f"; summary: {shown(result['summary'])}"
    )
    if t.get("stage_ms_per_image") and t["images"]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in t["stage_ms_per_image"].items())
        click.echo(
            f"per image, ms ({_parallelism(result)}; model: wall time, others: CPU time): "
            f"{stages}; bound by {t['bound_by']}"
        )
    if t["failed"]:
        click.get_current_context().exit(1)


#: `--engine` name -> "module:function" with run_infer's signature (imported on use,
#: so that the local engine never imports Ray).
ENGINES = {
    "local": "segdeploy.runtime.infer:run_infer",
    "ray": "segdeploy.runtime.ray_engine:run_infer_ray",
}


def _parallelism(result: dict) -> str:
    """Who did the host stages: the local engine's workers, or Ray's actors and tasks."""
    ray = result.get("ray")
    if ray is None:
        return f"{result['totals']['workers']} workers"
    nodes = len(ray["nodes_used"]) or ray["nodes"]
    return (
        f"Ray: {ray['model_actors']} model actor(s), tasks on {ray['cpus']:g} CPUs, {nodes} node(s)"
    )


def _engine(name: str):
    import importlib

    module, func = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), func)
