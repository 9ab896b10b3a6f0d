"""`segdeploy serve` on a private Ray on 127.0.0.1: the /v1 and v2 APIs, masks byte-identical
to `segdeploy infer`'s, bad requests, batching and metrics.

One service per module (Ray and Serve take ~15 s to start), serving the tiny model;
every test talks to it over HTTP as a client would.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from serve_helpers import (
    environments_of,
    free_port,
    photo_bytes,
    ray_environment,
    wait_gone,
    without_mark,
    write_photos,
)

pytest.importorskip("ray.serve", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

from segdeploy.cli import main  # noqa: E402
from segdeploy.serve.service import CONTROLLER_ENV, controller_env, serving  # noqa: E402
from segdeploy.serve.settings import ServeSettings  # noqa: E402

NAME = "tiny"
ID2LABEL = {0: "background", 1: "disc", 2: "box", 3: "triangle", 4: "ring"}
MAX_PIXELS = 200_000
MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def url(tiny_onnx_dir):
    settings = ServeSettings(
        model_dir=str(tiny_onnx_dir),
        name=NAME,
        port=free_port(),
        max_batch_size=8,
        batch_wait_ms=30,  # requests sent together share a model call for certain
        max_pixels=MAX_PIXELS,
        max_body_mb=MAX_BODY_MB,
        provider="cpu",
    )
    with ray_environment() as ray_dir:
        with serving(settings) as running:
            yield running.url
        assert not wait_gone(ray_dir), "Ray processes outlived the service"


@pytest.fixture(scope="module")
def infer_out(tiny_onnx_dir, tmp_path_factory):
    """Photos of every kind, and the label PNGs `segdeploy infer` writes for them, less
    their provenance mark (infer's only addition: the label map's bytes are the same)."""
    root = tmp_path_factory.mktemp("serve_photos")
    photos = write_photos(root / "in")
    result = CliRunner().invoke(
        main, ["infer", "--model", str(tiny_onnx_dir), str(root / "in"), "-o", str(root / "out")]
    )
    assert result.exit_code == 0, result.output
    labels = {}
    for photo in photos:
        written = (root / "out" / "in" / f"{photo.stem}.png").read_bytes()
        unmarked = without_mark(written)
        assert len(unmarked) < len(written)  # the mark was there, and only it went
        labels[photo] = root / "unmarked" / f"{photo.stem}.png"
        labels[photo].parent.mkdir(exist_ok=True)
        labels[photo].write_bytes(unmarked)
    return labels


def post(url: str, data: bytes, content_type: str = "image/png", **kw) -> httpx.Response:
    headers = {"Content-Type": content_type, **kw.pop("headers", {})}
    return httpx.post(f"{url}/v1/segment", content=data, headers=headers, timeout=60, **kw)


def good_request_answered(url: str) -> None:
    """After every refusal: the service still segments."""
    r = post(url, photo_bytes("png"))
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_masks_are_byte_identical_to_infer(url, infer_out):
    for photo, label in infer_out.items():
        r = post(url, photo.read_bytes(), "image/jpeg" if photo.suffix == ".jpg" else "image/png")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.content == label.read_bytes(), photo.name
        assert "model;dur=" in r.headers["server-timing"]


def test_multipart_and_untyped_bodies_give_the_same_mask(url, infer_out):
    photo, label = next(iter(infer_out.items()))
    r = httpx.post(f"{url}/v1/segment", files={"file": (photo.name, photo.read_bytes())})
    assert r.status_code == 200 and r.content == label.read_bytes()
    r = httpx.post(f"{url}/v1/segment", content=photo.read_bytes())  # no Content-Type
    assert r.status_code == 200 and r.content == label.read_bytes()


def test_json_answer(url, infer_out):
    photo, label = next(iter(infer_out.items()))
    r = post(url, photo.read_bytes(), headers={"Accept": "application/json"})
    assert r.status_code == 200
    body = r.json()
    assert base64.b64decode(body["mask"]) == label.read_bytes()
    with Image.open(label) as im:
        labels = np.asarray(im)
    assert (body["height"], body["width"]) == labels.shape
    assert body["model"] == NAME and body["variant"] == "fp32"
    assert body["classes"] == {str(i): name for i, name in ID2LABEL.items()}
    shares = {s["id"]: s["share"] for s in body["shares"]}
    counts = np.bincount(labels.ravel(), minlength=5)
    assert shares == {i: round(n / labels.size, 6) for i, n in enumerate(counts) if n}
    assert {"decode", "preprocess", "model", "upsample", "encode", "total"} <= body[
        "timings"
    ].keys()
    assert body["batch_size"] >= 1 and body["served_by"]["node"]
    assert "overlay" not in body


def test_overlay(url):
    data = photo_bytes("jpeg", size=(40, 52))
    r = post(url, data, "image/jpeg", params={"overlay": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.mode == "RGB" and im.size == (52, 40)
        overlay = np.asarray(im, dtype=np.int16)
    with Image.open(io.BytesIO(data)) as im:
        source = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert not np.array_equal(overlay, source)  # the class colours are blended in
    # infer's overlay (segdeploy.runtime.overlay) of the photo and the service's mask
    from segdeploy.runtime.overlay import render_overlay
    from segdeploy.runtime.palette import palette_for

    with Image.open(io.BytesIO(post(url, data, "image/jpeg").content)) as im:
        labels = np.asarray(im)
    with Image.open(io.BytesIO(data)) as im:
        expected = render_overlay(im.convert("RGB"), labels, palette_for(5), ID2LABEL)
    assert np.array_equal(overlay, np.asarray(expected, dtype=np.int16))
    body = post(
        url, data, "image/jpeg", params={"overlay": "1"}, headers={"Accept": "application/json"}
    ).json()
    assert base64.b64decode(body["overlay"]) == r.content
    assert post(url, data, "image/jpeg", params={"overlay": "maybe"}).status_code == 400


def test_tritonclient_reads_the_v2_protocol(url, infer_out):
    http = pytest.importorskip("tritonclient.http")
    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and not client.is_model_ready("other")
    meta = client.get_model_metadata(NAME)
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "image": "BYTES",
        "pixels": "UINT8",
    }
    assert meta["outputs"] == [{"name": "labels", "datatype": "UINT8", "shape": [-1, -1]}]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    for photo, label in infer_out.items():
        with Image.open(label) as im:
            expected = np.asarray(im)
        # A file is BYTES, sent binary (JSON strings must be UTF-8); the answer either way.
        image = http.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo.read_bytes()], dtype=object))
        for binary in (True, False):
            out = http.InferRequestedOutput("labels", binary_data=binary)
            result = client.infer(NAME, [image], outputs=[out], request_id="r1")
            assert result.get_response()["id"] == "r1"
            labels = result.as_numpy("labels")
            assert labels.dtype == np.uint8 and np.array_equal(labels, expected), photo.name
    # Pixels instead of a file: the same labels as for a PNG of those pixels.
    data = photo_bytes("png", 3)
    with Image.open(io.BytesIO(data)) as im:
        pixels = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(post(url, data).content)) as im:
        expected = np.asarray(im)
    for shape, binary in ((pixels.shape, True), ((1, *pixels.shape), False)):
        tensor = http.InferInput("pixels", list(shape), "UINT8")
        tensor.set_data_from_numpy(pixels.reshape(shape), binary_data=binary)
        labels = client.infer(NAME, [tensor]).as_numpy("labels")  # no outputs named: binary
        assert labels.shape == shape[:-1] and np.array_equal(
            labels.reshape(expected.shape), expected
        )
    client.close()


def _v2(url: str, body, name: str = NAME, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v2/models/{name}/infer", content=data, headers=headers or {}, timeout=60
    )


def _pixels(shape, datatype="UINT8", data=None) -> dict:
    n = int(np.prod(shape))
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(shape),
                "datatype": datatype,
                "data": data if data is not None else [7] * n,
            }
        ]
    }


def _v2_binary(url: str, size: int, raw: bytes, shape=(2, 2, 3)) -> httpx.Response:
    """A binary-extension request whose pixels claim `size` bytes, followed by `raw`."""
    pixels = {"name": "pixels", "shape": list(shape), "datatype": "UINT8"}
    head = json.dumps({"inputs": [pixels | {"parameters": {"binary_data_size": size}}]}).encode()
    return _v2(url, head + raw, headers={"Inference-Header-Content-Length": str(len(head))})


def _blank_png(width: int, height: int) -> bytes:
    """A small file of many pixels: one colour compresses to almost nothing."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()


