"""The hand-written peer of `segdeploy serve` in benchmarks/bench_serve.py: a FastAPI endpoint
calling transformers' image-segmentation pipeline, as a user writes it from the docs.

    SEGDEPLOY_BASELINE_MODEL=models/camvid-b0-512 \\
        .venv/bin/python -m uvicorn serve_baseline_app:app --app-dir benchmarks --port 8001

POST /segment with the image file as the body answers the label map as a PNG, like
`segdeploy serve`'s /v1/segment.
"""

from __future__ import annotations

import io
import os

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from transformers import pipeline

segmenter = pipeline("image-segmentation", model=os.environ["SEGDEPLOY_BASELINE_MODEL"])
class_id = {name: int(i) for i, name in segmenter.model.config.id2label.items()}
app = FastAPI()


def label_map(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    labels = np.zeros((image.height, image.width), np.uint8)
    for segment in segmenter(image, subtask="semantic"):
        labels[np.asarray(segment["mask"]) > 0] = class_id[segment["label"]]
    return labels


@app.post("/segment")
async def segment(request: Request) -> Response:
    labels = await run_in_threadpool(label_map, await request.body())
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@app.get("/health")
async def health() -> dict:
    return {"ok": True}
