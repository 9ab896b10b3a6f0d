"""Sessions on onnxruntime's CPU, CUDA or TensorRT, or on OpenVINO, with an explicit
fallback chain.

`PROVIDERS_BY_NAME` is the registry: for each `--provider` name, how it shows among
the available providers, where `--fallback` goes next, which graph files it runs,
how it opens a session and what to say when it is missing. `create_session` and
`Segmenter` go through it alone; a new provider is a new entry, not a new branch.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segdeploy.errors import SegdeployError, first_line
from segdeploy.folders import PREPROCESSOR_FILE, image_size_of, read_json

log = logging.getLogger(__name__)

#: onnxruntime's providers, best first (TensorRT -> CUDA -> CPU is `--fallback`'s order).
CHAIN = ("tensorrt", "cuda", "cpu")
#: OpenVINO's own runtime on the CPU (segdeploy.runtime.openvino_runner).
OPENVINO = "openvino"
ORT_NAME = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

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


@dataclass(frozen=True)
class SessionRequest:
    """What a session is opened with, whichever provider opens it."""

    threads: int | None = None
    spin: bool = True
    fp16: bool = False
    trt_cache: str | os.PathLike | None = None
    batch_size: int = 1
    image_size: tuple[int, int] | None = None
    device_id: int = 0
    trt_workspace: int = DEFAULT_TRT_WORKSPACE
    input_name: str = DEFAULT_INPUT_NAME
    ov_cache: str | os.PathLike | None = None
    mem_pattern: bool = True  # session_options'


class StartFailed(Exception):
    """A provider that is installed could not start on this graph: `--fallback` steps past
    it, warning with `reason`; without `--fallback`, `error` is what the user sees."""

    def __init__(self, reason: str, error: SegdeployError):
        super().__init__(reason)
        self.reason, self.error = reason, error


@dataclass(frozen=True)
class Provider:
    """One `--provider` (see the module docstring)."""

    listed_as: str  # its name in `available_providers()`
    next: str | None  # where `--fallback` goes when it is missing or fails to start
    #: (path, name, SessionRequest) -> session; raises StartFailed or SegdeployError.
    open: Callable[[Path, str, SessionRequest], Any]
    missing: Callable[[str, Sequence[str]], str]  # (name, available) -> how to get it
    graphs: tuple[str, ...] = (".onnx",)  # the graph files it runs, by suffix
    on_cpu: bool = False  # runs on the CPU (opens a graph to check it, on any machine)
    #: Windows per model call of a tiled image when no batch size is given (None: the
    #: provider's default batch, segmenter.default_batch_size).
    window_batch: int | None = None


def available_providers() -> list[str]:
    """onnxruntime's available providers, and "OpenVINO" when the openvino package is
    installed (found without importing it)."""
    import importlib.util

    import onnxruntime as ort

    available = list(ort.get_available_providers())
    try:
        if importlib.util.find_spec("openvino") is not None:
            available.append(PROVIDERS_BY_NAME[OPENVINO].listed_as)
    except (ImportError, ValueError):
        pass
    return available


def missing_provider_message(name: str, available: Sequence[str]) -> str:
    """Say what is missing and how to get it."""
    return PROVIDERS_BY_NAME[name].missing(name, available)


def _missing_openvino(name: str, available: Sequence[str]) -> str:
    return (
        "OpenVINO is not installed here: pip install 'segdeploy[openvino]', or pass "
        "--fallback to run on onnxruntime's CPU provider."
    )


def _missing_ort(name: str, available: Sequence[str]) -> str:
    """onnxruntime's GPU providers come with onnxruntime-gpu (the CPU one is always there)."""
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
    if _listed(requested, available):
        return ProviderChoice(requested, requested)
    if not fallback:
        raise SegdeployError("--provider", missing_provider_message(requested, available))
    skipped = []
    name: str | None = requested
    while name is not None:
        if _listed(name, available):
            return ProviderChoice(name, requested, tuple(skipped))
        skipped.append(name)
        name = PROVIDERS_BY_NAME[name].next
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


