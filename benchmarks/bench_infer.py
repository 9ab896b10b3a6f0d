"""End-to-end images/s of `segdeploy infer` on a folder vs the model alone.

- model alone: ONNX Runtime on already-preprocessed batches (no decoding,
  upsampling or writing), with per-batch latency p50/p95;
- pipeline: `segdeploy.runtime.infer.run_infer` on the folder with the same session
  (decode, preprocess, model, upsample, write PNGs, summary.json);
- command: the real `segdeploy infer` in a fresh process, start-up included.

The gap between the first two is what the threaded pipeline leaves on the
table; on a CPU-only machine the model dominates.

    .venv/bin/python benchmarks/bench_infer.py --model models/segformer \\
        [--images ../shared/data/camvid/images/val] [--limit 50] [--provider cpu]

Writes benchmarks/results/infer_<provider>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "camvid" / "images" / "val"


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", required=True, type=Path, help="ONNX folder, or model folder with onnx/"
    )
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--variant", default="fp32")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-cli", action="store_true", help="skip the fresh-process command run")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)

    from segdeploy.atomic import write_json
    from segdeploy.runtime.image_io import is_image_name
    from segdeploy.runtime.infer import run_infer
    from segdeploy.runtime.segmenter import Segmenter

    files = sorted(p for p in args.images.rglob("*") if p.is_file() and is_image_name(p))[
        : args.limit
    ]
    if not files:
        print(f"no images under {args.images}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    try:
        folder = work / "images"
        folder.mkdir()
        for f in files:  # a folder of exactly these images, for the pipeline and the command
            os.symlink(f.resolve(), folder / f.name)

        t = time.perf_counter()
        seg = Segmenter(
            args.model,
            args.provider,
            args.variant,
            threads=args.threads,
            batch_size=args.batch_size,
        )
        startup_s = time.perf_counter() - t

        # Model alone.
        inputs = [seg.prepare(seg.load(f)) for f in files]
        bs = seg.batch_size
        batches = [inputs[i : i + bs] for i in range(0, len(inputs), bs)]

        def model_call(b):
            if seg.fused:  # labels come out of the graph; force the copy to the host
                seg.forward(b, [(1, 1)] * len(b))[0]()
            else:
                seg.logits(np.stack(b))

        model_call(batches[0])  # warm-up
        latencies = []
        for b in batches:
            t = time.perf_counter()
            model_call(b)
            latencies.append(time.perf_counter() - t)
        model_s = sum(latencies)

        # The pipeline, same session.
        out = work / "out"
        t = time.perf_counter()
        summary = run_infer(
            [folder], args.model, out, segmenter=seg, workers=args.workers, progress=False
        )
        pipeline_s = time.perf_counter() - t
        if summary["totals"]["failed"]:
            print(f"warning: {summary['totals']['failed']} images failed", file=sys.stderr)

        # The command, fresh process.
        cli_s = None
        if not args.no_cli:
            cmd = [
                sys.executable,
                "-c",
                "from segdeploy.cli import main; main()",
                "-q",
                "infer",
                "--model",
                str(args.model),
                "--provider",
                args.provider,
                "--variant",
                args.variant,
                str(folder),
                "-o",
                str(work / "cli"),
            ]
            for opt, val in (
                ("--batch-size", args.batch_size),
                ("--threads", args.threads),
                ("--workers", args.workers),
            ):
                if val:
                    cmd += [opt, str(val)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            cli_s = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                cli_s = None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(files)
    rows = [
        (
            "model alone",
            n / model_s,
            f"batch {bs}: p50 {percentile(latencies, 50) * 1e3:.1f} ms, p95 {percentile(latencies, 95) * 1e3:.1f} ms",
        ),
        ("segdeploy infer pipeline", n / pipeline_s, f"{seg.provider}, same session"),
    ]
    if cli_s:
        rows.append(
            (
                "segdeploy infer command",
                n / cli_s,
                f"fresh process, start-up included ({cli_s:.1f} s)",
            )
        )
    print(f"{n} images from {args.images}, model {seg.onnx_path} ({seg.variant}) on {seg.provider}")
    print(f"{'':26} {'images/s':>9}")
    for name, ips, note in rows:
        print(f"{name:26} {ips:9.2f}  {note}")
    import onnxruntime

    result = {
        "benchmark": "infer",
        "images": n,
        "image_folder": str(args.images),
        "model": str(seg.onnx_path),
        "variant": seg.variant,
        "provider": seg.provider,
        "batch_size": bs,
        "model_input_size": list(seg.preprocessor.size) if seg.preprocessor.size else None,
        "session_startup_s": round(startup_s, 3),
        "model_alone_images_per_s": round(n / model_s, 3),
        "model_batch_latency_ms": {
            "p50": round(percentile(latencies, 50) * 1e3, 2),
            "p95": round(percentile(latencies, 95) * 1e3, 2),
        },
        "pipeline_images_per_s": round(n / pipeline_s, 3),
        "pipeline_summary_totals": summary["totals"],
        "command_images_per_s": round(n / cli_s, 3) if cli_s else None,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "median_batch_latency_ms": round(statistics.median(latencies) * 1e3, 2),
    }
    dest = args.output or ROOT / "benchmarks" / "results" / f"infer_{seg.provider}.json"
    write_json(dest, result)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
