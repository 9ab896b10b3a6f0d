"""OpenVINO's runtime behind the calls segdeploy makes of an onnxruntime session.

`--provider openvino` compiles the exported graph (model.onnx or any variant, or
an OpenVINO IR such as export's model_openvino_int8.xml) with OpenVINO for the
CPU. `OpenVINOSession` answers `get_inputs()`, `get_outputs()`, `get_providers()`
and `run(names, feeds)` as `onnxruntime.InferenceSession` does, so `Segmenter`,
validation and the engines around them run it unchanged (the provider registry,
`segdeploy.runtime.providers`, decides which one opens).

Settings (`OpenVINOSettings.choose`): fp32 inference precision (OpenVINO would
otherwise pick bf16 or fp16 where the CPU has them, which is not the precision
the graph was validated at), the threads the process may use (its CPU affinity),
and the performance mode by batch size: see `choose`.

The compiled model is cached on disk (`CompiledCache`): compiling reads and
optimises the whole graph, importing a compiled blob skips that. The blob's name
holds everything it depends on (graph content hash, OpenVINO version, CPU,
settings, input shape), so a changed graph or upgrade never reuses a stale one;
it is written atomically, in $XDG_CACHE_HOME/segdeploy/openvino unless another
folder is given, never in the model folder unless asked. A cache that cannot be
written is skipped with a warning; the run goes on.

openvino comes with the `openvino` extra (`pip install 'segdeploy[openvino]'`);
this module imports it only when a session is opened, and never imports torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import write_bytes
from segdeploy.errors import SegdeployError, first_line
from segdeploy.folders import user_cache_dir

log = logging.getLogger(__name__)

#: The name `get_providers()` reports, as onnxruntime names its execution providers.
PROVIDER_NAME = "OpenVINO"
EXTRA_HINT = "pip install 'segdeploy[openvino]'"
#: Graph files OpenVINO reads besides ONNX: its own IR (.xml, weights in the .bin beside it).
IR_SUFFIX = ".xml"


def reason(err: Exception) -> str:
    """OpenVINO's message without its source locations: its first line is "Exception from
    src/...cpp:84:", the reason ("No conversion rule found for operations: X") comes after."""
    noise = ("Exception from ", "Check '", "FrontEnd API failed", "Summary:")
    lines = [ln.strip(" -") for ln in str(err).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(noise)]
    return " ".join(kept)[:400] if kept else first_line(err)


def is_ir(path: str | os.PathLike) -> bool:
    """Whether `path` is an OpenVINO IR graph (only OpenVINO runs it)."""
    return Path(path).suffix == IR_SUFFIX


def default_cache_dir() -> Path:
    """Where compiled models go unless told: $XDG_CACHE_HOME/segdeploy/openvino."""
    return user_cache_dir() / "openvino"


@dataclass(frozen=True)
class OpenVINOSettings:
    """How OpenVINO runs the graph on the CPU (the CPU plugin's properties)."""

    threads: int
    #: LATENCY: one stream, every thread on each request. THROUGHPUT: `streams` streams
    #: of threads/streams threads each; a batch is split across them (`run`).
    mode: str = "LATENCY"
    streams: int = 1

    @classmethod
    def choose(cls, batch_size: int, threads: int) -> OpenVINOSettings:
        """LATENCY for batch 1 or one thread; for larger batches THROUGHPUT with one
        stream per thread (at most one per image), the batch split across them.

        Segmenter sends one batch at a time and waits for it; one stream runs it
        with all threads, which must meet at every layer, while streams of one
        thread each run their share of the batch without meeting at all.
        """
        if threads < 1 or batch_size < 1:
            raise SegdeployError("--threads", "threads and batch size must be positive")
        streams = min(threads, batch_size)
        if streams < 2:
            return cls(threads)
        return cls(threads, "THROUGHPUT", streams)

    def config(self) -> dict[str, Any]:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        return {
            hints.performance_mode: getattr(hints.PerformanceMode, self.mode),
            hints.inference_precision: ov.Type.f32,
            props.inference_num_threads: self.threads,
            props.num_streams: self.streams,
        }

    @property
    def key(self) -> str:
        return f"{self.mode.lower()}-t{self.threads}-s{self.streams}-f32"


@dataclass(frozen=True)
class Port:
    """An input or output as onnxruntime's NodeArg shows it: a name and a shape whose
    dynamic dimensions are names (str), static ones ints."""

    name: str
    shape: list[int | str]


