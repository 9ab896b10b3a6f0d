"""int8 vs fp32 ONNX on the CPU: mean IoU on an evaluation split, and speed.

For each quantization setting asked for, it quantizes the fp32 graph
(segdeploy.export.quantize.quantize_int8, calibrated on training images), then measures
against the fp32 graph:

- accuracy: mean IoU against the ground truth of the evaluation split, both
  graphs run on the same preprocessed images and upsampled to the label size the
  same way (segdeploy.upsample_argmax), plus pixel agreement between the two;
- speed, end to end: `Segmenter.predict_batch` on decoded images (preprocess,
  model, upsample and argmax to the image size), images/s, variants interleaved
  round by round so that load from other processes hits them alike; best round
  and median are reported;
- speed of the model alone in CPU seconds per image on one thread: on a shared
  machine this is the steadiest measure of how much work each graph does.

    .venv/bin/python benchmarks/bench_int8.py --model models/camvid-b0 \\
        [--configs default,percentile,all] [--eval-images 101] [--speed-images 16]

The model folder is what `segdeploy train` writes, with the fp32 export in
onnx/; the evaluation and calibration data are those recorded in its
train_args.json unless --dataset is given. Writes
benchmarks/results/int8_cpu.json (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segdeploy.export.quantize import DEFAULT_FLOAT_OP_TYPES  # noqa: E402

# name -> keyword arguments of quantize_int8
CONFIGS: dict[str, dict] = {
    "default": {},
    "percentile": {"calibration_method": "percentile"},
    "entropy": {"calibration_method": "entropy"},
    "all": {"exclude_op_types": ()},  # nothing kept in float
    "no-softmax-only": {"exclude_op_types": ("Softmax",)},
    "float-add": {"exclude_op_types": (*DEFAULT_FLOAT_OP_TYPES, "Add")},
    "float-resize": {"exclude_op_types": (*DEFAULT_FLOAT_OP_TYPES, "Resize")},
    "int8-scores": {"float_attention_scores": False},
    "per-tensor": {"per_channel": False},
}


def eval_rows(spec_dict: dict, eval_images: int | None):
    from segdeploy.data import DatasetSpec, load_splits

    data = load_splits(DatasetSpec.from_dict(spec_dict), need_train=False)
    rows = data.eval
    if eval_images is not None:
        rows = rows.select(range(min(eval_images, len(rows))))
    return rows, data


def accuracy(onnx_path: Path, pre, rows, data, *, threads: int) -> tuple[dict, list[np.ndarray]]:
    import onnxruntime as ort

    from segdeploy import upsample_argmax
    from segdeploy.data import label_array
    from segdeploy.train.metrics import MeanIoU

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    metric = MeanIoU(data.num_labels, data.spec.ignore_index)
    preds = []
    for row in rows:
        labels = label_array(
            row["annotation"],
            reduce_labels=data.spec.reduce_labels,
            ignore_index=data.spec.ignore_index,
            num_labels=data.num_labels,
            where=row["name"],
        )
        logits = session.run(None, {name: pre.pixel_values([row["image"].convert("RGB")])})[0]
        pred = upsample_argmax(logits, labels.shape)[0]
        metric.update(pred, labels)
        preds.append(pred)
    return metric.compute(), preds


def cpu_seconds_per_image(onnx_path: Path, x: np.ndarray, repeats: int) -> float:
    """Process CPU time of one-thread runs: the graph's work, little affected by other load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.process_time()
        session.run(None, {name: x})
        times.append(time.process_time() - t)
    return min(times) / x.shape[0]


