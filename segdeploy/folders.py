"""The folders the stages hand to each other, and the one place their file names are spelled.

`segdeploy train` writes a *model folder* (a Hugging Face model folder plus
segdeploy's records); `segdeploy export` reads it and writes an *ONNX folder*
(by default `MODEL/onnx`); `validate` reads both; `infer` and `bench` read the
ONNX folder. A command opens each folder once (`ModelFolder.open`,
`OnnxFolder.open`) and passes the object on: no other module spells these file
names or parses config.json, so the layout has one owner (as optimum keeps its
file names in `onnxruntime/constants.py`).

Torch-free: the runtime reads ONNX folders through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from segdeploy.errors import SegdeployError

# -- file names ----------------------------------------------------------------------------

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
#: What transformers' save_pretrained writes as weights; any one makes a trained folder.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRAIN_ARGS_FILE = "train_args.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
CHECKPOINTS_DIR = "checkpoints"
#: In checkpoints/: what the checkpoints were made with, for `train --resume`.
RUN_RECORD_FILE = "run.json"
#: Where `segdeploy export` puts a model folder's ONNX folder by default.
ONNX_SUBDIR = "onnx"
#: Files copied from the model folder into the ONNX folder, so that optimum's
#: ORTModelForSemanticSegmentation and `segdeploy infer` load it as it is.
COPIED_FILES = (CONFIG_FILE, PREPROCESSOR_FILE)
#: Graph file per variant, as `segdeploy export` writes them; any other variant
#: name `v` means `model_v.onnx`.
VARIANT_FILES = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "optimized": "model_optimized.onnx",
    "int8": "model_int8.onnx",
    # Bilinear upsampling and argmax inside the graph (export --fuse-argmax): outputs labels.
    "fused": "model_fused.onnx",
    "fp16_fused": "model_fp16_fused.onnx",
    # NNCF int8 for OpenVINO (export --quantize int8 --int8-engine openvino): an OpenVINO
    # IR graph (its weights in model_openvino_int8.bin), run by `--provider openvino`.
    "openvino_int8": "model_openvino_int8.xml",
}
#: Input that a graph with argmax fused in takes (the label map's height and width).
OUTPUT_SIZE_INPUT = "output_size"
QUANTIZATION_REPORT = "quantization_int8.json"
#: What NNCF's int8 for OpenVINO (model_openvino_int8.xml) was made with.
OPENVINO_QUANTIZATION_REPORT = "quantization_openvino_int8.json"
#: Where every command looks for models when `--model` is not given.
MODELS_ROOT = "models"


def variant_of(graph_file: str) -> str | None:
    """The variant whose graph file is `graph_file` (model_fp16.onnx -> fp16), or None."""
    return next((v for v, f in VARIANT_FILES.items() if f == graph_file), None)


def variant_file(variant: str) -> str:
    """The graph file name of `variant` (`fp16` -> model_fp16.onnx, `x` -> model_x.onnx)."""
    if not variant or any(c in variant for c in "/\\") or variant.startswith("."):
        raise SegdeployError("--variant", f"not a variant name: {variant!r}")
    name = VARIANT_FILES.get(variant, f"model_{variant}.onnx")
    if len(os.fsencode(name)) > 255:  # NAME_MAX: no such file can exist
        raise SegdeployError("--variant", f"too long for a file name ({len(variant)} characters)")
    return name


def validation_report_name(graph_file: str) -> str:
    """validation.json for model.onnx, validation_<variant>.json for model_<variant>.onnx."""
    stem = Path(graph_file).stem
    return (
        "validation.json" if stem == "model" else f"validation_{stem.removeprefix('model_')}.json"
    )


# -- reading -------------------------------------------------------------------------------


def read_json(path: Path, *, missing: str | None = None) -> Any:
    """The JSON in `path`; one-line SegdeployError when unreadable.

    `missing`: the problem to report when the file does not exist; None returns None then.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is None:
            return None
        raise SegdeployError(path, missing) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SegdeployError(path, f"unreadable: {getattr(err, 'strerror', None) or err}") from None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model folder (or ONNX folder), as a dict."""
    if not folder.is_dir():
        raise SegdeployError(folder, "not a folder (expected a model folder)")
    if not (folder / CONFIG_FILE).is_file():
        raise SegdeployError(folder, f"no {CONFIG_FILE}: not a Hugging Face model folder")
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise SegdeployError(folder / CONFIG_FILE, "is not a JSON object")
    return config


def id2label_of(config: dict[str, Any]) -> dict[int, str]:
    """Class names by id; transformers' own defaults (LABEL_i, 2 classes) when absent."""
    raw = config.get("id2label") or {}
    try:
        names = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise SegdeployError(
            CONFIG_FILE, f"id2label is not a map of ids to names: {raw!r}"
        ) from None
    if names:
        return names
    return {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}


