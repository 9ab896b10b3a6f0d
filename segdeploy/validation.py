"""Prove an ONNX export faithful: run it and the PyTorch model on the same images, compare.

Both models see the very same `pixel_values` (the SegformerImageProcessor of the
PyTorch model folder), and both sets of logits go through the one function
`upsample_argmax` (bilinear to the label size, align_corners=False, as in the
Hugging Face semantic-segmentation guide) before the mean IoU is accumulated.
Images are streamed in small batches: only confusion matrices and running sums
are kept, never the logits of the whole split.

The verdict: the export passes when every rule it is held to passes (the report
lists them in "rules" and the failing ones in "failed_rules"): its mean IoU is
within `tolerance` of PyTorch's, either way (an export that scores higher is as
unfaithful as one that scores lower); its label maps agree with PyTorch's on at
least MIN_AGREEMENT of the pixels for its precision; and an fp32 graph's logits
match PyTorch's (DEFAULT_LOGIT_TOLERANCE), since mean IoU alone cannot see a
change to classes the model never predicts. Without labelled data, the logits of
random images are compared instead, which proves less: it is said so in the report.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import write_json
from segdeploy.errors import SegdeployError
from segdeploy.export import VARIANTS, num_labels_of, read_segformer_config
from segdeploy.runtime.segmenter import OUTPUT_SIZE_INPUT

log = logging.getLogger(__name__)

#: Largest allowed change of mean IoU (absolute, either way), per graph precision.
DEFAULT_TOLERANCE = {"fp32": 0.001, "fp16": 0.005, "int8": 0.01}
#: Largest allowed max |logit difference|, relative to the largest |logit| of PyTorch
#: (or 1, whichever is larger): for every graph without labelled data, for fp32 graphs
#: always. fp32 measured 1e-7..4e-6 relative (max |delta| 4.3e-6, CamVid b0,
#: benchmarks/results/camvid_validation_fp32.json), so 1e-3 fails only a changed graph.
DEFAULT_LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
#: Smallest share of pixels whose label equals PyTorch's, per precision, for every
#: graph (with or without data). Measured: fp32 100.000% (CamVid b0, 101 val images,
#: benchmarks/results/camvid_validation_fp32.json; and the tiny test model), fp16
#: 99.997% (tiny model, README), int8 99.757% (CamVid b0,
#: benchmarks/results/camvid_validation_int8.json). The untrained tiny test model
#: measured fp32 100.000%, fp16 99.951%, int8 98.33% on 8 synthetic images: with
#: random weights nearly every pixel is a near tie that int8 rounding flips, so
#: its int8 graph fails the floor, as it should fail any model it is that unsure
#: of. Each floor leaves room below the trained models' measurements and still
#: fails a graph that changes decisions the model is sure of.
MIN_AGREEMENT = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}
#: Graphs with argmax fused in (`export --fuse-argmax`) return labels, not logits;
#: they are judged by agreement with PyTorch's label maps (issue 7: 99.9%).
FUSED_MIN_AGREEMENT = 0.999
RANDOM_INPUT_NOTE = (
    "no labelled data: compared logits on random images only, which proves less than "
    "mean IoU on real images (pass --dataset to validate on data)"
)
_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
}


# ---------------------------------------------------------------- what to compare with


def recorded_dataset(model_dir: str | os.PathLike):
    """The DatasetSpec that `segdeploy train` recorded in train_args.json, or None."""
    from segdeploy.data import DatasetSpec

    path = Path(model_dir) / "train_args.json"
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("dataset")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise SegdeployError(path, f"unreadable: {err}") from err
    if not recorded:
        return None
    try:
        return DatasetSpec.from_dict(recorded)
    except (TypeError, ValueError, KeyError) as err:
        raise SegdeployError(path, f"the recorded dataset is not a DatasetSpec: {err}") from err


def resolve_dataset(
    model_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    split: str | None = None,
    reduce_labels: bool | None = None,
    ignore_index: int | None = None,
    id2label_file: str | None = None,
):
    """The data to validate on: the options given, else what train recorded, else None.

    `split` is the split to validate on as a whole (e.g. "val", "validation[:50]").
    `dataset` without `split` validates on the held-out part that `segdeploy train`
    would evaluate on with the same dataset. The label options override the
    recorded ones.
    """
    from segdeploy.data import DatasetSpec

    recorded = recorded_dataset(model_dir)
    if dataset is None and recorded is None:
        if split is not None or reduce_labels is not None or ignore_index is not None:
            raise SegdeployError(
                "--split", f"no dataset recorded in {model_dir}/train_args.json: pass --dataset too"
            )
        return None
    if dataset is not None and (recorded is None or recorded.name != dataset):
        spec = DatasetSpec(dataset)
    else:
        spec = recorded
    changes: dict[str, Any] = {}
    if split is not None:
        changes.update(split=split, eval_split=split)
    if reduce_labels is not None:
        changes["reduce_labels"] = reduce_labels
    if ignore_index is not None:
        changes["ignore_index"] = ignore_index
    if id2label_file is not None:
        changes["id2label_file"] = id2label_file
    return replace(spec, **changes) if changes else spec


def load_validation_data(spec, *, num_labels: int):
    """Load the evaluation split of `spec`; SegdeployError if its classes do not fit the model."""
    from segdeploy.data import load_splits

    data = load_splits(spec, need_train=False)
    if len(data.id2label) != num_labels:
        raise SegdeployError(
            "--dataset",
            f"{spec.name} has {len(data.id2label)} classes but the model has {num_labels}",
        )
    if len(data.eval) == 0:
        raise SegdeployError("--split", f"the evaluation split of {spec.name} is empty")
    return data


# ---------------------------------------------------------------- graphs


def validation_path(onnx_path: str | os.PathLike) -> Path:
    """validation.json for model.onnx, validation_<variant>.json for model_<variant>.onnx."""
    onnx_path = Path(onnx_path)
    stem = onnx_path.stem
    if stem == "model":
        return onnx_path.with_name("validation.json")
    return onnx_path.with_name(f"validation_{stem.removeprefix('model_')}.json")


def load_graph(onnx_path: str | os.PathLike):
    """The ONNX model, checked; SegdeployError when missing or corrupt."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SegdeployError(onnx_path, "no such ONNX graph (run `segdeploy export` first)")
    try:
        model = onnx.load(onnx_path)
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, OSError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SegdeployError(onnx_path, f"not a valid ONNX graph: {first}") from err
    return model


