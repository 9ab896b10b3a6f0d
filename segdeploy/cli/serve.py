"""`segdeploy serve`: thin Click layer over segdeploy.serve.service.run_service."""

from __future__ import annotations

import logging

import click

from segdeploy.cli.options import ray_address_option, ray_timeout_option, settings_from
from segdeploy.runtime.providers import PROVIDERS
from segdeploy.serve.settings import ServeSettings

_D = ServeSettings()


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    default=_D.model_dir,
    help="Exported model: an ONNX folder or a trained model folder with its export in onnx/. "
    "Default: the newest export under models/.",
)
@click.option(
    "--name",
    default=_D.name,
    help="The model's name in URLs (/v2/models/NAME)  [default: the model folder's name].",
)
@click.option("--host", default=_D.host, show_default=True, help="Address to listen on; "
              "0.0.0.0 opens the service to the network.")  # fmt: skip
@click.option("--port", type=click.IntRange(1, 65535), default=_D.port, show_default=True)
@click.option(
    "--replicas",
    default=_D.replicas,
    show_default=True,
    metavar="N|MIN-MAX",
    help="Model replicas (one Segmenter each; one GPU each with --provider cuda/tensorrt); "
    "MIN-MAX lets Ray Serve scale between them with the load.",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=_D.max_batch_size,
    help="Most requests one model call takes (dynamic batching)  [default: infer's: 4 on "
    "CPU, where larger batches are no faster and take more memory; 16 on GPU].",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=_D.batch_wait_ms,
    show_default=True,
    help="How long a batch waits for more requests once one arrived; 0 takes what queued "
    "up while the model was busy (no added latency).",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS, case_sensitive=False),
    default=_D.provider,
    show_default=True,
    help="ONNX Runtime provider of each replica; auto = CUDA if installed, else CPU.",
)
@click.option(
    "--fallback",
    is_flag=True,
    default=_D.fallback,
    help="If the provider is missing (or the cluster has no GPU), step down to the next "
    "(tensorrt -> cuda -> cpu) with a warning instead of exiting with status 2.",
)
@click.option(
    "--variant",
    default=_D.variant,
    show_default=True,
    help="Graph to run: fp32 (model.onnx), fp16, optimized, int8, or NAME for model_NAME.onnx.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=_D.threads,
    help="ONNX Runtime threads per replica, and the CPUs it reserves  [default: on a private "
    "Ray, this process's cores shared among the replicas; on a cluster, ONNX Runtime's own].",
)
@ray_address_option()
@ray_timeout_option()
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=_D.max_pixels,
    show_default=True,
    help="Refuse images larger than this many pixels (HTTP 413; decompression-bomb guard).",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=_D.max_body_mb,
    show_default=True,
    help="Refuse request bodies larger than this (HTTP 413).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=_D.max_queue,
    show_default=True,
    help="Segmentation requests in the service at once (waiting or running); more are "
    "answered 503 with Retry-After.",
)
def serve(**options) -> None:
    """Serve an exported model over HTTP on Ray Serve, with dynamic batching.

    \b
    POST /v1/segment            image file in, label PNG out (JSON with
                                Accept: application/json; ?overlay=1)
    /v2/...                     the Open Inference Protocol (KServe v2), as
                                Triton serves it: tritonclient works as is
    GET /metrics                Prometheus metrics
    GET /                       a page to drop an image on and see its overlay

    \b
    Example:
      segdeploy serve --model models/tiny --replicas 2
      curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg \\
           localhost:8000/v1/segment -o mask.png

    Needs the serve extra: pip install 'segdeploy[serve]'. Ctrl-C or SIGTERM
    answers the requests already inside, then stops (exit status 0); the private
    Ray it started stops with it.
    """
    from segdeploy.serve.service import run_service

    options["provider"] = options["provider"].lower()
    settings = settings_from(ServeSettings, options)
    verbose = logging.getLogger("segdeploy").isEnabledFor(logging.DEBUG)
    run_service(settings, verbose=verbose, say=lambda line: click.echo(line, err=True))
