"""Start, run and stop `segdeploy serve`: Ray, Ray Serve's HTTP proxy, the deployments.

`serving(settings)` is the whole life of a service as a context manager (tests and
library users hold it in-process); `run_service` is the command: it serves until
Ctrl-C or SIGTERM, then drains the requests inside (each is answered) and stops
Serve and the private Ray it started, so no Ray process outlives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segdeploy.errors import SegdeployError, first_line
from segdeploy.runtime.pipeline import available_cores
from segdeploy.runtime.ray_session import RaySessionInfo, ray_session
from segdeploy.serve.model import ServiceInfo
from segdeploy.serve.settings import GPU_PROVIDERS, INSTALL_HINT, ServeSettings

log = logging.getLogger(__name__)

#: The modules of the serve extra (import name -> what needs it).
EXTRA_MODULES = ("ray.serve", "fastapi", "uvicorn", "prometheus_client", "multipart")
#: The Ray Serve application's name (one per cluster: a second `segdeploy serve` on a
#: shared cluster needs its own --name, which becomes part of this).
APP_PREFIX = "segdeploy"
#: How long a stop waits for the requests inside to be answered.
DRAIN_TIMEOUT_S = 30.0
#: The Serve controller's environment (names set in this process's environment win).
#: It reconciles every deployment every RAY_SERVE_CONTROL_LOOP_INTERVAL_S, Ray's default
#: 0.1 s, busy or idle; on 2 cores that took the model's threads: 2 interleaved rounds
#: (AVX2 EPYC, int8 b0, idle service) measured Ray's processes at 15.2% of a core with
#: 0.1 s and 11.5% with 0.5 s. The cost: a deployment change is seen up to 0.4 s later
#: (start-up 19.9 -> 20.5 s, stop 7.1 -> 8.1 s, same runs); autoscaling looks back 30 s
#: by default, so its decisions do not notice.
CONTROLLER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def controller_env() -> dict[str, str]:
    """CONTROLLER_ENV, where this process's environment does not set the same names."""
    return {k: os.environ.get(k, v) for k, v in CONTROLLER_ENV.items()}


def check_extra() -> None:
    """Exit 2 with the install line when a module of the serve extra is missing."""
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise SegdeployError(
                "segdeploy serve", f"{module} is not installed: {INSTALL_HINT}"
            ) from None


@dataclass(frozen=True)
class Plan:
    """What the driver learnt from the model before touching Ray."""

    info: ServiceInfo
    model_kwargs: dict[str, Any]
    gpu: bool


def plan(settings: ServeSettings, model_dir: Path) -> Plan:
    """Open the model here (CPU, one thread) so that a missing model, variant or provider
    exits with status 2 before Ray starts; its classes and colours go to the front end."""
    from segdeploy.runtime import providers
    from segdeploy.runtime.palette import palette_for
    from segdeploy.runtime.segmenter import Segmenter

    provider = settings.provider.lower()
    gpu = provider in GPU_PROVIDERS
    if provider == "auto":
        import onnxruntime as ort

        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    elif not settings.fallback:
        providers.check_provider(provider)
    probe = Segmenter(
        model_dir, "cpu", settings.variant, threads=1, batch_size=settings.max_batch_size
    )
    info = ServiceInfo(
        name=settings.model_name(probe.folder),
        variant=probe.variant,
        provider=provider,
        id2label=dict(probe.id2label),
        label_dtype=probe.label_dtype.name,
        palette=["#" + bytes(c.tolist()).hex() for c in palette_for(probe.num_labels)],
    )
    model_kwargs = {
        "model_dir": str(Path(model_dir).absolute()),
        "provider": provider,
        "variant": settings.variant,
        "fallback": settings.fallback,
        "max_pixels": settings.max_pixels,
    }
    return Plan(info, model_kwargs, gpu)


