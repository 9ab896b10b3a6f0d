"""The Ray a segdeploy command runs on: a private one for the command alone, or a cluster
joined on purpose. Every front end on Ray (`infer --engine ray`, `serve`) gets its Ray
here, so that they all follow one rule:

- no address (and no $RAY_ADDRESS), or "local": a private Ray for this command alone,
  started with Ray's `address="local"` (never the cluster Ray's auto-detection would
  find), listening on 127.0.0.1 only, with the CPUs of this process's affinity
  (taskset, cgroup cpuset); it is shut down on exit and none of its processes outlive
  the block;
- "auto", "HOST:PORT", "ray://HOST:PORT" or $RAY_ADDRESS: join that cluster (never
  sizing it: num_cpus/num_gpus are a private Ray's); a cluster that does not answer
  within `connect_timeout_s` is one line, not Ray's ten minutes of retries; on exit the
  driver disconnects and the cluster runs on;
- Ray already initialised in this process (a Ray user's own session, a test's): used as
  it is, and left as it is.

Ray's own output (its Python loggers, the C++ core worker's lines on stderr, the
workers' output forwarded to the driver) is hidden unless `verbose`: the front end
says what failed, in one line.
During the block SIGTERM stops the command as Ctrl-C does (KeyboardInterrupt) instead
of Ray's `sys.exit(15)`; the signal handlers found on entry are restored on exit.

    with ray_session(None) as info:   # private: info.private, info.cpus...
        ds = ray.data.from_items(rows).map_batches(...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from segdeploy.errors import SegdeployError, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'segdeploy[ray]'"
#: How long joining a cluster may wait for it to answer (`--ray-timeout`).
DEFAULT_CONNECT_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
#: Ray's own switch (meant for laptops) that keeps Ray on the loopback: without it Ray
#: replaces 127.0.0.1 by the machine's network address, both where a private Ray listens
#: and in an address to join (127.0.0.1:PORT became 192.0.2.2:PORT, and hung). Read when
#: Ray is imported; it leaves other addresses as they are.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: How long the processes of a private Ray get to exit after `ray.shutdown()`.
EXIT_GRACE_S = 10.0
#: Where Ray's options are named in messages (the CLI's option for the address).
WHERE = "--ray-address"


@dataclass(frozen=True)
class RaySessionInfo:
    """What the block runs on: the cluster's address (HOST:PORT of its GCS, or the
    ray:// address joined), whether this session started it, and its size."""

    address: str
    private: bool
    nodes: int
    cpus: float
    gpus: float


