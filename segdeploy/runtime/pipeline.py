"""The engine of `segdeploy infer`: host stages in worker processes, the model in batches.

Per image the work is: decode (Pillow), preprocess (resize, normalise), the
model (one call per batch), upsample + argmax, class shares, PNG encode and
write. Everything but the model holds the GIL, so threads could not spread it
over cores (measured 0.93-1.1x on two); here it runs in `workers` processes,
and the calling process only lists inputs, batches and runs the model (on
CUDA with its IO binding, unchanged). Queues are bounded: at most
`workers + 2` chunks of `chunk_size` images wait at each side of the model, so
memory stays flat on folders of any size. Records come out in input order.

Worker processes start from a fork server (`forkserver`), never by forking the
caller: the caller holds an ONNX Runtime session and its threads, which a fork
would copy half-way. The server imports this module once (numpy, Pillow, no
torch or transformers) and forks each worker from it, so workers start in
milliseconds. Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole
process group, and the caller alone decides what finishes (the writes in
flight) and shuts the workers down, so no file is cut in half and no process
outlives the run. A worker that dies (a decoder crash, the OOM killer) breaks
the pool: it is restarted and the images it held are retried one at a time,
so only the image that kills a worker again becomes a failure row. A write
that fails because the disk is full (or read-only) stops the run.

`workers=0` runs every stage in the calling thread: the reference (its labels
are the ones the worker path must reproduce byte for byte) and for debugging.

The stage functions are plain and picklable, for any engine (e.g. Ray actors):

    from segdeploy.runtime.pipeline import StageConfig, prepare_image, model_batch, finish_image
    cfg = StageConfig.for_segmenter(seg, overlay=False)       # small, picklable
    p = prepare_image(path, cfg)                               # decode + preprocess one image
    raws = model_batch(seg, [p.x, ...], [p.size, ...])         # the model on one batch
    result = finish_image(raws[i], p.size, label_png, cfg, fused=seg.fused)  # upsample+write

Each returns its CPU seconds per stage (`cpu`), summed into the run's stage table.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.atomic import write_bytes
from segdeploy.errors import SegdeployError, first_line
from segdeploy.runtime.image_io import MAX_PIXELS, label_png, load_image
from segdeploy.runtime.lifeline import tied_pool
from segdeploy.runtime.overlay import render_overlay
from segdeploy.runtime.processors import ImageProcessor
from segdeploy.runtime.provenance import Mark, mark_jpeg, mark_png, rel_name
from segdeploy.runtime.upsample import upsample_argmax

log = logging.getLogger(__name__)

#: Stages in the order an image meets them; all but "model" run in the workers.
STAGES = (
    "decode",
    "preprocess",
    "model",
    "upsample_argmax",
    "class_shares",
    "png_encode",
    "overlay",
)
#: A write error with one of these stops the run: no later write can succeed either.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
WORKER_DIED = "worker process died while processing this image"
#: Fewest images per worker task (see `chunk_size`).
MIN_CHUNK = 8
#: Most images per worker task, and the model input (bytes) a task may carry: small
#: images go to the workers in larger tasks (see `chunk_size`).
MAX_CHUNK = 32
CHUNK_BYTES = 4 << 20
#: How often a wait on the workers looks for a stop signal.
POLL_S = 0.05


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cgroup's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker process per core this process may run on (`available_cores`), or 0
    (in-process) on a single core, where passing arrays between processes only costs:
    measured 1.1-1.25x faster in-process pinned to one core."""
    cores = available_cores()
    return cores if cores > 1 else 0


