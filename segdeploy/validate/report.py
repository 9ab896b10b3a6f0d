"""Validation reports: built here and only here, written beside their graph.

A report is a JSON object (a dict): graph, onnx_dir, torch_model, precision,
opset, provider, mode, dataset, images, image_size, pixel_agreement, logit
differences, fused_argmax, then the verdict's fields (see verdicts.py) and
timings. `passed` is None for a graph that was skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segdeploy.folders import validation_report_name, variant_of


def validation_path(onnx_path: str | os.PathLike) -> Path:
    """validation.json for model.onnx, validation_<variant>.json for model_<variant>.onnx."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(validation_report_name(onnx_path.name))


def graph_report(path: Path, precision: str, opset: int, st, run: dict, data) -> dict:
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


def timings(run: dict, st) -> dict[str, float]:
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


def skipped_report(path: Path, precision: str, opset: int, provider: str, why: str) -> dict:
    variant = variant_of(path.name)
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


def failed(reports) -> bool:
    """Whether any report's verdict is a failure (skipped graphs do not count)."""
    return any(r.get("passed") is False for r in reports)


def skipped(report: dict[str, Any]) -> bool:
    return bool(report.get("skipped"))