def import_ray():
    """The `ray` module (with Ray Data), or a SegdeployError saying how to install it."""
    if "ray" not in sys.modules:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs both; check the data part too)
    except ImportError:
        raise SegdeployError("--engine ray", f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


def resolve_address(address: str | None) -> str | None:
    """The cluster to join, or None for a private Ray: `address`, else $RAY_ADDRESS;
    "local" (Ray's word for "start one here") is private too."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    return None if address == "local" else address


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Iterator[RaySessionInfo]:
    """Ray for the block: private when `address` (and $RAY_ADDRESS) is None, else the
    cluster at `address` joined; see the module's docstring. `num_cpus` (default: this
    process's cores) and `num_gpus` (default: Ray's detection) size a private Ray only."""
    target = resolve_address(address)
    if target is not None and (num_cpus is not None or num_gpus is not None):
        raise SegdeployError(WHERE, "num_cpus and num_gpus size a private Ray, not a cluster")
    if not connect_timeout_s > 0:  # also refuses NaN
        raise SegdeployError(
            "--ray-timeout", f"must be a positive number of seconds, got {connect_timeout_s}"
        )
    ray = import_ray()
    if ray.is_initialized():
        yield _info(ray, _gcs_address(ray) or target or "unknown", private=False)
        return
    levels = _quiet_loggers(verbose)
    handlers = _signal_handlers()
    before = _descendants()
    stopped = False
    try:
        with _loopback_kept(ray):
            if target is None:
                _start_private(ray, num_cpus, num_gpus, verbose)
            else:
                _join(ray, target, verbose, connect_timeout_s)
        _sigterm_as_interrupt()
        info = _info(ray, _gcs_address(ray) or target, private=target is None)
        _log_session(info)
        with _native_lines_hidden(not verbose):
            try:
                yield info
            finally:
                stopped = True
                _stop(ray, before)
    finally:
        if not stopped:  # a start that failed half-way
            _stop(ray, before)
        _restore_signal_handlers(handlers)
        for logger, level in levels.items():
            logger.setLevel(level)


# -- starting and joining ---------------------------------------------------------------


@contextlib.contextmanager
def _loopback_kept(ray) -> Iterator[None]:
    """LOOPBACK_ENV's effect for the block also when Ray was imported before `import_ray`
    could set it (a Ray user's script, a test suite that imported Ray first): Ray reads
    the variable into this constant at import, and reads the constant where it matters
    (services.get_node_ip_address, at call time)."""
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = before


def _start_private(ray, num_cpus: int | None, num_gpus: int | None, verbose: bool) -> None:
    from segdeploy.runtime.pipeline import available_cores

    if num_cpus is not None and num_cpus < 1:
        raise SegdeployError(WHERE, f"a private Ray needs at least 1 CPU, got {num_cpus}")
    try:
        ray.init(
            address="local",  # a new Ray, whatever runs on this machine already
            num_cpus=num_cpus or available_cores(),
            num_gpus=num_gpus,
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=_ray_level(verbose),
        )
    except (ConnectionError, RuntimeError, ValueError, OSError) as err:
        raise SegdeployError(WHERE, f"cannot start a private Ray here: {first_line(err)}") from None


def _join(ray, target: str, verbose: bool, timeout: float) -> None:
    """ray.init on the cluster at `target`, once it has answered within `timeout` s."""
    _wait_for_cluster(ray, target, timeout)
    try:
        ray.init(address=target, log_to_driver=verbose, logging_level=_ray_level(verbose))
    except ImportError:  # ray:// needs Ray Client, an extra of Ray's
        raise SegdeployError(
            WHERE, f"joining {target} needs Ray Client: pip install 'ray[client]'"
        ) from None
    except Exception as err:  # Ray's errors have no common base: ConnectionError, RuntimeError, AuthenticationError...
        if ray.is_initialized():
            raise
        raise SegdeployError(WHERE, f"cannot join {target}: {_why(err)}") from None


def _why(err: BaseException) -> str:
    text = first_line(err)
    if "No node info found matching" in text:
        return (
            "this machine is not a node of that cluster: run segdeploy on one of its "
            "nodes (`ray start --address HEAD:PORT` makes this one), or join through Ray "
            "Client (ray://HEAD:10001)"
        )
    return text


#: A connection's preface and an empty SETTINGS frame (RFC 9113 3.4): a gRPC server, as
#: Ray's GCS and Ray Client's server are, answers with a SETTINGS frame of its own.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


def _wait_for_cluster(ray, target: str, timeout: float) -> None:
    """Return once something at `target` speaks gRPC, or raise a one-line error after
    `timeout` seconds.

    Hand-written because Ray's own connection cannot be bounded: ray.init (and Ray's
    GcsClient) retries for 20 x 36 s whatever is or is not there (a closed port, an
    HTTP server), logging C++ lines meanwhile; grpcio, which could ask, is not part of
    Ray's install. A closed port is retried until `timeout` (a head may be starting).
    """
    host, port = _host_port(ray, target)
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    why = f"nothing listens at {where}"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SegdeployError(
                WHERE,
                f"cannot join {target}: {why}, for {timeout:g} s; start a cluster with "
                "`ray start --head`, or leave --ray-address out to run on a private Ray here",
            )
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)) as conn:
                conn.sendall(_H2_HELLO)
                frame = conn.recv(9)
            if len(frame) == 9 and frame[3] == _H2_SETTINGS:
                return
            why = f"what listens at {where} is not a Ray cluster (it does not speak gRPC)"
        except TimeoutError:
            why = f"{where} does not answer"
        except OSError as err:
            why = f"nothing listens at {where} ({(err.strerror or str(err)).lower()})"
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _host_port(ray, target: str) -> tuple[str, int]:
    """HOST, PORT of the server behind `target`; "auto" finds the cluster as Ray does."""
    if "://" in target:
        rest = target.split("://", 1)[1]
        host, sep, port = rest.rpartition(":")
        host, port = (host, port) if sep else (rest, "10001")  # Ray Client's default port
    else:
        from ray._private import services  # Ray's own reading of "auto" and HOST:PORT

        try:
            resolved = services.canonicalize_bootstrap_address(target)
        except (ConnectionError, ValueError) as err:
            raise SegdeployError(WHERE, f"cannot join {target}: {first_line(err)}") from None
        if resolved is None:
            raise SegdeployError(WHERE, f"cannot join {target}: no Ray cluster found")
        host, _, port = resolved.rpartition(":")
    try:
        return host.strip("[]") or LOOPBACK, int(port)
    except ValueError:
        raise SegdeployError(
            WHERE, f"expected HOST:PORT, auto or ray://HOST:PORT, got {target!r}"
        ) from None


# -- what runs, and stopping it ---------------------------------------------------------


def _gcs_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client sessions have none here: their ray:// address is used
        return None


def _info(ray, address: str, private: bool) -> RaySessionInfo:
    resources = ray.cluster_resources()
    return RaySessionInfo(
        address=address,
        private=private,
        nodes=sum(1 for node in ray.nodes() if node.get("Alive")),
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
    )


def _log_session(info: RaySessionInfo) -> None:
    size = f"{info.nodes} node(s), {info.cpus:g} CPUs, {info.gpus:g} GPUs"
    if info.private:
        log.debug("Ray: a private Ray on %s (%s)", info.address, size)
    else:
        log.info("Ray: joined the cluster at %s (%s)", info.address, size)


def _descendants() -> set:
    import psutil

    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def _ray_processes(ray) -> set | None:
    """The processes Ray's node started for this process (GCS, raylet, dashboard...) and
    their descendants (the workers are the raylet's children); None where this Ray does
    not say (its node object is internal to Ray)."""
    import psutil

    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    if node is None or not isinstance(getattr(node, "all_processes", None), dict):
        return None
    found = set()
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error, AttributeError, TypeError):
                proc = psutil.Process(info.process.pid)
                found |= {proc, *proc.children(recursive=True)}
    return found


def _stop(ray, before: set) -> None:
    """Disconnect; a private Ray's processes (started since `before`) are waited for, and
    killed if still there after EXIT_GRACE_S.

    Only Ray's: other children started inside the block are the caller's (the local
    engine's fork server, started in a block, was killed here and reaped, and every
    later run in the process met "ChildProcessError: No child processes")."""
    import psutil

    # Before shutdown: Ray's workers are the raylet's children.
    started = _descendants() - before
    ours = _ray_processes(ray)
    if ours is not None:
        started &= ours
    with contextlib.suppress(Exception):  # a half-started Ray: stop what there is
        ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=EXIT_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            log.debug("Ray: killing %s (pid %d), still there after shutdown", proc.name(), proc.pid)
            proc.kill()
    psutil.wait_procs(alive, timeout=EXIT_GRACE_S)


# -- quiet, and signals -----------------------------------------------------------------


def _ray_level(verbose: bool) -> int:
    """Ray's loggers: silent (a failure reaches the user as segdeploy's one line), or with
    -v segdeploy's own level (INFO, DEBUG with -vv)."""
    if not verbose:
        return logging.CRITICAL
    return min(logging.INFO, logging.getLogger("segdeploy").getEffectiveLevel())


