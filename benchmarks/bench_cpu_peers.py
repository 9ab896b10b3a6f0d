"""ONNX Runtime against OpenVINO on the CPU, model only, on one exported SegFormer graph.

    .venv/bin/python benchmarks/bench_cpu_peers.py

Speed does not depend on the weights, so by default the graph is a random-init
`scratch:b0` at 512x512 (made once in --work). Every configuration holds its
own session/compiled model in this one process and they are timed in
interleaved rounds (each round runs every configuration in turn), so a noisy,
shared machine slows them alike; the table reports each one's median ms per
image and its ratio to ORT fp32 paired round by round.

Configurations: ORT fp32 as `segdeploy infer` runs it (runtime.providers.
session_options), ORT fp32 under candidate changes (ORT_ENABLE_EXTENDED, no
intra-op spinning, onnxruntime.transformers' fusions), OpenVINO fp32 (f32
precision hint, LATENCY; THROUGHPUT for the record), OpenVINO with default
hints, OpenVINO NNCF int8 and ORT on segdeploy's int8 graph. The int8 graphs
are calibrated on the same images (segdeploy.export.quantize.calibration_batches).

Writes benchmarks/results/cpu_peers.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def make_b0(folder: Path) -> Path:
    """A random-init scratch:b0 (CamVid's 11 classes) at 512x512, exported at opset 17."""
    from random_segformer import random_segformer

    if not (folder / "onnx" / "model.onnx").is_file():
        id2label = {i: f"class{i}" for i in range(11)}
        random_segformer(folder, folder / "onnx", "b0", id2label, 512)
    return folder


def calibration(model_dir: Path, n: int) -> list[np.ndarray]:
    """n preprocessed images: CamVid training images when present, else synthetic ones."""
    from PIL import Image

    from segdeploy.data.synthetic import write_synthetic_folder
    from segdeploy.export.quantize import calibration_batches
    from segdeploy.runtime.processors import model_processor

    folder = CAMVID / "images" / "train"
    if not folder.is_dir():
        folder = write_synthetic_folder(model_dir / "synthetic", n_train=n, n_val=0, size=512)
        folder = folder / "images" / "train"
    images = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())[:n]]
    return list(calibration_batches(images, model_processor(model_dir).pixel_values))


# --- runners: each returns a callable batch -> logits ---------------------------------------


def ort_runner(path: Path, threads: int, **change):
    import onnxruntime as ort

    from segdeploy.runtime.providers import session_options

    opts = session_options(threads)
    if change.get("level") == "extended":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if change.get("no_spin"):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ov_runner(path: Path, threads: int, *, f32: bool = True, mode: str = "LATENCY"):
    import openvino as ov
    import openvino.properties as props

    from segdeploy.bench.openvino import compile_onnx

    if f32:
        compiled = compile_onnx(path, threads, mode=mode)
    else:  # OpenVINO's defaults, only the thread count set
        compiled = ov.Core().compile_model(str(path), "CPU", {props.inference_num_threads: threads})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0]


