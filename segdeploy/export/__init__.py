"""`segdeploy export`: a model folder of any registered family to ONNX, with its variants.

The fp32 graph goes by the family's route (segdeploy.export.routes: Optimum where it
supports the family, Optimum's custom OnnxConfig or torch's dynamo exporter otherwise).
The ONNX folder holds `model.onnx` (fp32, dynamic batch; dynamic spatial axes where
the family's graph is right at every size, else fixed at the trained size) plus
`config.json` and `preprocessor_config.json`, so that optimum's
`ORTModelForSemanticSegmentation` and `segdeploy infer` load it as it is.
Variants sit beside it with the same input and output names and fp32 I/O:
`model_fp16.onnx` and `model_optimized.onnx`. The whole folder, validation
reports included, is built in a temporary folder and renamed into place, so a
reader never meets a half-written export. It replaces only an earlier export (or an
empty folder), and keeps that export's other graphs when they were made from the same
fp32 graph (segdeploy.export.folder).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from segdeploy.atomic import atomic_dir, remove_stale_temporaries, write_json
from segdeploy.export.checks import (
    DEFAULT_OPSET,
    check_int8_engines,
    check_max_drop,
    check_opset,
    check_output,
    check_quantize,
)
from segdeploy.export.folder import carry_over
from segdeploy.export.rewrites import rewrites_for
from segdeploy.export.routes import export_fp32, resolve_opset
from segdeploy.export.variants import convert_fp16, optimize_graph
from segdeploy.families import ROUTES, Family, family_of
from segdeploy.folders import (
    OPENVINO_QUANTIZATION_REPORT,
    QUANTIZATION_REPORT,
    VARIANT_FILES,
    ModelFolder,
    default_onnx_dir,
)
from segdeploy.validate import ValidationSettings, load_data_for, open_model, validate_graphs
from segdeploy.writable import environment_errors_as_input

__all__ = [
    "DEFAULT_OPSET",
    "ExportResult",
    "ExportSettings",
    "check_export",
    "export_model",
    "export_onnx",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSettings:
    """What `segdeploy export` writes and how it validates it; the one source of its defaults."""

    #: None: the family's default opset (17 for SegFormer, DPT, MobileNetV2, MobileViT;
    #: 18 for BEiT, Data2VecVision, MobileViTV2, UPerNet: segdeploy.families).
    opset: int | None = DEFAULT_OPSET
    #: Also write model_fp16.onnx.
    fp16: bool = False
    #: Also write model_optimized.onnx.
    optimize: bool = False
    #: Also write model_fused.onnx (and model_fp16_fused.onnx with fp16).
    fuse_argmax: bool = False
    #: "int8" also writes model_int8.onnx; None writes no quantized graph.
    quantize: str | None = None
    #: Training images that set the int8 activation ranges.
    calibration_images: int = 64
    #: Accuracy-aware int8: the largest disagreement (1 - mean IoU against the fp32
    #: graph) allowed before measured-sensitive nodes are kept in float; None: off.
    max_drop: float | None = None
    #: Which int8 graphs: "onnxruntime" (model_int8.onnx, QDQ for onnxruntime) and/or
    #: "openvino" (model_openvino_int8.xml, NNCF's int8 as OpenVINO IR).
    int8_engines: tuple[str, ...] = ("onnxruntime",)
    #: Export after the family's exact rewrites (segdeploy.export.rewrites: SegFormer's
    #: decode head folded); False: the model as transformers defines it.
    rewrite: bool = True
    #: Compare every graph written with the PyTorch model.
    validate: bool = True
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_options(self, **options: Any) -> ExportSettings:
        """A copy with `options` replaced; validation options (max_images, provider, ...)
        go to `validation`."""
        own = {f.name for f in fields(self)}
        mine = {k: v for k, v in options.items() if k in own}
        theirs = {k: v for k, v in options.items() if k not in own}
        if theirs:
            mine["validation"] = replace(mine.get("validation", self.validation), **theirs)
        return replace(self, **mine)


@dataclass
class ExportResult:
    output: Path
    graphs: dict[str, Path]  # variant -> graph file, final location
    opset: int
    export_seconds: float
    route: str = ""  # the family's exporter route (segdeploy.families.ROUTES)
    #: Files of the earlier export in `output` kept (made from the same fp32 graph) and
    #: dropped (made from another one): segdeploy.export.folder.carry_over.
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    validation_seconds: float | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> report

    @property
    def passed(self) -> bool | None:
        """False if any validated graph failed; None when nothing was validated."""
        verdicts = [r["passed"] for r in self.reports.values() if r.get("passed") is not None]
        return all(verdicts) if verdicts else None


def check_export(
    model_dir: str | os.PathLike, output: Path, settings: ExportSettings
) -> tuple[ModelFolder, ExportSettings]:
    """Every pre-flight check of an export, once: bad input is refused before anything
    is written or any (possibly long) work starts. Returns the model folder and the
    settings with the opset resolved (the family's default when None)."""
    from segdeploy.runtime.providers import check_provider

    model = open_model(model_dir)
    family = family_of(model.config)
    settings = replace(settings, opset=resolve_opset(family, settings.opset))
    check_opset(settings.opset, family)
    check_output(model.path, output)
    if settings.validate:
        settings.validation.check()
        check_provider(settings.validation.provider, settings.validation.fallback)
    if settings.quantize is not None:
        check_quantize(model.path, settings.quantize, settings.calibration_images)
    if settings.max_drop is not None:
        check_max_drop(settings.max_drop, settings.quantize)
    check_int8_engines(settings.int8_engines, settings.quantize)
    return model, settings


def exporter_record(family: Family, rewrite: bool = True) -> dict[str, Any]:
    """How the fp32 graph was made, for the reports: the family's route, its axes and the
    rewrites applied to the model before it was exported."""
    return {
        "family": family.name,
        "route": family.route,
        "route_means": ROUTES[family.route],
        "dynamic_spatial": family.dynamic_spatial,
        "fixed_size_why": family.fixed_size_why,
        "rewrites": {r.name: r.what for r in rewrites_for(family.model_type)} if rewrite else {},
    }


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    settings: ExportSettings | None = None,
    *,
    data=None,
    progress: bool = False,
    **options: Any,
) -> ExportResult:
    """Export `model_dir` to `output` (default `model_dir/onnx`) and validate every graph made.

    `options` replace fields of `settings` (`fp16=True`, `max_images=10`, ...).
    `data` is the validation data (`segdeploy.validate.load_validation_data`), or
    None to compare logits on random inputs only. Reports are written beside the
    graphs (`validation.json`, `validation_fp16.json`, ...) before the folder is
    moved into place. Bad input raises SegdeployError before anything is written.
    """
    settings = (settings or ExportSettings()).with_options(**options)
    output = _output_of(model_dir, output)
    model, settings = check_export(model_dir, output, settings)
    return _export(model, output, settings, data, progress)