def graph_precision(model) -> str:
    """'int8' when quantised, 'fp16' when it holds float16 weights, else 'fp32'."""
    from onnx import TensorProto

    if any(node.op_type in _INT8_OPS for node in model.graph.node):
        return "int8"
    if any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def graph_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ---------------------------------------------------------------- comparison


def upsample_argmax(logits, size: tuple[int, int]) -> np.ndarray:
    """Class map at `size` from logits [C, h, w]: bilinear (align_corners=False), then argmax.

    The one function both models' logits go through, so that any difference in the
    predictions comes from the models, not from post-processing.
    """
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    up = torch.nn.functional.interpolate(
        logits[None], size=tuple(size), mode="bilinear", align_corners=False
    )
    # numpy's argmax: same first-maximum rule as torch.argmax, but ~4x faster over
    # the outer class axis (torch's CPU argmax reduces a strided dim slowly).
    return up[0].numpy().argmax(0)


class _GraphStats:
    """Running comparison of one ONNX graph with PyTorch."""

    def __init__(self, metric, session, provider: str):
        self.metric = metric
        self.session = session
        self.provider = provider
        self.fused = any(i.name == OUTPUT_SIZE_INPUT for i in session.get_inputs())
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.n_logits = 0
        self.agree = 0
        self.pixels = 0
        self.seconds = 0.0

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        (logits,) = self.session.run(["logits"], {"pixel_values": pixel_values})
        self.seconds += time.perf_counter() - start
        return np.asarray(logits, dtype=np.float32)

    def run_labels(self, pixel_values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A fused graph's label map at `size` for one image ([1, 3, h, w] input)."""
        start = time.perf_counter()
        (labels,) = self.session.run(
            None,
            {"pixel_values": pixel_values, OUTPUT_SIZE_INPUT: np.asarray(size, dtype=np.int64)},
        )
        self.seconds += time.perf_counter() - start
        return labels[0]

    def add_logits(self, ref: np.ndarray, got: np.ndarray) -> None:
        diff = np.abs(ref - got)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum(dtype=np.float64))
        self.n_logits += diff.size

    def add_prediction(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.agree += int((ref == got).sum())
        self.pixels += ref.size


def _make_metric(data, num_labels: int):
    if data is None:  # random inputs: nothing to score against
        return None
    from segdeploy.metrics import MeanIoU

    return MeanIoU(num_labels, ignore_index=data.spec.ignore_index)


def _labelled_batches(data, batch_size: int, num_labels: int) -> Iterator[tuple[list, list]]:
    """(RGB images, label maps) of data.eval; a bad file raises SegdeployError naming it."""
    from segdeploy.data import iter_examples

    examples = iter_examples(data, "eval", num_labels)
    while batch := list(itertools.islice(examples, batch_size)):
        yield [image for image, _, _ in batch], [labels for _, labels, _ in batch]


def _random_batches(n: int, batch_size: int, size: tuple[int, int]) -> Iterator[tuple[list, None]]:
    images = _random_images(n, size)
    for start in range(0, n, batch_size):
        yield images[start : start + batch_size], None


def _random_images(n: int, size: tuple[int, int], seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), mode="RGB")
        for _ in range(n)
    ]