def transformers_fused(src: Path, dst: Path) -> Path:
    """onnxruntime.transformers' optimizer fusions (SkipLayerNorm, Attention, Gelu) only."""
    from onnxruntime.transformers.optimizer import optimize_model

    if not dst.is_file():
        model = optimize_model(str(src), model_type="vit", opt_level=0, use_gpu=False)
        model.save_model_to_file(str(dst))
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/segdeploy-cpu-peers"))
    ap.add_argument("--threads", type=int, default=2)
    # Many short rounds rather than few long ones: the load of a shared machine changes
    # within seconds, and a paired ratio only cancels what both sides of a pair saw.
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=1, help="timed calls per config per round")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--output", type=Path, default=RESULTS / "cpu_peers.json")
    args = ap.parse_args()

    from segdeploy.bench.openvino import nncf_int8_model
    from segdeploy.export.quantize import quantize_int8

    model_dir = make_b0(args.work / "b0")
    fp32 = model_dir / "onnx" / "model.onnx"
    calib = calibration(model_dir, args.calibration_images)
    int8 = model_dir / "onnx" / "model_int8.onnx"
    if not int8.is_file():
        quantize_int8(fp32, int8, iter(calib))
    nncf_xml = nncf_int8_model(fp32, calib, model_dir / "onnx" / "nncf_int8.xml")
    fused = transformers_fused(fp32, model_dir / "onnx" / "model_trf.onnx")

    t = args.threads
    configs = {
        "ORT fp32 (segdeploy today)": lambda: ort_runner(fp32, t),
        "ORT fp32, ORT_ENABLE_EXTENDED": lambda: ort_runner(fp32, t, level="extended"),
        "ORT fp32, no intra-op spinning": lambda: ort_runner(fp32, t, no_spin=True),
        "ORT fp32, transformers fusions": lambda: ort_runner(fused, t),
        "ORT fp32, transformers fusions + no spinning": lambda: ort_runner(fused, t, no_spin=True),
        "OpenVINO fp32 (f32 hint, LATENCY)": lambda: ov_runner(fp32, t),
        "OpenVINO fp32 (f32 hint, THROUGHPUT)": lambda: ov_runner(fp32, t, mode="THROUGHPUT"),
        "OpenVINO default hints": lambda: ov_runner(fp32, t, f32=False),
        "OpenVINO NNCF int8": lambda: ov_runner(nncf_xml, t),
        "ORT segdeploy int8 (model_int8.onnx)": lambda: ort_runner(int8, t),
    }
    base = next(iter(configs))
    runners = {name: make() for name, make in configs.items()}
    x1 = calib[0]
    ref = runners[base](x1).argmax(1)
    agreement = {n: float((r(x1).argmax(1) == ref).mean()) for n, r in runners.items()}

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {}
    for bs in batch_sizes:
        x = np.concatenate([calib[i % len(calib)] for i in range(bs)])
        for r in runners.values():
            r(x)  # warm-up
        times = {n: [] for n in runners}  # per round: median ms per image
        names = list(runners)
        for k in range(args.rounds):
            # Each round starts one configuration later, so that none always runs
            # right after the same neighbour (or first, after a pause).
            for name in names[k % len(names) :] + names[: k % len(names)]:
                r = runners[name]
                calls = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    r(x)
                    calls.append((time.perf_counter() - t0) * 1000 / bs)
                times[name].append(statistics.median(calls))
        results[bs] = {
            n: {
                "ms_per_image": round(statistics.median(v), 1),
                "rounds_ms": [round(a, 1) for a in v],
                # Paired by round: this config's time over ORT fp32's in the same round.
                "vs_ort_fp32": round(
                    statistics.median(a / b for a, b in zip(v, times[base], strict=True)), 3
                ),
            }
            for n, v in times.items()
        }

    report = {
        "command": ".venv/bin/python benchmarks/bench_cpu_peers.py " + " ".join(sys.argv[1:]),
        "model": "scratch:b0, random init, 512x512, opset 17",
        "threads": t,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "calibration_images": len(calib),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "loadavg": os.getloadavg()},
        "versions": _versions(),
        "agreement_with_ort_fp32_argmax": agreement,
        "results": {str(k): v for k, v in results.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    table = _table(report, batch_sizes)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    return 0


def _table(report, batch_sizes) -> str:
    head = "| runtime, graph | " + " | ".join(
        f"b{b} ms/img | b{b} vs ORT fp32" for b in batch_sizes
    )
    lines = [
        f"Model only, {report['model']}, {report['threads']} threads, median of "
        f"{report['rounds']} interleaved rounds; ratio = time / ORT fp32 time, paired by round "
        "(below 1 is faster).",
        "",
        head + " | argmax agreement |",
        "|---|" + "---:|" * (2 * len(batch_sizes) + 1),
    ]
    for name in report["results"][str(batch_sizes[0])]:
        cells = []
        for b in batch_sizes:
            r = report["results"][str(b)][name]
            cells += [f"{r['ms_per_image']:.1f}", f"{r['vs_ort_fp32']:.3f}"]
        agree = report["agreement_with_ort_fp32_argmax"][name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {agree:.2%} |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict[str, str]:
    import nncf
    import onnxruntime
    import openvino

    return {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
            "nncf": nncf.__version__}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
