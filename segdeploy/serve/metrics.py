"""The service's Prometheus metrics, kept by the replica that holds the API (it sees every request).

A registry of its own, not prometheus_client's process-wide default: two services
in one process (tests) must not share counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Latency buckets (seconds): a model call on a CPU takes 10 ms to 1 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServiceMetrics:
    """requests and errors by route and status, latency, model batch sizes, queue length."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "segdeploy_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "segdeploy_request_errors",
            "Requests answered with an error status (4xx, 5xx), by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "segdeploy_request_latency_seconds",
            "Time from a request's arrival at the service to its answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "segdeploy_batch_size",
            "Images per model call (dynamic batching), one observation per call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "segdeploy_queue_length",
            "Segmentation requests in the service now, waiting or running.",
            registry=self.registry,
        )
        self.refused = Counter(
            "segdeploy_overload_refusals",
            "Requests answered 503 because the queue was full (--max-queue) or the service "
            "was stopping.",
            registry=self.registry,
        )

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
