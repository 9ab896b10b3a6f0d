"""One backend at one batch size, served from a process of its own.

`segdeploy bench` starts `python -m segdeploy.bench.worker JOB.json` once per
row, so that each row's peak memory is its own (a process's high-water mark
never goes down) and one backend's imports, caches and threads cannot help or
hinder another. The parent then drives all rows of a batch size round by
round, one command at a time (JSON lines on stdin and stdout):

    -> {"do": "round", "calls": k}   one timed end-to-end pass over all
                          images, then k timed forward calls
    <- {"event": "round", "end_to_end_s": ..., "model_latency_s": [...]}
    -> {"do": "finish"}   write the last pass's label maps, report peak memory
    <- {"event": "result", ...}

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


class Row:
    """A backend set up for one batch size: warm-up done, ready for timed rounds."""

    def __init__(self, job: dict[str, Any]):
        from segdeploy.bench.backends import make_runner, parse_backend

        self.backend = parse_backend(job["backend"])
        self.images, self.out = Path(job["images"]), Path(job["out"])
        self.batch_size = job["batch_size"]
        model_dir = Path(job["model_dir"]) if job.get("model_dir") else None
        onnx_dir = Path(job["onnx_dir"]) if job.get("onnx_dir") else None

        start = time.perf_counter()
        self.runner = make_runner(
            self.backend, model_dir, onnx_dir, self.batch_size, job.get("threads")
        )
        self.setup_s = time.perf_counter() - start
        self.items = list_items(self.images, self.out)
        if not self.items:
            raise SegdeployError(self.images, "no images to benchmark")
        # Warm-up: a pass over a few images, written elsewhere and thrown away,
        # and the first forward calls on the model-only batches.
        warm = self.items[: min(len(self.items), 2 * self.batch_size)]
        warm_out = self.out.with_name(self.out.name + "-warmup")
        self.runner.end_to_end(warm, warm_out, [str(i.path) for i in warm])
        shutil.rmtree(warm_out, ignore_errors=True)
        distinct = min(job["model_runs"], max(1, math.ceil(len(self.items) / self.batch_size)))
        self.batches = self.runner.model_inputs(self.items, distinct)
        for i in range(MODEL_WARMUP_CALLS):
            self.runner.forward(self.batches[i % len(self.batches)])
        self.calls = 0
        self.labels = None

    def round(self, calls: int) -> dict[str, Any]:
        t = time.perf_counter()
        self.labels = self.runner.end_to_end(self.items, self.out, [str(self.images)])
        e2e = time.perf_counter() - t
        latency = []
        for _ in range(calls):
            batch = self.batches[self.calls % len(self.batches)]
            self.calls += 1
            t = time.perf_counter()
            self.runner.forward(batch)
            latency.append(time.perf_counter() - t)
        return {"event": "round", "end_to_end_s": e2e, "model_latency_s": latency}

    def finish(self) -> dict[str, Any]:
        from segdeploy.runtime.infer import label_path, save_labels

        peak = peak_rss_mb()
        if self.labels is not None:  # segdeploy wrote its own label PNGs; the others' alike
            for item, lab in zip(self.items, self.labels, strict=True):
                save_labels(label_path(self.out, item), lab)
        return {
            "event": "result",
            "status": "ok",
            "provider": getattr(self.runner, "provider", "cpu"),
            "threads": self.runner.threads,
            "images": len(self.items),
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