def default_threads() -> int:
    """ONNX Runtime's intra-op threads: one per core this process may run on. Left to
    itself, ONNX Runtime starts one per physical core of the machine and pins each to its
    core, outside the process's own affinity: under `taskset -c 0` its second thread ran
    on core 1 (measured)."""
    return available_cores()


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start the fork server the workers come from, without waiting for it; its context.

    The server's own start (a fresh interpreter importing this module: numpy,
    Pillow) takes 0.2-0.3 s. Calling this as soon as a run knows it will use
    workers lets that happen on another core while the caller loads the model
    and plans the run; the pool then finds the server ready. A server already
    running is reused.

    The server is a `python -c` process, whose first import path is the working
    directory: a folder named `segdeploy` there (the parent of a clone) would be
    imported as an empty namespace package in place of the installed one (an
    editable install's finder comes after the path), and every worker would die
    importing it. So the server starts with PYTHONSAFEPATH (no working directory on
    its path) and the installed package's folder first on PYTHONPATH."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with _environment(PYTHONSAFEPATH="1", PYTHONPATH=_installed_root()):
        multiprocessing.forkserver.ensure_running()
    return ctx


def _installed_root() -> str:
    """PYTHONPATH for the fork server: the folder holding this segdeploy package, then
    whatever PYTHONPATH already says."""
    root = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else os.pathsep.join([root, rest])


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set for the block (what a process started in it inherits)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chunk_size(batch_size: int, workers: int, input_bytes: int | None = None) -> int:
    """Images per task sent to a worker: at least `MIN_CHUNK`, so that the round trips
    to the workers (and the GIL they take in the caller) stay few when batches are
    small; one batch when in-process (nothing to save, and memory stays low).

    Small model inputs (`input_bytes` per image) go in larger tasks, up to MAX_CHUNK
    images or CHUNK_BYTES of input: a round trip costs the caller about as much as
    decoding a 64-px image, and 32 images per task instead of 8 made `segdeploy infer`
    1.11x faster on the demo's 64-px images (400 images, 2 workers, measured
    interleaved); a 512x512 input (3 MiB) stays at MIN_CHUNK, so memory does not grow."""
    if not workers:
        return batch_size
    n = MIN_CHUNK
    if input_bytes:
        n = min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_BYTES // input_bytes))
    return max(batch_size, n)


def input_bytes(seg) -> int | None:
    """Bytes of one image's model input (float32, 3 channels), when the processor makes
    one size; None when the input follows each image's size."""
    size = getattr(seg.preprocessor, "size", None)
    return 3 * size[0] * size[1] * 4 if size else None


# -- stages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """What the host stages need, shipped once to each worker."""

    preprocessor: ImageProcessor  # any family's (segdeploy.runtime.processors)
    id2label: dict[int, str]
    max_pixels: int | None = MAX_PIXELS
    palette: np.ndarray | None = None  # set: write overlays with these colours
    #: OUT, which the marks' paths are relative to (segdeploy.runtime.provenance); None:
    #: marks name the file alone.
    output: str | None = None
    model: str | None = None  # the model's fingerprint, for the marks

    @classmethod
    def for_segmenter(
        cls, seg, *, overlay: bool = False, output: str | os.PathLike | None = None
    ) -> StageConfig:
        from segdeploy.runtime.palette import palette_for

        return cls(
            seg.preprocessor,
            dict(seg.id2label),
            seg.max_pixels,
            palette_for(seg.num_labels) if overlay else None,
            None if output is None else os.fspath(output),
            seg.fingerprint,
        )

    def mark(self, path: str | os.PathLike, size: tuple[int, int]) -> Mark:
        """The provenance mark of the output written at `path` (a label map of `size`)."""
        rel = rel_name(path, self.output) if self.output is not None else Path(path).name
        return Mark(rel, self.model, (int(size[0]), int(size[1])))


@dataclass
class Prepared:
    """One decoded, preprocessed image."""

    x: np.ndarray  # float32 [3, h, w]: the model input
    size: tuple[int, int]  # (H, W) of the image: the label map's size
    image: np.ndarray | None  # H x W x 3 uint8, kept only for overlays
    cpu: dict[str, float]
    wall: float


@dataclass
class Finished:
    size: tuple[int, int]
    classes: list[dict[str, Any]]
    cpu: dict[str, float]
    wall: float
    labels: np.ndarray | None = None  # handed back when the Job asked (a clip's label stream)
    overlay: np.ndarray | None = None  # blended pixels handed back (a clip's overlay video)


@dataclass(frozen=True)
class Fatal:
    """A write error that stops the run (disk full, read-only): the path and the OS reason."""

    path: str
    reason: str


def prepare_image(path: str | os.PathLike | np.ndarray, cfg: StageConfig) -> Prepared:
    """Decode + preprocess one image file (or an RGB frame already decoded: a clip's, see
    segdeploy.runtime.video); a bad file raises SegdeployError(path, reason)."""
    wall, t0 = time.perf_counter(), time.thread_time()
    try:
        if isinstance(path, np.ndarray):
            image = Image.fromarray(path)  # HxWx3 uint8: RGB, the same pixels as its PNG
        else:
            image = load_image(path, max_pixels=cfg.max_pixels)
        t1 = time.thread_time()
        cfg.preprocessor.check_pixels(image.height, image.width, cfg.max_pixels)
        x = cfg.preprocessor.to_array(image)
    except SegdeployError as err:  # a frame (an array) is named by its record, not here
        raise SegdeployError(None if isinstance(path, np.ndarray) else path, err.problem) from None
    except (OSError, ValueError, MemoryError) as err:  # Pillow's resize on odd data, memory
        raise SegdeployError(path, f"cannot preprocess: {type(err).__name__}: {err}") from None
    t2 = time.thread_time()
    kept = np.asarray(image) if cfg.palette is not None else None
    return Prepared(
        x,
        (image.height, image.width),
        kept,
        {"decode": t1 - t0, "preprocess": t2 - t1},
        time.perf_counter() - wall,
    )


def model_batch(
    seg, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]], *, isolate: bool = False
) -> list:
    """The model on one batch (`Segmenter.forward`, IO binding on CUDA): per image its output
    on the host, logits [C, h, w] (or the labels, when `seg.fused`).

    `isolate`: when the model fails on the batch, run its images one by one, so that only
    an image the model cannot run (a 1x1 input where the graph's strides need more) fails,
    as a string (the reason) in its place, and the others still get their output."""
    try:
        return [p.raw() for p in seg.forward(inputs, sizes)]
    except Exception as err:  # onnxruntime's errors (InvalidArgument, Fail...) are plain Exceptions
        if not isolate:
            raise
        if len(inputs) > 1:
            return [
                model_batch(seg, [x], [s], isolate=True)[0]
                for x, s in zip(inputs, sizes, strict=True)
            ]
        log.debug("the model failed on one image", exc_info=True)
        shape = "x".join(str(d) for d in inputs[0].shape[1:])
        return [f"the model cannot run this image ({shape} input): {first_line(err)}"]