def _ports(nodes) -> list[Port]:
    ports = []
    for i, node in enumerate(nodes):
        dims = node.get_partial_shape()
        shape: list[int | str] = []
        if dims.rank.is_static:
            shape = [d.get_length() if d.is_static else f"d{j}" for j, d in enumerate(dims)]
        names = node.get_names()
        ports.append(Port(node.get_any_name() if names else f"output{i}", shape))
    return ports


def graph_digest(path: Path) -> str:
    """Content hash of a graph and every file its weights live in (an IR's .bin, an ONNX
    graph's external data)."""
    h = hashlib.sha256()
    parts = (path, path.with_suffix(".bin")) if is_ir(path) else (
        path, path.with_name(path.name + "_data"), path.with_suffix(".onnx.data")
    )  # fmt: skip
    for part in parts:
        if part.is_file():
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _cpu_key(core) -> str:
    """The CPU a blob was compiled for: its name and instruction-set flags (a blob built
    with AVX-512 kernels must not be imported on a CPU without them)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    return hashlib.sha256(f"{name}\n{flags}".encode()).hexdigest()[:8]


class CompiledCache:
    """Compiled models on disk, one file per (graph, OpenVINO, CPU, settings, shape)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def path(self, core, graph: Path, settings: OpenVINOSettings, shape: str) -> Path:
        import openvino as ov

        # "2026.4.1-22982-e213a147257-releases/2026/4": the release and its build number.
        version = re.sub(r"[^A-Za-z0-9.-]+", "_", "-".join(ov.__version__.split("-")[:2]))
        key = (
            f"{graph.stem}-{graph_digest(graph)}-ov{version}-cpu{_cpu_key(core)}-"
            f"{settings.key}-{shape}"
        )
        return self.folder / f"{key}.blob"

    def load(self, core, path: Path, config: dict[str, Any]):
        """The cached compiled model, or None (absent, or not importable: then rebuilt)."""
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            return core.import_model(blob, "CPU", config)
        except Exception as err:  # a blob of another build, or damaged: compile afresh
            log.warning("ignoring the cached OpenVINO model %s: %s", path, reason(err))
            return None

    def store(self, compiled, path: Path) -> None:
        try:
            write_bytes(path, compiled.export_model().getvalue())
        except OSError as err:
            log.warning(
                "cannot cache the compiled OpenVINO model in %s (%s); the next run compiles "
                "it again",
                path.parent,
                err.strerror or err,
            )


def _static_spatial(model, image_size: tuple[int, int] | None) -> str:
    """Fix the image input's dynamic height and width to `image_size` (the processor's
    output, the only size Segmenter sends), keeping the batch dynamic: static shapes let
    OpenVINO plan memory and pick kernels once. Returns the shape's key for the cache."""
    port = model.inputs[0]
    dims = port.get_partial_shape()
    if image_size is None or dims.rank.is_dynamic or dims.rank.get_length() != 4:
        return "dynamic"
    if dims[2].is_static and dims[3].is_static:
        return f"{dims[2].get_length()}x{dims[3].get_length()}"
    import openvino as ov

    shape = ov.PartialShape([dims[0], dims[1], *image_size])
    model.reshape({port.get_any_name(): shape})
    return f"{image_size[0]}x{image_size[1]}"


def compile_graph(
    path: str | os.PathLike,
    settings: OpenVINOSettings,
    *,
    image_size: tuple[int, int] | None = None,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
):
    """(CompiledModel, where it is cached or None) of the graph at `path` on the CPU.

    SegdeployError (naming the graph and OpenVINO's reason) when OpenVINO cannot read or
    compile it: an operator it does not implement, a malformed graph.
    """
    import openvino as ov

    path = Path(path)
    if not path.is_file():
        raise SegdeployError(path, "model file not found")
    core = ov.Core()
    try:
        model = core.read_model(os.fspath(path))
        shape = _static_spatial(model, image_size)
    except Exception as err:  # OpenVINO raises RuntimeError/OpConversionFailure...
        raise SegdeployError(path, f"OpenVINO cannot read the graph: {reason(err)}") from err
    config = settings.config()
    store = CompiledCache(cache) if use_cache else None
    blob = store.path(core, path, settings, shape) if store else None
    if store is not None and blob is not None:
        compiled = store.load(core, blob, config)
        if compiled is not None:
            log.info("OpenVINO %s: %s from the cache %s", ov.__version__, path.name, blob)
            return compiled, blob
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as err:
        raise SegdeployError(
            path, f"OpenVINO cannot compile the graph for the CPU: {reason(err)}"
        ) from err
    if store is not None and blob is not None:
        store.store(compiled, blob)
    log.info("OpenVINO %s: %s compiled (%s)", ov.__version__, path.name, settings.key)
    return compiled, blob


