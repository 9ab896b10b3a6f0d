"""Clips and streams in `segdeploy infer`: their frames as the pipeline's jobs, their
records routed to each clip's outputs.

A clip (a video file among the inputs) or a stream (`--stream URL`) is a source
of frames (segdeploy.runtime.video) feeding the same engine as photos
(segdeploy.runtime.pipeline): each frame taken is a `Job` carrying its decoded
pixels, so it is preprocessed, batched into the model, upsampled and written
by the same workers, and its record comes back in input order. Records of a
clip's frames do not go into the run's summary.json: `Clips.route` hands them,
in order, to the clip's `ClipOutputs` (segdeploy.runtime.video_out), which
writes the label stream, the overlay video and the clip's own summary.json.
The run's summary.json gets one record per clip.

With `--skip-existing` a clip whose summary.json says it is complete (same
model and options) is skipped; a clip a stopped run left half done resumes:
the frames whose labels verify are passed on without the model (their labels
read back), the rest are segmented.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

from segdeploy.errors import SegdeployError
from segdeploy.runtime.pipeline import Job, Keep, class_shares, prepare_image
from segdeploy.runtime.video import Frame, FrameChoice, FrameReader, import_av
from segdeploy.runtime.video_out import (
    LABEL_MODES,
    OVERLAY_CODECS,
    ClipOutputs,
    frame_name,
)


@dataclass(frozen=True)
class VideoSettings:
    """`segdeploy infer`'s options for clips and streams (the CLI's defaults come from here)."""

    every: int = 1
    start: float = 0.0
    end: float | None = None
    max_fps: float | None = None
    labels: str = "png"  # one of video_out.LABEL_MODES
    overlay_codec: str = "h264"  # a key of video_out.OVERLAY_CODECS
    streams: tuple[str, ...] = ()

    def choice(self) -> FrameChoice:
        return FrameChoice(self.every, self.start, self.end, self.max_fps)

    def check(self) -> None:
        self.choice()  # raises on a bad --every, --start, --end, --max-fps
        if self.labels not in LABEL_MODES:
            raise SegdeployError("--video-labels", f"expected one of {LABEL_MODES}")
        if self.overlay_codec not in OVERLAY_CODECS:
            raise SegdeployError("--overlay-codec", f"expected one of {sorted(OVERLAY_CODECS)}")


def run_header(seg, settings: VideoSettings, overlay: bool) -> dict[str, Any]:
    """What a clip's outputs were made with; --skip-existing resumes only a clip whose
    summary.json or journal has the same."""
    return {
        "model": str(seg.onnx_path),
        "variant": seg.variant,
        "choice": asdict(settings.choice()),
        "labels": settings.labels,
        "overlay": settings.overlay_codec if overlay else None,
    }


def stream_name(url: str) -> str:
    """The output folder of a stream: its URL without the scheme, as one safe name."""
    rest = url.split("://", 1)[-1]
    rest = rest.removeprefix("file:")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", rest).strip("._") or "stream"
    return name[:120]


@dataclass
class _Clip:
    """One clip in flight: its outputs and its reader (the decode thread)."""

    source: str
    out: ClipOutputs
    reader: FrameReader | None = None


class Clips:
    """The clips and streams of one run (see the module's docstring)."""

    def __init__(
        self,
        output: Path,
        seg,
        settings: VideoSettings,
        cfg,
        *,
        skip_existing: bool,
    ):
        """`cfg`: the run's pipeline.StageConfig (its palette set: overlays wanted)."""
        settings.check()  # PyAV for --stream: run_infer checks it before the model loads
        self.output, self.seg, self.settings = output, seg, settings
        self.out_real = Path(os.path.realpath(output))
        overlay = cfg.palette is not None
        self.overlay = OVERLAY_CODECS[settings.overlay_codec] if overlay else None
        self.palette = cfg.palette
        self.cfg = cfg
        self.skip_existing = skip_existing
        self.frames = 0  # frames segmented or resumed in this run, all clips
        self._open: dict[int, _Clip] = {}
        self._names: set[str] = set()
        self.header = run_header(seg, settings, overlay)

    # -- entries -------------------------------------------------------------------------
    def file_entries(self, path: Path, rel: PurePath) -> Iterator[Job | dict]:
        """A clip found among the inputs; its outputs go to OUT/<its folder>/<file name>/.
        Without PyAV the run stops here: SegdeployError with the install line (exit 2)."""
        import_av(path)
        yield from self._entries(str(path), rel.parent / path.name, stream=False)

    def stream_entries(self) -> Iterator[Job | dict]:
        for url in self.settings.streams:
            name, n = stream_name(url), 1
            while f"{name}-{n}" in self._names if n > 1 else name in self._names:
                n += 1
            self._names.add(name if n == 1 else f"{name}-{n}")
            yield from self._entries(url, PurePath(name if n == 1 else f"{name}-{n}"), stream=True)

    def _entries(self, source: str, rel: PurePath, *, stream: bool) -> Iterator[Job | dict]:
        folder = self.output / rel
        if not _inside(Path(os.path.realpath(folder)), self.out_real):
            yield {"input": source, "reason": f"{folder} leads outside the output folder"}
            return
        self._names.add(str(rel))
        out = ClipOutputs(
            folder, str(rel), source, mode=self.settings.labels, overlay=self.overlay,
            palette=self.palette, id2label=self.seg.id2label, header=self.header,
        )  # fmt: skip
        done: list[dict[str, Any]] = []
        if self.skip_existing:
            summary = out.complete()
            if summary is not None:
                yield {"input": source, "output": str(rel), "skipped": True,
                       "summary": f"{rel}/summary.json"}  # fmt: skip
                return
            done = out.resumable()
            done = done[: out.verified(done)]
        clip = _Clip(source, out)
        key = id(clip)
        self._open[key] = clip
        try:
            yield from self._frames(clip, done, stream)
        except SegdeployError as err:
            out.abort()
            self._open.pop(key, None)
            yield {"input": source, "reason": err.problem}
            return
        yield {"tag": (clip, None), "input": source}  # the clip's end, after all its frames

    def _frames(self, clip: _Clip, done: list[dict], stream: bool) -> Iterator[Job | dict]:
        out, keep = (
            clip.out,
            Keep(labels=self.settings.labels == "ffv1", overlay=bool(self.overlay)),
        )
        bare = 0 if self.overlay else len(done)  # resumed frames need pixels only to blend
        choice = self.settings.choice()
        clip.reader = FrameReader(
            clip.source, choice, stream=stream, live=stream, bare=bare, prepare=self._prepare
        )
        known = out.resumed_labels(done)
        try:
            for k, frame in enumerate(clip.reader):
                if out.info is None:
                    out.start(clip.reader.info[0])
                if k < len(done):
                    labels = next(known, None)
                    if labels is None or done[k]["index"] != frame.index:
                        raise SegdeployError(
                            clip.source,
                            f"cannot resume at frame {frame.index}: its outputs changed since "
                            "they were checked; run again without --skip-existing",
                        )
                    yield self._resumed(clip, frame, labels)
                    continue
                label = out.png_path(frame) if self.settings.labels == "png" else None
                prepared, frame.prepared = frame.prepared, None  # the record keeps no pixels
                yield Job(Path(clip.source), label, None, keep=keep, tag=(clip, frame),
                          prepared=prepared)  # fmt: skip
        finally:
            known.close()
            clip.reader.close()

    def _prepare(self, rgb):
        """Decode stage's second half for a frame, on its reader thread (`prepare_image`)."""
        return prepare_image(rgb, self.cfg)

    def _resumed(self, clip: _Clip, frame: Frame, labels) -> dict:
        """A frame a stopped run finished: its record, with its labels read back."""
        rec = {
            "tag": (clip, frame),
            "input": clip.source,
            "classes": class_shares(labels, self.seg.id2label),
            "labels": labels,
            "resumed": True,
        }
        if self.settings.labels == "png":
            rec["output"] = str(clip.out.png_path(frame).relative_to(self.output))
        return rec

    # -- records -------------------------------------------------------------------------
    def route(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """A record with a clip's tag, in order: a frame goes to its clip's outputs (None is
        returned); the clip's end writes its summary.json and returns the clip's record."""
        clip, frame = rec["tag"]
        out = clip.out
        if frame is None:
            if out.frames + len(out.dropped) < clip.reader.counts.taken:
                return None  # a stopped run: frames missing, left to close() for resuming
            self._open.pop(id(clip), None)
            if out.info is None and clip.reader.info:  # every frame was left out
                out.start(clip.reader.info[0])
            return out.finish(clip.reader.counts)
        if "reason" in rec:
            out.drop(frame, rec["reason"])
            return None
        output = frame_name(frame) if self.settings.labels == "png" else None
        out.add(
            frame,
            rec["classes"],
            rec.get("labels"),
            rec.get("overlay_pixels"),
            output,
            resumed=rec.get("resumed", False),
        )
        self.frames += 1
        return None

    def close(self) -> None:
        """After the run: clips still open (an interrupted run) keep what resumes them."""
        for clip in self._open.values():
            if clip.reader is not None:
                clip.reader.close()
            clip.out.abort()
        self._open.clear()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