def export_model(
    model_dir: str | os.PathLike,
    output: str | os.PathLike | None,
    settings: ExportSettings,
    *,
    warn: Callable[[str], None] = log.warning,
    progress: bool = False,
) -> ExportResult:
    """`segdeploy export`: checks, then the validation data the settings name (or train
    recorded; `warn` hears when there is none), then the export."""
    output = _output_of(model_dir, output)
    model, settings = check_export(model_dir, output, settings)
    data = load_data_for(model, settings.validation, warn) if settings.validate else None
    return _export(model, output, settings, data, progress)


def _output_of(model_dir: str | os.PathLike, output: str | os.PathLike | None) -> Path:
    return Path(output) if output is not None else default_onnx_dir(model_dir)


def _export(
    model: ModelFolder, output: Path, settings: ExportSettings, data, progress: bool
) -> ExportResult:
    remove_stale_temporaries(output.parent)  # `.onnx.tmp-<pid>-*` folders of killed exports
    graphs: dict[str, Path] = {}
    family = family_of(model.config)
    result = ExportResult(
        output=output, graphs=graphs, opset=settings.opset, export_seconds=0.0, route=family.route
    )
    # A disk that fills up mid-export is the user's environment, not a bug: one line,
    # exit 2; atomic_dir has then removed the partial folder and `output` is unchanged.
    with environment_errors_as_input(output, f"{output} is unchanged"), atomic_dir(output) as tmp:
        start = time.perf_counter()
        built = _build(model, family, tmp, output, settings)
        result.export_seconds = time.perf_counter() - start
        log.info(
            "exported %s in %.1f s",
            ", ".join(p.name for p in built.values()),
            result.export_seconds,
        )
        if settings.validate:
            start = time.perf_counter()
            reports = validate_graphs(
                list(built.values()),
                model,
                settings.validation,
                data=data,
                onnx_dir_name=output,
                skip_unrunnable=("fp16",),
                progress=progress,
                extra={"exporter": exporter_record(family, settings.rewrite)},
            )
            result.reports = {variant: reports[path.name] for variant, path in built.items()}
            result.validation_seconds = time.perf_counter() - start
        # Last, just before the swap: the other graphs of an earlier export stay if
        # they were made from this very fp32 graph.
        result.kept, result.dropped = carry_over(output, tmp)
    graphs.update({variant: output / path.name for variant, path in built.items()})
    return result


