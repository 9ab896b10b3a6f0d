"""Locust users for tests/test_serve_load.py: each posts CamVid photos to /v1/segment, and
every 20th request is a deliberately truncated file that must be refused with 400.

    SERVE_PHOTOS=DIR locust -f tests/serve_locustfile.py --headless -u 8 -r 4 \\
        --run-time 30s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import HttpUser, constant, task

PHOTOS = [p.read_bytes() for p in sorted(Path(os.environ["SERVE_PHOTOS"]).glob("*.jpg"))]
_counter = itertools.count()


class Client(HttpUser):
    wait_time = constant(0)

    @task
    def segment(self) -> None:
        i = next(_counter)
        data = PHOTOS[i % len(PHOTOS)]
        bad = i % 20 == 19
        name = "/v1/segment (truncated, 400 expected)" if bad else "/v1/segment"
        with self.client.post(
            "/v1/segment",
            data=data[: len(data) // 3] if bad else data,
            headers={"Content-Type": "image/jpeg"},
            name=name,
            catch_response=True,
        ) as r:
            expected = 400 if bad else 200
            if r.status_code == expected and (bad or r.content.startswith(b"\x89PNG")):
                r.success()
            else:
                r.failure(f"status {r.status_code}, expected {expected}: {r.text[:200]}")
