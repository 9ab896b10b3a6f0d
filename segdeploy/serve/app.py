"""The service's HTTP API (FastAPI): what the replica that holds the API answers.

- `POST /v1/segment`: an image file (raw body, or multipart `file=`) -> its label PNG;
  `Accept: application/json` -> the mask and class shares as JSON; `?overlay=1` ->
  the overlay PNG (or, in JSON, the overlay beside the mask);
- the Open Inference Protocol (`protocol`): `/v2`, `/v2/health/{live,ready}`,
  `/v2/models/NAME[/versions/1][/ready]`, `POST /v2/models/NAME[/versions/1]/infer`;
- `GET /metrics` (Prometheus), `GET /` (a page to try it), `/docs` and
  `/openapi.json` (FastAPI's schema).

Every refusal is a 4xx with `{"error": "<reason>"}` (the v2 protocol's error shape,
which tritonclient reads); nothing a client sends can stop the service. The
segmentation itself happens in a model replica, reached through `backend` (an
object with `async segment(Job) -> Segmented | Refused`), so this module knows
nothing of Ray.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from segdeploy import __version__
from segdeploy.errors import first_line
from segdeploy.serve import protocol
from segdeploy.serve.metrics import ServiceMetrics
from segdeploy.serve.model import Job, Refused, Segmented, ServiceInfo
from segdeploy.serve.page import render_page
from segdeploy.serve.settings import ServeSettings

#: Seconds a client is told to wait after a 503 (queue full, stopping).
RETRY_AFTER_S = 1
#: How often a drain looks whether the last request has left.
DRAIN_POLL_S = 0.05
#: Raw bodies: any image type, or bytes of no stated type.
RAW_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"
SEGMENT_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
ERROR_RESPONSES = {
    code: {"description": text, "content": {"application/json": {"example": {"error": text}}}}
    for code, text in (
        (400, "empty body, not an image, truncated file, bad v2 tensor"),
        (413, "body over --max-body-mb, or image over --max-pixels"),
        (415, "unsupported Content-Type"),
        (503, "queue full (--max-queue) or stopping; see Retry-After"),
    )
}


class Backend(Protocol):
    async def segment(self, job: Job) -> Segmented | Refused: ...


class ApiError(Exception):
    """A refusal: HTTP status, the reason (one line), extra headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Gate:
    """Bounds the segmentation requests in the service (`--max-queue`) and drains them.

    Every handler runs on one event loop (the API replica's), so a plain counter is exact.
    """

    def __init__(self, limit: int, metrics: ServiceMetrics):
        self.limit, self.metrics = limit, metrics
        self.active = 0
        self.stopping = False

    def _refuse(self, reason: str) -> ApiError:
        self.metrics.refused.inc()
        return ApiError(503, reason, {"Retry-After": str(RETRY_AFTER_S)})

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        if self.stopping:
            raise self._refuse("the service is stopping")
        if self.active >= self.limit:
            raise self._refuse(
                f"busy: {self.active} requests are in the service (--max-queue "
                f"{self.limit}); retry after {RETRY_AFTER_S} s"
            )
        self.active += 1
        self.metrics.queue.set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.queue.set(self.active)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503) and wait until those inside are answered, at most
        `timeout_s`; how many are still inside then. Polls: a drain may be asked from
        another event loop than the one serving (Ray Serve's handle calls)."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return self.active


# -- reading requests ------------------------------------------------------------------


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before reading it
    when Content-Length says so), so no client can make the service hold more."""
    too_big = f"body over the limit of {limit} bytes (--max-body-mb)"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"{too_big}: Content-Length {length}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _multipart_file(request, body: bytes) -> bytes:
    """The `file` field of a multipart body already read (and size-checked)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as err:  # python-multipart's and starlette's parse errors alike
        raise ApiError(400, f"malformed multipart body: {first_line(err)}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "multipart body without a file field: send the image as file=")
    return await upload.read()


async def image_bytes(request, limit: int) -> bytes:
    """The image file a `/v1/segment` request carries, or an ApiError saying what is wrong."""
    media = _media_type(request)
    multipart = media == MULTIPART
    if media and not (multipart or media.startswith("image/") or media in RAW_TYPES):
        raise ApiError(
            415,
            f"unsupported Content-Type {media!r}: send the image file's bytes (image/*, "
            "application/octet-stream) or multipart/form-data with file=",
        )
    body = await read_body(request, limit)
    data = await _multipart_file(request, body) if multipart else body
    if not data:
        raise ApiError(400, "empty body: send the image file's bytes")
    return data


def _flag(request, name: str) -> bool:
    value = request.query_params.get(name, "0").lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(400, f"?{name}= takes 1 or 0, got {value!r}")


def server_timing(ms: dict[str, float]) -> str:
    """The replica's stage times as a Server-Timing header (browsers' dev tools show it)."""
    return ", ".join(f"{k};dur={v:.2f}" for k, v in ms.items())


# -- the app ---------------------------------------------------------------------------


class _Observe:
    """ASGI middleware: every answer counted by route and status, with its latency."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, time.perf_counter() - start)


class Service:
    """The state behind the routes: model info, limits, metrics, the gate, the backend."""

    def __init__(self, backend: Backend, info: ServiceInfo, settings: ServeSettings):
        self.backend, self.info, self.settings = backend, info, settings
        self.metrics = ServiceMetrics()
        self.gate = Gate(settings.max_queue, self.metrics)
        self.page = render_page(info)
        #: Set once every deployment of the app runs (`serving` says so): before that the
        #: model replicas may still be loading, and the ready routes answer 503.
        self.ready = False

    def check_ready(self) -> None:
        if self.gate.stopping:
            raise ApiError(503, "the service is stopping")
        if not self.ready:
            raise ApiError(503, "the model replicas are starting")

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.info.name or version not in (None, protocol.MODEL_VERSION):
            which = name if version is None else f"{name} version {version}"
            raise ApiError(
                404,
                f"unknown model {which!r}: this service serves {self.info.name!r} "
                f"version {protocol.MODEL_VERSION}",
            )

    async def run(self, job: Job) -> Segmented:
        """The job on a model replica; a replica's refusal or failure as an ApiError."""
        try:
            result = await self.backend.segment(job)
        except Exception as err:  # a replica that died or failed: the service goes on
            raise ApiError(503, f"the model replica failed: {first_line(err)}") from None
        if isinstance(result, Refused):
            raise ApiError(result.status, result.reason)
        if result.first_in_batch:
            self.metrics.batch_size.observe(result.batch_size)
        return result

    def segment_json(self, result: Segmented, total_ms: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.info.name,
            "variant": self.info.variant,
            "width": result.width,
            "height": result.height,
            "classes": {str(k): v for k, v in self.info.id2label.items()},
            "shares": result.shares,
            "mask": base64.b64encode(result.png or b"").decode("ascii"),
        }
        if result.overlay is not None:
            out["overlay"] = base64.b64encode(result.overlay).decode("ascii")
        out["timings"] = {**result.timings_ms, "total": round(total_ms, 3)}
        out["batch_size"] = result.batch_size
        out["served_by"] = result.served_by
        return out


def build_app(backend: Backend, info: ServiceInfo, settings: ServeSettings):
    """The FastAPI app of the replica that holds the API (`deployments`)."""
    service = Service(backend, info, settings)
    app = FastAPI(
        title=f"segdeploy serve: {info.name}",
        version=__version__,
        description="Semantic segmentation with an exported model: label maps as PNG or "
        "JSON, and the Open Inference Protocol (KServe v2) that Triton's clients speak.",
    )
    app.state.service = service
    app.add_middleware(_Observe, metrics=service.metrics)

    def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error(err.status, err.reason, err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error(400, "; ".join(str(e.get("msg")) for e in err.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return error(500, f"internal error: {type(err).__name__}: {first_line(err)}")

    @app.post(
        "/v1/segment",
        summary="Segment one image",
        openapi_extra={"requestBody": SEGMENT_BODY},
        responses={
            200: {
                "description": "The label map (PNG, one class id per pixel; 16-bit above "
                "256 classes), the overlay PNG with ?overlay=1, or JSON with "
                "Accept: application/json",
                "content": {"image/png": {}, "application/json": {}},
            },
            **ERROR_RESPONSES,
        },
    )
    async def segment(request: Request):
        start = time.perf_counter()
        async with service.gate.enter():
            overlay = _flag(request, "overlay")
            data = await image_bytes(request, settings.max_body_bytes)
            outputs = frozenset({"png", "overlay"} if overlay else {"png"})
            result = await service.run(Job(data, outputs))
        total_ms = (time.perf_counter() - start) * 1e3
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(service.segment_json(result, total_ms))
        body = result.overlay if overlay else result.png
        timing = server_timing({**result.timings_ms, "total": total_ms})
        return Response(body, media_type="image/png", headers={"Server-Timing": timing})

    _v2_routes(app, service)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(service.page)

    return app


def _v2_routes(app: FastAPI, service: Service) -> None:
    """The Open Inference Protocol's routes (`protocol` has the tensors' rules)."""
    info, settings = service.info, service.settings

    @app.get("/v2", summary="v2: server metadata")
    async def server_metadata():
        return protocol.server_metadata(__version__)

    @app.get("/v2/health/live", summary="v2: the server is up")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="v2: the server takes requests")
    async def ready():
        service.check_ready()
        return {"ready": True}

    def _both(path: str, handler: Callable[..., Awaitable], method: str, summary: str) -> None:
        # Each model route also under /versions/{version}, as Triton's clients may ask.
        add = app.get if method == "get" else app.post
        add(f"/v2/models/{{name}}{path}", summary=summary)(handler)
        add(f"/v2/models/{{name}}/versions/{{version}}{path}", summary=summary)(handler)

    async def metadata(name: str, version: str | None = None):
        service.check_model(name, version)
        return protocol.model_metadata(info.name, np.dtype(info.label_dtype), info.platform)

    async def model_ready(name: str, version: str | None = None):
        service.check_model(name, version)
        service.check_ready()
        return {"name": info.name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None):
        service.check_model(name, version)
        async with service.gate.enter():
            body = await read_body(request, settings.max_body_bytes)
            try:
                req = protocol.parse_infer_request(
                    body, request.headers.get(protocol.HEADER_LENGTH)
                )
            except protocol.ProtocolError as err:
                raise ApiError(400, str(err)) from None
            if req.pixels is not None:
                h, w = req.pixels.shape[:2]
                if h * w > settings.max_pixels:
                    raise ApiError(
                        413, f"{w}x{h} = {w * h} pixels is over --max-pixels {settings.max_pixels}"
                    )
            if req.image is not None and not req.image:
                raise ApiError(400, "input 'image' is empty: send the image file's bytes")
            data = req.image if req.image is not None else req.pixels
            result = await service.run(Job(data, frozenset({"labels"})))
        body, headers = protocol.infer_response(info.name, req, result.labels)
        return Response(body, headers=headers)

    _both("", metadata, "get", "v2: model metadata")
    _both("/ready", model_ready, "get", "v2: the model takes requests")
    _both("/infer", infer, "post", "v2: segment one image")
