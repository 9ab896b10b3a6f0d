"""Regenerate benchmarks/results/camvid_cpu.{json,md,png}: `make bench`.

CamVid val (101 images, 480x360) with a CamVid-trained SegFormer, on this
machine's CPU. Every step is the project's own command, run as a user would:

1. `segdeploy train` scratch:b0 on CamVid train, unless MODEL already holds a
   finished model (then it is reused: training takes the longest);
2. `segdeploy export --opset 17 --quantize int8` with both int8 engines
   (onnxruntime's model_int8.onnx, NNCF's model_openvino_int8.xml), validated on CamVid val
   (a few minutes). It runs every time, so the table always measures the
   graphs today's code writes; --reuse-export skips it when MODEL/onnx has
   both graphs and is newer than the weights (an int8 graph made by older
   code once slipped into a table that way);
3. `segdeploy bench` on CamVid val, every CPU backend (segdeploy infer on
   onnxruntime and on OpenVINO, and OpenVINO's own pipeline), batch sizes 1 and 4;
4. `benchmarks/bench_pipeline.py`: how `segdeploy infer`'s host pipeline scales
   with cores (tiny model, CamVid train + val), to
   benchmarks/results/pipeline_cpu.{json,md};
5. `benchmarks/bench_video.py`: infer on a clip against the same frames as JPEGs
   (also twice over, for the rate per frame), lossless clips against PNG frames,
   memory over clip length (10 s, 100 s, 10 minutes), to
   benchmarks/results/video_cpu.{json,md};
6. `benchmarks/bench_tiles.py`: `segdeploy infer --tile` on generated 1k to 16k
   TIFFs with a 150-class SegFormer b0 (megapixels/s, peak RSS, batched windows
   against one per call, the tiled run against the model alone), to
   benchmarks/results/tiles_cpu.{json,md};
7. `benchmarks/bench_serve.py`: `segdeploy serve` (MODEL's export) under 1, 4 and 16
   loopback clients beside `segdeploy infer` and a hand-written FastAPI + transformers
   endpoint, to benchmarks/results/serve_cpu.{json,md}.

Why 512x512 (SegFormer's and the guide's input size), though a smaller size
trains several times faster: at 512 the model is most of the end-to-end time,
as on a real deployment, so the comparison measures the inference paths, not
JPEG decoding. CamVid's 480x360 frames are upsampled a little to get there.

    .venv/bin/python benchmarks/run_all.py [--model models/camvid-b0-512] [--retrain]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
_SCRIPT = Path(sys.executable).with_name("segdeploy")  # the venv's console script
SEGDEPLOY = (
    [str(_SCRIPT)]
    if _SCRIPT.is_file()
    else [sys.executable, "-c", "import sys; from segdeploy.cli import main; sys.exit(main())"]
)

#: The training recipe: scratch:b0 (no pretrained weights offline), lr 1e-3 (scratch
#: needs far more than the guide's 6e-5 for a pretrained encoder), 160 steps of 2
#: images at 512 px (~5 s of CPU per step, so ~15 minutes on two idle cores).
#: Every CPU row, the OpenVINO peers (issue 16) included: bench leaves them out by default.
BACKENDS = (
    "torch,hf-pipeline,optimum,onnx-cpu,onnx-cpu-int8,onnx-openvino,onnx-openvino-openvino_int8,"
    "openvino,openvino-int8"
)
TRAIN_ARGS = [
    "--model", "scratch:b0",
    "--no-reduce-labels", "--ignore-index", "11",  # CamVid: classes 0..10, 11 = void
    "--eval-split", "val",
    "--image-size", "512",
    "--batch-size", "2",
    "--max-steps", "160",
    "--eval-steps", "160",
    "--lr", "1e-3",
]  # fmt: skip


#: Reports `segdeploy export` writes in MODEL/onnx -> their names in benchmarks/results.
REPORTS = {
    "validation.json": "camvid_validation_fp32.json",
    "validation_int8.json": "camvid_validation_int8.json",
    "quantization_int8.json": "camvid_quantization_int8.json",
    "validation_openvino_int8.json": "camvid_validation_openvino_int8.json",
    "quantization_openvino_int8.json": "camvid_quantization_openvino_int8.json",
}


def rel(path: Path) -> str:
    """Paths as seen from the repository root, so the recorded commands read the same anywhere."""
    return os.path.relpath(path.resolve(), ROOT)


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(["segdeploy", *cmd[len(SEGDEPLOY) :]]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def finished(model: Path) -> bool:
    return (model / "metrics.json").is_file() and (model / "config.json").is_file()


def up_to_date(model: Path, graph: Path) -> bool:
    weights = model / "model.safetensors"
    return graph.is_file() and graph.stat().st_mtime >= weights.stat().st_mtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "camvid-b0-512")
    # (paths are given to the commands relative to the repository root, where they run)
    parser.add_argument("--data", type=Path, default=CAMVID)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "camvid_cpu.json"
    )
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--backends", default=BACKENDS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--max-images", type=int, default=None, help="bench on the first N val images only"
    )
    parser.add_argument("--model-runs", type=int, default=10)
    parser.add_argument("--no-int8", action="store_true", help="benchmark the fp32 graph only")
    parser.add_argument("--retrain", action="store_true", help="train again even if MODEL is there")
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="skip benchmarks/bench_pipeline.py, bench_video.py, bench_tiles.py and bench_serve.py",
    )
    parser.add_argument(
        "--reuse-export",
        action="store_true",
        help="skip the export when MODEL/onnx is newer than the weights",
    )
    args = parser.parse_args(argv)

    if not (args.data / "images" / "val").is_dir():
        print(f"error: CamVid not found at {args.data} (give --data)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model
    if args.retrain or not finished(model):
        run([*SEGDEPLOY, "train", "--dataset", rel(args.data), *TRAIN_ARGS, "-o", rel(model),
             *(["--overwrite"] if model.exists() else [])])  # fmt: skip
    else:
        print(f"reusing the trained model in {model} (--retrain to train again)")

    onnx_dir = model / "onnx"
    int8 = ["model_int8.onnx", "model_openvino_int8.xml"]
    graphs = [onnx_dir / g for g in ["model.onnx", *([] if args.no_int8 else int8)]]
    if args.reuse_export and all(up_to_date(model, g) for g in graphs):
        print(f"reusing the export in {onnx_dir} (--reuse-export)")
    else:
        # Both int8 graphs: onnxruntime's (model_int8.onnx) and NNCF's for OpenVINO.
        int8_args = [
            "--quantize",
            "int8",
            "--int8-engine",
            "onnxruntime",
            "--int8-engine",
            "openvino",
        ]
        run([*SEGDEPLOY, "export", rel(model), "--opset", "17",
             *([] if args.no_int8 else int8_args)])  # fmt: skip
        # The export's own reports go beside the table: they hold the validation
        # (mean IoU of each graph against PyTorch's) and what int8 kept in float.
        for name, dest in REPORTS.items():
            if (onnx_dir / name).is_file():
                shutil.copyfile(onnx_dir / name, args.output.parent / dest)

    run(
        [
            *SEGDEPLOY, "bench",
            "--model", rel(model),
            "--batch-sizes", args.batch_sizes,
            "--backends", args.backends,
            "--runs", str(args.runs),
            "--model-runs", str(args.model_runs),
            *(["--max-images", str(args.max_images)] if args.max_images else []),
            "--output", rel(args.output),
        ]
    )  # fmt: skip
    if args.no_pipeline:
        return 0
    rc = 0
    scripts = {
        "bench_pipeline.py": [],
        "bench_video.py": ["--twice"],
        "bench_tiles.py": [],
        "bench_serve.py": ["--model", rel(model)]
        + ([] if args.data == CAMVID else ["--images", rel(args.data / "images" / "val")]),
    }
    for script, extra in scripts.items():
        print("$ " + shlex.join(["python", f"benchmarks/{script}", *extra]), flush=True)
        rc = (
            rc
            or subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / script), *extra], cwd=ROOT
            ).returncode
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