def _processor_size(processor) -> tuple[int, int]:
    size = getattr(processor, "size", None) or {}
    return int(size.get("height", 64)), int(size.get("width", 64))


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def validate_graphs(
    onnx_paths: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    *,
    data=None,
    max_images: int | None = None,
    tolerance: float | None = None,
    logit_tolerance: float | None = None,
    provider: str = "cpu",
    fallback: bool = False,
    batch_size: int = 4,
    random_inputs: int = 4,
    threads: int | None = None,
    onnx_dir_name: str | os.PathLike | None = None,
    skip_unrunnable: Sequence[str] = (),
    write: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Validate several graphs of one folder against the PyTorch model in one pass.

    PyTorch runs once per batch; every graph runs on the same `pixel_values`.
    `data` is a SegmentationData (see `load_validation_data`) or None for the
    random-input check on `random_inputs` images. `tolerance`/`logit_tolerance`
    None -> the default of each graph's precision. A graph whose precision is in
    `skip_unrunnable` and that the provider cannot load gets a "skipped" report
    instead of an error. Each report is written (atomically) to
    `validation_path(graph)` unless `write` is False; `onnx_dir_name` is the folder
    name recorded in the reports (the export validates inside a temporary folder).
    `threads` sets both PyTorch's and onnxruntime's intra-op threads (None: their
    defaults). Returns {graph file name: report}.
    """
    if batch_size < 1:
        raise SegdeployError("--batch-size", "must be at least 1")
    if threads is not None and threads < 1:
        raise SegdeployError("--threads", "must be at least 1")
    model_dir = Path(model_dir)
    config = read_segformer_config(model_dir, need_weights=True)
    num_labels = num_labels_of(config)
    id2label = {int(k): v for k, v in config.get("id2label", {}).items()}
    graphs = [_inspect(p) for p in onnx_paths]  # every graph checked before any runs
    stats, reports = _open_sessions(
        graphs, provider, fallback, threads, data, num_labels, skip_unrunnable
    )
    if data is not None and max_images is not None and max_images < len(data.eval):
        data = replace(data, eval=data.eval.select(range(max_images)))

    start = time.perf_counter()
    with _torch_threads(threads):
        run = _compare(model_dir, stats, data, num_labels, batch_size, random_inputs, progress)
    run["total_s"] = time.perf_counter() - start

    for path, precision, opset in graphs:
        if path.name in stats:
            report = _report(path, precision, opset, stats[path.name], run, data)
            report["onnx_dir"] = os.fspath(onnx_dir_name if onnx_dir_name else path.parent)
            report["torch_model"] = os.fspath(model_dir)
            _judge(report, stats[path.name], run, data, id2label, tolerance, logit_tolerance)
            report["timings"] = _timings(run, stats[path.name])
            reports[path.name] = report
        if write:
            write_json(validation_path(path), reports[path.name])
    return {path.name: reports[path.name] for path, _, _ in graphs}


def _judge(report, st, run, data, id2label, tolerance, logit_tolerance) -> None:
    """Hold the graph to its rules (see the module docstring); sets passed and failed_rules."""
    if data is not None:
        _judge_miou(report, run["torch_iou"], st.metric.compute(), id2label, tolerance)
    else:
        _mark_random_inputs(report)
    if st.fused:  # labels, not logits: only agreement can be compared
        _judge_agreement(report, FUSED_MIN_AGREEMENT, "fused_agreement")
    else:
        if data is None or report["precision"] == "fp32":
            _judge_logits(report, run["logit_scale"], logit_tolerance)
        _judge_agreement(report, MIN_AGREEMENT[report["precision"]], "pixel_agreement")
    _verdict(report)


def _inspect(path: str | os.PathLike) -> tuple[Path, str, int]:
    model = load_graph(path)
    return Path(path), graph_precision(model), graph_opset(model)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    # On a busy machine, OpenMP threads that wait on each other can make PyTorch
    # several times slower than one thread; `threads` lets the user choose.
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _open_sessions(graphs, provider, fallback, threads, data, num_labels, skip_unrunnable):
    """A running comparison per graph, and "skipped" reports for those that cannot run."""
    from segdeploy.runtime.providers import active_provider, create_session

    stats: dict[str, _GraphStats] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for path, precision, opset in graphs:
        try:
            session = create_session(path, provider, fallback=fallback, threads=threads)
        except SegdeployError as err:
            if precision not in skip_unrunnable:
                raise
            skipped[path.name] = _skipped_report(path, precision, opset, provider, str(err))
            log.warning("not validating %s: %s", path.name, err)
            continue
        metric = _make_metric(data, num_labels)
        stats[path.name] = _GraphStats(metric, session, active_provider(session))
    return stats, skipped


def _compare(model_dir, stats, data, num_labels, batch_size, random_inputs, progress) -> dict:
    """Run PyTorch and every graph over the images, batch by batch; returns run-wide figures."""
    import torch
    from tqdm import tqdm
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    t = time.perf_counter()
    torch_model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SegformerImageProcessor.from_pretrained(model_dir)
    load_s = time.perf_counter() - t
    image_size = _processor_size(processor)
    torch_metric = _make_metric(data, num_labels)
    if data is not None:
        n_images = len(data.eval)
        batches = _labelled_batches(data, batch_size, num_labels)
    else:
        n_images = random_inputs
        batches = _random_batches(random_inputs, batch_size, image_size)
    run = {"images": n_images, "image_size": list(image_size), "logit_scale": 0.0}
    run.update(load_s=load_s, torch_threads=torch.get_num_threads())
    run.update(preprocess_s=0.0, torch_s=0.0, postprocess_s=0.0)

    # A context, so that an error mid-way clears the bar before the message is printed.
    with tqdm(
        total=n_images, unit="image", leave=False, desc="validating", disable=not progress
    ) as bar:
        while True:
            t = time.perf_counter()
            batch = next(batches, None)  # decoding is timed with the preprocessing
            if batch is None:
                break
            images, labels = batch
            pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
            pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
            run["preprocess_s"] += time.perf_counter() - t

            t = time.perf_counter()
            with torch.inference_mode():
                ref = torch_model(pixel_values=torch.from_numpy(pixel_values)).logits.numpy()
            run["torch_s"] += time.perf_counter() - t
            run["logit_scale"] = max(run["logit_scale"], float(np.abs(ref).max()))

            outputs = {}
            for name, st in stats.items():
                if st.fused:  # runs per image below: its output size is the label size
                    continue
                got = st.run(pixel_values)
                if got.shape != ref.shape:
                    raise SegdeployError(
                        name,
                        f"outputs logits of shape {list(got.shape)} where the PyTorch model in "
                        f"{model_dir} gives {list(ref.shape)}: not an export of this model",
                    )
                st.add_logits(ref, got)
                outputs[name] = got

            t = time.perf_counter()
            for i, image in enumerate(images):
                size = labels[i].shape if labels is not None else (image.height, image.width)
                ref_pred = upsample_argmax(ref[i], size)
                if labels is not None:
                    torch_metric.update(ref_pred, labels[i])
                for name, st in stats.items():
                    if st.fused:
                        pred = st.run_labels(pixel_values[i : i + 1], tuple(size))
                    else:
                        pred = upsample_argmax(outputs[name][i], size)
                    st.add_prediction(ref_pred, pred)
                    if labels is not None:
                        st.metric.update(pred, labels[i])
            run["postprocess_s"] += time.perf_counter() - t
            bar.update(len(images))
    run["torch_iou"] = torch_metric.compute() if torch_metric is not None else None
    return run


def _report(path: Path, precision: str, opset: int, st: _GraphStats, run: dict, data) -> dict:
    return {
        "graph": path.name,
        "onnx_dir": None,
        "torch_model": None,
        "precision": precision,
        "opset": opset,
        "provider": st.provider,
        "mode": "dataset" if data is not None else "random_inputs",
        "dataset": data.spec.to_dict() if data is not None else None,
        "images": run["images"],
        "image_size": run["image_size"],
        "pixel_agreement": st.agree / st.pixels if st.pixels else None,
        "max_abs_logit_diff": st.max_abs if st.n_logits else None,
        "mean_abs_logit_diff": st.sum_abs / st.n_logits if st.n_logits else None,
        "fused_argmax": st.fused,
    }


def _timings(run: dict, st: _GraphStats) -> dict[str, float]:
    return {
        "total_s": round(run["total_s"], 3),
        "load_s": round(run["load_s"], 3),
        "preprocess_s": round(run["preprocess_s"], 3),
        "torch_s": round(run["torch_s"], 3),
        "onnx_s": round(st.seconds, 3),
        "onnx_ms_per_image": round(1000 * st.seconds / max(run["images"], 1), 2),
        "postprocess_s": round(run["postprocess_s"], 3),
        "torch_threads": run["torch_threads"],
    }


def _rule(report: dict, name: str, ok: bool, text: str) -> None:
    """Record one rule's verdict; the report passes only when every rule it was held to does."""
    report.setdefault("rules", {})[name] = {"passed": bool(ok), "reason": text}


def _verdict(report: dict) -> None:
    rules = report.get("rules", {})
    report["failed_rules"] = [name for name, r in rules.items() if not r["passed"]]
    report["passed"] = not report["failed_rules"]
    report["reason"] = "; ".join(r["reason"] for r in rules.values())
    if report["failed_rules"]:
        report["reason"] += f" (failed: {', '.join(report['failed_rules'])})"


def _judge_miou(report, torch_result, onnx_result, id2label, tolerance) -> None:
    tol = DEFAULT_TOLERANCE[report["precision"]] if tolerance is None else float(tolerance)
    t_miou, o_miou = _finite(torch_result["mean_iou"]), _finite(onnx_result["mean_iou"])
    drop = None if t_miou is None or o_miou is None else t_miou - o_miou
    report.update(
        mean_iou_torch=t_miou,
        mean_iou_onnx=o_miou,
        mean_iou_drop=drop,
        tolerance=tol,
        per_class_iou=[
            {"id": i, "class": id2label.get(i, str(i)), "torch": _finite(t), "onnx": _finite(o)}
            for i, (t, o) in enumerate(
                zip(torch_result["per_category_iou"], onnx_result["per_category_iou"], strict=True)
            )
        ],
    )
    if drop is None:
        _rule(report, "mean_iou", False, "no labelled pixels: mean IoU is undefined")
    else:
        # A small epsilon: a drop equal to the tolerance must not fail on float rounding.
        ok = abs(drop) <= tol + 1e-12
        _rule(
            report,
            "mean_iou",
            ok,
            f"mean IoU {'dropped' if drop >= 0 else 'rose'} by {abs(drop):.5f}, "
            f"{'within' if ok else 'beyond'} the tolerance {tol}",
        )


def _judge_logits(report, logit_scale, logit_tolerance) -> None:
    """max |logit difference| within a tolerance relative to PyTorch's largest |logit|.

    Held to by every graph without labelled data, and by fp32 graphs always: mean
    IoU alone passed an fp32 graph with the classifier rows of two never-predicted
    classes swapped (max |delta logit| 0.78, issue 12).
    """
    tol = (
        DEFAULT_LOGIT_TOLERANCE[report["precision"]]
        if logit_tolerance is None
        else float(logit_tolerance)
    )
    allowed = tol * max(1.0, logit_scale)
    ok = report["max_abs_logit_diff"] <= allowed
    report.update(logit_tolerance=tol, max_abs_logit_allowed=allowed)
    _rule(
        report,
        "logits",
        ok,
        f"max |logit difference| {report['max_abs_logit_diff']:.3g} "
        f"{'within' if ok else 'beyond'} {allowed:.3g}",
    )


def _mark_random_inputs(report) -> None:
    report.update(mean_iou_torch=None, mean_iou_onnx=None, mean_iou_drop=None, tolerance=None)
    report["note"] = RANDOM_INPUT_NOTE


def _judge_agreement(report, floor: float, name: str) -> None:
    """Label maps equal to PyTorch's on at least `floor` of the pixels."""
    agreement = report["pixel_agreement"] or 0.0
    ok = agreement >= floor
    report["min_pixel_agreement"] = floor
    _rule(
        report,
        name,
        ok,
        f"label maps agree with PyTorch on {100 * agreement:.3f}% of pixels, "
        f"{'at least' if ok else 'below'} {100 * floor:g}%",
    )


def _skipped_report(path: Path, precision: str, opset: int, provider: str, why: str) -> dict:
    variant = next((v for v, f in VARIANTS.items() if f == path.name), None)
    hint = f"--variant {variant}" if variant else f"--graph {path.name}"
    return {
        "graph": path.name,
        "precision": precision,
        "opset": opset,
        "provider": provider,
        "passed": None,
        "skipped": True,
        "reason": (
            f"onnxruntime cannot run this graph on {provider} ({why}); validate it where it "
            f"runs, e.g. `segdeploy validate ONNX_DIR {hint} --provider cuda`"
        ),
    }


def validate_onnx(
    onnx_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    data=None,
    max_images: int | None = None,
    tolerance: float | None = None,
    logit_tolerance: float | None = None,
    provider: str = "cpu",
    fallback: bool = False,
    batch_size: int = 4,
    random_inputs: int = 4,
    threads: int | None = None,
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Validate one ONNX graph against the PyTorch model in `model_dir`; returns the report.

    The report is also written to `validation_path(onnx_path)` unless `write` is False.
    """
    reports = validate_graphs(
        [onnx_path],
        model_dir,
        data=data,
        max_images=max_images,
        tolerance=tolerance,
        logit_tolerance=logit_tolerance,
        provider=provider,
        fallback=fallback,
        batch_size=batch_size,
        random_inputs=random_inputs,
        threads=threads,
        write=write,
        progress=progress,
    )
    return reports[Path(onnx_path).name]


# ---------------------------------------------------------------- display


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def summary_table(reports: Sequence[dict[str, Any]]):
    """One column per graph (PyTorch first): the figures that decide, and the verdict."""
    from rich.table import Table

    table = Table(title="ONNX export vs PyTorch", title_justify="left")
    table.add_column("")
    table.add_column("torch", justify="right")
    for r in reports:
        table.add_column(r["graph"], justify="right")
    ran = [r for r in reports if not r.get("skipped")]
    first = ran[0] if ran else {}

    def row(label: str, torch_cell: str, cell) -> None:
        table.add_row(label, torch_cell, *["-" if r.get("skipped") else cell(r) for r in reports])

    row("mean IoU", _fmt(first.get("mean_iou_torch")), lambda r: _fmt(r.get("mean_iou_onnx")))
    row("mIoU drop", "", lambda r: _fmt(r.get("mean_iou_drop"), 5))
    row(
        "tolerance",
        "",
        lambda r: (
            _fmt(r["tolerance"])
            if r.get("tolerance") is not None
            else f"logits {r['logit_tolerance']:g}"
        ),
    )
    row("pixel agreement", "", lambda r: _pct(r.get("pixel_agreement")))
    row("max |Δ logit|", "", lambda r: _sci(r.get("max_abs_logit_diff")))
    row("mean |Δ logit|", "", lambda r: _sci(r.get("mean_abs_logit_diff")))
    row("images", str(first.get("images", "-")), lambda r: str(r["images"]))
    row("precision, opset", "fp32", lambda r: f"{r['precision']}, {r['opset']}")
    row("provider", "cpu", lambda r: r["provider"])
    row(
        "run time",
        f"{first['timings']['torch_s']:.1f}s" if first else "-",
        lambda r: f"{r['timings']['onnx_s']:.1f}s",
    )
    table.add_row(
        "result",
        "",
        *[
            "[yellow]SKIPPED"
            if r.get("skipped")
            else ("[green]PASS" if r["passed"] else "[bold red]FAIL")
            for r in reports
        ],
    )
    return table


def class_table(reports: Sequence[dict[str, Any]]):
    """Per-class IoU of PyTorch and of each graph (dataset mode only); None otherwise."""
    from rich.table import Table

    with_classes = [r for r in reports if r.get("per_class_iou")]
    if not with_classes:
        return None
    table = Table(title="IoU per class", title_justify="left")
    table.add_column("class")
    table.add_column("torch", justify="right")
    for r in with_classes:
        table.add_column(r["graph"], justify="right")
    for i, row in enumerate(with_classes[0]["per_class_iou"]):
        table.add_row(
            row["class"],
            _fmt(row["torch"]),
            *[_fmt(r["per_class_iou"][i]["onnx"]) for r in with_classes],
        )
    return table


def print_reports(reports: Sequence[dict[str, Any]], console=None) -> None:
    """The tables and, for each graph, the reason of its verdict."""
    from rich.console import Console

    console = console or Console()
    classes = class_table(reports)
    if classes is not None:
        console.print(classes)
    console.print(summary_table(reports))
    notes = {r["note"] for r in reports if r.get("note")}
    for note in sorted(notes):
        console.print(f"[yellow]note[/]: {note}")
    for r in reports:
        console.print(f"{r['graph']}: {r['reason']}", highlight=False)