def finish_image(
    raw: np.ndarray,
    size: tuple[int, int],
    label: str | os.PathLike | None,
    cfg: StageConfig,
    *,
    fused: bool = False,
    overlay: str | os.PathLike | None = None,
    image: np.ndarray | None = None,
    keep: Keep | None = None,
) -> Finished:
    """Upsample + argmax, class shares, write the label PNG (and the overlay) atomically;
    `label` None writes no PNG, and `keep` hands the labels or the blended overlay back
    (a clip's frame: its streams are written in order by the caller).

    Raises OSError (and SegdeployError) when a file cannot be written."""
    wall, t0 = time.perf_counter(), time.thread_time()
    labels = raw if fused else upsample_argmax(raw, size)
    t1 = time.thread_time()
    classes = class_shares(labels, cfg.id2label)
    t2 = time.thread_time()
    if label is not None:
        save_labels(label, labels, mark=cfg.mark(label, labels.shape))
    t3 = time.thread_time()
    cpu = {"upsample_argmax": t1 - t0, "class_shares": t2 - t1, "png_encode": t3 - t2}
    keep = keep or Keep()
    blended = None
    if cfg.palette is not None and image is not None and (overlay is not None or keep.overlay):
        blended = render_overlay(image, labels, cfg.palette, cfg.id2label)
        if overlay is not None:
            jpeg = io.BytesIO()
            blended.save(jpeg, format="JPEG", quality=90)
            write_bytes(overlay, mark_jpeg(jpeg.getvalue(), cfg.mark(overlay, labels.shape)))
        cpu["overlay"] = time.thread_time() - t3
    return Finished(
        (int(labels.shape[0]), int(labels.shape[1])),
        classes,
        cpu,
        time.perf_counter() - wall,
        labels if keep.labels else None,
        np.asarray(blended) if keep.overlay and blended is not None else None,
    )