BAD_REQUESTS = {
    # name: (send(url) -> response, status, words of the reason)
    "empty body": (lambda u: post(u, b""), 400, "empty body"),
    "not an image": (lambda u: post(u, b"GIF89a? no, plain text"), 400, "not an image"),
    "truncated": (lambda u: post(u, photo_bytes("png")[:300]), 400, "truncated"),
    "wrong content type": (
        lambda u: post(u, photo_bytes("png"), "text/plain"),
        415,
        "Content-Type",
    ),
    "json content type": (lambda u: post(u, b"{}", "application/json"), 415, "Content-Type"),
    "multipart without file": (
        lambda u: httpx.post(f"{u}/v1/segment", files={"other": ("a.png", photo_bytes("png"))}),
        400,
        "file",
    ),
    "over max pixels": (
        lambda u: post(u, _blank_png(401, 500)),
        413,
        "--max-pixels",
    ),
    "over max body": (
        lambda u: post(u, b"\x89PNG" + bytes(int(MAX_BODY_MB * 2**20))),
        413,
        "--max-body-mb",
    ),
    "compressed body": (
        lambda u: post(u, gzip.compress(photo_bytes("png")), "application/octet-stream"),
        400,
        "not an image",
    ),
    "v2 wrong dtype": (lambda u: _v2(u, _pixels((4, 4, 3), "FP32")), 400, "UINT8"),
    "v2 wrong shape": (lambda u: _v2(u, _pixels((4, 4))), 400, "[H, W, 3]"),
    "v2 shape and data disagree": (
        lambda u: _v2(u, _pixels((4, 4, 3), data=[1, 2, 3])),
        400,
        "needs 48",
    ),
    "v2 values out of range": (
        lambda u: _v2(u, _pixels((1, 1, 3), data=[1, 2, 300])),
        400,
        "0..255",
    ),
    "v2 unknown input": (
        lambda u: _v2(
            u, {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
        ),
        400,
        "unknown input",
    ),
    "v2 image not an image": (
        lambda u: _v2(
            u, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
        ),
        400,
        "not an image",
    ),
    "v2 two images": (
        lambda u: _v2(
            u,
            {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]},
        ),
        400,
        "one image",
    ),
    "v2 not json": (lambda u: _v2(u, b"{nope"), 400, "JSON"),
    "v2 binary size past the body": (
        lambda u: _v2_binary(u, 99, bytes(12)),
        400,
        "past the 12 bytes",
    ),
    "v2 binary data left over": (lambda u: _v2_binary(u, 12, bytes(20)), 400, "belong to no input"),
    "v2 over max pixels": (
        lambda u: _v2_binary(u, 500 * 401 * 3, bytes(500 * 401 * 3), shape=(500, 401, 3)),
        413,
        "--max-pixels",
    ),
    "v2 unknown model": (lambda u: _v2(u, _pixels((4, 4, 3)), name="other"), 404, "unknown model"),
    "unknown route": (lambda u: httpx.get(f"{u}/v3/nothing"), 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_and_the_next_is_answered(url, case):
    send, status, words = BAD_REQUESTS[case]
    r = send(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["error"], r.json()
    good_request_answered(url)


def test_requests_sent_together_share_model_calls(url):
    photos = [photo_bytes("jpeg", i) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(
                lambda d: post(url, d, "image/jpeg", headers={"Accept": "application/json"}), photos
            )
        )
    assert all(r.status_code == 200 for r in answers)
    assert max(r.json()["batch_size"] for r in answers) > 1


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    assert found, f"{name}{{{labels}}} not in /metrics"
    return float(found.group(1))


def test_metrics(url):
    before = httpx.get(f"{url}/metrics").text
    post(url, photo_bytes("png"))
    post(url, b"")
    text = httpx.get(f"{url}/metrics").text
    ok = 'code="200",route="/v1/segment"'
    bad = 'code="400",route="/v1/segment"'
    assert _metric(text, "segdeploy_requests_total", ok) >= 1 + (
        _metric(before, "segdeploy_requests_total", ok) if ok in before else 0
    )
    assert _metric(text, "segdeploy_request_errors_total", bad) >= 1
    assert _metric(text, "segdeploy_request_latency_seconds_count", 'route="/v1/segment"') >= 2
    calls = _metric(text, "segdeploy_batch_size_count")
    images = _metric(text, "segdeploy_batch_size_sum")
    assert 1 <= calls <= images
    assert _metric(text, "segdeploy_queue_length") == 0  # nothing in flight now


def test_page_and_schema(url):
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '"name": "tiny"' in page.text and "/v1/segment" in page.text
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/segment", "/v2/models/{name}/infer", "/metrics"} <= schema["paths"].keys()
    assert "multipart/form-data" in schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]


def test_the_serve_controller_runs_with_segdeploys_settings(url):
    """serve.start's controller_options reach the controller's process: it reconciles
    every 0.5 s, not Ray's 0.1 s (CONTROLLER_ENV says why)."""
    controllers = environments_of("ServeController")
    assert controllers, "no Serve controller process found"
    for env in controllers:
        assert env.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "0.5"


def test_one_replica_serves_http_and_the_model_in_one_deployment(url):
    """No front end hop with one replica: Serve's proxy reaches the model's process."""
    from ray import serve

    (app,) = serve.status().applications.values()
    assert set(app.deployments) == {"service"}


def test_the_callers_environment_wins_over_the_controllers_defaults(monkeypatch):
    name = next(iter(CONTROLLER_ENV))
    monkeypatch.delenv(name, raising=False)
    assert controller_env()[name] == CONTROLLER_ENV[name]
    monkeypatch.setenv(name, "0.25")
    assert controller_env()[name] == "0.25"
