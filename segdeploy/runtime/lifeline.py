"""A worker process ends with the run that started it, however the run ends.

The run's worker processes come from multiprocessing's fork server, so their
parent is the server, not the run. When the run is killed outright (SIGKILL, the
OOM killer) nothing tells them: a ProcessPoolExecutor worker waits on its call
queue, whose pickled copy holds both ends of the queue's pipe, so it never reads
end-of-file and waits forever; the fork server lives as long as any worker holds
its liveness pipe; and all of them keep the run's stdout and stderr open, so a
caller reading those waits forever too (measured: `segdeploy infer --workers 2`
killed with SIGKILL left the server and both workers running).

Neither multiprocessing (its `daemon` flag acts only when the parent exits
cleanly) nor concurrent.futures has an option for this, and Linux's
PR_SET_PDEATHSIG names the parent, which is the fork server. So each worker
watches the run's process itself: `exit_with(pid)`, which every pool made by
`tied_pool` runs in its workers after their own initializer.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

#: How long a worker told to stop (SIGTERM, so that a file being written is unwound
#: and removed) may take before it is ended outright.
GRACE_S = 10.0
#: Where pidfds are missing (not Linux 5.3+): how often the run's process is looked at.
POLL_S = 1.0


def tied_pool(
    workers: int, ctx: BaseContext, initializer: Callable, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of `workers` processes from `ctx` that run
    `initializer(*initargs)`, then end with this process however it ends (`exit_with`)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_tied,
        initargs=(os.getpid(), initializer, initargs),
    )


def _init_tied(run_pid: int, initializer: Callable, initargs: tuple) -> None:
    initializer(*initargs)  # first: its SIGTERM handler is what exit_with's SIGTERM meets
    exit_with(run_pid)


def exit_with(pid: int) -> None:
    """End this process soon after process `pid` ends: SIGTERM to itself (its handler,
    if it has one, unwinds the task in hand), then, after GRACE_S, an immediate exit.
    A daemon thread waits on a pidfd of `pid` (no polling), else polls every POLL_S."""
    threading.Thread(target=_watch, args=(pid,), name="segdeploy-lifeline", daemon=True).start()


def _watch(pid: int) -> None:
    _wait_for_exit(pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    except (AttributeError, OSError):  # no pidfds here: look every POLL_S
        while _alive(pid):
            time.sleep(POLL_S)
        return
    try:
        select.select([fd], [], [])  # readable once the process has exited
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
