"""The inference paths `segdeploy bench` compares, each behind the same three calls.

Backend names are what `--backends` takes:

    torch           transformers' AutoModelForSemanticSegmentation, eager: the image
                    processor, forward, bilinear upsampling to the image size, argmax
    hf-pipeline     transformers' pipeline("image-segmentation"), the guide's inference path
    optimum         optimum's pipeline("image-segmentation", accelerator="ort"): the same
                    transformers pipeline around ORTModelForSemanticSegmentation
    onnx-<p>[-<v>]  segdeploy's own path (`segdeploy infer`, `Segmenter`) on provider
                    p = cpu | cuda | tensorrt | openvino with graph variant
                    v = fp16 | int8 | optimized | openvino_int8 | ...

`check_backend` decides in the parent process, cheaply, whether a backend can run
here (and why not). `make_runner` builds, inside a fresh worker process, the
object that the measurement drives:

    runner.end_to_end(items, out, inputs)  files -> label maps (the user's path, timed);
                                   segdeploy takes `inputs` as the CLI does (the folder)
                                   and writes its label PNGs; the others return the label
                                   maps, which the worker writes with Pillow in the same
                                   timed pass (or keeps in memory: BenchSettings.in_memory)
    runner.model_inputs(items)     preprocessed batches for the model alone (not timed)
    runner.forward(batch)          the model alone (timed)

Only `make_runner` imports torch, transformers or optimum, and only for the
backends that use them: a segdeploy backend's worker never loads torch, so its
peak memory is what a deployment machine would see.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError

ONNX_PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")
REFERENCE = "torch"  # the backend every other one's masks are compared with


@dataclass(frozen=True)
class Backend:
    """One `--backends` entry: the runner class that runs it (`kind`, a key of RUNNERS)
    and, for segdeploy's own runner, the provider and graph variant."""

    name: str
    kind: str
    provider: str = "cpu"
    variant: str = "fp32"

    @property
    def runner(self) -> type[Runner]:
        return RUNNERS[self.kind]

    @property
    def description(self) -> str:
        return self.runner.describe(self)

    @property
    def end_to_end_includes(self) -> str:
        return self.runner.end_to_end_includes

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: the numbers its model computes with."""
        return self.runner.precision_of(self)

    @property
    def graph(self) -> str | None:
        """The graph file in the ONNX folder that segdeploy's row runs (None for the others)."""
        return self.runner.graph_of(self)

    @property
    def writes_labels(self) -> bool:
        """Whether its end-to-end pass writes the label PNGs itself (else the worker does)."""
        return self.runner.writes_labels


def parse_backend(name: str) -> Backend:
    """The Backend for a `--backends` entry; SegdeployError for an unknown name."""
    name = name.strip().lower()
    for runner in RUNNERS.values():
        backend = runner.parse(name)
        if backend is not None:
            return backend
    raise SegdeployError(
        "--backends",
        f"unknown backend {name!r}; choose "
        + ", ".join(k for k in RUNNERS if k != SegdeployRunner.kind)
        + f", or onnx-<provider>[-<variant>] with provider {'|'.join(ONNX_PROVIDERS)} "
        "(e.g. onnx-cpu, onnx-cpu-int8)",
    )


def onnx_variants(onnx_dir: Path | None) -> list[str]:
    """The graph variants present in an ONNX folder besides fp32 (model_<v>.onnx -> v, and
    OpenVINO IR graphs model_<v>.xml -> v)."""
    if onnx_dir is None or not onnx_dir.is_dir():
        return []
    graphs = [*onnx_dir.glob("model_*.onnx"), *onnx_dir.glob("model_*.xml")]
    return sorted({p.stem.removeprefix("model_") for p in graphs if p.is_file()})


def default_backends(onnx_dir: Path | None) -> list[str]:
    """Every backend worth a row: the three alternatives, then each provider and variant.

    TensorRT gets fp32 and fp16 only: it picks its own kernels and precision from
    the fp32 graph (fp16 is a build flag), so the other graph variants mean nothing to it.
    """
    variants = onnx_variants(onnx_dir)
    return [name for runner in RUNNERS.values() for name in runner.default_names(variants)]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_backend(
    backend: Backend,
    model_dir: Path | None,
    onnx_dir: Path | None,
    available: Sequence[str],
    tiling=None,
) -> str | None:
    """Why `backend` cannot run here, or None when it can.

    `available` is onnxruntime's list of provider names (get_available_providers());
    `tiling` (tiles.TileOptions): only runners with a sliding-window mode can run.
    """
    if tiling is not None and tiling.enabled and not backend.runner.tiles:
        return "no sliding-window mode (with --tile only torch and onnx-* rows run)"
    return backend.runner.unavailable(backend, model_dir, onnx_dir, available)


