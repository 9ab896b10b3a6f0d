"""`segdeploy validate`: prove an ONNX export faithful: run it and the PyTorch model on the same images, compare.

Both models see the very same `pixel_values` (the family's image processor of the
PyTorch model folder, e.g. SegformerImageProcessor), and both sets of logits go through the one function
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

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from segdeploy.atomic import write_json
from segdeploy.errors import SegdeployError
from segdeploy.folders import ModelFolder, has_weights, variant_file
from segdeploy.train.torch_ops import torch_threads
from segdeploy.validate.compare import compare, open_sessions, upsample_argmax
from segdeploy.validate.data import load_data_for, load_validation_data, resolve_dataset
from segdeploy.validate.graphs import inspect, load_graph, open_model
from segdeploy.validate.report import (
    failed,
    graph_report,
    skipped,
    timings,
    validation_path,
)
from segdeploy.validate.settings import ValidationSettings
from segdeploy.validate.tables import print_outcome, print_reports
from segdeploy.validate.tiled import compare_tiled
from segdeploy.validate.verdicts import judge
from segdeploy.writable import check_writable

__all__ = [
    "ValidationSettings",
    "failed",
    "load_data_for",
    "load_graph",
    "load_validation_data",
    "open_model",
    "print_outcome",
    "print_reports",
    "resolve_dataset",
    "skipped",
    "upsample_argmax",
    "validate_export",
    "validate_graphs",
    "validate_onnx",
    "validation_path",
]

log = logging.getLogger(__name__)
#: Frozen, so one shared default instance is safe.
DEFAULT_SETTINGS = ValidationSettings()


def validate_graphs(
    onnx_paths: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike | ModelFolder,
    settings: ValidationSettings = DEFAULT_SETTINGS,
    *,
    data=None,
    onnx_dir_name: str | os.PathLike | None = None,
    skip_unrunnable: Sequence[str] = (),
    write: bool = True,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Validate several graphs of one folder against the PyTorch model in one pass.

    PyTorch runs once per batch; every graph runs on the same `pixel_values`.
    `data` is a SegmentationData (see `load_validation_data`) or None for the
    random-input check on `settings.random_inputs` images. Tolerances None -> the
    default of each graph's precision. A graph whose precision is in
    `skip_unrunnable` and that the provider cannot load gets a "skipped" report
    instead of an error. Each report is written (atomically) to
    `validation_path(graph)` unless `write` is False; `onnx_dir_name` is the folder
    name recorded in the reports (the export validates inside a temporary folder).
    `settings.threads` sets both PyTorch's and onnxruntime's intra-op threads.
    `extra` is added to every report (the export records how the graph was made).
    Returns {graph file name: report}.
    """
    s = settings
    s.check()
    model = model_dir if isinstance(model_dir, ModelFolder) else open_model(model_dir)
    graphs = [inspect(p) for p in onnx_paths]  # every graph checked before any runs
    if write:  # a read-only export is found now, not after every image has run
        for path, _, _ in graphs:
            check_writable(path.parent, validation_path(path).name)
    stats, reports = open_sessions(
        graphs, s.provider, s.fallback, s.threads, data, model.num_labels, skip_unrunnable
    )
    if data is not None and s.max_images is not None and s.max_images < len(data.eval):
        data = replace(data, eval=data.eval.select(range(s.max_images)))

    start = time.perf_counter()
    tiling = s.tiling
    with torch_threads(s.threads):
        args = (model.path, stats, data, model.num_labels, s.batch_size, s.random_inputs, progress)
        run = compare_tiled(*args, tiling) if tiling.enabled else compare(*args)
    run["total_s"] = time.perf_counter() - start

    id2label = {int(k): v for k, v in model.config.get("id2label", {}).items()}
    for path, precision, opset in graphs:
        if path.name in stats:
            report = graph_report(path, precision, opset, stats[path.name], run, data)
            report["onnx_dir"] = os.fspath(onnx_dir_name if onnx_dir_name else path.parent)
            report["torch_model"] = os.fspath(model.path)
            if "tiles" in run:  # sliding windows: what was tiled, and how many windows
                report["tiles"] = {**run["tiles"], "windows": run["windows"]}
            report.update(extra or {})
            judge(report, stats[path.name], run, data, id2label, s.tolerance, s.logit_tolerance)
            report["timings"] = timings(run, stats[path.name])
            reports[path.name] = report
        if write:
            write_json(validation_path(path), reports[path.name])
    return {path.name: reports[path.name] for path, _, _ in graphs}


def validate_onnx(
    onnx_path: str | os.PathLike,
    model_dir: str | os.PathLike | ModelFolder,
    settings: ValidationSettings | None = None,
    *,
    data=None,
    write: bool = True,
    progress: bool = False,
    **overrides,
) -> dict[str, Any]:
    """Validate one ONNX graph against the PyTorch model in `model_dir`; returns the report.

    `overrides` replace fields of `settings` (e.g. `tolerance=0.01`). The report is
    also written to `validation_path(onnx_path)` unless `write` is False.
    """
    settings = replace(settings or ValidationSettings(), **overrides)
    reports = validate_graphs(
        [onnx_path], model_dir, settings, data=data, write=write, progress=progress
    )
    return reports[Path(onnx_path).name]


def validate_export(
    onnx_dir: str | os.PathLike,
    settings: ValidationSettings = DEFAULT_SETTINGS,
    *,
    model_dir: str | os.PathLike | None = None,
    graph: str | None = None,
    variant: str | None = None,
    warn: Callable[[str], None] = log.warning,
    progress: bool = False,
) -> dict[str, Any]:
    """`segdeploy validate`: check one graph of an ONNX folder against its PyTorch model.

    Every bad input (graph, model folder, provider, data) is refused before the
    comparison starts. `model_dir` None: the folder that holds `onnx_dir`.
    """
    from segdeploy.runtime.providers import check_provider

    if graph and variant:
        raise SegdeployError("--graph", "give --graph or --variant, not both")
    onnx_dir = Path(onnx_dir)
    if graph is not None and str(Path(graph)) != Path(graph).name:
        # The report goes beside the graph: a path would write into another folder.
        raise SegdeployError(
            "--graph",
            f"{graph!r} is a path; give the name of a graph in ONNX_DIR ({onnx_dir}), or "
            "give the graph's own folder as ONNX_DIR",
        )
    open_model(onnx_dir, need_weights=False)
    onnx_path = onnx_dir / graph if graph else onnx_dir / variant_file(variant or "fp32")
    inspect(onnx_path)  # a missing or corrupt graph (ONNX or IR): before any data is loaded
    check_writable(onnx_dir, validation_path(onnx_path).name)  # read-only: before the data
    if model_dir is None:
        parent = onnx_dir.resolve().parent
        if not has_weights(parent):
            raise SegdeployError(
                onnx_dir, f"no PyTorch model in {parent} to compare with: pass --model MODEL_DIR"
            )
        model_dir = parent
    model = open_model(model_dir)
    settings.check()
    check_provider(settings.provider, settings.fallback)
    data = load_data_for(model, settings, warn)
    return validate_onnx(onnx_path, model, settings, data=data, progress=progress)
