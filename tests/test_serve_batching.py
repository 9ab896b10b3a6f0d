"""`segdeploy.serve.batching.Batcher`: the requests that queue up while the model runs
share its next call, without any wait (plain asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from segdeploy.serve.batching import Batcher


class SlowModel:
    """A blocking `forward` that takes `seconds` per call and records each call's items."""

    def __init__(self, seconds: float, fail_on=None):
        self.seconds, self.fail_on = seconds, fail_on
        self.calls: list[list[int]] = []
        self.running = threading.Event()

    def __call__(self, items):
        self.calls.append(list(items))
        self.running.set()
        time.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


async def _arrive(batcher: Batcher, items, every_s: float):
    async def one(i):
        await asyncio.sleep(every_s * i)
        return await batcher(items[i])

    return await asyncio.gather(*(one(i) for i in range(len(items))), return_exceptions=True)


def test_requests_arriving_while_the_model_runs_share_its_next_call():
    # No batch wait: the first request runs alone at once, and the 15 that arrive during
    # its call (10 ms apart, the call takes 300 ms) run as full batches after it. Ray
    # Serve's @serve.batch made this 16 calls of one request each.
    model = SlowModel(0.3)
    results = asyncio.run(_arrive(Batcher(model, max_batch_size=8), list(range(16)), 0.01))
    assert results == [2 * i for i in range(16)]  # each request got its own result
    sizes = [len(c) for c in model.calls]
    assert sizes[0] == 1, sizes
    assert sizes[1:] == [8, 7], sizes
    assert sorted(i for c in model.calls for i in c) == list(range(16))


def test_a_lone_request_is_a_batch_of_one_and_waits_for_no_company():
    model = SlowModel(0.0)
    batcher = Batcher(model, max_batch_size=8)

    async def one_at_a_time():
        return [await batcher(i) for i in range(3)]

    assert asyncio.run(one_at_a_time()) == [0, 2, 4]
    assert model.calls == [[0], [1], [2]]


def test_batch_wait_gathers_requests_that_arrive_within_it():
    model = SlowModel(0.0)
    # Three requests 20 ms apart: the first waits (up to 2 s) for company, and the batch
    # leaves as soon as it is full, not after the whole wait.
    batcher = Batcher(model, max_batch_size=3, wait_s=2.0)
    start = time.perf_counter()
    assert asyncio.run(_arrive(batcher, [1, 2, 3], 0.02)) == [2, 4, 6]
    assert model.calls == [[1, 2, 3]]
    assert time.perf_counter() - start < 1.5


def test_a_failed_call_fails_its_requests_only_and_the_next_call_runs():
    model = SlowModel(0.2, fail_on=3)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8)
        first = await _arrive(batcher, [1, 2, 3, 4], 0.01)  # 1 alone, then 2, 3, 4 together
        after = await batcher(5)
        return first, after

    first, after = asyncio.run(scenario())
    assert first[0] == 2
    assert all(isinstance(r, ValueError) and "bad item 3" in str(r) for r in first[1:])
    assert after == 10
    assert model.calls == [[1], [2, 3, 4], [5]]


def test_a_request_whose_client_left_is_not_run():
    model = SlowModel(0.2)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.to_thread(model.running.wait, 5)  # the model runs request 1
        gone = asyncio.ensure_future(batcher(2))
        kept = asyncio.ensure_future(batcher(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await kept

    assert asyncio.run(scenario()) == (2, 6)
    assert model.calls == [[1], [3]]


@pytest.mark.parametrize("size, wait", [(0, 0.0), (4, -1.0)])
def test_impossible_settings_are_refused(size, wait):
    with pytest.raises(ValueError):
        Batcher(SlowModel(0.0), max_batch_size=size, wait_s=wait)


# -- the replica around the batcher (no Ray either) --------------------------------------


def test_a_replica_warms_up_with_one_full_batch_at_the_processors_size(tiny_onnx_dir):
    from segdeploy.serve.model import ReplicaModel

    model = ReplicaModel(str(tiny_onnx_dir), provider="cpu", batch_size=3)
    shapes = []
    run = model.seg._run
    model.seg._run = lambda pixels, size: shapes.append(pixels.shape) or run(pixels, size)
    model.warm_up()
    h, w = model.seg.preprocessor.size
    assert shapes == [(3, 3, h, w)]


def test_a_replica_runs_without_memory_patterns_and_infer_keeps_them(tiny_onnx_dir):
    # A replica's batch size varies with what queued up; onnxruntime's per-shape memory
    # patterns fragmented its arena across batch sizes and the service's RSS grew 1.26x
    # under the bench's load (benchmarks/results/serve_cpu.md). infer's fixed batches
    # keep them.
    from segdeploy.runtime.segmenter import Segmenter
    from segdeploy.serve.model import ReplicaModel

    replica = ReplicaModel(str(tiny_onnx_dir), provider="cpu", batch_size=2)
    assert replica.seg.session.get_session_options().enable_mem_pattern is False
    plain = Segmenter(tiny_onnx_dir, "cpu", threads=1)
    assert plain.session.get_session_options().enable_mem_pattern is True
    # ...and batches of every size still give the labels of one image at a time
    x = np.random.default_rng(0).random((3, *replica.seg.preprocessor.size), np.float32)
    size = (40, 50)
    alone = plain.forward([x], [size])[0]()
    for n in (2, 1):
        for pending in replica.seg.forward([x] * n, [size] * n):
            np.testing.assert_array_equal(pending(), alone)


def test_a_cpu_replica_runs_its_stages_on_one_thread_and_a_gpu_one_on_every_core(
    tiny_onnx_dir,
):
    # On a CPU, more threads decoding a queue of requests at once took the cores from
    # the model (16 clients: 1.15x the images/s with one thread, 2-core EPYC).
    from segdeploy.runtime.pipeline import available_cores
    from segdeploy.serve.model import ReplicaModel

    replica = ReplicaModel(str(tiny_onnx_dir), provider="cpu", batch_size=2)
    assert replica.stage_threads() == 1
    replica.seg.io_device = "cuda"  # what a CUDA or TensorRT session sets
    assert replica.stage_threads() == available_cores()


@pytest.mark.parametrize("given, gpu, used", [(None, False, 4), (None, True, 16), (2, False, 2)])
def test_the_default_batch_is_infers_on_the_replicas_device(given, gpu, used):
    from segdeploy.serve.settings import ServeSettings

    settings = ServeSettings(max_batch_size=given)
    settings.check()
    assert settings.batch_size_on(gpu) == used
