"""The process group of a `torchrun` / `accelerate launch` run: how it is chosen and closed.

The Trainer (through Accelerate) opens the group; `segdeploy train` closes it
itself, at a point where every rank is known to be doing the same thing, so
that no rank can be left waiting on another one that has gone.
"""

from __future__ import annotations

import os
from datetime import timedelta

# How long the ranks may arrive apart at the closing barrier. They reach it
# straight after the same final evaluation, so seconds apart; a rank later than
# this is stuck or dead, and the run fails naming it instead of hanging.
CLOSE_TIMEOUT = timedelta(minutes=5)


def cpu_distributed() -> bool:
    """Launched by torchrun/accelerate on a machine without CUDA.

    Accelerate only picks CPU DDP (gloo) when told the run is on CPU; otherwise
    it silently trains N independent copies. A single process is left to the
    Trainer's own device choice (CUDA, MPS or CPU).
    """
    import torch

    launched = (
        int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    )
    return launched and not torch.cuda.is_available()


def close_process_group(timeout: timedelta | None = None) -> None:
    """Meet every rank once more, then close the group: call it after the last collective.

    It must come before rank 0's own work (the model folder, the upload), not
    after it: the other ranks would otherwise sit in a collective for as long
    as that work takes, and a rank that dies or stalls meanwhile leaves them
    waiting for the group's timeout (30 minutes by default). Exiting with the
    gloo group still open let its threads abort a rank at interpreter shutdown
    ("terminate called without an active exception", SIGABRT), so every rank
    destroys it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            # Names the ranks that did not arrive in time (gloo only).
            dist.monitored_barrier(timeout=timeout or CLOSE_TIMEOUT, wait_all_ranks=True)
        else:
            dist.barrier()
    dist.destroy_process_group()
