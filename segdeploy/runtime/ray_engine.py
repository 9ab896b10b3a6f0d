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

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from segdeploy.atomic import remove_stale_temporaries
from segdeploy.errors import SegdeployError, first_line
from segdeploy.folders import variant_file
from segdeploy.runtime import pipeline, ray_video
from segdeploy.runtime.image_io import MAX_PIXELS
from segdeploy.runtime.infer import (
    SUMMARY_NAME,
    Failure,
    Item,
    Planner,
    RunStopped,
    _Records,
    check_plan,
    check_top_names,
    existing_record,
    label_path,
    overlay_path,
    prepare_output,
    summary_header,
    summary_totals,
)
from segdeploy.runtime.providers import probe_provider
from segdeploy.runtime.ray_session import (
    DEFAULT_CONNECT_TIMEOUT_S,
    import_ray,
    ray_session,
    resolve_address,
)

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("cuda", "tensorrt")

#: Placeholders for a failed row's tensors: same number of dimensions as a real
#: one, so that Ray keeps one (variable-shaped) tensor column.
_NO_PIXELS = np.zeros((3, 0, 0), np.float32)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
_NO_RAW = np.zeros((0, 0, 0), np.float32)


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
        ov_cache: str | os.PathLike | None = None,
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
            ov_cache=ov_cache,
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
            reasons = list(batch["reason"])
            for i, raw in zip(
                ok,
                pipeline.model_batch(
                    self.seg, [batch["pixels"][i] for i in ok], sizes, isolate=True
                ),
                strict=True,
            ):
                if isinstance(raw, str):  # the model cannot run this image: it alone fails
                    reasons[i] = raw
                else:
                    raws[i] = raw
            # Per image: its share of the batch, as the local engine records it.
            model_s[ok] = (time.perf_counter() - t) / len(ok)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        if ok:
            out["reason"] = np.array(reasons, dtype=object)
        out["raw"] = _column(raws)
        out["model_s"] = model_s
        out["provider"] = np.array([self.seg.provider] * len(raws), dtype=object)
        # Who did the work, for the summary's "ray" section (actors, nodes used).
        actor, node = _where()
        out["actor"] = np.array([actor] * len(raws), dtype=object)
        out["node"] = np.array([node] * len(raws), dtype=object)
        return out


def _where() -> tuple[str, str]:
    """(actor id, node id) of the Ray worker running this code."""
    import ray

    ctx = ray.get_runtime_context()
    return str(ctx.get_actor_id() or ""), str(ctx.get_node_id())


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
        "actor": batch["actor"],
        "node": batch["node"],
        "write_node": np.array([_where()[1]] * len(records), dtype=object),
    }


# -- the driver ------------------------------------------------------------------------


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


