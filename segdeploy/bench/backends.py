"""The inference paths `segdeploy bench` compares, each behind the same three calls.

Backend names are what `--backends` takes:

    torch           transformers' SegformerForSemanticSegmentation, eager: the image
                    processor, forward, bilinear upsampling to the image size, argmax
    hf-pipeline     transformers' pipeline("image-segmentation"), the guide's inference path
    optimum         optimum's pipeline("image-segmentation", accelerator="ort"): the same
                    transformers pipeline around ORTModelForSemanticSegmentation
    openvino[-int8] OpenVINO on the CPU, fp32 or NNCF int8 (segdeploy.bench.openvino)
    onnx-<p>[-<v>]  segdeploy's own path (`segdeploy infer`, `Segmenter`) on provider
                    p = cpu | cuda | tensorrt with graph variant v = fp16 | int8 | optimized | ...

`check_backend` decides in the parent process, cheaply, whether a backend can run
here (and why not). `make_runner` builds, inside a fresh worker process, the
object that the measurement drives:

    runner.end_to_end(items, out, inputs)  files -> label maps (the user's path, timed);
                                   segdeploy takes `inputs` as the CLI does (the folder)
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

from segdeploy.bench.openvino import RUNNERS as OPENVINO_RUNNERS
from segdeploy.errors import SegdeployError

ONNX_PROVIDERS = ("cpu", "cuda", "tensorrt")
REFERENCE = "torch"  # the backend every other one's masks are compared with
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # "torch" | "hf-pipeline" | "optimum" | "segdeploy" | "openvino"
    provider: str = "cpu"
    variant: str = "fp32"

    @property
    def description(self) -> str:
        if self.kind == "openvino":
            return OPENVINO_RUNNERS[self.name].description
        if self.kind == "torch":
            return "transformers model, eager: processor, forward, bilinear upsample, argmax"
        if self.kind == "hf-pipeline":
            return 'transformers pipeline("image-segmentation"), masks merged to a label map'
        if self.kind == "optimum":
            return 'optimum pipeline("image-segmentation", accelerator="ort"), ORTModelForSemanticSegmentation, CPU'
        return f"segdeploy infer: {self.variant} graph on onnxruntime {self.provider}"

    @property
    def end_to_end_includes(self) -> str:
        if self.kind == "openvino":
            return OPENVINO_RUNNERS[self.name].end_to_end_includes
        if self.kind == "segdeploy":
            return "listing, decoding, preprocessing, model, upsampling, writing label PNGs and summary.json"
        return "decoding, preprocessing, model, upsampling; label maps kept in memory (not written)"


def parse_backend(name: str) -> Backend:
    """The Backend for a `--backends` entry; SegdeployError for an unknown name."""
    name = name.strip().lower()
    if name in ("torch", "hf-pipeline", "optimum"):
        return Backend(name, name)
    if name in OPENVINO_RUNNERS:
        return Backend(name, "openvino")
    if name.startswith("onnx-"):
        provider, _, variant = name[len("onnx-") :].partition("-")
        if provider in ONNX_PROVIDERS and (variant == "" or variant.replace("_", "").isalnum()):
            return Backend(name, "segdeploy", provider, variant or "fp32")
    raise SegdeployError(
        "--backends",
        f"unknown backend {name!r}; choose torch, hf-pipeline, optimum, openvino, "
        "openvino-int8, or onnx-<provider>"
        f"[-<variant>] with provider {'|'.join(ONNX_PROVIDERS)} (e.g. onnx-cpu, onnx-cpu-int8)",
    )


def onnx_variants(onnx_dir: Path | None) -> list[str]:
    """The graph variants present in an ONNX folder besides fp32 (model_<v>.onnx -> v)."""
    if onnx_dir is None or not onnx_dir.is_dir():
        return []
    return sorted(
        p.stem.removeprefix("model_") for p in onnx_dir.glob("model_*.onnx") if p.is_file()
    )


def default_backends(onnx_dir: Path | None) -> list[str]:
    """Every backend worth a row: the three alternatives, then each provider and variant.

    TensorRT gets fp32 and fp16 only: it picks its own kernels and precision from
    the fp32 graph (fp16 is a build flag), so the other graph variants mean nothing to it.
    """
    variants = onnx_variants(onnx_dir)
    names = ["torch", "hf-pipeline", "optimum"]
    for provider in ONNX_PROVIDERS:
        names.append(f"onnx-{provider}")
        for v in variants:
            if provider != "tensorrt" or v == "fp16":
                names.append(f"onnx-{provider}-{v}")
    return names


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
) -> str | None:
    """Why `backend` cannot run here, or None when it can.

    `available` is onnxruntime's list of provider names (get_available_providers()).
    """
    from segdeploy.runtime import providers as prov
    from segdeploy.runtime.segmenter import variant_file

    if backend.kind == "openvino":
        return OPENVINO_RUNNERS[backend.name].unavailable(model_dir, onnx_dir)
    if backend.kind in ("torch", "hf-pipeline"):
        if not _has_module("torch") or not _has_module("transformers"):
            return "torch and transformers are not installed"
        if model_dir is None or not any((model_dir / f).is_file() for f in WEIGHT_FILES):
            return f"no PyTorch weights in {model_dir} (give --model a trained model folder)"
        return None
    if onnx_dir is None or not (onnx_dir / "model.onnx").is_file():
        return f"no ONNX export at {onnx_dir} (run `segdeploy export` first)"
    if backend.kind == "optimum":
        if not _has_module("optimum.onnxruntime") or not _has_module("torch"):
            return "optimum's onnxruntime support (optimum-onnx) or torch is not installed"
        return None
    if prov.ORT_NAME[backend.provider] not in available:
        return prov.missing_provider_message(backend.provider, available)
    graph_variant = "fp32" if backend.provider == "tensorrt" else backend.variant
    if not (onnx_dir / variant_file(graph_variant)).is_file():
        return f"no {variant_file(graph_variant)} in {onnx_dir} (see `segdeploy export --help`)"
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


class TorchRunner:
    """The Hugging Face guide's inference, written out: processor, model, upsample, argmax."""

    def __init__(self, model_dir: Path, batch_size: int, threads: int | None):
        import torch
        from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        self.model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
        self.processor = SegformerImageProcessor.from_pretrained(model_dir)
        self.dtype = _label_dtype(self.model.config.num_labels)
        self.threads = torch.get_num_threads()

    def _load(self, path: Path):
        return load_rgb(path)

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> list[np.ndarray]:
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
        return [
            self.processor(images=[self._load(i.path) for i in batch], return_tensors="pt")[
                "pixel_values"
            ]
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        with self.torch.inference_mode():
            self.model(pixel_values=batch)


class PipelineRunner:
    """transformers' (or optimum's) image-segmentation pipeline on file paths.

    The pipeline returns one binary mask per class present; merging them into one
    label map is the user's last step, so it is timed too.
    """

    def __init__(self, backend: Backend, model_dir: Path, onnx_dir: Path, batch_size: int, threads):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        if backend.kind == "hf-pipeline":
            from transformers import pipeline

            self.pipe = pipeline("image-segmentation", model=str(model_dir), device="cpu")
        else:
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
            self.pipe = pipeline(
                "image-segmentation",
                model=model,
                image_processor=AutoImageProcessor.from_pretrained(onnx_dir),
                accelerator="ort",
            )
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


class SegdeployRunner:
    """`segdeploy infer` on the folder, exactly as the CLI runs it, around one Segmenter."""

    def __init__(self, backend: Backend, onnx_dir: Path, batch_size: int, threads: int | None):
        from segdeploy.runtime.segmenter import Segmenter

        fp16 = backend.variant == "fp16"
        # TensorRT builds fp16 engines from the fp32 graph; elsewhere fp16 selects model_fp16.onnx.
        variant = "fp32" if fp16 else backend.variant
        self.onnx_dir = onnx_dir
        self.segmenter = Segmenter(
            onnx_dir,
            backend.provider,
            variant,
            fp16=fp16,
            threads=threads,
            batch_size=batch_size,
            trt_cache=os.environ.get("SEGDEPLOY_BENCH_TRT_CACHE"),
        )
        self.batch_size = batch_size
        self.threads = threads
        self.provider = self.segmenter.provider

    def end_to_end(self, items, out: Path, inputs: Sequence[str]) -> None:
        from segdeploy.infer import run_infer

        run_infer(
            inputs,
            self.onnx_dir,
            out,
            segmenter=self.segmenter,
            progress=False,
        )

    def model_inputs(self, items, count: int):
        seg = self.segmenter
        return [
            np.stack([seg.prepare(seg.load(i.path)) for i in batch])
            for batch in _model_batches(items, self.batch_size, count)
        ]

    def forward(self, batch) -> None:
        self.segmenter.logits(batch)


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
):
    if backend.kind == "torch":
        return TorchRunner(model_dir, batch_size, threads)
    if backend.kind in ("hf-pipeline", "optimum"):
        return PipelineRunner(backend, model_dir, onnx_dir, batch_size, threads)
    if backend.kind == "openvino":
        return OPENVINO_RUNNERS[backend.name](model_dir, onnx_dir, batch_size, threads)
    return SegdeployRunner(backend, onnx_dir, batch_size, threads)


def _label_dtype(num_labels: int) -> np.dtype:
    from segdeploy.runtime.upsample import label_dtype

    return label_dtype(num_labels)
