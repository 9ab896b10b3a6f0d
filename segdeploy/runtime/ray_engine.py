"""`segdeploy infer --engine ray`: the same job as `segdeploy.runtime.infer.run_infer` on Ray Data.

The driver plans once, exactly as the local engine does (`check_plan` and
`Planner`: the same file list, unique output names inside OUT, no input
overwritten, symlink loops listed once; `--skip-existing` checks), and
turns the images left to do into a dataset of (input path, output name) rows.
Three Ray Data stages then run wherever the cluster has room:

1. `decode_batch` (tasks): read, decode and preprocess; a file that cannot be
   read becomes a row with a `reason` instead of an exception;
2. `_ModelStage` (actors, `--actors N` or `MIN-MAX`): one `Segmenter` per
   actor, created once, runs batches of `--batch-size` and upsamples;
   with `--provider cuda|tensorrt` each actor holds one GPU;
3. `write_batch` (tasks): the label PNG (and overlay), written atomically
   with the local engine's `save_labels`, and the per-image record.

The records stream back to the driver, which writes `summary.json` with the
local engine's schema. Workers import neither torch nor transformers.

OUTPUT (and every input) must be a path that every node of the cluster
reaches under the same name (a shared file system); a relative OUTPUT with
`--ray-address` is refused.

`SegmentBatch` is the building block for Ray users who already hold a
dataset: `ds.map_batches(SegmentBatch, fn_constructor_kwargs={"model_dir": ...},
concurrency=2, batch_size=8)` adds a `labels` column to batches holding an
`image` column (HxWx3 uint8 arrays, as `ray.data.read_images` gives, or file
paths).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import remove_stale_temporaries
from segdeploy.errors import SegdeployError
from segdeploy.runtime import pipeline
from segdeploy.runtime.image_io import MAX_PIXELS
from segdeploy.runtime.infer import (
    SUMMARY_NAME,
    Failure,
    Item,
    Planner,
    _existing_record,
    _Records,
    check_plan,
    check_top_names,
    label_path,
    overlay_path,
    prepare_output,
    summary_header,
    summary_totals,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'segdeploy[ray]'"
GPU_PROVIDERS = ("cuda", "tensorrt")

#: Placeholders for a failed row's tensors: same number of dimensions as a real
#: one, so that Ray keeps one (variable-shaped) tensor column.
_NO_PIXELS = np.zeros((3, 0, 0), np.float32)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
_NO_RAW = np.zeros((0, 0, 0), np.float32)


#: Ray's own switch (meant for laptops) that keeps a local Ray on the loopback: without
#: it Ray replaces 127.0.0.1 by the machine's network address. Read when Ray is imported.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def import_ray(*, loopback: bool = False):
    """The `ray` module, or a SegdeployError saying how to install it.

    `loopback`: a Ray started by this process will listen on 127.0.0.1 only
    (when Ray is imported here for the first time).
    """
    if loopback and "ray" not in sys.modules:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs both; check the data part too)
    except ImportError:
        raise SegdeployError("--engine ray", f"Ray is not installed: {INSTALL_HINT}") from None
    # Ray sets up its loggers on import, at INFO (plan and timing of every dataset);
    # follow segdeploy's verbosity instead (-v shows them).
    level = logging.getLogger("segdeploy").getEffectiveLevel()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING) if level > 10 else level)
    return ray


def parse_actors(text: str | None, option: str = "--actors") -> int | tuple[int, int] | None:
    """`--actors` (and `segdeploy serve --replicas`, named by `option`): N (a fixed pool) or
    MIN-MAX (Ray scales the pool between them)."""
    if text is None:
        return None
    lo, sep, hi = text.partition("-")
    try:
        counts = (int(lo), int(hi)) if sep else (int(lo),)
    except ValueError:
        raise SegdeployError(option, f"expected N or MIN-MAX, got {text!r}") from None
    if min(counts) < 1 or (sep and counts[0] > counts[1]):
        raise SegdeployError(option, f"need 1 <= MIN <= MAX, got {text!r}")
    return counts if sep else counts[0]


def _column(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A batch column of arrays: stacked when their shapes agree, else ragged (object)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    col = np.empty(len(arrays), dtype=object)
    col[:] = list(arrays)
    return col


# -- the stages ------------------------------------------------------------------------
# Each stage calls the local engine's stage functions (segdeploy.runtime.pipeline), so
# both engines decode, preprocess, upsample and write with the same code.


def decode_batch(
    batch: dict[str, np.ndarray], *, cfg: pipeline.StageConfig
) -> dict[str, np.ndarray]:
    """Stage 1: files -> model inputs; unreadable files get a `reason` instead."""
    pixels, images, heights, widths, reasons, walls, cpus = [], [], [], [], [], [], []
    for path in batch["path"]:
        reason, image = "", None
        try:
            p = pipeline.prepare_image(path, cfg)
        except SegdeployError as err:
            reason, p = err.problem, None
        if p is None:
            pixels.append(_NO_PIXELS)
            heights.append(0)
            widths.append(0)
            walls.append(0.0)
            cpus.append("{}")
        else:
            pixels.append(p.x)
            heights.append(p.size[0])
            widths.append(p.size[1])
            walls.append(p.wall)
            cpus.append(json.dumps(p.cpu))
            image = p.image
        images.append(image if image is not None else _NO_IMAGE)
        reasons.append(reason)
    out = {
        "input": batch["input"],
        "path": batch["path"],
        "out": batch["out"],
        "reason": np.array(reasons, dtype=object),
        "pixels": _column(pixels),
        "height": np.array(heights, np.int64),
        "width": np.array(widths, np.int64),
        "decode_s": np.array(walls, np.float64),
        "decode_cpu": np.array(cpus, dtype=object),
    }
    if cfg.palette is not None:
        out["image"] = _column(images)
    return out


class SegmentBatch:
    """Callable class for `Dataset.map_batches`: adds label maps to batches of images.

    One `Segmenter` per Ray actor, created once in the constructor (the
    arguments are `Segmenter`'s). Each batch (a dict of numpy columns) must hold
    `image_column`: HxWx3 (or HxW) uint8 arrays, e.g. from
    `ray.data.read_images`, or image file paths; the result is the same batch
    with `label_column` added: (H, W) class ids at each image's own size
    (uint8, uint16 above 256 classes). A bad image raises; `segdeploy infer
    --engine ray` is the fault-tolerant path for file lists.

        ds = ray.data.read_images("s3://bucket/photos/")
        ds = ds.map_batches(SegmentBatch, fn_constructor_kwargs={"model_dir": "/models/seg"},
                            concurrency=4, batch_size=8)
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        provider: str = "auto",
        variant: str = "fp32",
        *,
        fallback: bool = False,
        threads: int | None = None,
        trt_cache: str | os.PathLike | None = None,
        fp16: bool = False,
        batch_size: int | None = None,
        max_pixels: int | None = MAX_PIXELS,
        image_column: str = "image",
        label_column: str = "labels",
    ):
        from segdeploy.runtime.segmenter import Segmenter

        self.seg = Segmenter(
            model_dir,
            provider,
            variant,
            fallback=fallback,
            threads=threads,
            trt_cache=trt_cache,
            fp16=fp16,
            batch_size=batch_size,
            max_pixels=max_pixels,
        )
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [x if isinstance(x, np.ndarray) else str(x) for x in batch[self.image_column]]
        return {**batch, self.label_column: _column(self.seg.predict_batch(images))}


