"""The fp32 graph: Optimum's ONNX exporter, with its advice that does not apply kept quiet."""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from segdeploy.folders import COPIED_FILES, VARIANT_FILES


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
        # (segdeploy.validate) compares mean IoU on real images, and runs after this.
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
    onnx_path = out_dir / VARIANT_FILES["fp32"]
    if not onnx_path.is_file():
        raise RuntimeError(f"Optimum wrote no {onnx_path.name} in {out_dir}")
    return onnx_path