def end_to_end(folder: Path, variants: list[str], images: list, *, threads, rounds: int) -> dict:
    """images/s of Segmenter.predict_batch per variant, interleaved round by round."""
    from segdeploy import Segmenter

    segs = {v: Segmenter(folder, "cpu", v, threads=threads) for v in variants}
    for s in segs.values():
        s.predict_batch(images[:2])  # warm-up
    seconds = {v: [] for v in variants}
    for _ in range(rounds):
        for v, s in segs.items():
            t = time.perf_counter()
            s.predict_batch(images)
            seconds[v].append(time.perf_counter() - t)
    return {
        v: {
            "images_per_s_best": len(images) / min(ts),
            "images_per_s_median": len(images) / statistics.median(ts),
            "rounds": len(ts),
        }
        for v, ts in seconds.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, type=Path, help="trained model folder with onnx/")
    ap.add_argument("--configs", default="default", help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--dataset", default=None, help="JSON DatasetSpec; default: train_args.json")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=None, help="default: the whole split")
    ap.add_argument("--speed-images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (end to end)")
    ap.add_argument("--cpu-repeats", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/int8_cpu.json")
    args = ap.parse_args(argv)

    from segdeploy.export.quantize import quantize_int8, training_calibration_batches
    from segdeploy.runtime.processors import model_processor

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    onnx_dir = args.model / "onnx"
    fp32 = onnx_dir / "model.onnx"
    recorded = json.loads((args.model / "train_args.json").read_text())
    spec = json.loads(args.dataset) if args.dataset else recorded["dataset"]
    pre = model_processor(onnx_dir)
    rows, data = eval_rows(spec, args.eval_images)
    threads = args.threads

    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        # A scratch ONNX folder: the fp32 graph plus one model_<variant>.onnx per config.
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(onnx_dir / f, work / f)
        os.symlink(fp32.resolve(), work / "model.onnx")

        base_metrics, base_preds = accuracy(fp32, pre, rows, data, threads=threads or 2)
        results = {"fp32": {"mean_iou": base_metrics["mean_iou"]}}
        print(f"fp32 mean IoU {base_metrics['mean_iou']:.4f} on {len(rows)} images", flush=True)
        for name in names:
            out = work / f"model_{name}.onnx"
            report = quantize_int8(
                fp32,
                out,
                training_calibration_batches(args.model, args.calibration_images),
                **CONFIGS[name],
            )
            m, preds = accuracy(out, pre, rows, data, threads=threads or 2)
            agree = float(
                np.mean(
                    np.concatenate(
                        [(a == b).ravel() for a, b in zip(preds, base_preds, strict=True)]
                    )
                )
            )
            results[name] = {
                "mean_iou": m["mean_iou"],
                "mean_iou_drop": base_metrics["mean_iou"] - m["mean_iou"],
                "pixel_agreement": agree,
                "settings": CONFIGS[name],
                "report": report,
            }
            print(
                f"{name:16s} mean IoU {m['mean_iou']:.4f} drop {results[name]['mean_iou_drop']:+.4f}"
                f" agreement {agree:.4f} (quantized in {report['seconds']['total']:.0f} s)",
                flush=True,
            )

        if not args.no_speed:
            x = pre.pixel_values([rows[0]["image"].convert("RGB")])
            for v in ["fp32", *names]:
                path = fp32 if v == "fp32" else work / f"model_{v}.onnx"
                results[v]["cpu_ms_per_image_1thread"] = 1000 * cpu_seconds_per_image(
                    path, x, args.cpu_repeats
                )
            images = [
                rows[i]["image"].convert("RGB") for i in range(min(args.speed_images, len(rows)))
            ]
            speed = end_to_end(work, ["fp32", *names], images, threads=threads, rounds=args.rounds)
            for v, s in speed.items():
                results[v].update(s)
                results[v]["speedup_best"] = (
                    s["images_per_s_best"] / speed["fp32"]["images_per_s_best"]
                )
                results[v]["speedup_median"] = (
                    s["images_per_s_median"] / speed["fp32"]["images_per_s_median"]
                )
                results[v]["cpu_speedup_1thread"] = (
                    results["fp32"]["cpu_ms_per_image_1thread"]
                    / results[v]["cpu_ms_per_image_1thread"]
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "model": str(args.model),
        "image_size": list(pre.size) if pre.size else None,
        "dataset": spec,
        "eval_images": len(rows),
        "calibration_images": args.calibration_images,
        "threads": threads,
        "results": results,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    print(f"\n{'variant':16s} {'mIoU':>7s} {'drop':>7s} {'agree':>7s} {'img/s best':>10s} "
          f"{'x fp32':>7s} {'img/s med':>10s} {'x fp32':>7s} {'1-thread CPU ms':>16s} {'x fp32':>7s}")  # fmt: skip
    for v, r in results.items():
        print(
            f"{v:16s} {r['mean_iou']:7.4f} {r.get('mean_iou_drop', 0):+7.4f} "
            f"{r.get('pixel_agreement', 1):7.4f} {r.get('images_per_s_best', float('nan')):10.2f} "
            f"{r.get('speedup_best', float('nan')):7.2f} {r.get('images_per_s_median', float('nan')):10.2f} "
            f"{r.get('speedup_median', float('nan')):7.2f} {r.get('cpu_ms_per_image_1thread', float('nan')):16.1f} "
            f"{r.get('cpu_speedup_1thread', float('nan')):7.2f}"
        )
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
