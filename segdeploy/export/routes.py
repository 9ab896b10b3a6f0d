"""model.onnx from a saved Hugging Face model folder, by the route its family registers.

Every route writes the same contract: one input `pixel_values` [batch, 3, H, W]
float32 and one output `logits` [batch, num_labels, h, w]; the batch axis is
always dynamic, the spatial axes only where `Family.dynamic_spatial` says the
graph is right at every size (otherwise they are fixed at `export_size()`).

- "optimum": Optimum's `onnx_export_from_model` with the family's task, the supported
  path (what `main_export` calls once it has loaded the model; the model is loaded
  here so that its rewrites apply).
- "optimum-custom": Optimum's own extension point, a custom OnnxConfig passed as
  `custom_onnx_configs`. `main_export` cannot be used for it when Optimum knows the
  model type but not its segmentation task (mobilenet_v2: it refuses the task
  before looking at custom configs), so the model is loaded here and handed to
  `onnx_export_from_model`, the documented entry for custom exports.
- "torch-dynamo": torch.onnx.export(dynamo=True) of a wrapper returning logits
  only, for families whose graph TorchScript cannot trace (BEiT/Data2VecVision
  and UPerNet: adaptive_avg_pool2d with a size that is not a divisor).

Every route exports the model after its family's exact rewrites
(segdeploy.export.rewrites) unless `rewrite=False`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from segdeploy.errors import SegdeployError
from segdeploy.families import Family, family_of
from segdeploy.folders import COPIED_FILES, PREPROCESSOR_FILE, VARIANT_FILES

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


class _DropOpsetAdvice(logging.Filter):
    # Optimum advises opset >= 18 for SegFormer at every export; 17 is our documented
    # default and validates exactly, so the advice is noise for the user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "lower than the recommended minimum opset" not in record.getMessage()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporters' advice that does not apply to the user's run.

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


def resolve_opset(family: Family, opset: int | None) -> int:
    """`opset`, or the family's default when None."""
    return family.default_opset if opset is None else opset


def check_opset(family: Family, opset: int) -> None:
    """SegdeployError unless `opset` is at least what `family` needs, saying why."""
    if opset < family.min_opset:
        raise SegdeployError(
            "--opset",
            f"{opset} is too old for {family.name}: it needs opset >= {family.min_opset} "
            f"because {family.min_opset_why}",
        )


def export_size(config, model_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """The (height, width) a graph is traced at: the size the folder's image processor
    produces (what the model was trained and will be fed at), else the config's
    image_size, else 512. A family that runs only at config.image_size (BEiT,
    Data2VecVision) is traced at that size whatever its processor says.

    For a family whose spatial axes are fixed this is the only size the graph accepts,
    and the size infer must resize to.
    """
    native = _config_size(config)
    if native is not None and family_of(config).size_bound:
        return native
    processed = _processor_output_size(Path(model_dir)) if model_dir is not None else None
    return processed or native or (512, 512)


def _config_size(config) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, list | tuple):
        return int(size[0]), int(size[-1])
    return (int(size), int(size)) if size else None


