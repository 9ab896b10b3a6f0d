"""Run PyTorch and every ONNX graph over the same images, batch by batch, and keep running sums.

Both models see the very same `pixel_values` (the family's image processor of the
PyTorch model folder, e.g. SegformerImageProcessor), and both sets of logits go through the one function
`upsample_argmax` before the mean IoU is accumulated. Images are streamed in
small batches: only confusion matrices and running sums are kept, never the
logits of the whole split.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError, first_line
from segdeploy.folders import OUTPUT_SIZE_INPUT
from segdeploy.train.torch_ops import upsample_bilinear
from segdeploy.validate.data import labelled_batches, random_batches
from segdeploy.validate.report import skipped_report

log = logging.getLogger(__name__)


def upsample_argmax(logits, size: tuple[int, int]) -> np.ndarray:
    """Class map at `size` from logits [C, h, w]: bilinear (align_corners=False), then argmax.

    The one function both models' logits go through, so that any difference in the
    predictions comes from the models, not from post-processing.
    """
    import torch

    up = upsample_bilinear(torch.as_tensor(logits, dtype=torch.float32)[None], size)
    # numpy's argmax: same first-maximum rule as torch.argmax, but ~4x faster over
    # the outer class axis (torch's CPU argmax reduces a strided dim slowly).
    return up[0].numpy().argmax(0)


class GraphStats:
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
        #: The logits check at a second input size, for graphs with dynamic spatial axes.
        self.second_size: dict[str, Any] | None = None

    @property
    def dynamic_spatial(self) -> bool:
        """Whether the graph's input height and width are dynamic (named, not numbers)."""
        shape = self.session.get_inputs()[0].shape
        return len(shape) == 4 and not all(isinstance(d, int) for d in shape[2:])

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


def make_metric(data, num_labels: int):
    if data is None:  # random inputs: nothing to score against
        return None
    from segdeploy.train.metrics import MeanIoU

    return MeanIoU(num_labels, ignore_index=data.spec.ignore_index)


def processor_size(processor) -> tuple[int, int]:
    """The (height, width) of the processor's outputs, for random inputs: its crop when it
    crops, else its resize (a shortest edge gives a square)."""
    crops = getattr(processor, "do_center_crop", False)
    size = (processor.crop_size if crops else getattr(processor, "size", None)) or {}
    side = size.get("shortest_edge", 64)
    return int(size.get("height", side)), int(size.get("width", side))


def open_sessions(graphs, provider, fallback, threads, data, num_labels, skip_unrunnable):
    """A running comparison per graph, and "skipped" reports for those that cannot run.

    An OpenVINO IR graph runs on OpenVINO whatever `provider` says: it has no other runtime.
    """
    from segdeploy.runtime.openvino_runner import is_ir
    from segdeploy.runtime.providers import OPENVINO, active_provider, create_session

    stats: dict[str, GraphStats] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for path, precision, opset in graphs:
        where = OPENVINO if is_ir(path) else provider
        try:
            session = create_session(path, where, fallback=fallback, threads=threads)
        except SegdeployError as err:
            if precision not in skip_unrunnable:
                raise
            skipped[path.name] = skipped_report(path, precision, opset, provider, str(err))
            log.warning("not validating %s: %s", path.name, err)
            continue
        metric = make_metric(data, num_labels)
        stats[path.name] = GraphStats(metric, session, active_provider(session))
    return stats, skipped


def compare(model_dir, stats, data, num_labels, batch_size, random_inputs, progress) -> dict:
    """Run PyTorch and every graph over the images, batch by batch; returns run-wide figures."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForSemanticSegmentation

    from segdeploy.families import family_of, processor_class

    t = time.perf_counter()
    family = family_of(model_dir)
    torch_model = AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = processor_class(family).from_pretrained(model_dir)
    load_s = time.perf_counter() - t
    image_size = processor_size(processor)
    torch_metric = make_metric(data, num_labels)
    if data is not None:
        n_images = len(data.eval)
        batches = labelled_batches(data, batch_size, num_labels)
    else:
        n_images = random_inputs
        batches = random_batches(random_inputs, batch_size, image_size)
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
    check_second_size(torch_model, stats, image_size, family)
    return run


def second_size(image_size: tuple[int, int], square_only: bool) -> tuple[int, int]:
    """Another input size than the one validated: height +36 and width +68, so that a graph
    right only at square inputs or at multiples of 32 (padding and pooling traced for
    them) shows; kept square where the family needs it."""
    h, w = image_size
    return (h + 36, w + 36) if square_only else (h + 36, w + 68)


def check_second_size(torch_model, stats: dict[str, GraphStats], image_size, family) -> None:
    """Compare the logits of every fp32 graph with dynamic spatial axes with PyTorch's at a
    second size (two seeded random images): a dynamic graph that is only right at the
    traced size (UPerNet's pooling, MobileNetV2's TF padding) is caught here."""
    import torch

    graphs = [st for st in stats.values() if not st.fused and st.dynamic_spatial]
    if not graphs:
        return
    size = second_size(image_size, family.square_only)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *size, generator=gen)
    with torch.inference_mode():
        ref = torch_model(pixel_values=pixels).logits.numpy()
    for st in graphs:
        st.second_size = {"size": list(size), "logit_scale": float(np.abs(ref).max())}
        try:
            (got,) = st.session.run(["logits"], {"pixel_values": pixels.numpy()})
        except Exception as err:  # onnxruntime's Fail: a shape traced into the graph
            st.second_size.update(max_abs_logit_diff=float("inf"), error=first_line(err))
            continue
        same = got.shape == ref.shape
        st.second_size["max_abs_logit_diff"] = (
            float(np.abs(ref - got).max()) if same else float("inf")
        )
        if not same:
            st.second_size["error"] = (
                f"logits {list(got.shape)} where PyTorch gives {list(ref.shape)}"
            )
