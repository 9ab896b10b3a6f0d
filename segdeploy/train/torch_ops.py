"""The few torch operations that training, validation and the demo share (torch imported lazily).

The runtime has its own exact numpy upsampling (`segdeploy.runtime.upsample`);
these run where PyTorch is already loaded: inside the Trainer on the device, and
beside the PyTorch model that validation compares with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def upsample_bilinear(logits: Any, size: tuple[int, int]) -> Any:
    """Logits [N, C, h, w] resized to `size`: bilinear, align_corners=False.

    As in the Hugging Face semantic-segmentation guide and the runtime, so that
    every stage turns logits into labels the same way.
    """
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32) if not torch.is_tensor(logits) else logits
    return torch.nn.functional.interpolate(
        logits, size=tuple(size), mode="bilinear", align_corners=False
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored after.

    On a busy machine, OpenMP threads that wait on each other can make PyTorch
    several times slower than one thread; `n` lets the user choose (None: torch's).
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