def image_size_of(preprocessor: dict[str, Any] | None) -> tuple[int, int] | None:
    """(height, width) the preprocessor resizes to, or None when it keeps each image's size."""
    size = (preprocessor or {}).get("size") or {}
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def user_cache_dir() -> Path:
    """segdeploy's cache folder: $XDG_CACHE_HOME/segdeploy, else ~/.cache/segdeploy (what
    the runtimes build from a model and may rebuild, outside the user's model folders)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative value is invalid and ignored.
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "segdeploy"


def default_onnx_dir(model_dir: str | os.PathLike) -> Path:
    """Where `segdeploy export` writes a model folder's ONNX folder unless told otherwise."""
    return Path(model_dir) / ONNX_SUBDIR


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds PyTorch weights: a trained model folder."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def is_trained_folder(folder: Path) -> bool:
    """A complete model folder as `segdeploy train` leaves it (metrics and config written last)."""
    return (folder / METRICS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


# -- the folders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _HfFolder:
    """What both folders are: a Hugging Face folder, config.json and preprocessor beside it."""

    path: Path
    config: dict[str, Any] = field(repr=False)
    #: The problem reported when preprocessor_config.json is missing; None: it may be.
    preprocessor_missing: ClassVar[str | None] = None

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @cached_property
    def id2label(self) -> dict[int, str]:
        return id2label_of(self.config)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @cached_property
    def preprocessor(self) -> dict[str, Any] | None:
        return read_json(self.path / PREPROCESSOR_FILE, missing=self.preprocessor_missing)

    @property
    def image_size(self) -> tuple[int, int] | None:
        return image_size_of(self.preprocessor)


@dataclass(frozen=True)
class ModelFolder(_HfFolder):
    """A trained Hugging Face model folder: config.json, weights, preprocessor and records."""

    @classmethod
    def open(cls, path: str | os.PathLike, *, need_weights: bool = True) -> ModelFolder:
        path = Path(path)
        config = read_config(path)
        folder = cls(path, config)
        return folder.require_weights() if need_weights else folder

    def require_weights(self) -> ModelFolder:
        """Self, or SegdeployError when the folder holds no PyTorch weights."""
        if not has_weights(self.path):
            raise SegdeployError(
                self.path, f"no PyTorch weights ({WEIGHT_FILES[0]}): not a trained model folder"
            )
        return self

    @property
    def weight_files(self) -> list[Path]:
        """The weight files present (transformers' save_pretrained names)."""
        return [self.path / name for name in WEIGHT_FILES if (self.path / name).is_file()]

    @cached_property
    def train_args(self) -> dict[str, Any] | None:
        """What `segdeploy train` recorded (options, resolved dataset); None if not trained by it."""
        args = read_json(self.path / TRAIN_ARGS_FILE)
        if args is not None and not isinstance(args, dict):
            raise SegdeployError(self.path / TRAIN_ARGS_FILE, "is not a JSON object")
        return args

    @property
    def recorded_dataset(self) -> dict[str, Any] | None:
        """The dataset spec train recorded (a DatasetSpec as a dict), or None."""
        return (self.train_args or {}).get("dataset") or None

    @property
    def train_args_path(self) -> Path:
        return self.path / TRAIN_ARGS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def default_onnx_dir(self) -> Path:
        return default_onnx_dir(self.path)


@dataclass(frozen=True)
class OnnxFolder(_HfFolder):
    """An export: graphs (one per variant), config.json, preprocessor_config.json, reports."""

    preprocessor_missing: ClassVar[str | None] = (
        "missing: the export needs its preprocessor_config.json"
    )

    @classmethod
    def open(cls, path: str | os.PathLike, variant: str = "fp32") -> OnnxFolder:
        """The ONNX folder at `path`, or at `path/onnx` for a trained model folder; it
        must hold the graph of `variant`."""
        path = Path(path)
        if not path.is_dir():
            raise SegdeployError(path, "model folder not found")
        name = variant_file(variant)
        candidates = (path, path / ONNX_SUBDIR)
        for folder in candidates:
            if (folder / name).is_file():
                return cls(folder, read_config(folder))
            if os.path.lexists(folder / name):  # a dangling link, a device, a folder
                raise SegdeployError(folder / name, _not_a_graph(folder / name))
        have = sorted(p.name for d in candidates if d.is_dir() for p in d.glob("*.onnx"))
        hint = f" (found: {', '.join(have)})" if have else " (run `segdeploy export` first)"
        raise SegdeployError(
            path, f"no {name} here or in {ONNX_SUBDIR}/ for variant {variant!r}{hint}"
        )

    def graph(self, variant: str = "fp32") -> Path:
        return self.path / variant_file(variant)

    def report_path(self, graph: Path) -> Path:
        return graph.with_name(validation_report_name(graph.name))

    @property
    def quantization_report(self) -> Path:
        return self.path / QUANTIZATION_REPORT

    @property
    def model_folder(self) -> Path | None:
        """The trained model folder this export sits in (MODEL/onnx), if there is one."""
        parent = self.path.resolve().parent
        return parent if has_weights(parent) else None


def _not_a_graph(path: Path) -> str:
    """Why `path`, which exists, is not a graph file to load."""
    if path.is_symlink() and not path.exists():
        return f"dangling symlink (to {os.readlink(path)}): not a graph file"
    if path.is_dir():
        return "is a folder, not a graph file"
    kind = "a special file (FIFO, device or socket)"
    return (
        f"is {kind}{f' (via {os.readlink(path)})' if path.is_symlink() else ''}, not a graph file"
    )


def newest_export(root: str | os.PathLike = MODELS_ROOT) -> Path:
    """The model folder under `root` whose ONNX export (onnx/model.onnx) is the newest.

    The default of every command's `--model`: after `segdeploy train` and `segdeploy
    export`, the model just made is used without naming it again.
    """
    root = Path(root)
    graphs = [p for p in root.glob(f"*/{ONNX_SUBDIR}/{VARIANT_FILES['fp32']}") if p.is_file()]
    if not graphs:
        raise SegdeployError(
            root, "no exported model here: pass --model DIR, or run `segdeploy export` first"
        )
    return max(graphs, key=lambda p: p.stat().st_mtime).parent.parent