class _ModelStage(SegmentBatch):
    """Stage 2: the model on the rows that decoded; its raw output (logits, or labels from
    a fused graph) goes on to the write stage, which upsamples as the local workers do."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, r in enumerate(batch["reason"]) if not r]
        raws = [_NO_RAW] * len(batch["reason"])
        model_s = np.zeros(len(raws))
        if ok:
            t = time.perf_counter()
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
            for i, raw in zip(
                ok,
                pipeline.model_batch(self.seg, [batch["pixels"][i] for i in ok], sizes),
                strict=True,
            ):
                raws[i] = raw
            # Per image: its share of the batch, as the local engine records it.
            model_s[ok] = (time.perf_counter() - t) / len(ok)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["raw"] = _column(raws)
        out["model_s"] = model_s
        out["provider"] = np.array([self.seg.provider] * len(raws), dtype=object)
        return out


def write_batch(
    batch: dict[str, np.ndarray], *, output: str, cfg: pipeline.StageConfig, fused: bool
) -> dict[str, np.ndarray]:
    """Stage 3: upsample, label PNGs (and overlays) under OUTPUT; one JSON record per row,
    with the host stages' CPU times for the driver's stage table."""
    out_dir = Path(output)
    records, cpus = [], []
    for i, reason in enumerate(batch["reason"]):
        src = str(batch["input"][i])
        if reason:
            records.append(json.dumps({"input": src, "reason": str(reason)}))
            cpus.append("{}")
            continue
        item = Item(Path(src), Path(str(batch["out"][i])))
        job = pipeline.Job(
            item.path,
            label_path(out_dir, item),
            overlay_path(out_dir, item) if cfg.palette is not None else None,
        )
        size = (int(batch["height"][i]), int(batch["width"][i]))
        image = np.asarray(batch["image"][i]) if cfg.palette is not None else None
        try:
            res = pipeline.finish_image(
                np.asarray(batch["raw"][i]), size, job.label, cfg,
                fused=fused, overlay=job.overlay, image=image,
            )  # fmt: skip
        except (SegdeployError, OSError, ValueError) as err:
            records.append(json.dumps({"input": src, "reason": f"cannot write outputs: {err}"}))
            cpus.append("{}")
            continue
        model_s = float(batch["model_s"][i])
        rec = pipeline.image_record(out_dir, job, float(batch["decode_s"][i]), model_s, res)
        records.append(json.dumps(rec))
        cpus.append(json.dumps({**json.loads(batch["decode_cpu"][i]), **res.cpu}))
    return {
        "record": np.array(records, dtype=object),
        "cpu": np.array(cpus, dtype=object),
        "provider": batch["provider"],
        "model_s": batch["model_s"],
    }


# -- the driver ------------------------------------------------------------------------


def _connect(ray, address: str | None, progress: bool) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray here; True if we did."""
    if ray.is_initialized():  # a Ray user's own session (or a test's): use it as it is
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": progress,
        "logging_level": logging.WARNING,  # not Ray's start-up chatter on every run
    }
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SegdeployError("--ray-address", f"cannot join {address}: {first}") from None
    else:
        # A private single-machine cluster on this machine's cores, on the loopback only.
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    return True


