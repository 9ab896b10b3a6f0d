"""Pre-flight checks of `segdeploy export`: all bad input is refused before the (possibly
long) export starts, and before anything is written."""

from __future__ import annotations

from pathlib import Path

from segdeploy.errors import SegdeployError
from segdeploy.export.folder import check_replaceable
from segdeploy.export.routes import check_opset as check_family_opset
from segdeploy.families import Family
from segdeploy.writable import check_writable

#: The opset `segdeploy export` writes without --opset: None means the family's own
#: default (segdeploy.families: the lowest it needs that keeps LayerNorm one node).
DEFAULT_OPSET = None


def check_opset(opset: int, family: Family) -> None:
    """SegdeployError unless both onnx and torch's exporter can write `opset`, and the
    family's graph is right at it (segdeploy.export.routes.check_opset says why not)."""
    import onnx
    import torch
    from torch.onnx import _constants

    if opset > onnx.defs.onnx_opset_version():
        raise SegdeployError(
            "--opset",
            f"{opset} is newer than the installed onnx {onnx.__version__} writes "
            f"(<= {onnx.defs.onnx_opset_version()})",
        )
    # onnx may know opsets that torch's exporter cannot write yet (torch 2.13: <= 23);
    # found out after the export started, it would fail with a page-long IR dump.
    torch_max = getattr(_constants, "ONNX_MAX_OPSET", None)
    if torch_max is not None and opset > torch_max:
        raise SegdeployError(
            "--opset",
            f"{opset} is newer than torch {torch.__version__}'s ONNX exporter writes (<= {torch_max})",
        )
    check_family_opset(family, opset)


def check_quantize(model_dir: Path, quantize: str, calibration_images: int) -> None:
    """Refuse, before a long export, a quantization that cannot be calibrated."""
    if quantize != "int8":
        raise SegdeployError("--quantize", f"unknown {quantize!r}; choose int8")
    if calibration_images < 1:
        raise SegdeployError("--calibration-images", f"must be >= 1, got {calibration_images}")
    from segdeploy.export.quantize.calibration import recorded_training_data

    recorded_training_data(model_dir)  # calibration reads the recorded training split


def check_max_drop(max_drop: float, quantize: str | None) -> None:
    """--max-drop is a limit for the int8 graph: refused without it, or out of [0, 1]."""
    if quantize != "int8":
        raise SegdeployError("--max-drop", "applies to int8 only: add --quantize int8")
    if not 0.0 <= max_drop <= 1.0:
        raise SegdeployError("--max-drop", f"must be between 0 and 1, got {max_drop}")


#: `--int8-engine` values: who makes the int8 graph, and for which runtime.
INT8_ENGINES = ("onnxruntime", "openvino")


def check_int8_engines(engines, quantize: str | None) -> None:
    """Known engines, int8 asked for when one is not the default, and NNCF and OpenVINO
    installed for "openvino" (refused now, not after the fp32 export)."""
    import importlib.util

    engines = tuple(engines)
    unknown = [e for e in engines if e not in INT8_ENGINES]
    if unknown or not engines:
        raise SegdeployError(
            "--int8-engine",
            f"unknown {unknown[0] if unknown else 'none'!r}; choose from "
            + ", ".join(INT8_ENGINES),
        )
    if quantize != "int8" and engines != ("onnxruntime",):
        raise SegdeployError("--int8-engine", "applies to int8 only: add --quantize int8")
    if "openvino" in engines and quantize == "int8":
        for module in ("openvino", "nncf"):
            if importlib.util.find_spec(module) is None:
                raise SegdeployError(
                    "--int8-engine",
                    f"openvino needs {module}: pip install 'segdeploy[openvino]'",
                )


def check_output(model_dir: Path, output: Path) -> None:
    """Refuse an output folder export must not replace (see segdeploy.export.folder), or
    one it cannot write beside."""
    check_replaceable(output, model_dir)
    # The new folder is built beside `output`: read-only, full, or under a file fails now.
    check_writable(output.absolute().parent, "--output")
