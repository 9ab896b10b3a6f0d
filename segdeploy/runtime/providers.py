"""ONNX Runtime sessions on CPU, CUDA or TensorRT, with an explicit fallback chain.

The pure functions here (`choose_provider`, `provider_options`, `trt_cache_dir`,
`missing_provider_message`) take the list of available providers as an argument,
so that the GPU decisions are tested on machines without a GPU.

Why not let onnxruntime fall back by itself: when a provider fails to start,
`InferenceSession` prints a banner to stdout and silently runs on another
provider. A user who asked for `--provider cuda` must instead get an error, or,
with `--fallback`, a logged warning that names the provider actually used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segdeploy.errors import SegdeployError, first_line
from segdeploy.folders import PREPROCESSOR_FILE, image_size_of, read_json

log = logging.getLogger(__name__)

#: Short names, best first: the order `--fallback` walks down.
CHAIN = ("tensorrt", "cuda", "cpu")
#: OpenVINO's own runtime on the CPU (segdeploy.runtime.openvino_runner), beside
#: onnxruntime's chain; `--fallback` steps from it to onnxruntime's CPU provider.
OPENVINO = "openvino"
PROVIDERS = ("auto", *CHAIN, OPENVINO)
ORT_NAME = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: How each provider shows in `available_providers()`: onnxruntime's providers by their
#: names, OpenVINO's runtime as "OpenVINO" (when the openvino package is installed).
AVAILABLE_NAME = {**ORT_NAME, OPENVINO: "OpenVINO"}
SHORT_NAME = {v: k for k, v in AVAILABLE_NAME.items()}
#: Where `--fallback` goes when a provider is missing or fails to start.
NEXT = {"tensorrt": "cuda", "cuda": "cpu", OPENVINO: "cpu"}

#: TensorRT builder workspace; 4 GiB fits every SegFormer size at batch 16 and
#: leaves room on a 16 GB card.
DEFAULT_TRT_WORKSPACE = 4 << 30
DEFAULT_INPUT_NAME = "pixel_values"


@dataclass(frozen=True)
class ProviderChoice:
    """The provider to try first, and what the user should hear about it."""

    name: str  # "tensorrt" | "cuda" | "cpu"
    requested: str
    skipped: tuple[str, ...] = ()  # providers of the chain passed over because missing

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


def available_providers() -> list[str]:
    """onnxruntime's available providers, and "OpenVINO" when the openvino package is
    installed (found without importing it)."""
    import importlib.util

    import onnxruntime as ort

    available = list(ort.get_available_providers())
    try:
        if importlib.util.find_spec("openvino") is not None:
            available.append(AVAILABLE_NAME[OPENVINO])
    except (ImportError, ValueError):
        pass
    return available


def missing_provider_message(name: str, available: Sequence[str]) -> str:
    """Say what is missing and how to get it."""
    if name == OPENVINO:
        return (
            "OpenVINO is not installed here: pip install 'segdeploy[openvino]', or pass "
            "--fallback to run on onnxruntime's CPU provider."
        )
    have = ", ".join(SHORT_NAME.get(p, p) for p in available if p in SHORT_NAME) or "none"
    msg = (
        f"onnxruntime here has no {ORT_NAME[name]} (available: {have}). "
        "Install the GPU build: `pip uninstall -y onnxruntime && pip install onnxruntime-gpu` "
        '(or `pip install -e ".[gpu]"`, see README section GPU)'
    )
    if name == "tensorrt":
        msg += "; TensorRT also needs the TensorRT libraries (libnvinfer) on the library path"
    return msg + ", or pass --fallback to use the best provider available."


def choose_provider(
    requested: str, available: Sequence[str], *, fallback: bool = False
) -> ProviderChoice:
    """Pick the provider to start, from the provider names in `available`
    (`available_providers()`: onnxruntime's, and "OpenVINO").

    `auto` means CUDA when present, else onnxruntime's CPU provider. It never picks
    TensorRT: a TensorRT engine takes minutes to build on first use, and
    onnxruntime-gpu lists the TensorRT provider even where the TensorRT libraries
    are absent, so TensorRT is only used when asked for by name. Nor OpenVINO:
    which runtime is fastest on a CPU depends on the CPU and the graph, and
    `segdeploy bench` says which it is here; it is used when asked for by name.
    """
    requested = requested.lower()
    if requested not in PROVIDERS:
        raise SegdeployError(
            "--provider", f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}"
        )
    if requested == "auto":
        name = "cuda" if ORT_NAME["cuda"] in available else "cpu"
        return ProviderChoice(name, requested)
    if AVAILABLE_NAME[requested] in available:
        return ProviderChoice(requested, requested)
    if not fallback:
        raise SegdeployError("--provider", missing_provider_message(requested, available))
    skipped = []
    name: str | None = requested
    while name is not None:
        if AVAILABLE_NAME[name] in available:
            return ProviderChoice(name, requested, tuple(skipped))
        skipped.append(name)
        name = NEXT.get(name)
    # The CPU provider is in every onnxruntime build; reaching here means a broken install.
    raise SegdeployError("--provider", f"no usable provider in {list(available)}")


def profile_shapes(input_name: str, image_size: tuple[int, int], batch_size: int) -> dict[str, str]:
    """TensorRT optimisation profile: batches of 1..batch_size at the model's fixed input size.

    The preprocessor resizes every image to `image_size`, so only the batch
    dimension varies (the last batch of a folder is smaller); the engine is tuned
    for full batches.
    """
    h, w = image_size
    if batch_size < 1 or h < 1 or w < 1:
        raise SegdeployError(
            "--batch-size", f"batch size and image size must be positive, got {batch_size}, {h}x{w}"
        )
    return {
        "trt_profile_min_shapes": f"{input_name}:1x3x{h}x{w}",
        "trt_profile_opt_shapes": f"{input_name}:{batch_size}x3x{h}x{w}",
        "trt_profile_max_shapes": f"{input_name}:{batch_size}x3x{h}x{w}",
    }


def model_digest(onnx_path: str | os.PathLike) -> str:
    """Content hash of the model file (and its external-data file, if any)."""
    h = hashlib.sha256()
    path = Path(onnx_path)
    for part in (path, path.with_name(path.name + "_data"), path.with_suffix(".onnx.data")):
        if part.is_file():
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def trt_cache_dir(
    root: str | os.PathLike,
    onnx_path: str | os.PathLike,
    *,
    fp16: bool,
    image_size: tuple[int, int] | None,
    batch_size: int,
) -> Path:
    """The engine folder for this model, precision and profile under the cache root.

    onnxruntime names cached engines after the graph's structure, not its
    weights, and does not notice when the model file changes: a re-exported
    model with new weights would silently reuse the old engine. Keying the
    folder by the model's content hash, the precision and the profile makes a
    stale engine impossible, and an unchanged model always finds its engine.
    """
    shape = "dynamic" if image_size is None else f"{image_size[0]}x{image_size[1]}"
    key = f"{Path(onnx_path).stem}-{model_digest(onnx_path)}-{'fp16' if fp16 else 'fp32'}-b{batch_size}-{shape}"
    return Path(root) / key


def has_cached_engine(cache_dir: str | os.PathLike) -> bool:
    return any(Path(cache_dir).glob("*.engine"))


def provider_options(
    name: str,
    *,
    device_id: int = 0,
    fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
    trt_timing_cache: str | os.PathLike | None = None,
    trt_workspace: int = DEFAULT_TRT_WORKSPACE,
    profile: dict[str, str] | None = None,
) -> list[Any]:
    """The `providers=` list for `InferenceSession`, best provider first.

    CPU always comes last: onnxruntime places the few operators a GPU provider
    cannot run there. TensorRT is followed by CUDA for the same reason (nodes
    TensorRT rejects run on CUDA rather than on the CPU).
    """
    cpu = ORT_NAME["cpu"]
    cuda = (ORT_NAME["cuda"], {"device_id": device_id})
    if name == "cpu":
        return [cpu]
    if name == "cuda":
        return [cuda, cpu]
    if name != "tensorrt":
        raise SegdeployError("--provider", f"unknown provider {name!r}")
    trt: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(trt_workspace),
    }
    if trt_cache is not None:
        trt["trt_engine_cache_enable"] = True
        trt["trt_engine_cache_path"] = os.fspath(trt_cache)
    if trt_timing_cache is not None:
        # Layer timings do not depend on the weights, so one timing cache serves every model.
        trt["trt_timing_cache_enable"] = True
        trt["trt_timing_cache_path"] = os.fspath(trt_timing_cache)
    trt.update(profile or {})
    return [(ORT_NAME["tensorrt"], trt), cuda, cpu]


def read_image_size(model_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) the preprocessor resizes to, or None when there is no fixed size."""
    try:
        return image_size_of(read_json(Path(model_dir) / PREPROCESSOR_FILE))
    except SegdeployError:  # unreadable: the caller goes on without a fixed size
        return None


def session_options(threads: int | None, *, spin: bool = True):
    """`spin=False`: idle intra-op threads sleep instead of spin-waiting, leaving their core
    to other processes (infer's workers: 1.35x the images/s of the tiny model on 2 cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise SegdeployError("--threads", f"must be at least 1, got {threads}")
        opts.intra_op_num_threads = threads
        # One inter-op thread: SegFormer is a chain, parallel branches buy nothing.
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; our own log says which provider runs
    return opts


def create_session(
    onnx_path: str | os.PathLike,
    provider: str = "cpu",
    *,
    fallback: bool = False,
    threads: int | None = None,
    trt_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    batch_size: int = 1,
    image_size: tuple[int, int] | None = None,
    device_id: int = 0,
    trt_workspace: int = DEFAULT_TRT_WORKSPACE,
    input_name: str = DEFAULT_INPUT_NAME,
    available: Sequence[str] | None = None,
    spin: bool = True,
    ov_cache: str | os.PathLike | None = None,
):
    """A session on `provider` ("auto", "cpu", "cuda", "tensorrt", "openvino"): an
    `onnxruntime.InferenceSession`, or for "openvino" an `OpenVINOSession`, which
    answers the same calls (segdeploy.runtime.openvino_runner).

    Raises SegdeployError when the model file is missing or unreadable, or when
    the provider is absent or fails to start, unless `fallback` is set: then
    TensorRT -> CUDA -> CPU (and OpenVINO -> CPU) is walked down with a logged
    warning at each step. `fp16` builds TensorRT engines in fp16 (other providers run
    the graph as it is; pick the fp16 graph with Segmenter's `variant`). `image_size`
    and `batch_size` set the TensorRT shape profile, and OpenVINO's input shape and
    settings; `image_size` defaults to the preprocessor_config.json beside the model
    for TensorRT. `ov_cache`: OpenVINO's compiled-model folder (None: the user cache).
    An OpenVINO IR graph (.xml) runs on OpenVINO only (`graph_provider`).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SegdeployError(onnx_path, "model file not found")
    if available is None:
        available = available_providers()
    provider, fallback = graph_provider(onnx_path, provider, fallback)
    choice = choose_provider(provider, available, fallback=fallback)
    if choice.fell_back:
        log.warning(
            "provider %s is not available (%s missing); falling back to %s",
            choice.requested,
            ", ".join(choice.skipped),
            choice.name,
        )
    name = choice.name
    if name == OPENVINO:
        session = _openvino_session(onnx_path, threads, batch_size, image_size, ov_cache, fallback)
        if session is not None:
            return session
        name = NEXT[OPENVINO]
    ort_options = (fp16, trt_cache, batch_size, image_size, device_id, trt_workspace, input_name)
    return _ort_session(onnx_path, name, available, fallback, threads, spin, ort_options)


def graph_provider(path: Path, provider: str, fallback: bool) -> tuple[str, bool]:
    """(provider, fallback) for the graph at `path`: an OpenVINO IR runs on OpenVINO only,
    so `auto` means openvino there, another provider is refused and nothing to fall back
    to; any other graph keeps both."""
    from segdeploy.runtime.openvino_runner import is_ir

    if not is_ir(path):
        return provider, fallback
    if provider.lower() not in ("auto", OPENVINO):
        raise SegdeployError(
            path,
            f"is an OpenVINO IR graph, which only OpenVINO runs, not --provider {provider}: "
            "use --provider openvino",
        )
    return OPENVINO, False


def _openvino_session(path: Path, threads, batch_size, image_size, cache, fallback: bool):
    """An OpenVINOSession; None when it cannot start and `fallback` (warned: onnxruntime's
    CPU provider runs the graph instead)."""
    from segdeploy.runtime.openvino_runner import open_session
    from segdeploy.runtime.pipeline import available_cores

    try:
        return open_session(
            path,
            threads=threads or available_cores(),
            batch_size=batch_size,
            image_size=image_size,
            cache=cache,
        )
    except SegdeployError as err:
        if not fallback:
            raise
        log.warning("provider openvino failed to start (%s); falling back to cpu", err.problem)
        return None


def _ort_session(onnx_path: Path, name, available, fallback, threads, spin, ort_options):
    """An onnxruntime session on `name`, walking down NEXT with `fallback`."""
    import onnxruntime as ort

    opts = session_options(threads, spin=spin)
    while True:
        providers = _providers_for(name, onnx_path, *ort_options)
        try:
            # enable_fallback=0: onnxruntime's own fallback would print to stdout and
            # switch providers silently; we decide, and say so, below.
            session = ort.InferenceSession(
                os.fspath(onnx_path), sess_options=opts, providers=providers, enable_fallback=0
            )
        except Exception as err:  # ORT raises bare RuntimeError/Fail/InvalidGraph...
            if name == "cpu":
                raise SegdeployError(
                    onnx_path, f"onnxruntime cannot load the model: {first_line(err)}"
                ) from err
            reason = first_line(err)
        else:
            active = session.get_providers()[0]
            if SHORT_NAME.get(active) == name:
                log.info("onnxruntime %s: %s on %s", ort.__version__, onnx_path.name, active)
                return session
            # ORT drops a provider it cannot register with only a warning; never run
            # somewhere the user did not hear of.
            reason = f"onnxruntime started {active} instead"
        if not fallback:
            raise SegdeployError(
                "--provider",
                f"{ORT_NAME[name]} failed to start ({reason}); check the CUDA/cuDNN"
                f"{'/TensorRT' if name == 'tensorrt' else ''} libraries (README section GPU), "
                "or pass --fallback",
            )
        nxt = _next_available(name, available)
        log.warning("provider %s failed to start (%s); falling back to %s", name, reason, nxt)
        name = nxt


def check_provider(provider: str, fallback: bool = False) -> None:
    """SegdeployError now if `provider` is missing here, rather than after a long run."""
    choose_provider(provider, available_providers(), fallback=fallback)


def _next_available(name: str, available: Sequence[str]) -> str:
    nxt = NEXT.get(name)
    while nxt is not None and AVAILABLE_NAME[nxt] not in available:
        nxt = NEXT.get(nxt)
    return nxt or "cpu"


def _providers_for(
    name, onnx_path, fp16, trt_cache, batch_size, image_size, device_id, trt_workspace, input_name
) -> list[Any]:
    if name != "tensorrt":
        return provider_options(name, device_id=device_id)
    if image_size is None:
        image_size = read_image_size(onnx_path.parent)
    profile = None if image_size is None else profile_shapes(input_name, image_size, batch_size)
    engine_dir = None
    if trt_cache is not None:
        engine_dir = trt_cache_dir(
            trt_cache, onnx_path, fp16=fp16, image_size=image_size, batch_size=batch_size
        )
        engine_dir.mkdir(parents=True, exist_ok=True)
        if has_cached_engine(engine_dir):
            log.info("reusing the TensorRT engine cached in %s", engine_dir)
        else:
            log.warning(
                "building a TensorRT engine (minutes, once); it will be cached in %s", engine_dir
            )
    else:
        log.warning(
            "building a TensorRT engine (minutes); pass --trt-cache DIR to keep it for the next run"
        )
    return provider_options(
        "tensorrt",
        device_id=device_id,
        fp16=fp16,
        trt_cache=engine_dir,
        trt_timing_cache=trt_cache,
        trt_workspace=trt_workspace,
        profile=profile,
    )


def active_provider(session) -> str:
    """Short name ("cpu", "cuda", "tensorrt") of the provider the session runs on first."""
    active = session.get_providers()[0]
    return SHORT_NAME.get(active, active)


def run_io_binding(
    session, feeds: dict[str, Any], *, device_type: str = "cuda", device_id: int = 0
):
    """Run with IO binding; return the IOBinding, its outputs still on `device_type`.

    Each input is copied to the device once; the outputs stay there until the
    caller asks for them with `binding.copy_outputs_to_cpu()`, so a pipeline can
    hand them to a postprocessing thread without a synchronous copy in the model
    thread. Works with device_type="cpu" as well, which is how it is tested
    without a GPU.
    """
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device_type, device_id)
    session.run_with_iobinding(binding)
    return binding
