"""One backend at one batch size, measured in a process of its own.

`segdeploy bench` starts `python -m segdeploy.bench.worker JOB.json` once per
row, so that each row's peak memory is its own (a process's high-water mark
never goes down) and one backend's imports, caches and threads cannot speed up
or slow down the next. The worker writes RESULT.json with raw timings; the
parent turns them into medians and percentiles, and scores the label maps the
worker left in the job's output folder.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from segdeploy.atomic import write_json
from segdeploy.errors import SegdeployError

#: Forward calls before the timed ones: the first runs allocate and pick kernels.
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
    from segdeploy.infer import Failure, iter_inputs

    items, failures = [], []
    for item in iter_inputs([images], exclude=out):
        (failures if isinstance(item, Failure) else items).append(item)
    if failures:
        raise SegdeployError(failures[0].path, failures[0].reason)
    return items


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run the job; raise on failure (the caller records the reason)."""
    from segdeploy.bench.backends import make_runner, parse_backend
    from segdeploy.infer import label_path, save_labels

    backend = parse_backend(job["backend"])
    images, out = Path(job["images"]), Path(job["out"])
    batch_size, runs, model_runs = job["batch_size"], job["runs"], job["model_runs"]
    model_dir = Path(job["model_dir"]) if job.get("model_dir") else None
    onnx_dir = Path(job["onnx_dir"]) if job.get("onnx_dir") else None

    start = time.perf_counter()
    runner = make_runner(backend, model_dir, onnx_dir, batch_size, job.get("threads"))
    setup_s = time.perf_counter() - start
    items = list_items(images, out)
    if not items:
        raise SegdeployError(images, "no images to benchmark")

    # Warm-up pass on a few images, written elsewhere and thrown away.
    warm = items[: min(len(items), 2 * batch_size)]
    warm_out = out.with_name(out.name + "-warmup")
    runner.end_to_end(warm, warm_out, [str(i.path) for i in warm])
    shutil.rmtree(warm_out, ignore_errors=True)

    e2e_s, labels = [], None
    for _ in range(runs):
        t = time.perf_counter()
        labels = runner.end_to_end(items, out, [str(images)])
        e2e_s.append(time.perf_counter() - t)

    distinct = min(model_runs, math.ceil(len(items) / batch_size))
    batches = runner.model_inputs(items, distinct)
    for i in range(MODEL_WARMUP_CALLS):
        runner.forward(batches[i % len(batches)])
    latency_s = []
    for i in range(model_runs):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        runner.forward(batch)
        latency_s.append(time.perf_counter() - t)
    del batches
    peak = peak_rss_mb()

    if labels is not None:  # segdeploy wrote its own label PNGs; keep the others' alike
        for item, lab in zip(items, labels, strict=True):
            save_labels(label_path(out, item), lab)
    return {
        "backend": backend.name,
        "batch_size": batch_size,
        "status": "ok",
        "provider": getattr(runner, "provider", "cpu"),
        "threads": runner.threads,
        "images": len(items),
        "setup_s": setup_s,
        "end_to_end_s": e2e_s,
        "model_latency_s": latency_s,
        "peak_rss_mb": peak,
        "torch_imported": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m segdeploy.bench.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "optimum", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        result = measure(job)
    except SegdeployError as err:
        result = {"status": "failed", "reason": str(err)}
    except Exception as err:  # any library's failure is this row's result, not a crash of the bench
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        result = {"status": "failed", "reason": f"{type(err).__name__}: {first}"}
        logging.getLogger(__name__).exception("backend %s failed", job.get("backend"))
    write_json(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