def _quiet_loggers(verbose: bool) -> dict[logging.Logger, int]:
    """Set Ray's Python loggers for the block; their levels before, to restore."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data", "ray.serve")]
    before = {logger: logger.level for logger in loggers}
    for logger in loggers:
        logger.setLevel(_ray_level(verbose))
    return before


def _signal_handlers() -> dict[int, object] | None:
    if threading.current_thread() is not threading.main_thread():
        return None  # handlers can only be set from the main thread: leave them
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: ray.init's handler calls
    sys.exit(15) from wherever the main thread is (a traceback, no summary, status 15)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _restore_signal_handlers(handlers: dict[int, object] | None) -> None:
    for sig, handler in (handlers or {}).items():
        if handler is not None:  # None: set outside Python, cannot be put back
            signal.signal(sig, handler)


#: The start of a line of Ray's C++ logging: "[2026-12-06 22:55:25,153 E 21913 21913] ".
_NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")


@contextlib.contextmanager
def _native_lines_hidden(enabled: bool) -> Iterator[None]:
    """Drop the lines of Ray's C++ logging from this process's stderr for the block.

    Hand-written because nothing in Ray silences them: Ray's core worker (C++, in this
    process) writes them straight to file descriptor 2, past Python's logging, at any
    RAY_BACKEND_LOG_LEVEL (which prints a line of its own). So fd 2 becomes a pipe, and
    a thread copies everything to the real stderr but whole lines in that format.
    Started after ray.init, so that no Ray process inherits the pipe.
    """
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):
        enabled = False
    if not enabled:
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy_lines, args=(read_end, real), daemon=True)
    copier.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closed: the copier reads to its end
        copier.join(timeout=5.0)
        if not copier.is_alive():
            os.close(real)


def _copy_lines(read_end: int, real: int) -> None:
    held = b""  # a partial line that may be the start of a C++ line
    with contextlib.suppress(OSError):
        while chunk := os.read(read_end, 65536):
            *lines, held = (held + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not _NATIVE_LINE.match(line))
            if held and not held.startswith(b"["):  # progress bars: no newline, no wait
                out, held = out + held, b""
            if out:
                os.write(real, out)
        if held and not _NATIVE_LINE.match(held):
            os.write(real, held)
    os.close(read_end)
