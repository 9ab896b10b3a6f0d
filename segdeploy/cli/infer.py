"""`segdeploy infer`: thin Click layer over segdeploy.runtime.infer.run_infer (torch-free)."""

from __future__ import annotations

import click

from segdeploy.runtime.providers import PROVIDERS


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
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
    "never read as input and must not hold the inputs: a run that would write over an input "
    "file or outside OUTPUT exits with status 2 before writing anything.",
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
    help="Images per model call (and TensorRT's largest profile)  [default: 4 on CPU, 16 on GPU].",
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
    help="Skip images whose outputs already exist: resumes an interrupted run.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse images larger than this many pixels (decompression-bomb guard)  "
    "[default: Pillow's, about 89 million].",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),  # the keys of ENGINES below
    default="local",
    show_default=True,
    help="local: threads on this machine. ray: Ray Data on a Ray cluster (pip install "
    "'segdeploy[ray]'); OUTPUT and the inputs must then be paths every node reaches.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="With --engine ray: the cluster to join (HOST:PORT of `ray start --head`)  "
    "[default: $RAY_ADDRESS, else Ray starts here on this machine's cores].",
)
@click.option(
    "--actors",
    default=None,
    metavar="N|MIN-MAX",
    help="With --engine ray: model actors (one Segmenter each; one GPU each with --provider "
    "cuda/tensorrt); MIN-MAX lets Ray scale the pool  [default: one per GPU, else one per node].",
)
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
    max_pixels: int | None,
    engine: str,
    ray_address: str | None,
    actors: str | None,
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
      segdeploy infer --model models/segformer photos/ -o masks --overlay
      segdeploy infer --provider cuda --batch-size 32 'data/**/*.jpg'
      segdeploy infer --engine ray --ray-address HEAD:6379 /shared/in -o /shared/out

    A file that cannot be read (corrupt, not an image, empty, too large) is
    reported and skipped; the exit status is then 1. A missing model or
    provider exits with status 2 at once. Ctrl-C and SIGTERM leave only complete
    files and summary.json ("interrupted": true), exit status 130; rerun with
    --skip-existing to continue. A full disk stops the run: exit status 1.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from segdeploy.errors import SegdeployError
    from segdeploy.folders import newest_export
    from segdeploy.runtime.image_io import MAX_PIXELS

    if engine == "local":
        for name, value in (("--ray-address", ray_address), ("--actors", actors)):
            if value is not None:
                raise SegdeployError(name, "only with --engine ray")
        engine_opts: dict = {"workers": workers}
    else:
        from segdeploy.runtime.ray_engine import parse_actors

        engine_opts = {"address": ray_address, "actors": parse_actors(actors)}
        if workers is not None:
            raise SegdeployError("--workers", "only with --engine local (Ray sizes its tasks)")
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
            max_pixels=max_pixels or MAX_PIXELS,
            **engine_opts,
        )
    t = result["totals"]
    click.echo(
        f"segmented {t['images']} images ({t['skipped']} skipped, {t['failed']} failed) "
        f"in {t['seconds']:.1f} s on {result['provider']}"
        + (f", {t['images_per_s']:.2f} images/s" if t["images"] and t["images_per_s"] else "")
        + f"; summary: {result['summary']}"
    )
    if t.get("stage_ms_per_image") and t["images"]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in t["stage_ms_per_image"].items())
        click.echo(
            f"per image, ms ({t['workers']} workers; model: wall time, others: CPU time): "
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


def _engine(name: str):
    import importlib

    module, func = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), func)