def save_labels(path: str | os.PathLike, labels: np.ndarray, *, mark: Mark | None = None) -> None:
    """The label map as `encode_labels` makes it, written atomically, with the provenance
    `mark` (segdeploy.runtime.provenance) when given."""
    png = encode_labels(labels, where=path)
    write_bytes(path, png if mark is None else mark_png(png, mark))


def encode_labels(labels: np.ndarray, *, where: str | os.PathLike | None = None) -> bytes:
    """The label PNG of every front end (files, `segdeploy serve`), unmarked: 8-bit when
    ids fit, else 16-bit (`label_png`). `where` names the output in the error for > 65536
    classes."""
    if labels.dtype != np.uint8:
        if labels.max(initial=0) >= 1 << 16:
            raise SegdeployError(where, "more than 65536 classes do not fit a PNG")
        labels = labels.astype(np.uint16)
    return label_png(labels)


def class_shares(labels: np.ndarray, id2label: dict[int, str]) -> list[dict[str, Any]]:
    """The classes present, largest share first: [{"id", "name", "share"}]."""
    counts = _class_counts(labels, len(id2label))
    total = max(int(labels.size), 1)
    present = [(int(i), int(n)) for i, n in enumerate(counts) if n]
    present.sort(key=lambda t: -t[1])
    return [
        {"id": i, "name": id2label.get(i, str(i)), "share": round(n / total, 6)} for i, n in present
    ]