class OpenVINOSession:
    """A graph compiled by OpenVINO for the CPU, called as an onnxruntime session is.

    In THROUGHPUT mode a batch is split into one part per stream, run at once on an
    asynchronous queue (OpenVINO releases the GIL while it runs), and the parts'
    outputs are joined in order: the caller sees one synchronous call.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        settings: OpenVINOSettings,
        *,
        image_size: tuple[int, int] | None = None,
        cache: str | os.PathLike | None = None,
        use_cache: bool = True,
    ):
        import openvino as ov

        self.path = Path(path)
        self.settings = settings
        self.compiled, self.cache_file = compile_graph(
            path, settings, image_size=image_size, cache=cache, use_cache=use_cache
        )
        self._inputs = _ports(self.compiled.inputs)
        self._outputs = _ports(self.compiled.outputs)
        self._request = self.compiled.create_infer_request()
        self._queue = (
            ov.AsyncInferQueue(self.compiled, settings.streams) if settings.streams > 1 else None
        )

    def get_inputs(self) -> list[Port]:
        return self._inputs

    def get_outputs(self) -> list[Port]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [PROVIDER_NAME]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]):
        """Outputs named `output_names` (None: all), as numpy arrays the caller owns."""
        names = list(output_names) if output_names else [p.name for p in self._outputs]
        index = {p.name: i for i, p in enumerate(self._outputs)}
        missing = [n for n in names if n not in index]
        if missing:
            raise SegdeployError(self.path, f"the graph has no output {missing[0]!r}")
        first = self._inputs[0].name
        n = len(feeds[first])
        if self._queue is None or n < 2:
            out = self._request.infer(feeds, share_inputs=True)
            return [np.asarray(out[index[name]]) for name in names]
        return self._run_split(names, index, feeds, first, n)

    def _run_split(self, names, index, feeds, first: str, n: int) -> list[np.ndarray]:
        parts = np.array_split(np.arange(n), min(self.settings.streams, n))
        results: dict[int, list[np.ndarray]] = {}

        def done(request, k: int) -> None:
            # Copied here: the request's output buffers are reused by its next run.
            results[k] = [np.array(request.get_output_tensor(index[m]).data) for m in names]

        self._queue.set_callback(done)
        for k, rows in enumerate(parts):
            part = {**feeds, first: np.ascontiguousarray(feeds[first][rows[0] : rows[-1] + 1])}
            self._queue.start_async(part, k, share_inputs=True)
        self._queue.wait_all()
        if len(results) != len(parts):
            raise SegdeployError(self.path, "OpenVINO returned no output for part of the batch")
        return [
            np.concatenate([results[k][j] for k in range(len(parts))]) for j in range(len(names))
        ]


def open_session(
    path: str | os.PathLike,
    *,
    threads: int,
    batch_size: int = 1,
    image_size: tuple[int, int] | None = None,
    cache: str | os.PathLike | None = None,
) -> OpenVINOSession:
    """An OpenVINOSession with the settings `OpenVINOSettings.choose` picks for
    `batch_size` and `threads`; SegdeployError when openvino is not installed."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise SegdeployError(
            "--provider", f"openvino is not installed: {EXTRA_HINT}, or pass --fallback"
        ) from None
    settings = OpenVINOSettings.choose(batch_size, threads)
    return OpenVINOSession(path, settings, image_size=image_size, cache=cache)


def ir_precision(path: str | os.PathLike) -> str:
    """'int8' for an IR with quantization nodes (NNCF writes FakeQuantize), else 'fp32';
    SegdeployError when it is missing or OpenVINO cannot read it."""
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise SegdeployError(path, "missing: an OpenVINO IR needs its .xml and .bin")
    try:
        import openvino as ov
    except ImportError:
        raise SegdeployError(
            path, f"is an OpenVINO IR; openvino is not installed: {EXTRA_HINT}"
        ) from None
    try:
        model = ov.Core().read_model(os.fspath(path))
    except Exception as err:
        raise SegdeployError(path, f"not a readable OpenVINO IR: {reason(err)}") from err
    quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    return "int8" if quantized else "fp32"