def _torch_unavailable(model_dir: Path | None) -> str | None:
    from segdeploy.folders import has_weights

    if not _has_module("torch") or not _has_module("transformers"):
        return "torch and transformers are not installed"
    if model_dir is None or not has_weights(model_dir):
        return f"no PyTorch weights in {model_dir} (give --model a trained model folder)"
    return None


def _export_missing(onnx_dir: Path | None) -> str | None:
    from segdeploy.folders import variant_file

    if onnx_dir is None or not (onnx_dir / variant_file("fp32")).is_file():
        return f"no ONNX export at {onnx_dir} (run `segdeploy export` first)"
    return None


# ------------------------------------------------------------------ runners (worker side)


def _chunks(seq: Sequence[Any], n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _model_batches(items: Sequence[Any], batch_size: int, count: int) -> list[list[Any]]:
    """`count` full batches of distinct images where there are enough, cycling otherwise."""
    n = max(len(items), 1)
    batches, start = [], 0
    for _ in range(count):
        batches.append([items[(start + j) % n] for j in range(batch_size)])
        start = (start + batch_size) % n
    return batches


#: Runner classes by kind, in the order of the report's rows: a new backend is one class
#: decorated with @register (as timm and segmentation_models_pytorch register models).
RUNNERS: dict[str, type[Runner]] = {}


def register(cls: type[Runner]) -> type[Runner]:
    RUNNERS[cls.kind] = cls
    return cls


class Runner:
    """A backend: what it is (for the report), whether it can run here (parent process,
    cheap), and, built in the worker, the three calls the measurement drives."""

    kind: str = ""
    #: Whether it runs sliding windows (`tiled`) for --tile.
    tiles: bool = False
    #: The tile options it runs (tiles.TileOptions), None: whole images.
    tiling = None
    #: What the end-to-end figure includes, written under the report's table (the
    #: worker's writing of the label PNGs, or not, is added by the report).
    end_to_end_includes = "decoding, preprocessing, model, upsampling"
    #: Its end_to_end writes the label PNGs itself (segdeploy infer); else it returns the
    #: label maps and the worker writes them with Pillow, as a user would.
    writes_labels = False
    description = ""

    @classmethod
    def describe(cls, backend: Backend) -> str:
        return cls.description

    @classmethod
    def precision_of(cls, backend: Backend) -> str:
        return "fp32"

    @classmethod
    def graph_of(cls, backend: Backend) -> str | None:
        return None

    @classmethod
    def parse(cls, name: str) -> Backend | None:
        """The Backend `name` means for this runner, or None."""
        return Backend(name, cls.kind) if name == cls.kind else None

    @classmethod
    def default_names(cls, variants: Sequence[str]) -> list[str]:
        """Its `--backends` names in the default run, given the export's graph variants."""
        return [cls.kind]

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        """Why it cannot run here, or None."""
        raise NotImplementedError

    @classmethod
    def create(cls, backend, model_dir, onnx_dir, batch_size: int, threads: int | None):
        """The runner, built inside the worker process (imports its libraries)."""
        raise NotImplementedError

    def end_to_end(self, items, out: Path, inputs: Sequence[str]):
        raise NotImplementedError

    def model_inputs(self, items, count: int):
        raise NotImplementedError

    def forward(self, batch) -> None:
        raise NotImplementedError

    def tiled(self, tiling) -> Runner:
        """This runner running sliding windows (`tiles` runners only)."""
        self.tiling = tiling
        return self


def _window_batches(items, plan, prepare, batch_size: int, count: int) -> list[np.ndarray]:
    """Up to `count` batches of `batch_size` windows, cut as `segdeploy infer --tile` cuts
    them, from the images in turn (model-only inputs of a tiled row)."""
    from segdeploy.runtime.large_image import open_source
    from segdeploy.runtime.tiles import window_batches

    batches = []
    for item in items:
        with open_source(item.path) as source:
            for _, x, _ in window_batches(source, plan, prepare, batch_size):
                if len(x) == batch_size or not batches:
                    batches.append(x)
                if len(batches) == count:
                    return batches
    return batches


@register
class TorchRunner(Runner):
    """The Hugging Face guide's inference, written out: processor, model, upsample, argmax."""

    kind = "torch"
    description = "transformers model, eager: processor, forward, bilinear upsample, argmax"
    tiles = True

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        return _torch_unavailable(model_dir)

    @classmethod
    def create(cls, backend, model_dir, onnx_dir, batch_size, threads):
        return cls(model_dir, batch_size, threads)

    def __init__(self, model_dir: Path, batch_size: int, threads: int | None):
        import torch
        from transformers import AutoModelForSemanticSegmentation

        from segdeploy.families import family_of, processor_class

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        self.model_dir = model_dir
        self.model = AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
        self.processor = processor_class(family_of(model_dir)).from_pretrained(model_dir)
        self.dtype = _label_dtype(self.model.config.num_labels)
        self.threads = torch.get_num_threads()

    def _load(self, path: Path):
        return load_rgb(path)

    def _plan(self):
        """The tiling of the PyTorch model: segdeploy's windows and window inputs, at the
        model's size where the family runs only that (its exported graph's)."""
        from segdeploy.families import family_of
        from segdeploy.runtime.processors import model_processor
        from segdeploy.runtime.tiles import plan_tiles

        family = family_of(self.model_dir)
        processor = model_processor(self.model_dir)
        fixed = None if family.dynamic_spatial else processor.size
        plan = plan_tiles(
            self.tiling, graph_size=fixed, processor=processor, square_only=family.square_only
        )
        return plan, processor

    def _tiled_end_to_end(self, items) -> list[np.ndarray]:
        from segdeploy.runtime.large_image import open_source
        from segdeploy.runtime.tiles import WindowModel, predict_bands

        plan, processor = self._plan()
        model = WindowModel(processor.normalize, self._logits, self.model.config.num_labels)
        labels = []
        for item in items:
            with open_source(item.path) as source:
                out = np.empty((source.height, source.width), self.dtype)
                for y0, band in predict_bands(source, model, plan, self.batch_size):
                    out[y0 : y0 + len(band)] = band
            labels.append(out)
        return labels

    def _logits(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(pixel_values=self.torch.from_numpy(x)).logits.numpy()

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> list[np.ndarray]:
        if self.tiling is not None:
            return self._tiled_end_to_end(items)
        torch, F = self.torch, self.torch.nn.functional
        labels = []
        for chunk in _chunks(items, self.batch_size):
            images = [self._load(item.path) for item in chunk]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                logits = self.model(pixel_values=pixels).logits
                for i, image in enumerate(images):
                    up = F.interpolate(
                        logits[i : i + 1],
                        size=(image.height, image.width),
                        mode="bilinear",
                        align_corners=False,
                    )
                    labels.append(up.argmax(1)[0].numpy().astype(self.dtype))
        return labels

    def model_inputs(self, items, count: int):
        if self.tiling is not None:
            plan, processor = self._plan()
            batches = _window_batches(items, plan, processor.normalize, self.batch_size, count)
            return [self.torch.from_numpy(b) for b in batches]
        return [
            self.processor(images=[self._load(i.path) for i in batch], return_tensors="pt")[
                "pixel_values"
            ]
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        with self.torch.inference_mode():
            self.model(pixel_values=batch)


class PipelineRunner(Runner):
    """transformers' (or optimum's) image-segmentation pipeline on file paths.

    The pipeline returns one binary mask per class present; merging them into one
    label map is the user's last step, so it is timed too.
    """

    @classmethod
    def create(cls, backend, model_dir, onnx_dir, batch_size, threads):
        return cls(model_dir, onnx_dir, batch_size, threads)

    def _pipeline(self, model_dir: Path, onnx_dir: Path, threads: int | None):
        raise NotImplementedError

    def __init__(self, model_dir: Path, onnx_dir: Path, batch_size: int, threads):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        self.pipe = self._pipeline(model_dir, onnx_dir, threads)
        config = self.pipe.model.config
        self.label2id = {str(k): int(v) for k, v in config.label2id.items()}
        self.dtype = _label_dtype(len(config.id2label))
        self.threads = torch.get_num_threads()

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> list[np.ndarray]:
        # Decoded by us, not from paths, so that every row sees the pixels infer sees.
        images = [load_rgb(item.path) for item in items]
        results = self.pipe(images, batch_size=self.batch_size)
        return [self._label_map(segments) for segments in results]

    def _label_map(self, segments) -> np.ndarray:
        w, h = segments[0]["mask"].size
        labels = np.zeros((h, w), self.dtype)
        for seg in segments:
            labels[np.asarray(seg["mask"]) > 0] = self.label2id[seg["label"]]
        return labels

    def model_inputs(self, items, count: int):
        return [
            self.pipe.image_processor(
                images=[load_rgb(i.path) for i in batch], return_tensors="pt"
            )["pixel_values"]
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        # The pipeline's own model object: a torch module for hf-pipeline, an
        # ORTModel (torch in, torch out) for optimum.
        with self.torch.inference_mode():
            self.pipe.model(pixel_values=batch)


@register
class HfPipelineRunner(PipelineRunner):
    kind = "hf-pipeline"
    description = 'transformers pipeline("image-segmentation"), masks merged to a label map'

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        return _torch_unavailable(model_dir)

    def _pipeline(self, model_dir, onnx_dir, threads):
        from transformers import pipeline

        return pipeline("image-segmentation", model=str(model_dir), device="cpu")


@register
class OptimumRunner(PipelineRunner):
    kind = "optimum"
    description = 'optimum pipeline("image-segmentation", accelerator="ort"), ORTModelForSemanticSegmentation, CPU'

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        missing = _export_missing(onnx_dir)
        if missing is None and (not _has_module("optimum.onnxruntime") or not _has_module("torch")):
            return "optimum's onnxruntime support (optimum-onnx) or torch is not installed"
        return missing

    def _pipeline(self, model_dir, onnx_dir, threads):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSemanticSegmentation
        from optimum.pipelines import pipeline
        from transformers import AutoImageProcessor

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # The model is built here rather than through the pipeline's model_kwargs:
        # the pipeline deep-copies those, and SessionOptions cannot be copied.
        model = ORTModelForSemanticSegmentation.from_pretrained(
            onnx_dir, provider="CPUExecutionProvider", session_options=opts
        )
        return pipeline(
            "image-segmentation",
            model=model,
            image_processor=AutoImageProcessor.from_pretrained(onnx_dir),
            accelerator="ort",
        )


@register
class SegdeployRunner(Runner):
    """`segdeploy infer` on the folder, exactly as the CLI runs it, around one Segmenter."""

    kind = "segdeploy"
    end_to_end_includes = (
        "listing, decoding, preprocessing, model, upsampling, writing label PNGs and summary.json"
    )
    tiles = True
    writes_labels = True

    @classmethod
    def describe(cls, backend: Backend) -> str:
        where = (
            "OpenVINO (CPU)"
            if backend.provider == "openvino"
            else f"onnxruntime {backend.provider}"
        )
        return f"segdeploy infer: {backend.variant} graph on {where}"

    @classmethod
    def precision_of(cls, backend: Backend) -> str:
        if "int8" in backend.variant:
            return "int8"
        return "fp16" if backend.variant.startswith("fp16") else "fp32"

    @classmethod
    def graph_of(cls, backend: Backend) -> str | None:
        from segdeploy.folders import variant_file

        # TensorRT builds its fp16 engine from the fp32 graph.
        return variant_file("fp32" if backend.provider == "tensorrt" else backend.variant)

    @classmethod
    def parse(cls, name: str) -> Backend | None:
        if not name.startswith("onnx-"):
            return None
        provider, _, variant = name[len("onnx-") :].partition("-")
        if provider in ONNX_PROVIDERS and (variant == "" or variant.replace("_", "").isalnum()):
            return Backend(name, cls.kind, provider, variant or "fp32")
        return None

    @classmethod
    def default_names(cls, variants: Sequence[str]) -> list[str]:
        """Each provider on fp32, then on each variant it can run. TensorRT gets fp16 only:
        it picks its own kernels and precision from the fp32 graph (fp16 is a build flag).
        OpenVINO IR graphs run on OpenVINO only; OpenVINO on the CPU computes fp16 graphs
        in fp32, so it gets none of those."""
        names = []
        for provider in ONNX_PROVIDERS:
            names.append(f"onnx-{provider}")
            names += [f"onnx-{provider}-{v}" for v in variants if _runs(provider, v)]
        return names

    @classmethod
    def unavailable(cls, backend, model_dir, onnx_dir, available) -> str | None:
        from segdeploy.folders import variant_file
        from segdeploy.runtime import providers as prov
        from segdeploy.runtime.openvino_runner import is_ir

        missing = _export_missing(onnx_dir)
        if missing is not None:
            return missing
        if prov.AVAILABLE_NAME[backend.provider] not in available:
            return prov.missing_provider_message(backend.provider, available)
        graph_variant = "fp32" if backend.provider == "tensorrt" else backend.variant
        if not (onnx_dir / variant_file(graph_variant)).is_file():
            return f"no {variant_file(graph_variant)} in {onnx_dir} (see `segdeploy export --help`)"
        if is_ir(variant_file(graph_variant)) and backend.provider != "openvino":
            return (
                f"{variant_file(graph_variant)} is an OpenVINO IR graph: only onnx-openvino runs it"
            )
        if graph_variant.endswith("fused"):
            return (
                f"{variant_file(graph_variant)} has argmax fused in (export --fuse-argmax): it "
                "returns label maps, not the logits that the model-only figures time; time it "
                f"end to end with `segdeploy infer --variant {graph_variant}`"
            )
        return None

    @classmethod
    def create(cls, backend, model_dir, onnx_dir, batch_size, threads):
        return cls(backend, onnx_dir, batch_size, threads)

    def __init__(self, backend: Backend, onnx_dir: Path, batch_size: int, threads: int | None):
        from segdeploy.runtime.pipeline import default_threads, default_workers
        from segdeploy.runtime.segmenter import Segmenter

        fp16 = backend.variant == "fp16"
        # TensorRT builds fp16 engines from the fp32 graph; elsewhere fp16 selects model_fp16.onnx.
        variant = "fp32" if fp16 else backend.variant
        self.onnx_dir = onnx_dir
        # The session `segdeploy infer` opens: its default threads (the cores of the
        # process's affinity) and, with worker processes, no spin-waiting.
        threads = threads or default_threads()
        self.segmenter = Segmenter(
            onnx_dir,
            backend.provider,
            variant,
            fp16=fp16,
            threads=threads,
            batch_size=batch_size,
            trt_cache=os.environ.get("SEGDEPLOY_BENCH_TRT_CACHE"),
            spin=default_workers() == 0,
        )
        self.batch_size = batch_size
        self.threads = threads
        self.provider = self.segmenter.provider

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> None:
        from segdeploy.runtime.infer import run_infer

        run_infer(
            inputs,
            self.onnx_dir,
            out,
            segmenter=self.segmenter,
            progress=False,
            tiling=self.tiling,
        )

    def model_inputs(self, items, count: int):
        seg = self.segmenter
        if self.tiling is not None:
            from segdeploy.runtime.tiles import plan_for

            plan = plan_for(seg, self.tiling)
            return _window_batches(items, plan, seg.preprocessor.normalize, self.batch_size, count)
        return [
            np.stack([seg.prepare(seg.load(i.path)) for i in batch])
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        self.segmenter.logits(batch)


def _runs(provider: str, variant: str) -> bool:
    """Whether the default rows pair `provider` with graph `variant` (see default_names)."""
    from segdeploy.folders import variant_file
    from segdeploy.runtime.openvino_runner import is_ir

    if provider == "tensorrt":
        return variant == "fp16"
    if provider == "openvino":
        return not variant.startswith("fp16")
    return not is_ir(variant_file(variant))


def load_rgb(path: Path):
    """The image as `segdeploy infer` sees it: EXIF-upright, every mode converted to RGB.

    The one conversion for every row (issue 12: grayscale images failed the torch
    and hf-pipeline rows with "mean must have 1 elements"; 16-bit images would be
    clipped by Pillow's own conversion), so that their masks compare with infer's.
    """
    from segdeploy.runtime.image_io import load_image

    return load_image(path)


def make_runner(
    backend: Backend,
    model_dir: Path | None,
    onnx_dir: Path | None,
    batch_size: int,
    threads: int | None = None,
    tiling=None,
):
    runner = backend.runner.create(backend, model_dir, onnx_dir, batch_size, threads)
    return runner.tiled(tiling) if tiling is not None and tiling.enabled else runner


def _label_dtype(num_labels: int) -> np.dtype:
    from segdeploy.runtime.upsample import label_dtype

    return label_dtype(num_labels)