def _class_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per class id (bincount's result). For few classes one comparison pass per
    class beats bincount, which first widens every uint8 id to 64 bits: 0.06 against
    0.2 ms for 5 classes at 480x360. Ids beyond `n` fall back to bincount."""
    if labels.dtype == np.uint8 and n <= 16:
        counts = np.array([np.count_nonzero(labels == k) for k in range(n)], dtype=np.intp)
        if counts.sum() == labels.size:
            return counts
    return np.bincount(labels.ravel(), minlength=n)


# -- worker side -----------------------------------------------------------------------

#: Per-process state of a worker (ProcessPoolExecutor has no other place for it): the
#: run's StageConfig, set once by `_init_worker` so that it is not pickled with every
#: task, and whether a task is running (see `_on_sigterm`).
_WORKER: dict[str, Any] = {"cfg": None, "busy": False}


def _init_worker(cfg: StageConfig) -> None:
    # Ctrl-C reaches the whole process group: the parent alone decides what finishes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _WORKER["cfg"] = cfg


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (the executor stopping a broken pool, or a whole process group being
    stopped) ends the worker: at once when idle; when busy, after unwinding its task,
    so that the file being written is removed (atomic writes), never left half done."""
    if _WORKER["busy"]:
        raise KeyboardInterrupt
    os._exit(0)


def _worker_task(fn: Callable, items: Sequence) -> list:
    _WORKER["busy"] = True
    try:
        return list(fn(items, _WORKER["cfg"]))
    except KeyboardInterrupt:
        os._exit(0)  # the files finished are complete; the parent sees a broken pool
    finally:
        _WORKER["busy"] = False


def _prepare_chunk(paths: Sequence[Path], cfg: StageConfig) -> Iterator[Prepared | str]:
    for path in paths:
        try:
            yield prepare_image(path, cfg)
        except SegdeployError as err:
            yield err.problem


def _finish_chunk(tasks: Sequence[tuple], cfg: StageConfig) -> Iterator[Finished | Fatal | str]:
    for raw, size, label, overlay, image, fused, keep in tasks:
        try:
            yield finish_image(
                raw, size, label, cfg, fused=fused, overlay=overlay, image=image, keep=keep
            )
        except OSError as err:
            fatal = fatal_error(err, label)
            if fatal is not None:
                yield fatal
                return  # the rest of the chunk would fail the same way
            yield f"cannot write outputs: {err}"
        except (SegdeployError, ValueError) as err:
            yield f"cannot write outputs: {err}"


# -- the engine ------------------------------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """What a Job's record hands back to the caller besides the files written."""

    labels: bool = False  # the (H, W) class ids
    overlay: bool = False  # the blended overlay pixels (needs StageConfig.palette)


@dataclass(frozen=True)
class Job:
    """An image to segment and where its outputs go.

    A clip's frame (segdeploy.runtime.clips) comes decoded: `pixels`, with `path`
    the clip; its label PNG may be None (a label stream), `keep` says what its
    record hands back, and `tag` (anything; it never leaves this process) goes
    into its record, so the caller can route it."""

    path: Path
    label: Path | None
    overlay: Path | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    keep: Keep | None = None
    tag: Any = field(default=None, compare=False)
    #: Decoded and preprocessed already (a clip's frame, by its reader thread): straight
    #: to the model, no round trip through the workers.
    prepared: Prepared | None = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> Path | np.ndarray:
        """What the decode stage reads: the file, or the frame already decoded."""
        return self.path if self.pixels is None else self.pixels


@dataclass
class Outcome:
    """What a run did, besides its records."""

    workers: int
    interrupted: bool = False
    stopped: Fatal | None = None  # the write error that stopped the run
    model_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    timed: int = 0  # images whose stage times are in `cpu`

    def add(self, prepared_cpu: dict, model_s: float, finished_cpu: dict) -> None:
        """Count one written image's stage times (CPU seconds per host stage, its share of
        the model's wall time); `model_s`, the model's total, is counted per batch."""
        for stage, sec in (*prepared_cpu.items(), *finished_cpu.items()):
            self.cpu[stage] += sec
        self.cpu["model"] += model_s
        self.timed += 1

    def stage_ms(self) -> dict[str, float]:
        """Milliseconds per image for each stage: CPU time in the workers, wall time of the
        model (its own threads run it); stages that did not run are left out."""
        n = max(self.timed, 1)
        ms = {k: v * 1e3 / n for k, v in self.cpu.items() if v > 0 or k == "model"}
        return {k: round(v, 3) for k, v in ms.items()}

    def bound_by(self) -> str | None:
        """The stage that limits the rate: the model (one process runs it) unless the host
        stages, shared by the workers, take longer per image; then the largest of those."""
        if not self.timed:
            return None
        ms = self.stage_ms()
        host = {k: v for k, v in ms.items() if k != "model"}
        parallel = max(self.workers, 1)
        # Workers=0: every stage shares the calling thread, so the sum bounds it.
        if self.workers and ms.get("model", 0.0) >= sum(host.values()) / parallel:
            return "model"
        return max(host, key=host.get) if host else "model"


class _Pool:
    """Worker processes (none for workers=0: then tasks run at once in the caller),
    restarted when one dies."""

    def __init__(self, workers: int, cfg: StageConfig, stop: Callable[[], bool] | None):
        self.workers, self.cfg, self._stop = workers, cfg, stop
        self.generation = 0
        self.stopping = False  # interrupted: a broken pool is not restarted
        self._ex = self._start()

    def checkpoint(self) -> None:
        """Raise KeyboardInterrupt here if a stop signal came (not while stopping)."""
        if self._stop is not None and not self.stopping and self._stop():
            raise KeyboardInterrupt

    def _wait(self, fut: Future) -> Any:
        while True:
            try:
                return fut.result(timeout=POLL_S)
            except TimeoutError:
                self.checkpoint()

    def _start(self) -> ProcessPoolExecutor | None:
        if self.workers == 0:
            return None
        # tied: a killed run's workers would otherwise wait forever (runtime/lifeline.py)
        return tied_pool(self.workers, start_forkserver(), _init_worker, (self.cfg,))

    def _restart(self) -> None:
        log.warning("a worker process died; starting new workers")
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
        self._ex = self._start()
        self.generation += 1

    def submit(self, fn: Callable, items: list) -> tuple[Future, int]:
        if self._ex is None:
            fut: Future = Future()
            try:
                fut.set_result(list(fn(items, self.cfg)))
            except Exception as err:  # a bug: re-raised by result(), as from a worker
                fut.set_exception(err)
            return fut, self.generation
        try:
            return self._ex.submit(_worker_task, fn, items), self.generation
        except BrokenProcessPool:
            if self.stopping:  # no new workers while the run ends: the items are not done
                fut = Future()
                fut.set_exception(BrokenProcessPool("stopping"))
                return fut, self.generation
            self._restart()
            return self._ex.submit(_worker_task, fn, items), self.generation

    def result(self, handle: tuple[Future, int], fn: Callable, items: list) -> list:
        fut, generation = handle
        try:
            return self._wait(fut)
        except BrokenProcessPool:
            if self.stopping:
                return []  # the run is ending: these items are not done, like the queued ones
            if generation == self.generation:
                self._restart()
            return [self._alone(fn, item) for item in items]

    def _alone(self, fn: Callable, item) -> Any:
        """Run one item on its own: if the pool breaks again, this item did it."""
        fut, _ = self.submit(fn, [item])
        try:
            return self._wait(fut)[0]
        except BrokenProcessPool:
            self._restart()
            return WORKER_DIED

    def cancel(self, handles: Iterable[tuple[Future, int]]) -> None:
        for fut, _ in handles:
            fut.cancel()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)


