"""`segdeploy serve`'s settings: one dataclass, the defaults of the CLI's options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import MAX_PIXELS
from segdeploy.runtime.ray_session import DEFAULT_CONNECT_TIMEOUT_S

#: The install line printed when the extra is missing.
INSTALL_HINT = "pip install 'segdeploy[serve]'"
#: Providers that run on a GPU: each replica then reserves one.
GPU_PROVIDERS = ("cuda", "tensorrt")


@dataclass(frozen=True)
class ServeSettings:
    """What `segdeploy serve` runs: the model, where it listens, how it batches and scales.

    `replicas`: N, or MIN-MAX for Ray Serve's autoscaling between them. `max_queue`:
    segmentation requests in the service at once (waiting or running); one more is
    answered 503 with Retry-After, so memory stays bounded under any load.
    `max_batch_size`: None is infer's default for the replicas' device
    (`segmenter.default_batch_size`: 4 on CPU, 16 on GPU).
    `batch_wait_ms`: how long a batch waits for more requests once one arrived; 0
    batches what queued up while the model was busy, at no cost in latency.
    `threads`: ONNX Runtime threads per replica (and the CPUs it reserves); default:
    the cores of this process's affinity shared among the replicas on a private Ray.
    """

    model_dir: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: str = "1"
    max_batch_size: int | None = None
    batch_wait_ms: float = 0.0
    provider: str = "auto"
    fallback: bool = False
    variant: str = "fp32"
    threads: int | None = None
    ray_address: str | None = None
    ray_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    max_pixels: int = MAX_PIXELS
    max_body_mb: float = 32.0
    max_queue: int = 64

    def batch_size_on(self, gpu: bool) -> int:
        """--max-batch-size, or infer's default on the replicas' device."""
        from segdeploy.runtime.segmenter import default_batch_size

        if self.max_batch_size is not None:
            return self.max_batch_size
        return default_batch_size("cuda" if gpu else "cpu")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def model_name(self, folder: Path) -> str:
        """The model's name in URLs: --name, else the model folder's name (a trained
        model's folder, not its onnx/ subfolder)."""
        if self.name:
            return self.name
        folder = folder.resolve()
        return folder.parent.name if folder.name == "onnx" else folder.name

    def replica_counts(self) -> tuple[int, int]:
        """(min, max) replicas; equal for a fixed count."""
        from segdeploy.runtime.ray_engine import parse_actors

        counts = parse_actors(self.replicas, "--replicas")
        return counts if isinstance(counts, tuple) else (counts, counts)

    def check(self) -> None:
        """Refuse impossible values with one line naming the option."""
        self.replica_counts()
        positive = {
            "--port": self.port,
            "--max-batch-size": 1 if self.max_batch_size is None else self.max_batch_size,
            "--max-pixels": self.max_pixels,
            "--max-body-mb": self.max_body_mb,
            "--max-queue": self.max_queue,
        }
        for option, value in positive.items():
            if value <= 0:
                raise SegdeployError(option, f"must be above 0, got {value}")
        if self.port > 65535:
            raise SegdeployError("--port", f"must be at most 65535, got {self.port}")
        if self.batch_wait_ms < 0:
            raise SegdeployError("--batch-wait-ms", f"must be 0 or more, got {self.batch_wait_ms}")
        if self.threads is not None and self.threads < 1:
            raise SegdeployError("--threads", f"must be at least 1, got {self.threads}")
        if self.name is not None and (
            not self.name or "/" in self.name or self.name in (".", "..")
        ):
            raise SegdeployError("--name", f"must be a plain name for URLs, got {self.name!r}")
