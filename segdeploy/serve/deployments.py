"""The Ray Serve deployments of `segdeploy serve`, in one of two shapes.

- One replica (`--replicas 1`, the default): `Standalone`, the HTTP API
  (`app.build_app`), its metrics, the bounded queue and the model in one replica.
  A request goes from Serve's HTTP proxy straight to the process that segments it.
- More (`--replicas N` or MIN-MAX, autoscaled): `Frontend` (one replica, no CPU
  reserved) holds the HTTP API, its metrics and the bounded queue, so that its
  counters are the service's and `--max-queue` bounds the whole service; it hands
  each request to a `ModelReplica` through a deployment handle.

`ModelReplica` is one Segmenter each (`model.ReplicaModel`), decoding, batching,
upsampling and encoding the requests. Requests that arrive together share one
model call (`batching.Batcher`); with a GPU provider each replica holds one GPU.
The handle's hop costs every request a round trip between two processes and the
front end's CPU, which is why one replica is served without it: on 2 cores (AVX2
EPYC, CamVid b0 int8, 3 interleaved rounds) 16 clients got 1.10x the images/s
(pairs 1.12, 1.00, 1.10) and one client's p50 was 0.97x (0.97, 0.98, 0.74).

Imported only once the serve extra is known to be there (it imports Ray Serve).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import ray
from ray import serve

from segdeploy.serve.app import build_app
from segdeploy.serve.batching import Batcher
from segdeploy.serve.model import Job, Refused, ReplicaModel, Segmented, ServiceInfo
from segdeploy.serve.settings import ServeSettings


class ModelReplica:
    """One Segmenter behind Ray Serve; also `app.Backend` itself, for `Standalone`."""

    def __init__(self, model_kwargs: dict, max_batch_size: int, batch_wait_s: float):
        self.model = ReplicaModel(batch_size=max_batch_size, **model_kwargs)
        self.model.warm_up()  # before Serve counts the replica ready
        # Requests that queue up while the model runs share its next call (`Batcher`).
        self.batcher = Batcher(self.model.forward, max_batch_size, batch_wait_s)
        self._stages = concurrent.futures.ThreadPoolExecutor(
            self.model.stage_threads(), thread_name_prefix="stages"
        )
        self.served_by = {
            "node": ray.get_runtime_context().get_node_id(),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    async def segment(self, job: Job) -> Segmented | Refused:
        # Decoding and upsampling run on the stages' threads (Pillow, numpy and zlib
        # release the GIL), so that the next requests are decoded while the model runs.
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._stages, self.model.prepare, job)
        if isinstance(prepared, Refused):
            return prepared
        passed = await self.batcher(prepared)
        result = await loop.run_in_executor(self._stages, self.model.finish, job, prepared, passed)
        result.served_by = self.served_by
        return result


class HandleBackend:
    """`app.Backend` over a handle to the ModelReplica deployment."""

    def __init__(self, handle):
        self.handle = handle

    async def segment(self, job: Job) -> Segmented | Refused:
        return await self.handle.segment.remote(job)


class _HttpApi:
    """What the service's driver asks of the replica that holds the HTTP API."""

    _app = None

    def __serve_build_asgi_app__(self):
        return self._app

    async def mark_ready(self) -> None:
        """Every deployment runs: the ready routes answer 200 from now on."""
        self._app.state.service.ready = True

    async def drain(self, timeout_s: float) -> int:
        """Refuse new segmentation requests and wait for those inside (`Gate.drain`)."""
        return await self._app.state.service.gate.drain(timeout_s)


@serve.ingress()
class Frontend(_HttpApi):
    """The HTTP API, in one replica, over the model replicas' deployment."""

    def __init__(self, model, info: ServiceInfo, settings: ServeSettings):
        self._app = build_app(HandleBackend(model), info, settings)


@serve.ingress()
class Standalone(_HttpApi):
    """The HTTP API and the model in one replica: no hop between them."""

    def __init__(self, model_kwargs: dict, info: ServiceInfo, settings: ServeSettings):
        replica = ModelReplica(model_kwargs, settings.max_batch_size, settings.batch_wait_ms / 1e3)
        self._app = build_app(replica, info, settings)


def _api_options(settings: ServeSettings) -> dict:
    # Room for every request --max-queue lets in, and for /metrics and health probes
    # beside them; the proxy's own queue is bounded too, past that.
    return {
        "max_ongoing_requests": settings.max_queue + 16,
        "max_queued_requests": settings.max_queue,
    }


def application(
    settings: ServeSettings,
    info: ServiceInfo,
    model_kwargs: dict,
    *,
    replicas: tuple[int, int],
    num_cpus: float,
    num_gpus: float,
):
    """The bound Ray Serve application: `Standalone` for one replica, else the front end
    over the model replicas."""
    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if replicas == (1, 1):
        return (
            serve.deployment(Standalone)
            .options(
                name="service",
                num_replicas=1,
                ray_actor_options=resources,
                **_api_options(settings),
            )
            .bind(model_kwargs, info, settings)
        )
    lo, hi = replicas
    scaling = (
        {"num_replicas": lo}
        if lo == hi
        else {
            "autoscaling_config": {
                "min_replicas": lo,
                "max_replicas": hi,
                # A replica is busy with one batch running and one forming.
                "target_ongoing_requests": settings.max_batch_size,
            }
        }
    )
    model = serve.deployment(ModelReplica).options(
        name="model",
        ray_actor_options=resources,
        # Every request the front end lets into the service (--max-queue, which bounds
        # memory): the Batcher queues them. A smaller bound makes the replica reject
        # requests that Ray's router then retries with backoff: with 2x the batch (8),
        # 16 clients got 4.87 and 5.69 images/s of the int8 graph, less than 4 clients
        # did, against 5.92 and 6.02 with 32 (interleaved, 2-core EPYC).
        max_ongoing_requests=settings.max_queue,
        **scaling,
    )
    front = serve.deployment(Frontend).options(
        name="frontend", num_replicas=1, ray_actor_options={"num_cpus": 0}, **_api_options(settings)
    )
    batch_wait_s = settings.batch_wait_ms / 1e3
    return front.bind(
        model.bind(model_kwargs, settings.max_batch_size, batch_wait_s), info, settings
    )