class _InOrder:
    """Hands records on in input order although stages finish out of order."""

    def __init__(self, emit: Callable[[dict], None]):
        self._emit, self._held, self._next = emit, {}, 0

    def put(self, seq: int, rec: dict) -> None:
        self._held[seq] = rec
        while self._next in self._held:
            self._emit(self._held.pop(self._next))
            self._next += 1

    def skip(self, seq: int) -> None:
        """No record will come for `seq` (dropped after the run stopped)."""
        self._held[seq] = None
        while self._next in self._held:
            rec = self._held.pop(self._next)
            if rec is not None:
                self._emit(rec)
            self._next += 1

    def drain(self) -> None:
        """At the end of an interrupted run: what is held, in order, past any gap."""
        for seq in sorted(self._held):
            if self._held[seq] is not None:
                self._emit(self._held[seq])
        self._held.clear()


class Stop(Exception):
    """A fatal write error (disk full, read-only): the run stops submitting work.

    Raised by the engine, and by a `record` callback that cannot store a record."""

    def __init__(self, fatal: Fatal):
        super().__init__(f"{fatal.path}: {fatal.reason}")
        self.fatal = fatal


def fatal_error(err: OSError, path: str | os.PathLike) -> Fatal | None:
    """The Fatal for an OSError that no retry can fix, else None."""
    if err.errno in FATAL_ERRNOS:
        return Fatal(str(err.filename or path), err.strerror or str(err))
    return None


