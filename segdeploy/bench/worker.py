"""One backend at one batch size, served from a process of its own.

`segdeploy bench` starts `python -m segdeploy.bench.worker JOB.json` once per
row, so that each row's peak memory is its own (a process's high-water mark
never goes down) and one backend's imports, caches and threads cannot help or
hinder another. The parent then drives all rows of a batch size round by
round, one command at a time (JSON lines on stdin and stdout):

    -> {"do": "round", "calls": k}   a timed end-to-end pass over the first
                          images, one over all images, then k timed forward calls
    <- {"event": "round", "end_to_end_s": ..., "short_s": ..., "model_latency_s": [...]}
    -> {"do": "finish"}   write the last pass's label maps, report peak memory
    <- {"event": "result", ...}

The short pass (`short_items`) is there to split a pass's time into a fixed
start-up (a process pool, listing, summary.json: what a fresh command pays once)
and a steady rate per image: two passes of different lengths give both.

Every row does the same job: image files in, label PNG files out. segdeploy's
row writes its own (it is `segdeploy infer`); the others' label maps are written
here, in the timed pass, with Pillow under the same names, as a user of those
libraries would (`write_label_pngs`). With `in_memory` they are written only after
timing, for scoring: the older comparison of label maps kept in memory.

Interleaving the rows this way means that a burst of load from another process
on a shared machine slows every row alike instead of one row wholesale; the
medians then compare like with like. Only one worker runs at any moment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from segdeploy.errors import SegdeployError

#: Forward calls before the first timed one: the first runs allocate and pick kernels.
MODEL_WARMUP_CALLS = 2


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MiB (None where it cannot be known).

    Linux: VmHWM, the high-water mark of this program's own address space.
    getrusage's ru_maxrss is not used there: it carries over the parent's peak
    across fork and exec, so every worker of a big parent would report the
    parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def list_items(images: Path, out: Path | None = None) -> list:
    """The images of a folder as `segdeploy infer` finds them (same order, same output names)."""
    from segdeploy.runtime.infer import Failure, iter_inputs

    items, failures = [], []
    for item in iter_inputs([images], exclude=out):
        (failures if isinstance(item, Failure) else items).append(item)
    if failures:
        raise SegdeployError(failures[0].path, failures[0].reason)
    return items


def _tuple(value):
    """JSON gives lists where the options had (height, width) tuples."""
    return tuple(value) if isinstance(value, list) else value


def short_items(items: list, batch_size: int) -> list:
    """The short pass's images: a quarter of them, at least two batches, at most half."""
    return items[: min(max(2 * batch_size, len(items) // 4), len(items) // 2)]


def write_label_pngs(out: Path, items, labels) -> None:
    """Label maps to PNG files with Pillow, named as `segdeploy infer` names them: what a
    user of a library that returns label maps writes."""
    from PIL import Image

    from segdeploy.runtime.infer import label_path

    for item, lab in zip(items, labels, strict=True):
        path = label_path(out, item)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab if lab.dtype == "uint8" else lab.astype("uint16")).save(path)


class Row:
    """A backend set up for one batch size: warm-up done, ready for timed rounds."""

    def __init__(self, job: dict[str, Any]):
        from segdeploy.bench.backends import make_runner, parse_backend

        self.backend = parse_backend(job["backend"])
        self.images, self.out = Path(job["images"]), Path(job["out"])
        self.batch_size = job["batch_size"]
        # The worker writes the label PNGs of a runner that returns label maps.
        self.write = not job.get("in_memory", False) and not self.backend.writes_labels
        model_dir = Path(job["model_dir"]) if job.get("model_dir") else None
        onnx_dir = Path(job["onnx_dir"]) if job.get("onnx_dir") else None

        start = time.perf_counter()
        tiling = None
        if job.get("tiling"):
            from segdeploy.runtime.tiles import TileOptions

            tiling = TileOptions(**{k: _tuple(v) for k, v in job["tiling"].items()})
        self.runner = make_runner(
            self.backend, model_dir, onnx_dir, self.batch_size, job.get("threads"), tiling
        )
        self.setup_s = time.perf_counter() - start
        self.items = list_items(self.images, self.out)
        if not self.items:
            raise SegdeployError(self.images, "no images to benchmark")
        # Warm-up: a pass over a few images, written elsewhere and thrown away,
        # and the first forward calls on the model-only batches.
        warm = self.items[: min(len(self.items), 2 * self.batch_size)]
        warm_out = self.out.with_name(self.out.name + "-warmup")
        self._pass(warm, warm_out, [str(i.path) for i in warm])
        shutil.rmtree(warm_out, ignore_errors=True)
        self.short = short_items(self.items, self.batch_size)
        distinct = min(job["model_runs"], max(1, math.ceil(len(self.items) / self.batch_size)))
        self.batches = self.runner.model_inputs(self.items, distinct)
        for i in range(MODEL_WARMUP_CALLS):
            self.runner.forward(self.batches[i % len(self.batches)])
        self.calls = 0
        self.labels = None

    def _pass(self, items: list, out: Path, inputs: list[str]) -> tuple[float, Any]:
        """One end-to-end pass into an empty `out`: (seconds, label maps or None)."""
        shutil.rmtree(out, ignore_errors=True)  # every pass writes new files, none replaces
        t = time.perf_counter()
        labels = self.runner.end_to_end(items, out, inputs)
        if self.write and labels is not None:
            write_label_pngs(out, items, labels)
        return time.perf_counter() - t, labels

    def round(self, calls: int) -> dict[str, Any]:
        short_s = None
        if self.short:
            short_out = self.out.with_name(self.out.name + "-short")
            short_s, _ = self._pass(self.short, short_out, [str(i.path) for i in self.short])
            shutil.rmtree(short_out, ignore_errors=True)
        e2e, self.labels = self._pass(self.items, self.out, [str(self.images)])
        latency = []
        for _ in range(calls):
            batch = self.batches[self.calls % len(self.batches)]
            self.calls += 1
            t = time.perf_counter()
            self.runner.forward(batch)
            latency.append(time.perf_counter() - t)
        return {
            "event": "round",
            "end_to_end_s": e2e,
            "short_s": short_s,
            "model_latency_s": latency,
        }

    def finish(self) -> dict[str, Any]:
        from segdeploy.runtime.infer import label_path, save_labels

        peak = peak_rss_mb()
        if self.labels is not None and not self.write:  # in memory: written now, for scoring
            for item, lab in zip(self.items, self.labels, strict=True):
                save_labels(label_path(self.out, item), lab)
        return {
            "event": "result",
            "status": "ok",
            "provider": getattr(self.runner, "provider", "cpu"),
            "threads": self.runner.threads,
            "images": len(self.items),
            "short_images": len(self.short),
            "setup_s": self.setup_s,
            "peak_rss_mb": peak,
            "torch_imported": "torch" in sys.modules,
        }


def serve(job: dict[str, Any], commands: TextIO, replies: TextIO) -> None:
    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        row = Row(job)
        reply({"event": "ready"})
        for line in commands:
            command = json.loads(line)
            do = command["do"]
            if do == "round":
                reply(row.round(command["calls"]))
            elif do == "finish":
                reply(row.finish())
                return
    except SegdeployError as err:
        reply({"event": "result", "status": "failed", "reason": str(err)})
    except Exception as err:  # any library's failure is this row's result, not the bench's
        logging.getLogger(__name__).exception("backend %s failed", job.get("backend"))
        reply({"event": "result", "status": "failed", "reason": failure_reason(err)})


#: OpenVINO's source locations, one per line before its message ("Exception from
#: src/inference/src/cpp/core.cpp:84:"): they say where, the line after says why.
_LOCATION = re.compile(r"Exception from \S+:\d+:\s*")


def failure_reason(err: BaseException, limit: int = 600) -> str:
    """`Type: message` on one line, every line of the message kept (a library's reason is
    not always on its first line: OpenVINO's comes after its source locations, which are
    dropped), cut at `limit` characters."""
    text = " ".join(_LOCATION.sub("", str(err)).split())
    return f"{type(err).__name__}: {text[:limit]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m segdeploy.bench.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    # Replies get stdout to themselves: whatever the libraries print (to sys.stdout or
    # straight to file descriptor 1 from C) goes to stderr, which the parent logs.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "optimum", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    serve(job, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
