"""Export a SegFormer model folder to ONNX through Optimum, with fp16 and optimised variants.

The ONNX folder holds `model.onnx` (fp32, dynamic batch and spatial axes) plus
`config.json` and `preprocessor_config.json`, so that optimum's
`ORTModelForSemanticSegmentation` and `segdeploy infer` load it as it is.
Variants sit beside it with the same input and output names and fp32 I/O:
`model_fp16.onnx` and `model_optimized.onnx`. The whole folder, validation
reports included, is built in a temporary folder and renamed into place, so a
reader never meets a half-written export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segdeploy.atomic import atomic_dir, remove_stale_temporaries, write_json
from segdeploy.errors import SegdeployError
from segdeploy.models import check_weight_file
from segdeploy.runtime.segmenter import VARIANT_FILES
from segdeploy.writable import check_writable, environment_errors_as_input

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Below opset 11, ONNX's Resize cannot express PyTorch's bilinear interpolation,
#: which SegFormer's decode head uses: such a graph would not be faithful.
MIN_OPSET = 11

#: Graph file of each variant inside an ONNX folder: the runtime's names, so that
#: `segdeploy infer --variant X` runs what `segdeploy export` wrote as X.
VARIANTS = VARIANT_FILES
COPIED_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class ExportResult:
    output: Path
    graphs: dict[str, Path]  # variant -> graph file, final location
    opset: int
    export_seconds: float
    validation_seconds: float | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> report

    @property
    def passed(self) -> bool | None:
        """False if any validated graph failed; None when nothing was validated."""
        verdicts = [r["passed"] for r in self.reports.values() if r.get("passed") is not None]
        return all(verdicts) if verdicts else None


def graph_path(onnx_dir: str | os.PathLike, variant: str = "fp32") -> Path:
    if variant not in VARIANTS:
        raise SegdeployError(
            "--variant", f"unknown variant {variant!r}; choose {', '.join(VARIANTS)}"
        )
    return Path(onnx_dir) / VARIANTS[variant]


def read_segformer_config(model_dir: str | os.PathLike, *, need_weights: bool) -> dict[str, Any]:
    """config.json of a SegFormer folder; SegdeployError if the folder is anything else."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SegdeployError(model_dir, "not a folder (expected a SegFormer model folder)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise SegdeployError(model_dir, "no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegdeployError(config_file, f"unreadable: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != "segformer":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise SegdeployError(config_file, f"model_type is {found!r}, not 'segformer'")
    if need_weights:
        weights = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
        if not weights:
            raise SegdeployError(
                model_dir, "no PyTorch weights (model.safetensors): not a trained model folder"
            )
        for path in weights:  # truncated or garbage weights: named now, not as a library error
            check_weight_file(path)
    return config


def num_labels_of(config: dict[str, Any]) -> int:
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' own default


def check_opset(opset: int) -> None:
    """SegdeployError unless both onnx and torch's exporter can write `opset`."""
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
    if opset < MIN_OPSET:
        raise SegdeployError(
            "--opset",
            f"{opset} is too old: SegFormer's bilinear resize needs opset >= {MIN_OPSET} to match PyTorch",
        )


def check_provider(provider: str, fallback: bool = False) -> None:
    """SegdeployError now if onnxruntime here lacks `provider`, rather than after the export."""
    import onnxruntime as ort

    from segdeploy.runtime.providers import choose_provider

    choose_provider(provider, ort.get_available_providers(), fallback=fallback)


def check_quantize(model_dir: Path, quantize: str, calibration_images: int) -> None:
    """Refuse, before a long export, a quantization that cannot be calibrated."""
    if quantize != "int8":
        raise SegdeployError("--quantize", f"unknown {quantize!r}; choose int8")
    if calibration_images < 1:
        raise SegdeployError("--calibration-images", f"must be >= 1, got {calibration_images}")
    from segdeploy.quantize import recorded_training_data

    recorded_training_data(model_dir)  # calibration reads the recorded training split


def check_output(model_dir: Path, output: Path) -> None:
    # atomic_dir replaces `output` as a whole: it must never be the model folder or hold it.
    model_dir, output = model_dir.resolve(), output.resolve()
    if output == model_dir or output in model_dir.parents:
        raise SegdeployError("--output", f"{output} would replace the model folder {model_dir}")
    if output.exists() and not output.is_dir():
        raise SegdeployError("--output", f"{output} exists and is not a folder")
    # The new folder is built beside `output`: read-only, full, or under a file fails now.
    check_writable(output.parent, "--output")


class _DropOpsetAdvice(logging.Filter):
    # Optimum advises opset >= 18 for SegFormer at every export; 17 is our documented
    # default and validates exactly, so the advice is noise for the user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "lower than the recommended minimum opset" not in record.getMessage()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's advice that does not apply to the user's run.

    Optimum loads the model through transformers' auto classes, which warn about
    deprecated arguments and slow image processors that the user did not choose.
    """
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("optimum.exporters.onnx.convert")
    flt = _DropOpsetAdvice()
    logger.addFilter(flt)
    verbosity = hf_logging.get_verbosity()
    if verbosity >= hf_logging.WARNING:  # leave -vv (debug) untouched
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        logger.removeFilter(flt)


def export_fp32(model_dir: Path, out_dir: Path, opset: int) -> Path:
    """Optimum's exporter: model.onnx with dynamic batch/height/width, config and preprocessor."""
    from optimum.exporters.onnx import main_export

    with _quiet_exporter():
        # do_validation=False: Optimum's check compares logits on one dummy input; ours
        # (segdeploy.validation) compares mean IoU on real images, and runs after this.
        main_export(
            str(model_dir),
            output=out_dir,
            task="semantic-segmentation",
            opset=opset,
            do_validation=False,
            local_files_only=True,
        )
    for name in COPIED_FILES:
        if not (out_dir / name).is_file() and (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    onnx_path = out_dir / VARIANTS["fp32"]
    if not onnx_path.is_file():
        raise RuntimeError(f"Optimum wrote no {onnx_path.name} in {out_dir}")
    return onnx_path


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (Cast nodes at the edges).

    onnxruntime's own converter; it appends the edge Casts at the end of the node
    list, so the graph is topologically re-sorted before the checker sees it.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    sorted_model = OnnxModel(model)
    sorted_model.topological_sort()
    model = sorted_model.model
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return dst


def optimize_graph(src: Path, dst: Path) -> Path:
    """onnxruntime's graph optimisations (level EXTENDED, CPU) saved as a graph.

    EXTENDED fuses ops (FusedMatMul, ...) into com.microsoft contrib ops that both
    the CPU and CUDA providers run; level ALL would add CPU-only layout changes.
    onnxruntime.transformers' optimizer was not used: it knows BERT-like models,
    not SegFormer.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = os.fspath(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(os.fspath(src), opts, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise RuntimeError(f"onnxruntime wrote no optimised graph at {dst}")
    return dst


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    optimize: bool = False,
    fuse_argmax: bool = False,
    quantize: str | None = None,
    calibration_images: int = 64,
    max_drop: float | None = None,
    validate: bool = True,
    data=None,
    max_images: int | None = None,
    tolerance: float | None = None,
    logit_tolerance: float | None = None,
    provider: str = "cpu",
    fallback: bool = False,
    batch_size: int = 4,
    random_inputs: int = 4,
    threads: int | None = None,
    progress: bool = False,
) -> ExportResult:
    """Export `model_dir` to `output` (default `model_dir/onnx`) and validate every graph made.

    `data` is the validation data (`segdeploy.validation.load_validation_data`), or
    None to compare logits on random inputs only. Reports are written beside the
    graphs (`validation.json`, `validation_fp16.json`, ...) before the folder is
    moved into place. Bad input raises SegdeployError before anything is written.
    """
    model_dir = Path(model_dir)
    output = Path(output) if output is not None else model_dir / "onnx"
    read_segformer_config(model_dir, need_weights=True)
    check_opset(opset)
    check_output(model_dir, output)
    if validate:
        check_provider(provider, fallback)
    if quantize is not None:
        check_quantize(model_dir, quantize, calibration_images)

    remove_stale_temporaries(output.parent)  # `.onnx.tmp-<pid>-*` folders of killed exports
    graphs: dict[str, Path] = {}
    result = ExportResult(output=output, graphs=graphs, opset=opset, export_seconds=0.0)
    # A disk that fills up mid-export is the user's environment, not a bug: one line,
    # exit 2; atomic_dir has then removed the partial folder and `output` is unchanged.
    with environment_errors_as_input(output, f"{output} is unchanged"), atomic_dir(output) as tmp:
        start = time.perf_counter()
        built = {"fp32": export_fp32(model_dir, tmp, opset)}
        if fp16:
            built["fp16"] = convert_fp16(built["fp32"], tmp / VARIANTS["fp16"])
        if optimize:
            built["optimized"] = optimize_graph(built["fp32"], tmp / VARIANTS["optimized"])
        if quantize == "int8":
            from segdeploy.quantize import quantize_int8, training_calibration_batches

            built["int8"] = tmp / VARIANTS["int8"]
            batches = training_calibration_batches(model_dir, calibration_images)
            if max_drop is None:
                report = quantize_int8(built["fp32"], built["int8"], batches)
            else:  # accuracy-aware: measured float exclusions (segdeploy.int8_search)
                from segdeploy.int8_search import quantize_int8_within

                report = quantize_int8_within(
                    built["fp32"], built["int8"], model_dir, calibration_images, max_drop
                )
            # Name the graphs where they will be, not in the temporary folder.
            report["source"] = str(output / built["fp32"].name)
            report["output"] = str(output / built["int8"].name)
            write_json(tmp / "quantization_int8.json", report)
        if fuse_argmax:
            from segdeploy.fuse_argmax import fuse_argmax as fuse

            num_labels = num_labels_of(read_segformer_config(model_dir, need_weights=False))
            for variant in [v for v in ("fp32", "fp16") if v in built]:
                fused = "fused" if variant == "fp32" else f"{variant}_fused"
                built[fused] = fuse(built[variant], tmp / VARIANTS[fused], num_labels)
        result.export_seconds = time.perf_counter() - start
        log.info(
            "exported %s in %.1f s",
            ", ".join(p.name for p in built.values()),
            result.export_seconds,
        )

        if validate:
            from segdeploy.validation import validate_graphs

            start = time.perf_counter()
            result.reports = validate_graphs(
                list(built.values()),
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
                onnx_dir_name=output,
                skip_unrunnable=("fp16",),
                progress=progress,
            )
            result.reports = {variant: result.reports[path.name] for variant, path in built.items()}
            result.validation_seconds = time.perf_counter() - start
    graphs.update({variant: output / path.name for variant, path in built.items()})
    return result