def _segdeploy_error(err: BaseException) -> SegdeployError | None:
    """The SegdeployError inside a Ray exception (task error, user-code error), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SegdeployError):
            return SegdeployError(err.where, err.problem)  # a plain one, not Ray's hybrid
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _gpu_actors(ray, provider: str, fallback: bool) -> bool:
    """Whether model actors each hold a GPU; a GPU provider on a GPU-less cluster is refused
    (the actors would wait for a GPU forever) unless --fallback lets them run on CPUs."""
    if provider not in GPU_PROVIDERS:
        return False
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return True
    if fallback:
        log.warning("the Ray cluster has no GPU: --fallback runs the model actors on CPUs")
        return False
    raise SegdeployError(
        "--provider", f"{provider} needs a GPU, and the Ray cluster has none (add --fallback)"
    )


def _default_actors(ray, provider: str) -> int:
    """One actor per GPU for GPU providers, else one per node (each uses the node's cores)."""
    if provider in GPU_PROVIDERS:
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def run_infer_ray(
    inputs: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    address: str | None = None,
    actors: int | tuple[int, int] | None = None,
    provider: str = "auto",
    variant: str = "fp32",
    fallback: bool = False,
    batch_size: int | None = None,
    threads: int | None = None,
    trt_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    overlay: bool = False,
    skip_existing: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    progress: bool | None = None,
) -> dict[str, Any]:
    """`run_infer` on Ray Data: same inputs, outputs, summary.json and return value.

    `address`: a Ray cluster (default $RAY_ADDRESS; neither: Ray starts here on
    this machine's cores). `actors`: model actors, N or (MIN, MAX).
    """
    from segdeploy.runtime.segmenter import Segmenter

    address = address or os.environ.get("RAY_ADDRESS") or None
    ray = import_ray(loopback=not address)
    if not inputs:
        raise SegdeployError("INPUT", "give at least one file, folder or glob")
    if address and not Path(output).is_absolute():
        raise SegdeployError(
            output,
            "with a Ray cluster (--ray-address) OUTPUT must be an absolute path that every "
            "node reaches (a shared file system)",
        )
    check_top_names(inputs)
    provider = provider.lower()
    # The model as the actors will load it, checked here (CPU) so that a missing model
    # or variant exits with status 2 before the cluster is touched; its header fields
    # (graph, classes) go into summary.json.
    graph_variant = "fp16" if fp16 and variant == "fp32" and provider != "tensorrt" else variant
    batch_size = batch_size or (16 if provider in GPU_PROVIDERS else 4)
    probe = Segmenter(
        model_dir, "cpu", graph_variant, threads=1, batch_size=batch_size, max_pixels=max_pixels
    )
    out = Path(output).absolute()
    # The local engine's planning, so the same rules keep user files safe: nothing is
    # written when an output would replace an input or leave OUT.
    check_plan(inputs, out)
    if progress is None:
        progress = sys.stderr.isatty()
    model_kwargs = {
        "model_dir": str(Path(model_dir).absolute()),
        "provider": provider,
        "variant": variant,
        "fallback": fallback,
        "threads": threads,
        "trt_cache": str(Path(trt_cache).absolute()) if trt_cache else None,
        "fp16": fp16,
        "batch_size": batch_size,
        "max_pixels": max_pixels,
    }
    started = _connect(ray, address, progress)
    try:
        # Checked before OUTPUT is made: a job that cannot run writes nothing.
        gpu = _gpu_actors(ray, provider, fallback)
        if actors is None:
            actors = _default_actors(ray, provider if gpu else "cpu")
        # One progress bar, the local engine's (images done); Ray's per-stage bars off,
        # and its notice that they are off with them.
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        prepare_output(out)
        remove_stale_temporaries(out)
        stages = functools.partial(
            _dataset, ray, probe=probe, out=out, overlay=overlay, actors=actors, gpu=gpu,
            model_kwargs=model_kwargs,
        )  # fmt: skip
        # The host stages run on every CPU of the cluster: the stage table's parallelism.
        outcome = pipeline.Outcome(workers=int(ray.cluster_resources().get("CPU", 1)))
        return _drive(
            inputs, out, probe, stages, overlay, skip_existing, provider, progress, outcome
        )
    finally:
        if started:
            ray.shutdown()


def _drive(inputs, out: Path, probe, stages, overlay, skip_existing, provider, progress, outcome):
    """List the inputs, run `stages(rows)` on the rest, and stream the records into
    summary.json (also when interrupted, marked so)."""
    from tqdm import tqdm

    counts: dict[str, int] = {"ignored": 0}
    records = _Records(out)
    bar = tqdm(unit="img", disable=not progress, dynamic_ncols=True)
    providers_seen: set[str] = set()
    interrupted = False
    start = time.perf_counter()

    def record(rec: dict[str, Any]) -> None:
        if "reason" in rec:
            log.error("%s: %s", rec["input"], rec["reason"])
        records.add(rec)
        bar.update(1)

    try:
        rows = []
        for item in Planner(out, clean=True).items(inputs, counts):
            if isinstance(item, Failure):
                record({"input": item.path, "reason": item.reason})
                continue
            if skip_existing:
                rec = _existing_record(out, item, overlay, probe.id2label)
                if rec is not None:
                    record(rec)
                    continue
            rows.append(
                {"input": str(item.path), "path": str(item.path.absolute()), "out": str(item.out)}
            )
        bar.total = records.done + records.skipped + records.failed + len(rows)
        bar.refresh()
        if rows:
            for batch in stages(rows).iter_batches(batch_size=None, batch_format="numpy"):
                for rec, cpu, prov_name, model_s in zip(
                    batch["record"], batch["cpu"], batch["provider"], batch["model_s"],
                    strict=True,
                ):  # fmt: skip
                    rec = json.loads(rec)
                    if "reason" not in rec:
                        providers_seen.add(str(prov_name))
                        outcome.model_s += float(model_s)
                        outcome.add(json.loads(cpu), float(model_s), {})
                    record(rec)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: the files written so far are complete; stopping")
    except Exception as err:
        # A bad option met on the workers (e.g. a provider that a node lacks) arrives
        # wrapped in Ray's errors: hand the CLI its one line, not Ray's trace.
        cause = _segdeploy_error(err)
        if cause is None:
            raise
        raise cause from None
    finally:
        bar.close()
        wall = time.perf_counter() - start
        header = summary_header(probe, ",".join(sorted(providers_seen)) or provider, interrupted)
        totals = summary_totals(records, counts["ignored"], wall, outcome)
        try:
            records.write_summary(out / SUMMARY_NAME, header, totals)
        finally:
            records.close()
    if interrupted:
        raise KeyboardInterrupt
    return {**header, "totals": totals, "summary": str(out / SUMMARY_NAME)}


def _actor_pool(ray, actors: int | tuple[int, int]):
    lo, hi = actors if isinstance(actors, tuple) else (actors, actors)
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)


def _dataset(ray, rows, *, probe, out: Path, overlay: bool, actors, gpu: bool, model_kwargs: dict):
    """The three stages over `rows`; lazy until iterated."""
    batch_size = model_kwargs["batch_size"]
    # Small blocks: outputs appear (and resume has something to skip) from the first
    # batches on, and every actor gets work; capped so huge jobs stay cheap to plan.
    blocks = max(1, min(math.ceil(len(rows) / batch_size), 10_000))
    cfg = pipeline.StageConfig.for_segmenter(probe, overlay=overlay)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"cfg": cfg},
    )
    ds = ds.map_batches(
        _ModelStage,
        batch_size=batch_size,
        batch_format="numpy",
        compute=_actor_pool(ray, actors),
        num_gpus=1 if gpu else 0,
        num_cpus=1,
        fn_constructor_kwargs=model_kwargs,
    )
    return ds.map_batches(
        write_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"output": str(out), "cfg": cfg, "fused": probe.fused},
    )
