"""Dynamic batching for one model replica: the requests that queued up while the model
ran share its next call.

Hand-written rather than Ray Serve's `@serve.batch` (Ray 2.60), which forms a batch
as soon as its wait ends and only then queues it behind the running call
(`max_concurrent_batches`): requests that arrive while the model runs each become a
batch of one. Measured: 16 requests arriving 10 ms apart during a 200 ms call gave 16
batches of 1 with `batch_wait_timeout_s=0`, and the service's mean batch under 16
clients was 1.01 (benchmarks/results/serve_cpu.md before this module). A wait long
enough to fill batches that way costs every request that wait, the lone one too.

Here one loop takes whatever is waiting each time the model is free (at most
`max_batch_size`), so a lone request runs at once and a busy model's queue runs as
one call; `wait_s` optionally holds a batch that is not full for more arrivals.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """`await batcher(item)`: `forward` (blocking, run on a thread) on the item together
    with the others waiting, one call at a time; `forward(items)` returns one result per
    item, in order. An exception in `forward` is raised to every request of that call.

    Lives on one event loop (the replica's): its loop task starts with the first request.
    """

    def __init__(
        self,
        forward: Callable[[Sequence[In]], Sequence[Out]],
        max_batch_size: int,
        wait_s: float = 0.0,
    ):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size {max_batch_size} < 1 or wait_s {wait_s} < 0")
        self.forward, self.max_batch_size, self.wait_s = forward, max_batch_size, wait_s
        self._waiting: collections.deque[tuple[In, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        """Requests waiting for the model (not those in the running call)."""
        return len(self._waiting)

    async def __call__(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        return await future

    async def _next_batch(self) -> list[tuple[In, asyncio.Future]]:
        arrived = self._arrived
        await arrived.wait()
        if self.wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_s
            while len(self._waiting) < self.max_batch_size and loop.time() < deadline:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
        batch = []
        while self._waiting and len(batch) < self.max_batch_size:
            item, future = self._waiting.popleft()
            if not future.done():  # a request whose client left is not run
                batch.append((item, future))
        if not self._waiting:
            arrived.clear()
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.forward, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
            except Exception as err:  # every request of the call gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
