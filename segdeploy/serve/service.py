"""Start, run and stop `segdeploy serve`: Ray, Ray Serve's HTTP proxy, the deployments.

`serving(settings)` is the whole life of a service as a context manager (tests and
library users hold it in-process); `run_service` is the command: it serves until
Ctrl-C or SIGTERM, then drains the requests inside (each is answered) and stops
Serve and the private Ray it started, so no Ray process outlives it.
"""

from __future__ import annotations

import contextlib
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
from segdeploy.serve.model import ServiceInfo
from segdeploy.serve.settings import GPU_PROVIDERS, INSTALL_HINT, ServeSettings, address_of

log = logging.getLogger(__name__)

#: The modules of the serve extra (import name -> what needs it).
EXTRA_MODULES = ("ray.serve", "fastapi", "uvicorn", "prometheus_client", "multipart")
#: The Ray Serve application's name (one per cluster: a second `segdeploy serve` on a
#: shared cluster needs its own --name, which becomes part of this).
APP_PREFIX = "segdeploy"
#: Hosts of a Ray address on this machine's loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
#: How long a stop waits for the requests inside to be answered.
DRAIN_TIMEOUT_S = 30.0


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


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    connect_timeout_s: float = 30.0,
) -> Iterator[Any]:
    """Ray for this command: join `address` ("auto", HOST:PORT, or $RAY_ADDRESS), else a
    private Ray on 127.0.0.1 sized from this process's CPU affinity, shut down at the end.

    A stand-in with the signature of segdeploy.runtime.ray_session (being written for
    every Ray front end); this module switches to it when it lands.
    """
    from segdeploy.runtime.ray_engine import LOOPBACK_ENV

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        for key, value in LOOPBACK_ENV.items():  # before Ray is first imported
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():  # a caller's own Ray (a test's, a notebook's): use it as it is
        yield ray
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if address:
        if address.rpartition(":")[0] in LOOPBACK_HOSTS:
            # A cluster on this machine's loopback: without this the driver takes the
            # machine's network address as its own and waits for a raylet there.
            kwargs["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
            raise SegdeployError(
                "--ray-address", f"cannot join {address}: {first_line(err)}"
            ) from None
    else:
        ray.init(
            num_cpus=num_cpus or available_cores(),
            num_gpus=num_gpus,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Running:
    """A service that answers: its URL and what it serves."""

    url: str
    info: ServiceInfo


def _resources(ray, settings: ServeSettings, private: bool, gpu: bool) -> tuple[int, float, float]:
    """(threads per replica, CPUs each reserves, GPUs each holds)."""
    lo, hi = settings.replica_counts()
    if gpu and ray.cluster_resources().get("GPU", 0) < 1:
        if not settings.fallback:
            raise SegdeployError(
                "--provider", f"{settings.provider} needs a GPU, and the Ray cluster has none"
            )
        log.warning("the Ray cluster has no GPU: --fallback runs the replicas on CPUs")
        gpu = False
    threads = settings.threads
    if threads is None and private:
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
    address = address_of(settings)
    with ray_session(address, verbose=verbose) as ray:
        from ray import serve

        # Serve logs every start-up step at INFO on the driver; -vv shows them.
        logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)

        from segdeploy.serve.deployments import application

        threads, cpus, gpus = _resources(ray, settings, address is None, the_plan.gpu)
        kwargs = {**the_plan.model_kwargs, "threads": threads or None}
        owned = not serve.status().proxies  # Serve was not running on this cluster before
        serve.start(
            http_options={"host": settings.host, "port": settings.port},
            proxy_location="HeadOnly",
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
    """Drain the front end, then remove the app (and Serve itself when we started it)."""
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