def check_port(host: str, port: int) -> None:
    """Refuse a port another process holds, in one line, before Ray starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise SegdeployError("--host", f"cannot resolve {host!r}: {err.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            raise SegdeployError(
                "--port", f"cannot listen on {host}:{port}: {err.strerror or err}"
            ) from None


@dataclass(frozen=True)
class Running:
    """A service that answers: its URL and what it serves."""

    url: str
    info: ServiceInfo


def _resources(
    session: RaySessionInfo, settings: ServeSettings, gpu: bool
) -> tuple[int, float, float]:
    """(threads per replica, CPUs each reserves, GPUs each holds)."""
    lo, hi = settings.replica_counts()
    if gpu and session.gpus < 1:
        if not settings.fallback:
            raise SegdeployError(
                "--provider", f"{settings.provider} needs a GPU, and the Ray cluster has none"
            )
        log.warning("the Ray cluster has no GPU: --fallback runs the replicas on CPUs")
        gpu = False
    threads = settings.threads
    if threads is None and session.private:
        # The cores of this machine shared among the replicas that may run at once.
        threads = max(1, available_cores() // hi)
    return threads or 0, float(threads or 1), 1.0 if gpu else 0.0


@contextlib.contextmanager
def serving(settings: ServeSettings, *, verbose: bool = False) -> Iterator[Running]:
    """The service, up and answering at settings.host:port for the block; stopped after
    (requests inside are answered first), with the private Ray it started."""
    from segdeploy.folders import newest_export

    settings.check()
    check_extra()
    model_dir = Path(settings.model_dir) if settings.model_dir else newest_export()
    the_plan = plan(settings, model_dir)
    check_port(settings.host, settings.port)
    with ray_session(
        settings.ray_address, verbose=verbose, connect_timeout_s=settings.ray_timeout
    ) as session:
        from ray import serve

        # Serve logs every start-up step at INFO on the driver; -vv shows them.
        logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)

        from segdeploy.serve.deployments import application

        threads, cpus, gpus = _resources(session, settings, the_plan.gpu)
        settings = dataclasses.replace(settings, max_batch_size=settings.batch_size_on(gpus > 0))
        kwargs = {**the_plan.model_kwargs, "threads": threads or None}
        owned = not serve.status().proxies  # Serve was not running on this cluster before
        serve.start(
            http_options={"host": settings.host, "port": settings.port},
            proxy_location="HeadOnly",
            controller_options={"runtime_env": {"env_vars": controller_env()}},
        )
        app_name = f"{APP_PREFIX}-{the_plan.info.name}"
        try:
            app = application(
                settings,
                the_plan.info,
                kwargs,
                replicas=settings.replica_counts(),
                num_cpus=cpus,
                num_gpus=gpus,
            )
            try:
                handle = serve.run(app, name=app_name, route_prefix="/")
            except RuntimeError as err:
                raise SegdeployError(
                    str(model_dir), f"the service did not start: {first_line(err)}"
                ) from None
            handle.mark_ready.remote().result()
            yield Running(f"http://{settings.host}:{settings.port}", the_plan.info)
        finally:
            _stop(serve, app_name, owned)


def _stop(serve, app_name: str, owned: bool) -> None:
    """Drain the API replica, then remove the app (and Serve itself when we started it)."""
    with contextlib.suppress(Exception):
        handle = serve.get_app_handle(app_name)
        left = handle.drain.remote(DRAIN_TIMEOUT_S).result(timeout_s=DRAIN_TIMEOUT_S + 10)
        if left:
            log.warning("%d requests were still running after %.0f s", left, DRAIN_TIMEOUT_S)
    if owned:
        serve.shutdown()
    else:
        serve.delete(app_name)


@contextlib.contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM for the block (the old handlers after it)."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_service(
    settings: ServeSettings, *, verbose: bool = False, say: Callable[[str], None] = print
) -> None:
    """`segdeploy serve`: serve until Ctrl-C or SIGTERM, then drain and stop."""
    with serving(settings, verbose=verbose) as running, stop_requested() as stop:
        lo, hi = settings.replica_counts()
        replicas = str(lo) if lo == hi else f"{lo}-{hi} (autoscaled)"
        say(
            f"serving {running.info.name} ({running.info.variant}) at {running.url} with "
            f"{replicas} replicas: POST {running.url}/v1/segment, Open Inference Protocol "
            f"under /v2, metrics at /metrics, a page at /; Ctrl-C stops"
        )
        while not stop.wait(0.5):
            pass
        say("stopping: answering the requests inside first")