def _check_job(inputs, model_dir, output, address, provider, variant, fp16, batch_size,
               max_pixels, *, overwrite=False, overlay=False, video=None,
               ov_cache=None):  # fmt: skip
    """Everything checked before Ray is touched (a bad job is exit status 2 with nothing
    written): the inputs, OUTPUT, the plan, and the model as the actors will load it
    (opened here on the CPU; its header fields go into summary.json). Returns (that
    Segmenter, OUTPUT as an absolute path)."""
    from segdeploy.runtime.segmenter import Segmenter

    if not inputs:
        raise SegdeployError("INPUT", "give at least one file, folder or glob")
    if resolve_address(address) is not None and not Path(output).is_absolute():
        raise SegdeployError(
            output,
            "with a Ray cluster (--ray-address) OUTPUT must be an absolute path that every "
            "node reaches (a shared file system)",
        )
    check_top_names(inputs)
    provider = provider.lower()
    graph_variant = "fp16" if fp16 and variant == "fp32" and provider != "tensorrt" else variant
    batch_size = batch_size or (16 if provider in GPU_PROVIDERS else 4)
    probe = Segmenter(
        model_dir,
        probe_provider(variant_file(graph_variant)),  # an OpenVINO IR opens on OpenVINO only
        graph_variant,
        threads=1,
        batch_size=batch_size,
        max_pixels=max_pixels,
        ov_cache=ov_cache,
    )
    out = Path(output).absolute()
    # The local engine's planning, so the same rules keep user files safe: nothing is
    # written when an output would replace an input, a file it did not write, or leave OUT.
    check_plan(
        inputs, out, overwrite=overwrite, overlay=overlay,
        streams=bool(video is not None and video.streams),
    )  # fmt: skip
    return probe, out


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
    ov_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    overlay: bool = False,
    skip_existing: bool = False,
    overwrite: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    progress: bool | None = None,
    ray_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    verbose: bool | None = None,
    video=None,
) -> dict[str, Any]:
    """`run_infer` on Ray Data: same inputs, outputs, summary.json and return value
    (plus `ray`: the cluster, and the model actors and nodes that did the work).

    `address`: a Ray cluster to join ("auto", HOST:PORT, ray://HOST:PORT; default
    $RAY_ADDRESS; neither: a private Ray on this machine, see `ray_session`), which has
    `ray_timeout` seconds to answer. `actors`: model actors, N or (MIN, MAX). `verbose`:
    show Ray's own log lines (default: with segdeploy's -v). `video`: VideoSettings for
    clips among the inputs and streams (segdeploy.runtime.ray_video).
    """
    ray = import_ray()
    probe, out = _check_job(inputs, model_dir, output, address, provider, variant, fp16,
                            batch_size, max_pixels, overwrite=overwrite, overlay=overlay,
                            video=video, ov_cache=ov_cache)  # fmt: skip
    provider = provider.lower()
    model_kwargs = {
        "model_dir": str(Path(model_dir).absolute()),
        "provider": provider,
        "variant": variant,
        "fallback": fallback,
        "threads": threads,
        "trt_cache": str(Path(trt_cache).absolute()) if trt_cache else None,
        "ov_cache": str(Path(ov_cache).absolute()) if ov_cache else None,
        "fp16": fp16,
        "batch_size": probe.batch_size,
        "max_pixels": max_pixels,
    }
    verbose = log.isEnabledFor(logging.DEBUG) if verbose is None else verbose
    job: _Job | None = None
    try:
        with ray_session(address, verbose=verbose, connect_timeout_s=ray_timeout) as info:
            # Checked before OUTPUT is made: a job that cannot run writes nothing.
            gpu = _gpu_actors(ray, provider, fallback)
            if actors is None:
                actors = _default_actors(ray, provider if gpu else "cpu")
            # One progress bar, the local engine's (images done); Ray's per-stage bars off,
            # and its notice that they are off with them.
            ray.data.DataContext.get_current().enable_progress_bars = False
            prepare_output(out)
            remove_stale_temporaries(out)
            stages = functools.partial(
                _dataset, ray, probe=probe, out=out, overlay=overlay, actors=actors, gpu=gpu,
                model_kwargs=model_kwargs,
            )  # fmt: skip
            # Clips and streams (segdeploy.runtime.ray_video): their frames go to the same actors.
            model_stage = {"fn": _ModelStage, "compute": _actor_pool(ray, actors),
                           "num_gpus": 1 if gpu else 0, "num_cpus": 1,
                           "fn_constructor_kwargs": model_kwargs}  # fmt: skip
            clips = ray_video.ClipRun(ray, probe, out, video, overlay, skip_existing, model_stage)
            job = _Job(out, probe, overlay, provider, fallback, info, progress, clips)
            with _stop_signals() as stop:
                job.plan(inputs, skip_existing, stop)
                job.run(stages, stop)
    except KeyboardInterrupt:
        if job is None:
            raise
        job.interrupted = True
        log.warning("interrupted: the files written so far are complete; stopping")
    except Exception as err:
        # A bad option met on the workers (e.g. a provider that a node lacks) arrives
        # wrapped in Ray's errors: hand the CLI its one line, not Ray's trace.
        cause = _segdeploy_error(err)
        if cause is not None:
            raise cause from None
        if not type(err).__module__.startswith("ray.") or job is None:
            raise
        raise RunStopped(
            "--engine ray",
            f"the Ray job failed: {type(err).__name__}: {first_line(err)} (summary: "
            f"{out / SUMMARY_NAME}; -v shows Ray's log)",
        ) from None
    finally:
        if job is not None:  # Ray has stopped: no worker writes any more
            job.finish()
    if job.interrupted:
        raise KeyboardInterrupt
    return job.result