def session_options(threads: int | None, *, spin: bool = True, mem_pattern: bool = True):
    """`spin=False`: idle intra-op threads sleep instead of spin-waiting, leaving their core
    to other processes (infer's workers: 1.35x the images/s of the tiny model on 2 cores).

    `mem_pattern=False`: for a session whose batch size varies from call to call (a serve
    replica's batches are whatever queued up). With memory patterns, ONNX Runtime plans
    one block per input shape and takes it from its CPU arena whole at each call; blocks
    of different batch sizes fragment the arena, which then grows by powers of two:
    SegFormer b0 at 512 grew 1.18 GB -> 1.84 GB at its first full batch after batches of
    1 and 3 (2-core EPYC, in process, warm-up batch included), 1.06x over the whole
    bench load without patterns, at the same speed (batch 1: 187 vs 191 ms, batch 4:
    730 vs 762 ms, interleaved medians)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_mem_pattern = mem_pattern
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
    mem_pattern: bool = True,
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
    `mem_pattern`: onnxruntime's memory patterns (`session_options`; off for sessions
    whose batch size varies).
    A graph only some providers run (OpenVINO IR, .xml) is refused by the others
    (`graph_provider`).
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
    request = SessionRequest(
        threads, spin, fp16, trt_cache, batch_size, image_size, device_id, trt_workspace,
        input_name, ov_cache, mem_pattern,
    )  # fmt: skip
    name = choice.name
    while True:
        try:
            return PROVIDERS_BY_NAME[name].open(onnx_path, name, request)
        except StartFailed as err:
            if not fallback:
                raise err.error from err
            nxt = _next_available(name, available)
            log.warning(
                "provider %s failed to start (%s); falling back to %s", name, err.reason, nxt
            )
            name = nxt


def graph_provider(path: Path, provider: str, fallback: bool) -> tuple[str, bool]:
    """(provider, fallback) for the graph at `path`. A graph that only some providers run
    (an OpenVINO IR) opens on the first of them with `auto`, is refused by the others,
    and has nothing to fall back to; any other graph keeps both."""
    runs = [n for n, p in PROVIDERS_BY_NAME.items() if path.suffix in p.graphs]
    if len(runs) == len(PROVIDERS_BY_NAME):
        return provider, fallback
    if not runs:
        raise SegdeployError(path, f"is not a graph any provider runs ({', '.join(PROVIDERS)})")
    if provider.lower() == "auto":
        return runs[0], False
    if provider.lower() not in runs:
        raise SegdeployError(
            path,
            f"is {_graph_kind(path)}, which runs on --provider {' or '.join(runs)} only, not "
            f"--provider {provider}: use --provider {runs[0]}",
        )
    return provider, False


def _graph_kind(path: Path) -> str:
    from segdeploy.runtime.openvino_runner import is_ir

    return "an OpenVINO IR graph" if is_ir(path) else f"a {path.suffix} graph"


def probe_provider(path: str | os.PathLike) -> str:
    """The CPU provider that opens the graph at `path`: to check a model on a machine that
    will not run it (the Ray engine's driver), whatever provider its actors use."""
    suffix = Path(path).suffix
    return next(n for n, p in PROVIDERS_BY_NAME.items() if p.on_cpu and suffix in p.graphs)


def _open_openvino(path: Path, name: str, request: SessionRequest):
    """An OpenVINOSession (segdeploy.runtime.openvino_runner)."""
    from segdeploy.runtime.openvino_runner import open_session
    from segdeploy.runtime.pipeline import available_cores

    return open_session(
        path,
        threads=request.threads or available_cores(),
        batch_size=request.batch_size,
        image_size=request.image_size,
        cache=request.ov_cache,
    )


def _open_openvino_or_fail(path: Path, name: str, request: SessionRequest):
    """`_open_openvino`; a graph OpenVINO cannot read or compile is StartFailed, so that
    `--fallback` runs it on onnxruntime's CPU provider (without it: OpenVINO's reason,
    named by the graph's path)."""
    try:
        return _open_openvino(path, name, request)
    except SegdeployError as err:
        raise StartFailed(err.problem, err) from err


def _open_ort(path: Path, name: str, request: SessionRequest):
    """An onnxruntime session on provider `name`."""
    import onnxruntime as ort

    opts = session_options(request.threads, spin=request.spin, mem_pattern=request.mem_pattern)
    providers = _providers_for(name, path, request)
    try:
        # enable_fallback=0: onnxruntime's own fallback would print to stdout and
        # switch providers silently; we decide, and say so, in create_session.
        session = ort.InferenceSession(
            os.fspath(path), sess_options=opts, providers=providers, enable_fallback=0
        )
    except Exception as err:  # ORT raises bare RuntimeError/Fail/InvalidGraph...
        if name == "cpu":
            raise SegdeployError(
                path, f"onnxruntime cannot load the model: {first_line(err)}"
            ) from err
        raise _ort_failed(name, first_line(err)) from err
    active = session.get_providers()[0]
    if SHORT_NAME.get(active) != name:
        # ORT drops a provider it cannot register with only a warning; never run
        # somewhere the user did not hear of.
        raise _ort_failed(name, f"onnxruntime started {active} instead")
    log.info("onnxruntime %s: %s on %s", ort.__version__, path.name, active)
    return session


def _ort_failed(name: str, reason: str) -> StartFailed:
    return StartFailed(
        reason,
        SegdeployError(
            "--provider",
            f"{ORT_NAME[name]} failed to start ({reason}); check the CUDA/cuDNN"
            f"{'/TensorRT' if name == 'tensorrt' else ''} libraries (README section GPU), "
            "or pass --fallback",
        ),
    )


def check_provider(provider: str, fallback: bool = False) -> None:
    """SegdeployError now if `provider` is missing here, rather than after a long run."""
    choose_provider(provider, available_providers(), fallback=fallback)


def _listed(name: str, available: Sequence[str]) -> bool:
    return PROVIDERS_BY_NAME[name].listed_as in available


def _next_available(name: str, available: Sequence[str]) -> str:
    nxt = PROVIDERS_BY_NAME[name].next
    while nxt is not None and not _listed(nxt, available):
        nxt = PROVIDERS_BY_NAME[nxt].next
    return nxt or "cpu"


def _providers_for(name: str, onnx_path: Path, request: SessionRequest) -> list[Any]:
    """onnxruntime's `providers=` for `name`; TensorRT's with its engine cache and profile."""
    device_id, image_size, trt_cache = request.device_id, request.image_size, request.trt_cache
    fp16, batch_size = request.fp16, request.batch_size
    if name != "tensorrt":
        return provider_options(name, device_id=device_id)
    if image_size is None:
        image_size = read_image_size(onnx_path.parent)
    profile = (
        None if image_size is None else profile_shapes(request.input_name, image_size, batch_size)
    )
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
        trt_workspace=request.trt_workspace,
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


#: The registry: every `--provider` but auto, in `--provider`'s order (see the module
#: docstring). OpenVINO runs ONNX and its own IR; `--fallback` steps from it to
#: onnxruntime's CPU provider, which every onnxruntime build has.
PROVIDERS_BY_NAME: dict[str, Provider] = {
    "tensorrt": Provider(ORT_NAME["tensorrt"], "cuda", _open_ort, _missing_ort),
    "cuda": Provider(ORT_NAME["cuda"], "cpu", _open_ort, _missing_ort),
    # One window per call: onnxruntime's CPU provider runs SegFormer's 512 px windows
    # slower per window batched (docs/tiles.md: the decode head's 128x128 tensors).
    "cpu": Provider(ORT_NAME["cpu"], None, _open_ort, _missing_ort, on_cpu=True, window_batch=1),
    OPENVINO: Provider(
        "OpenVINO", "cpu", _open_openvino_or_fail, _missing_openvino, (".onnx", ".xml"), True
    ),
}
PROVIDERS = ("auto", *PROVIDERS_BY_NAME)
#: How each provider shows in `available_providers()`, and back.
AVAILABLE_NAME = {name: p.listed_as for name, p in PROVIDERS_BY_NAME.items()}
SHORT_NAME = {v: k for k, v in AVAILABLE_NAME.items()}
