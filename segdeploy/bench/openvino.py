"""OpenVINO on the CPU as a `segdeploy bench` peer: the runtime a CPU user would pick instead.

    openvino        the export's model.onnx compiled by OpenVINO for the CPU, fp32
                    inference precision, OpenVINO's own hints otherwise
    openvino-int8   NNCF post-training int8 of that graph (transformer preset), calibrated
                    on the training images segdeploy's int8 calibrates on; made once and
                    cached in the export (onnx/openvino/), or in $XDG_CACHE_HOME/segdeploy
                    when the export is read-only or not segdeploy's

Both are runner classes of `segdeploy.bench.backends`' registry (one class per
backend, `@register`) and have the same end-to-end definition as
the other peers: files to label maps, decoded by `load_rgb`, preprocessed by
segdeploy's own processor (`model_processor`) and upsampled by the exact `upsample_argmax`, so
that only the model runtime differs from segdeploy's row. Each class says what it
is (`description`, `end_to_end_includes`) and why it cannot run here
(`unavailable`). openvino and nncf come with the `openvino` extra
(`pip install segdeploy[openvino]`); `segdeploy infer` never imports them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.bench.backends import Runner, _model_batches, load_rgb, register
from segdeploy.errors import SegdeployError
from segdeploy.folders import QUANTIZATION_REPORT, TRAIN_ARGS_FILE, VARIANT_FILES

log = logging.getLogger(__name__)

EXTRA_HINT = "install the openvino extra: pip install 'segdeploy[openvino]'"

# OpenVINO's performance mode per batch size, chosen by measurement
# (benchmarks/bench_cpu_peers.py): one synchronous request at a time is what
# bench drives, and THROUGHPUT splits the cores into streams that a single
# request cannot fill, so LATENCY wins at every batch size measured.
PERFORMANCE_MODE = "LATENCY"


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _chunks(seq: Sequence[Any], n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def compile_onnx(model, threads: int | None, *, mode: str = PERFORMANCE_MODE, f32: bool = True):
    """An OpenVINO CompiledModel on the CPU: `model` is an ov.Model or a path OpenVINO reads.

    f32: inference precision hint f32 (OpenVINO would otherwise pick bf16 or f16
    where the CPU has them, which is not the precision the row claims).
    """
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    config: dict[str, Any] = {hints.performance_mode: getattr(hints.PerformanceMode, mode)}
    if f32:
        config[hints.inference_precision] = ov.Type.f32
    if threads:
        config[props.inference_num_threads] = int(threads)
    if not isinstance(model, ov.Model):
        model = core.read_model(os.fspath(model))
    return core.compile_model(model, "CPU", config)


@register
class OpenVINORunner(Runner):
    """model.onnx compiled by OpenVINO on the CPU, fp32 precision hint."""

    kind = "openvino"
    description = (
        "OpenVINO CPU: the export's model.onnx, fp32 precision hint, "
        f"{PERFORMANCE_MODE} performance mode; segdeploy's preprocessing and upsampling"
    )

    @classmethod
    def default_names(cls, variants: Sequence[str]) -> list[str]:
        """None: the OpenVINO rows run when asked for (`--backends openvino,openvino-int8`),
        as `bench --help` says; NNCF's int8 alone takes minutes to make."""
        return []

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        """Why this row cannot run here, or None (listed in the report, the row skipped)."""
        if not _has("openvino"):
            return f"openvino is not installed ({EXTRA_HINT})"
        if onnx_dir is None or not (onnx_dir / VARIANT_FILES["fp32"]).is_file():
            return f"no ONNX export at {onnx_dir} (run `segdeploy export` first)"
        return None

    @classmethod
    def create(cls, backend, model_dir, onnx_dir, batch_size, threads):
        return cls(model_dir, onnx_dir, batch_size, threads)

    def __init__(self, model_dir: Path | None, onnx_dir: Path, batch_size: int, threads):
        from segdeploy.runtime.processors import model_processor

        self.onnx_dir, self.batch_size = Path(onnx_dir), batch_size
        self.preprocess = model_processor(self.onnx_dir).pixel_values
        self.compiled = compile_onnx(self.graph(model_dir), threads)
        self.request = self.compiled.create_infer_request()
        self.threads = threads or _compiled_threads(self.compiled)

    def graph(self, model_dir: Path | None):
        """What OpenVINO compiles: a path it reads, or an ov.Model."""
        return self.onnx_dir / VARIANT_FILES["fp32"]

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self.request.infer({0: batch})[0]

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> list[np.ndarray]:
        from segdeploy.runtime.upsample import upsample_argmax

        labels = []
        for chunk in _chunks(items, self.batch_size):
            images = [load_rgb(item.path) for item in chunk]
            logits = self._logits(self.preprocess(images))
            labels += [
                upsample_argmax(logits[i], (im.height, im.width)) for i, im in enumerate(images)
            ]
        return labels

    def model_inputs(self, items, count: int):
        return [
            self.preprocess([load_rgb(i.path) for i in batch])
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        self.request.infer({0: batch})


@register
class OpenVINOInt8Runner(OpenVINORunner):
    """NNCF post-training int8 of model.onnx, run by OpenVINO on the CPU."""

    kind = "openvino-int8"
    description = (
        "OpenVINO CPU: NNCF int8 of model.onnx (transformer preset, segdeploy's calibration "
        "images), cached in onnx/openvino/ or the user's cache; segdeploy's preprocessing and "
        "upsampling"
    )

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        reason = super().unavailable(backend, model_dir, onnx_dir, available)
        if reason:
            return reason
        if not _has("nncf"):
            return f"nncf is not installed ({EXTRA_HINT})"
        if model_dir is None or not (model_dir / TRAIN_ARGS_FILE).is_file():
            return (
                f"no {TRAIN_ARGS_FILE} in {model_dir}: NNCF calibrates on the training images "
                "recorded by `segdeploy train`, as segdeploy's int8 does"
            )
        return None

    @classmethod
    def precision_of(cls, backend) -> str:
        return "int8"

    def graph(self, model_dir: Path | None):
        return nncf_int8(self.onnx_dir, Path(model_dir))


def calibration_images_of(onnx_dir: Path) -> int:
    """How many images segdeploy's own int8 was calibrated on (its report), else the default."""
    from segdeploy.export.quantize import DEFAULT_CALIBRATION_IMAGES

    try:
        report = json.loads((onnx_dir / QUANTIZATION_REPORT).read_text(encoding="utf-8"))
        return int(report["calibration_images"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_CALIBRATION_IMAGES


def nncf_int8(onnx_dir: Path, model_dir: Path, n_images: int | None = None) -> Path:
    """NNCF int8 IR of onnx_dir/model.onnx, made once and cached (`cache_dir`).

    The cache key is the graph's content hash and the calibration image count, so a
    re-export never reuses a stale int8 model, and models of several exports can share
    one cache folder. Calibration batches are segdeploy's
    (`training_calibration_batches`): the same images, preprocessed the same way.
    """
    from segdeploy.runtime.providers import model_digest

    onnx_path = onnx_dir / VARIANT_FILES["fp32"]
    n_images = n_images or calibration_images_of(onnx_dir)
    cache = cache_dir(onnx_dir)
    xml = cache / f"model_nncf_int8-{model_digest(onnx_path)}-c{n_images}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    from segdeploy.export.quantize import training_calibration_batches

    log.info("quantizing %s with NNCF on %d calibration images (once)", onnx_path, n_images)
    batches = list(training_calibration_batches(model_dir, n_images))
    return nncf_int8_model(onnx_path, batches, xml)


def cache_dir(onnx_dir: Path) -> Path:
    """Where NNCF's int8 model of an export is kept: the export's own openvino/ folder when
    the export is segdeploy's (it holds nothing export did not write) and takes files;
    otherwise the user's cache folder, $XDG_CACHE_HOME/segdeploy/openvino (~/.cache by
    default), so that nothing is written among someone else's files or lost to a
    read-only folder after minutes of calibration."""
    from segdeploy.export.folder import OPENVINO_CACHE, is_export_folder
    from segdeploy.writable import check_writable

    if is_export_folder(onnx_dir):
        try:
            check_writable(onnx_dir / OPENVINO_CACHE, "the OpenVINO cache")
            return onnx_dir / OPENVINO_CACHE
        except SegdeployError:
            pass  # read-only, full: the user's cache folder instead
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "segdeploy" / OPENVINO_CACHE


def nncf_int8_model(onnx_path: Path, batches: Sequence[np.ndarray], xml: Path) -> Path:
    """NNCF post-training int8 (transformer preset) of `onnx_path`, calibrated on
    `batches` (preprocessed [N, 3, h, w] arrays), saved as OpenVINO IR `xml` (+ .bin).

    Reused when `xml` exists (callers put what the model depends on in its name).
    """
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    # Imported only to quantize: nncf imports torch when it is installed, which a row
    # that reuses the cached model should not pay for.
    import openvino as ov

    from segdeploy.export.quantize.openvino_int8 import nncf_quantize, save_ir

    model = ov.Core().read_model(os.fspath(onnx_path))
    return save_ir(nncf_quantize(model, batches), xml)


def _compiled_threads(compiled) -> int | None:
    import openvino.properties as props

    try:
        return int(compiled.get_property(props.inference_num_threads))
    except Exception:  # not every OpenVINO version reports it on a compiled model
        return None