class _Stop:
    """Ctrl-C and SIGTERM during a run. While the driver waits on Ray for the next batch
    they interrupt the wait at once (a batch can take long); anywhere else (recording a
    batch, planning) they are noted and raised at the next `check`, so that no record is
    half-written. `pipeline.stop_signals` only notes them: its engine polls, Ray Data's
    iterator cannot be polled."""

    def __init__(self):
        self.pending = False
        self.waiting = False

    def handler(self, signum, frame) -> None:
        self.pending = True
        if self.waiting:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Signals only noted in the block (a record being written), raised after it if
        the block was inside `waiting_on_ray`."""
        waiting, self.waiting = self.waiting, False
        try:
            yield
        finally:
            self.waiting = waiting
        if waiting:
            self.check()

    @contextlib.contextmanager
    def waiting_on_ray(self) -> Iterator[None]:
        self.waiting = True
        try:
            self.check()
            yield
        finally:
            self.waiting = False


@contextlib.contextmanager
def _stop_signals() -> Iterator[_Stop]:
    stop = _Stop()
    with pipeline.signals_to(stop.handler):
        yield stop


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class _Job:
    """One run's bookkeeping on the driver: the planned rows, the records streamed back,
    and summary.json, which holds every complete output even when the run is cut short
    (Ctrl-C, SIGTERM, a failure): outputs written whose records never reached the driver
    are found on disk once Ray has stopped and recorded from the files."""

    def __init__(self, out: Path, probe, overlay: bool, provider, fallback, info, progress, clips):
        from tqdm import tqdm

        self.out, self.probe, self.overlay, self.clips = out, probe, overlay, clips
        self.provider, self.fallback, self.info = provider, fallback, info
        self.records = _Records(out)
        self.counts: dict[str, int] = {"ignored": 0}
        self.rows: list[dict[str, str]] = []
        self.before: dict[Path, tuple[int, int, int]] = {}  # outputs there before the run
        self.recorded: set[str] = set()
        self.providers: set[str] = set()
        self.actors: set[str] = set()
        self.nodes: set[str] = set()
        # The host stages run on every CPU of the cluster: the stage table's parallelism.
        self.outcome = pipeline.Outcome(workers=int(info.cpus) or 1)
        self.interrupted = False
        self.stop = _Stop()  # the run's, from `plan` on
        self.result: dict[str, Any] = {}
        self.start = time.perf_counter()
        progress = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(unit="img", disable=not progress, dynamic_ncols=True)

    def record(self, rec: dict[str, Any]) -> None:
        with self.stop.held():  # never half a record
            if "reason" in rec:
                log.error("%s: %s", rec["input"], rec["reason"])
            self.records.add(rec)
            self.recorded.add(str(rec["input"]))
            self.bar.update(1)

    def plan(self, inputs, skip_existing: bool, stop: _Stop) -> None:
        """List the inputs: failures and (with --skip-existing) finished images are
        recorded now, clips go to ray_video, the rest become rows for Ray."""
        self.stop = stop
        for item in Planner(self.out, clean=True, overlay=self.overlay).items(inputs, self.counts):
            stop.check()
            if isinstance(item, Failure):
                self.record({"input": item.path, "reason": item.reason})
                continue
            if ray_video.is_video_name(item.path):
                self.clips.add_file(item.path, item.out)
                continue
            if skip_existing:
                rec = existing_record(self.out, item, self.overlay, self.probe)
                if rec is not None:
                    self.record(rec)
                    continue
            for path in self._outputs(item):
                if (sig := _signature(path)) is not None:
                    self.before[path] = sig
            self.rows.append(
                {"input": str(item.path), "path": str(item.path.absolute()), "out": str(item.out)}
            )
        self.bar.total = self.records.done + self.records.skipped + self.records.failed
        self.bar.total += len(self.rows)
        self.bar.refresh()

    def run(self, stages, stop: _Stop) -> None:
        """The photos (`stages(rows)`), then the clips and streams, on the same actors."""
        if self.rows:
            self._run_photos(stages, stop)
        with stop.waiting_on_ray():  # ray_video's loop: a signal stops it at once
            self.clips.run(self.record, self.bar)

    def _run_photos(self, stages, stop: _Stop) -> None:
        """Run `stages(rows)` and record what streams back."""
        batches = iter(stages(self.rows).iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            with stop.waiting_on_ray():
                batch = next(batches, None)
            if batch is None:
                return
            self.actors.update(str(a) for a in batch["actor"])
            self.nodes.update(str(n) for k in ("node", "write_node") for n in batch[k])
            for rec, cpu, prov_name, model_s in zip(
                batch["record"], batch["cpu"], batch["provider"], batch["model_s"], strict=True
            ):
                rec = json.loads(rec)
                if "reason" not in rec:
                    self.providers.add(str(prov_name))
                    self.outcome.model_s += float(model_s)
                    self.outcome.add(json.loads(cpu), float(model_s), {})
                self.record(rec)
            stop.check()

    def _outputs(self, item: Item) -> list[Path]:
        label = label_path(self.out, item)
        return [label, overlay_path(self.out, item)] if self.overlay else [label]

    def _recover(self) -> int:
        """Record the rows whose outputs this run wrote but whose records never came back
        (the driver stopped first); they have no times. Returns how many."""
        found = 0
        folders = set()
        for row in self.rows:
            if row["input"] in self.recorded:
                continue
            item = Item(Path(row["input"]), PurePath(row["out"]))
            paths = self._outputs(item)
            folders.add(paths[0].parent)
            if any(_signature(p) in (None, self.before.get(p)) for p in paths):
                continue  # not written (completely) by this run
            rec = existing_record(self.out, item, self.overlay, self.probe)
            if rec is None:
                continue
            del rec["skipped"]
            if self.overlay:
                rec["overlay"] = str(paths[1].relative_to(self.out))
            self.record(rec)
            found += 1
        for folder in folders:  # what workers stopped mid-write left
            remove_stale_temporaries(folder)
        return found

    def _provider(self) -> str:
        """The provider the actors used; when none reported back, the one they would
        have chosen (on this machine's onnxruntime)."""
        if self.providers:
            return ",".join(sorted(self.providers))
        import onnxruntime as ort

        from segdeploy.runtime.providers import choose_provider

        try:
            return choose_provider(
                self.provider, ort.get_available_providers(), fallback=self.fallback
            ).name
        except SegdeployError:
            return self.provider

    def finish(self) -> None:
        """summary.json, with the outputs found on disk; the result of the run."""
        try:
            self.clips.close()
            self.bar.close()
            if found := self._recover():
                log.info("%d images written before the stop are recorded from their files", found)
            wall = time.perf_counter() - self.start
            header = summary_header(self.probe, self._provider(), self.interrupted)
            header["ray"] = {
                "address": self.info.address,
                "private": self.info.private,
                "nodes": self.info.nodes,
                "cpus": self.info.cpus,
                "gpus": self.info.gpus,
                "model_actors": len(self.actors),
                "nodes_used": sorted(self.nodes),
            }
            totals = summary_totals(
                self.records,
                self.counts["ignored"],
                wall,
                self.outcome,
                self.clips.frames,
                self.counts,
            )
            self.records.write_summary(self.out / SUMMARY_NAME, header, totals)
        finally:
            self.records.close()
        self.result = {**header, "totals": totals, "summary": str(self.out / SUMMARY_NAME)}


def _actor_pool(ray, actors: int | tuple[int, int]):
    lo, hi = actors if isinstance(actors, tuple) else (actors, actors)
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)


def _dataset(ray, rows, *, probe, out: Path, overlay: bool, actors, gpu: bool, model_kwargs: dict):
    """The three stages over `rows`; lazy until iterated."""
    batch_size = model_kwargs["batch_size"]
    # Small blocks: outputs appear (and resume has something to skip) from the first
    # batches on, and every actor gets work; capped so huge jobs stay cheap to plan.
    blocks = max(1, min(math.ceil(len(rows) / batch_size), 10_000))
    cfg = pipeline.StageConfig.for_segmenter(probe, overlay=overlay, output=out)
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