def _processor_output_size(model_dir: Path) -> tuple[int, int] | None:
    import json

    try:
        cfg = json.loads((model_dir / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def export_fp32(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int | None = None,
    size: tuple[int, int] | None = None,
    rewrite: bool = True,
) -> Path:
    """Write `out_dir/model.onnx` (plus config.json and preprocessor_config.json) by the
    family's route; returns the graph's path. `size` overrides the traced size;
    `rewrite=False` exports the model without its family's rewrites."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    family = family_of(model_dir)  # before transformers: a one-line refusal, not a traceback
    opset = resolve_opset(family, opset)
    check_opset(family, opset)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        model = load_for_export(model_dir, rewrite)
        size = size or export_size(model.config, model_dir)
        path = ROUTES[family.route](model, model_dir, out_dir, family, opset, size)
    for name in COPIED_FILES:
        if not (out_dir / name).is_file() and (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return path


def load_for_export(model_dir: str | os.PathLike, rewrite: bool = True):
    """The saved model in eval mode, with its family's rewrites unless `rewrite` is False."""
    from transformers import AutoModelForSemanticSegmentation

    from segdeploy.export.rewrites import apply_rewrites

    model = AutoModelForSemanticSegmentation.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    if rewrite:
        apply_rewrites(model)
    return model


def export_optimum(
    model, model_dir: Path, out_dir: Path, family: Family, opset: int, size: tuple[int, int]
) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.utils.save_utils import maybe_load_preprocessors

    if (
        not family.dynamic_spatial
    ):  # no registered family needs it: the exporter would fix the batch too
        raise ValueError(f"{family.name}: the optimum route writes dynamic spatial axes only")
    # do_validation=False: segdeploy validates on real images after the export.
    onnx_export_from_model(
        model,
        output=out_dir,
        task=family.optimum_task,
        opset=opset,
        do_validation=False,
        no_dynamic_axes=False,
        preprocessors=maybe_load_preprocessors(str(model_dir)),
        height=size[0],
        width=size[1],
    )
    return _graph(out_dir)


def _segmentation_onnx_config(family: Family, dynamic_spatial: bool):
    """An Optimum OnnxConfig class: pixel_values in, logits out, with our axes."""
    from optimum.exporters.onnx.model_configs import ViTOnnxConfig

    spatial_in = {2: "height", 3: "width"} if dynamic_spatial else {}
    spatial_out = {2: "logits_height", 3: "logits_width"} if dynamic_spatial else {}

    class SegmentationOnnxConfig(ViTOnnxConfig):
        @property
        def inputs(self):
            return {INPUT_NAME: {0: "batch_size", **spatial_in}}

        @property
        def outputs(self):
            return {OUTPUT_NAME: {0: "batch_size", **spatial_out}}

    SegmentationOnnxConfig.__name__ = f"{family.config_class.removesuffix('Config')}SegOnnxConfig"
    return SegmentationOnnxConfig


def export_optimum_custom(
    model, model_dir: Path, out_dir: Path, family: Family, opset: int, size: tuple[int, int]
) -> Path:
    # optimum.exporters.onnx.export with our OnnxConfig, not onnx_export_from_model: for a
    # model type Optimum registers without this task (mobilenet_v2), both main_export and
    # onnx_export_from_model refuse the task ("doesn't support task semantic-segmentation
    # for the onnx backend") even when custom_onnx_configs is given.
    from optimum.exporters.onnx import export

    onnx_config = _segmentation_onnx_config(family, family.dynamic_spatial)(
        model.config, task=family.optimum_task
    )
    path = out_dir / VARIANT_FILES["fp32"]
    export(
        model,
        onnx_config,
        path,
        opset=opset,
        input_shapes={"batch_size": 2, "height": size[0], "width": size[1]},
    )
    return _graph(out_dir)


def export_torch_dynamo(
    model, model_dir: Path, out_dir: Path, family: Family, opset: int, size: tuple[int, int]
) -> Path:
    import torch

    wrapper = _logits_only(model)
    # Batch 2, not 1: the exporter would specialise a traced dimension of 1.
    example = torch.randn(2, 3, *size)
    dims = {0: torch.export.Dim("batch_size", min=1, max=1024)}
    if family.dynamic_spatial:
        dims |= {2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)}
    path = out_dir / VARIANT_FILES["fp32"]
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: dims},
            external_data=False,
            optimize=True,  # 1076 -> 202 nodes on tiny BEiT, +5 s of a 23 s export
            verify=False,  # segdeploy validates on real images after the export
            verbose=False,  # None prints the exporter's progress to stdout
        )
    program.save(path, external_data=False)
    return _graph(out_dir)


def _logits_only(model):
    """model wrapped as forward(pixel_values) -> logits, in eval mode: the exporter needs a
    tensor, not a ModelOutput, and exports what the wrapper's own mode says."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values, return_dict=False)[0]

    return LogitsOnly(model).eval()


def _graph(out_dir: Path) -> Path:
    path = out_dir / VARIANT_FILES["fp32"]
    if not path.is_file():
        raise RuntimeError(f"the exporter wrote no {path.name} in {out_dir}")
    return path


#: route -> f(model, model_dir, out_dir, family, opset, size): the graph's path.
ROUTES: dict[str, Callable[[object, Path, Path, Family, int, tuple[int, int]], Path]] = {
    "optimum": export_optimum,
    "optimum-custom": export_optimum_custom,
    "torch-dynamo": export_torch_dynamo,
}
