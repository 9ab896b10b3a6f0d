"""`segdeploy validate --tile`: PyTorch and every ONNX graph through the same sliding-window
inference, so that the report proves the tiled deployment, not the resized one.

The windows, their inputs and the blending are segdeploy.runtime.tiles' (the
code `segdeploy infer --tile` runs): each batch of windows is cut and
normalised once, run through the PyTorch model and through every graph, and
each model's logits go to a blender of its own. The logits of every window are
compared (max/mean |difference|), the label maps pixel by pixel, and with
labelled data each model's mean IoU at the images' own size.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.runtime.large_image import ArraySource
from segdeploy.runtime.tile_blend import TileBlender
from segdeploy.runtime.tiles import (
    TileOptions,
    TilePlan,
    graph_spatial_size,
    plan_tiles,
    window_batches,
)
from segdeploy.validate.compare import make_metric
from segdeploy.validate.data import labelled_batches, random_batches


def plan_for_graphs(options: TileOptions, stats, processor, family) -> TilePlan:
    """The tiling every graph can run: a fixed-size graph's size (all must agree)."""
    sizes = set()
    for name, st in stats.items():
        if st.fused:
            raise SegdeployError(
                name, "has argmax fused in and returns labels; tiling blends logits"
            )
        sizes.add(graph_spatial_size(st.session.get_inputs()[0].shape))
    fixed = [s for s in sizes if s is not None]
    if len(set(fixed)) > 1:
        raise SegdeployError("--tile", f"the graphs take different fixed sizes: {sorted(fixed)}")
    return plan_tiles(
        options,
        graph_size=fixed[0] if fixed else None,
        processor=processor,
        square_only=family.square_only,
        where="preprocessor_config.json",
    )


def tiled_images(data, batch_size: int, num_labels: int, random_inputs: int, plan: TilePlan):
    """(images, labels or None) batches: the dataset's, or random images 2.5 tiles on a side
    (so that windows overlap and the border shift happens)."""
    if data is not None:
        return len(data.eval), labelled_batches(data, batch_size, num_labels)
    size = (plan.tile[0] * 5 // 2, plan.tile[1] * 5 // 2)
    return random_inputs, random_batches(random_inputs, batch_size, size)


def compare_tiled(
    model_dir, stats, data, num_labels, batch_size, random_inputs, progress, options
) -> dict:
    """`validate.compare.compare`'s run, tiled: returns the same run-wide figures, with
    `tiles` (the plan) added."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForSemanticSegmentation

    from segdeploy.families import family_of
    from segdeploy.runtime.processors import model_processor

    t = time.perf_counter()
    family = family_of(model_dir)
    torch_model = AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = model_processor(model_dir)
    plan = plan_for_graphs(options, stats, processor, family)
    run: dict[str, Any] = {
        "load_s": time.perf_counter() - t,
        "torch_threads": torch.get_num_threads(),
    }
    n_images, batches = tiled_images(data, batch_size, num_labels, random_inputs, plan)
    run.update(images=n_images, image_size=list(plan.tile), tiles=plan.to_json(), logit_scale=0.0)
    run.update(preprocess_s=0.0, torch_s=0.0, postprocess_s=0.0, windows=0)
    torch_metric = make_metric(data, num_labels)

    def torch_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch_model(pixel_values=torch.from_numpy(x)).logits.numpy()

    with tqdm(
        total=n_images, unit="image", leave=False, desc="validating", disable=not progress
    ) as bar:
        for images, labels in batches:
            for i, image in enumerate(images):
                truth = None if labels is None else labels[i]
                ref = _one_image(
                    np.asarray(image),
                    truth,
                    torch_logits,
                    stats,
                    plan,
                    processor,
                    batch_size,
                    num_labels,
                    run,
                )
                if truth is not None:
                    torch_metric.update(ref, truth)
                bar.update(1)
    run["torch_iou"] = torch_metric.compute() if torch_metric is not None else None
    return run


def _one_image(
    pixels, truth, torch_logits, stats, plan, processor, batch_size, num_labels, run
) -> np.ndarray:
    """One image through PyTorch and every graph, window batch by window batch; updates the
    graphs' running comparisons and returns PyTorch's label map."""
    if truth is not None and truth.shape != pixels.shape[:2]:
        raise SegdeployError(
            "--tile",
            f"a label map is {truth.shape[1]}x{truth.shape[0]} but its image "
            f"{pixels.shape[1]}x{pixels.shape[0]}: tiled labels are at the image's own size",
        )
    source = ArraySource(pixels)
    grid = plan.grid(*pixels.shape[:2])
    blenders = {name: TileBlender(grid, num_labels, plan.weights()) for name in (None, *stats)}
    t = time.perf_counter()
    for windows, x, size in window_batches(source, plan, processor.normalize, batch_size):
        run["preprocess_s"] += time.perf_counter() - t
        t = time.perf_counter()
        ref = torch_logits(x)
        run["torch_s"] += time.perf_counter() - t
        run["logit_scale"] = max(run["logit_scale"], float(np.abs(ref).max()))
        run["windows"] += len(windows)
        outputs = {None: ref}
        for name, st in stats.items():
            got = st.run(x)
            if got.shape != ref.shape:
                raise SegdeployError(
                    name,
                    f"outputs logits of shape {list(got.shape)} where PyTorch gives {list(ref.shape)}",
                )
            st.add_logits(ref, got)
            outputs[name] = got
        t = time.perf_counter()
        for name, blender in blenders.items():
            for win, logits in zip(windows, outputs[name], strict=True):
                blender.add(win, logits, size)
        run["postprocess_s"] += time.perf_counter() - t
        t = time.perf_counter()
    maps = {name: _label_map(blender, pixels.shape[:2]) for name, blender in blenders.items()}
    for name, st in stats.items():
        st.add_prediction(maps[None], maps[name])
        if truth is not None:
            st.metric.update(maps[name], truth)
    return maps[None]


def _label_map(blender: TileBlender, shape) -> np.ndarray:
    labels = np.empty(shape, blender.dtype)
    for y0, band in blender.finished():
        labels[y0 : y0 + len(band)] = band
    return labels