def run(
    entries: Iterable[Job | dict],
    seg,
    output: Path,
    *,
    cfg: StageConfig,
    workers: int,
    record: Callable[[dict], None],
    stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Segment every Job of `entries`; `record` gets each record in input order.

    A dict in `entries` is a ready record (a failure found while listing, a
    skipped image) passed on in its place. Ctrl-C (KeyboardInterrupt, or
    `stop()` turning true: see `stop_signals`) stops the decoding, lets the
    masks the model has already computed be written, and returns with
    `interrupted` set; a full disk likewise with `stopped`.
    """
    engine = _Engine(seg, output, cfg, workers, record, stop)
    try:
        try:
            engine.feed(entries)
        except (KeyboardInterrupt, Stop) as reason:
            engine.wind_down(reason)
    finally:
        engine.close()
    return engine.outcome


class _Engine:
    """One run's bounded queues around the model: chunks of images go to the workers to
    decode, come back to the model in batches, and go out again to be written."""

    def __init__(self, seg, output: Path, cfg, workers: int, record, stop):
        self.seg, self.output = seg, output
        self.outcome = Outcome(workers=workers)
        self.size = seg.batch_size
        self.chunk_size = chunk_size(seg.batch_size, workers, input_bytes(seg))
        self.window = max(workers, 1) + 2  # chunks in flight on each side of the model
        self.pool = _Pool(workers, cfg, stop)
        self.ordered = _InOrder(record)
        self.chunk: list[tuple[int, Job]] = []
        self.decoding: deque[tuple[list, tuple]] = deque()
        self.waiting: list[tuple[int, Job, Prepared]] = []
        self.computed: list[tuple[tuple, tuple]] = []  # (part, task) waiting to be written
        self.writing: deque[tuple[list, list, tuple]] = deque()

    def feed(self, entries: Iterable[Job | dict]) -> None:
        """Every entry through the stages, then everything in flight to its end."""
        for seq, entry in enumerate(entries):
            self.pool.checkpoint()
            if isinstance(entry, dict):
                self.ordered.put(seq, entry)
                continue
            if entry.prepared is not None:
                self.waiting.append((seq, entry, entry.prepared))
                while len(self.waiting) >= self.size:
                    self.run_model(self.size)
                continue
            self.chunk.append((seq, entry))
            if len(self.chunk) >= self.chunk_size:
                self.submit_chunk()
            while len(self.decoding) > self.window:
                self.take_decoded()
        self.submit_chunk()
        while self.decoding:
            self.pool.checkpoint()
            self.take_decoded()
        if self.waiting:
            self.run_model(len(self.waiting))
        self.submit_writes()
        while self.writing:
            self.take_written()

    def wind_down(self, reason: KeyboardInterrupt | Stop) -> None:
        """After Ctrl-C, SIGTERM or a full disk: queued decodes are dropped; masks the model
        has already computed are still written (cheap, and saves the model time on resume).
        Every file is written atomically, so whatever the moment, no partial file stays."""
        if isinstance(reason, KeyboardInterrupt):
            self.outcome.interrupted = True
            log.warning("interrupted: finishing the images being written, then stopping")
        else:
            self.outcome.stopped = reason.fatal
            log.error("%s; stopping the run", reason)
        self.pool.stopping = True
        self.pool.cancel(h for _, h in self.decoding)
        self.decoding.clear()
        if self.outcome.stopped is None:
            self.submit_writes()
        self.computed.clear()  # after a full disk: not attempted, no record (as if interrupted)
        while self.writing:
            with contextlib.suppress(Stop):
                self.take_written()

    def close(self) -> None:
        self.pool.close()
        try:
            self.ordered.drain()
        except Stop as stop:  # the records cannot be stored either
            self.outcome.stopped = self.outcome.stopped or stop.fatal

    def submit_chunk(self) -> None:
        if self.chunk:
            part = list(self.chunk)
            self.chunk.clear()
            paths = [j.source for _, j in part]
            self.decoding.append((part, self.pool.submit(_prepare_chunk, paths)))

    def take_decoded(self) -> None:
        part, handle = self.decoding[0]
        results = self.pool.result(handle, _prepare_chunk, [j.source for _, j in part])
        self.decoding.popleft()  # only now: Ctrl-C while waiting leaves it to be cancelled
        results += [None] * (len(part) - len(results))  # a worker stopped by SIGTERM
        for (seq, job), res in zip(part, results, strict=True):
            if res is None:
                self.ordered.skip(seq)
            elif isinstance(res, str):
                self.ordered.put(seq, failure_record(job, res))
            else:
                self.waiting.append((seq, job, res))
        while len(self.waiting) >= self.size:
            self.run_model(self.size)

    def run_model(self, n: int) -> None:
        batch = self.waiting[:n]
        del self.waiting[:n]
        t = time.perf_counter()
        raws = model_batch(
            self.seg, [p.x for _, _, p in batch], [p.size for _, _, p in batch], isolate=True
        )
        model_s = time.perf_counter() - t
        self.outcome.model_s += model_s
        for (seq, job, p), raw in zip(batch, raws, strict=True):
            if isinstance(raw, str):  # this image alone: the others go on
                self.ordered.put(seq, failure_record(job, raw))
                continue
            task = (raw, p.size, job.label, job.overlay, p.image, self.seg.fused, job.keep)
            self.computed.append(((seq, job, p, model_s / len(batch)), task))
        if len(self.computed) >= self.chunk_size:
            self.submit_writes()
        while len(self.writing) > self.window:
            self.take_written()

    def submit_writes(self) -> None:
        if self.computed:
            part, tasks = (list(t) for t in zip(*self.computed, strict=True))
            self.computed.clear()
            self.writing.append((part, tasks, self.pool.submit(_finish_chunk, tasks)))

    def take_written(self) -> None:
        part, tasks, handle = self.writing[0]
        results = self.pool.result(handle, _finish_chunk, tasks)
        self.writing.popleft()  # only now: Ctrl-C while waiting leaves it to be recorded
        results += [None] * (len(part) - len(results))  # not attempted: after a Fatal, SIGTERM
        stop: Fatal | None = None
        for (seq, job, p, model_s), res in zip(part, results, strict=True):
            if isinstance(res, Finished):
                self.outcome.add(p.cpu, model_s, res.cpu)
                self.ordered.put(seq, image_record(self.output, job, p.wall, model_s, res))
            elif isinstance(res, str):
                self.ordered.put(seq, failure_record(job, res))
            elif isinstance(res, Fatal) and self.outcome.stopped is None and stop is None:
                stop = res
                self.ordered.put(seq, failure_record(job, f"{res.path}: {res.reason}"))
            else:  # not written because the run stopped: no record, as if interrupted
                self.ordered.skip(seq)
        if stop is not None:
            raise Stop(stop)


def image_record(
    output: Path, job: Job, decode_wall: float, model_s: float, res: Finished
) -> dict[str, Any]:
    """summary.json's record of one segmented image (every engine writes the same)."""
    rec: dict[str, Any] = {"input": str(job.path)}
    if job.label is not None:
        rec["output"] = str(job.label.relative_to(output))
    rec["size"] = list(res.size)
    rec["classes"] = res.classes
    if job.overlay is not None:
        rec["overlay"] = str(job.overlay.relative_to(output))
    times = {"decode": decode_wall, "model": model_s, "postprocess": res.wall}
    rec["time_s"] = {k: round(v, 6) for k, v in times.items()}
    rec["time_s"]["total"] = round(sum(times.values()), 6)
    if job.tag is not None:  # a clip's frame: what its caller routes and writes in order
        rec.update(tag=job.tag, labels=res.labels, overlay_pixels=res.overlay)
    return rec


def failure_record(job: Job, reason: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"input": str(job.path), "reason": reason}
    if job.tag is not None:
        rec["tag"] = job.tag
    return rec


# -- signals ---------------------------------------------------------------------------


class _Signals:
    """Ctrl-C and SIGTERM, remembered by the handler and acted on by the engine at points
    where its bookkeeping is whole (a KeyboardInterrupt raised anywhere could drop the
    record of a file a worker has just written)."""

    def __init__(self):
        self.pending = False

    def handler(self, signum, frame) -> None:
        self.pending = True

    def __call__(self) -> bool:
        return self.pending


@contextlib.contextmanager
def stop_signals() -> Iterator[_Signals]:
    """SIGINT and SIGTERM stop a run alike: pass the yielded object as `run(stop=...)`.

    One that arrives after the run (while the summary is written) is raised as
    KeyboardInterrupt when the block ends. Outside the main thread (where
    Python cannot install handlers) this changes nothing.
    """
    state = _Signals()
    with signals_to(state.handler):
        yield state
    if state.pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_to(handler) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` in the block, to the handlers found before after
    it; outside the main thread (where Python cannot install handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