def _quantize_onnxruntime(model, family, fp32: Path, int8: Path, settings) -> dict[str, Any]:
    """model_int8.onnx by onnxruntime's quantizer (with --max-drop, the accuracy-aware
    search); its report."""
    if settings.max_drop is None:
        from segdeploy.export.quantize import quantize_int8, training_calibration_batches

        batches = training_calibration_batches(model.path, settings.calibration_images)
        return quantize_int8(
            fp32,
            int8,
            batches,
            exclude_op_types=family.int8_float_op_types,
            skip_symbolic_shape=family.int8_skip_symbolic_shape,
        )
    # Accuracy-aware: float exclusions found by measured sensitivity.
    from segdeploy.export.quantize.search import quantize_int8_within

    return quantize_int8_within(
        fp32,
        int8,
        model.path,
        settings.calibration_images,
        settings.max_drop,
        start_op_types=family.int8_float_op_types,
        skip_symbolic_shape=family.int8_skip_symbolic_shape,
    )


def _build(
    model: ModelFolder, family: Family, tmp: Path, output: Path, settings: ExportSettings
) -> dict[str, Path]:
    """Every graph the settings ask for, written in `tmp`; {variant: graph}."""
    built = {"fp32": export_fp32(model.path, tmp, opset=settings.opset, rewrite=settings.rewrite)}
    if settings.fp16:
        built["fp16"] = convert_fp16(built["fp32"], tmp / VARIANT_FILES["fp16"])
    if settings.optimize:
        built["optimized"] = optimize_graph(built["fp32"], tmp / VARIANT_FILES["optimized"])
    if settings.quantize == "int8" and "onnxruntime" in settings.int8_engines:
        built["int8"] = tmp / VARIANT_FILES["int8"]
        report = _quantize_onnxruntime(model, family, built["fp32"], built["int8"], settings)
        # Name the graphs where they will be, not in the temporary folder.
        report["source"] = str(output / built["fp32"].name)
        report["output"] = str(output / built["int8"].name)
        write_json(tmp / QUANTIZATION_REPORT, report)
    if settings.quantize == "int8" and "openvino" in settings.int8_engines:
        from segdeploy.export.quantize.openvino_int8 import quantize_openvino_int8

        built["openvino_int8"] = tmp / VARIANT_FILES["openvino_int8"]
        report = quantize_openvino_int8(
            built["fp32"],
            built["openvino_int8"],
            model.path,
            settings.calibration_images,
            max_drop=settings.max_drop,
        )
        report["source"] = str(output / built["fp32"].name)
        report["output"] = str(output / built["openvino_int8"].name)
        write_json(tmp / OPENVINO_QUANTIZATION_REPORT, report)
    if settings.fuse_argmax:
        from segdeploy.export.fuse_argmax import fuse_argmax as fuse

        for variant in [v for v in ("fp32", "fp16") if v in built]:
            fused = "fused" if variant == "fp32" else f"{variant}_fused"
            built[fused] = fuse(built[variant], tmp / VARIANT_FILES[fused], model.num_labels)
    return built
