"""A clip's outputs: lossless label stream, overlay video, per-frame journal, summary.json.

One `ClipOutputs` per clip, in OUT/<clip name>/ (the clip's file name, extension
included, so that it never meets the outputs of a photo or folder beside it):

- labels, by `--video-labels`: `frames/<index>_<seconds>s.png` (one label PNG per
  frame, written by the pipeline's workers like a photo's) or `labels.mkv`, one
  FFV1 stream (gray, or gray16le above 256 classes; FFV1 is lossless, so every
  frame decodes to the exact class ids, and the stream keeps the clip's
  timestamps). Class ids never go through a lossy codec.
- `overlay.mp4` with `--overlay`: the frames blended with the class colours,
  H.264 (or the codec `--overlay-codec` names), at the frames' own timestamps.
- `summary.json`: the clip, the frames taken, skipped and dropped (and why), the
  per-class share of every frame over time and over the clip; `classes.png`
  plots the shares over time (segdeploy.runtime.share_plot; if it cannot be
  written, summary.json says why).

While the clip runs, each finished frame is appended (and flushed) to a hidden
journal, `.frames.partial.jsonl`, and the label stream and overlay are written
under hidden partial names; at the clip's end they are moved into place and the
journal is streamed into summary.json, so memory does not grow with the clip.
A run that is stopped leaves the journal and the partial label stream for
`--skip-existing`, which trusts only frames that are in the journal and
whose labels verify (the PNG exists, or the partial stream decodes to the
journal's checksum), and resumes from the first frame that does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import atomic_path, write_json
from segdeploy.errors import SegdeployError
from segdeploy.runtime.overlay import render_overlay
from segdeploy.runtime.share_plot import draw_shares, share_series
from segdeploy.runtime.video import ClipInfo, Frame, FrameCounts, import_av

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
PLOT = "classes.png"
FRAMES_DIR = "frames"
LABEL_STREAM = "labels.mkv"
JOURNAL = ".frames.partial.jsonl"
LABEL_PARTIAL = ".labels.partial.mkv"
LABEL_RESUMED = ".labels.resumed.mkv"
#: Matroska muxer options of the partial label stream (see ClipOutputs._encoders).
FLUSHED_MKV = {"cluster_time_limit": "1", "flush_packets": "1"}
#: Milliseconds: the time base of every stream written (Matroska's own).
TIME_BASE = Fraction(1, 1000)


@dataclass(frozen=True)
class OverlayCodec:
    codec: str
    pixel_format: str
    suffix: str
    options: tuple[tuple[str, str], ...] = ()
    even: bool = True  # 4:2:0 needs even sides: odd frames are padded by their last row/column


#: `--overlay-codec` name -> encoder (a registry: add a row, not an if).
OVERLAY_CODECS = {
    "h264": OverlayCodec("libx264", "yuv420p", ".mp4", (("preset", "veryfast"), ("crf", "23"))),
    "vp9": OverlayCodec("libvpx-vp9", "yuv420p", ".webm", (("deadline", "realtime"),)),
    "ffv1": OverlayCodec("ffv1", "bgr0", ".mkv", even=False),  # lossless, large
}
#: `--video-labels` choices.
LABEL_MODES = ("png", "ffv1")


def frame_name(frame: Frame) -> str:
    """A frame's label PNG name: its index and timestamp, sorted in time order."""
    return f"{frame.index:06d}_{frame.time:.3f}s.png"


def labels_crc(labels: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(labels).tobytes())


class _Encoder:
    """One video stream written with PyAV at millisecond timestamps (monotonic)."""

    def __init__(
        self, path: Path, codec: str, pixel_format: str, size, fps, options=(), muxer=None
    ):
        av = import_av(path)
        self.path = path
        self._av = av
        self._container = av.open(str(path), "w", options=dict(muxer or {}))
        try:
            rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(25)
            stream = self._container.add_stream(codec, rate=rate)
            stream.width, stream.height = size[1], size[0]
            stream.pix_fmt = pixel_format
            stream.time_base = TIME_BASE
            stream.codec_context.time_base = TIME_BASE
            if options:
                stream.options = dict(options)
            self._stream = stream
        except BaseException:
            self._container.close()
            raise
        self._last_pts = -1

    def write(self, array: np.ndarray, time_s: float, fmt: str) -> None:
        frame = self._av.VideoFrame.from_ndarray(array, format=fmt)
        pts = max(int(round(time_s * 1000)), self._last_pts + 1)
        frame.pts, frame.time_base = pts, TIME_BASE
        self._last_pts = pts
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


def read_label_stream(path: Path) -> Iterator[np.ndarray]:
    """The label maps of a label stream, in order, until its end or its first broken frame
    (a stream cut off by a killed run)."""
    av = import_av(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError):
        return
    with container:
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray()
        except (av.error.FFmpegError, OSError):
            return


class ClipOutputs:
    """Everything written for one clip; fed in frame order from the pipeline's records."""

    def __init__(
        self,
        folder: Path,
        rel: str,
        source: str,
        *,
        mode: str,
        overlay: OverlayCodec | None,
        palette: np.ndarray | None,
        id2label: dict[int, str],
        header: dict[str, Any],
    ):
        if mode not in LABEL_MODES:
            raise SegdeployError("--video-labels", f"expected one of {LABEL_MODES}, got {mode}")
        self.folder, self.rel, self.source = folder, rel, source
        self.mode, self.overlay_codec, self.palette = mode, overlay, palette
        self.id2label = id2label
        self.header = header  # what the run was (model, options): resume checks it
        self.info: ClipInfo | None = None
        self.frames = 0
        self.resumed = 0  # frames whose labels a stopped run had written (no model run)
        self.dropped: list[dict[str, Any]] = []
        self._shares = np.zeros(len(id2label), np.float64)
        self._journal = None
        self._labels: _Encoder | None = None
        self._overlay: _Encoder | None = None
        self._size: tuple[int, int] | None = None

    # -- paths -----------------------------------------------------------------------
    @property
    def summary_path(self) -> Path:
        return self.folder / SUMMARY

    @property
    def overlay_path(self) -> Path | None:
        return (
            None
            if self.overlay_codec is None
            else self.folder / f"overlay{self.overlay_codec.suffix}"
        )

    def png_path(self, frame: Frame) -> Path:
        return self.folder / FRAMES_DIR / frame_name(frame)

    # -- resume ----------------------------------------------------------------------
    def complete(self) -> dict[str, Any] | None:
        """summary.json of a finished run of this clip with the same model and options."""
        try:
            with self.summary_path.open(encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return None
        run = summary.get("run") if isinstance(summary, dict) else None
        return summary if run == self.header and summary.get("complete") else None

    def resumable(self) -> list[dict[str, Any]]:
        """Journal lines of frames a stopped run of the same model and options finished
        (leading, verified); [] when there is nothing to resume."""
        lines = []
        try:
            with (self.folder / JOURNAL).open(encoding="utf-8") as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except ValueError:
                        break  # the line a killed run was writing
        except OSError:
            return []
        if not lines or lines[0].get("run") != self.header:
            return []
        frames = [x for x in lines[1:] if "index" in x]
        if self.mode == "png":
            ok = 0
            for x in frames:
                if not (self.folder / FRAMES_DIR / x["output"]).is_file():
                    break
                ok += 1
            return frames[:ok]
        return frames  # checked against the stream as it is read back (resumed_labels)

    def verified(self, done: list[dict[str, Any]]) -> int:
        """How many leading frames of `done` the partial label stream holds intact
        (PNG frames were checked by `resumable`)."""
        if self.mode == "png":
            return len(done)
        n = 0
        for x, labels in zip(done, read_label_stream(self.folder / LABEL_PARTIAL), strict=False):
            if labels_crc(labels) != x.get("crc"):
                break
            n += 1
        return n

    def resumed_labels(self, done: list[dict[str, Any]]) -> Iterator[np.ndarray]:
        """The label maps of the frames `done` (resumable's lines), read back from the PNGs
        or the stopped run's partial stream; stops at the first that does not verify."""
        if self.mode == "png":
            from PIL import Image

            for x in done:
                with Image.open(self.folder / FRAMES_DIR / x["output"]) as im:
                    yield np.asarray(im)
            return
        old = self.folder / LABEL_RESUMED
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.folder / LABEL_PARTIAL, old)
        try:
            for x, labels in zip(done, read_label_stream(old), strict=False):
                if labels_crc(labels) != x.get("crc"):
                    return
                yield labels
        finally:
            old.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------
    def start(self, info: ClipInfo) -> None:
        """Open the journal (a new one: what a resume keeps is written into it again)."""
        self.info = info
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.mode == "png":
            (self.folder / FRAMES_DIR).mkdir(exist_ok=True)
        self._journal = (self.folder / JOURNAL).open("w", encoding="utf-8")
        self._write_journal({"run": self.header})

    def _write_journal(self, obj: dict[str, Any]) -> None:
        self._journal.write(json.dumps(obj) + "\n")
        self._journal.flush()  # a killed run keeps every line before its last

    def _encoders(self, size: tuple[int, int], wide: bool) -> None:
        """Open the streams at the first frame's size (`wide`: ids past 8 bits)."""
        h, w = self._size = size
        fps = self.info.fps if self.info else None
        if self.mode == "ffv1":
            fmt = "gray16le" if wide else "gray"
            # One Matroska cluster per frame, flushed: a killed run's partial stream holds
            # every frame but the last few (measured: 39 of 40), for --skip-existing.
            self._labels = _Encoder(
                self.folder / LABEL_PARTIAL, "ffv1", fmt, (h, w), fps, muxer=FLUSHED_MKV
            )
        codec = self.overlay_codec
        if codec is not None:
            even = (h + h % 2, w + w % 2) if codec.even else (h, w)
            partial = self.folder / f".overlay.partial{codec.suffix}"
            self._overlay = _Encoder(
                partial, codec.codec, codec.pixel_format, even, fps, codec.options
            )

    def add(
        self,
        frame: Frame,
        classes: list[dict[str, Any]],
        labels: np.ndarray | None,
        overlay_rgb: np.ndarray | None,
        output: str | None,
        *,
        resumed: bool = False,
    ) -> None:
        """One segmented frame, in order: journal, label stream, overlay."""
        if self._size is None and (labels is not None or overlay_rgb is not None):
            shape = labels.shape if labels is not None else overlay_rgb.shape
            self._encoders(shape[:2], labels is not None and labels.dtype != np.uint8)
        line: dict[str, Any] = {"index": frame.index, "time": round(frame.time, 4)}
        if output is not None:
            line["output"] = output
        line["shares"] = {str(c["id"]): c["share"] for c in classes}
        if self._labels is not None:
            fmt = "gray" if labels.dtype == np.uint8 else "gray16le"
            self._labels.write(np.ascontiguousarray(labels), frame.time, fmt)
            line["crc"] = labels_crc(labels)
        if self._overlay is not None:
            if overlay_rgb is None:  # a resumed frame: blended here, as a worker would
                overlay_rgb = np.asarray(
                    render_overlay(frame.rgb, labels, self.palette, self.id2label)
                )
            self._overlay.write(_pad_even(overlay_rgb, self._overlay_even()), frame.time, "rgb24")
        for c in classes:
            self._shares[c["id"]] += c["share"]
        self.frames += 1
        self.resumed += resumed
        self._write_journal(line)

    def _overlay_even(self) -> bool:
        return self.overlay_codec is not None and self.overlay_codec.even

    def drop(self, frame: Frame, reason: str) -> None:
        self.dropped.append({"index": frame.index, "time": round(frame.time, 4), "reason": reason})

    def finish(self, counts: FrameCounts) -> dict[str, Any]:
        """Close the streams and move them into place, draw the plot, write summary.json.
        The clip's record for the run's summary.json."""
        self._close_encoders()
        outputs: dict[str, Any] = {}
        if self.mode == "ffv1" and self._labels is not None:
            os.replace(self._labels.path, self.folder / LABEL_STREAM)
            outputs["labels"] = LABEL_STREAM
        elif self.mode == "png":
            outputs["labels"] = FRAMES_DIR + "/"
        if self._overlay is not None:
            os.replace(self._overlay.path, self.overlay_path)
            outputs["overlay"] = self.overlay_path.name
        if self._journal is not None:
            self._journal.close()
        dropped = counts.dropped + self.dropped
        summary = {
            "input": self.source,
            "run": self.header,
            "complete": True,
            "clip": self.info.as_dict() if self.info else None,
            "frames": self.frames,
            "resumed": self.resumed,
            "decoded": counts.decoded,
            "skipped": counts.skipped,
            "dropped": len(dropped),
            "ended": counts.ended,
            "outputs": outputs,
            "classes": self.mean_shares(),
        }
        series = None
        if self.frames:
            series = share_series(self.folder / JOURNAL, self.id2label, self.rel)
        if series is not None:
            error = draw_shares(series, self.folder / PLOT)
            if error is None:
                outputs["plot"] = PLOT
            else:
                log.error("%s: %s", self.folder / PLOT, error)
                summary["plot_error"] = error
        self._write_summary(summary, dropped)
        (self.folder / JOURNAL).unlink(missing_ok=True)
        record = {
            "input": self.source,
            "output": self.rel,
            "video": {
                k: summary[k]
                for k in ("frames", "resumed", "decoded", "skipped", "dropped", "ended")
            },
            "summary": f"{self.rel}/{SUMMARY}",
        }
        if self.frames == 0:
            record["reason"] = self._empty_reason(counts)
        return record

    def _empty_reason(self, counts: FrameCounts) -> str:
        """Why a clip gave no frame: how reading ended, or a --start/--end that left out
        every frame decoded (past the clip's end, say), with the clip's length."""
        reason = "no frame was segmented"
        if counts.ended:
            return f"{reason} ({counts.ended})"
        start, end = self.header["choice"]["start"], self.header["choice"]["end"]
        if counts.decoded and counts.skipped >= counts.decoded and (start or end is not None):
            asked = f"--start {start:g} s" + ("" if end is None else f" to --end {end:g} s")
            duration = self.info.duration if self.info is not None else None
            lasts = "" if duration is None else f": the clip lasts {duration:g} s"
            return f"{reason}: none from {asked}{lasts}"
        return reason

    def mean_shares(self) -> list[dict[str, Any]]:
        n = max(self.frames, 1)
        present = [(i, s / n) for i, s in enumerate(self._shares) if s > 0]
        present.sort(key=lambda t: -t[1])
        return [
            {"id": i, "name": self.id2label.get(i, str(i)), "share": round(s, 6)}
            for i, s in present
        ]

    def _write_summary(self, summary: dict[str, Any], dropped: list[dict[str, Any]]) -> None:
        """summary.json with the journal's frames streamed in, not held in memory."""
        with atomic_path(self.summary_path) as tmp, tmp.open("w", encoding="utf-8") as out:
            out.write("{\n")
            for key, value in summary.items():
                out.write(f"  {json.dumps(key)}: {json.dumps(value)},\n")
            out.write(f'  "dropped_frames": {json.dumps(dropped)},\n')
            out.write('  "timeline": [')
            first = True
            with (self.folder / JOURNAL).open(encoding="utf-8") as f:
                next(f, None)  # the run header
                for line in f:
                    out.write(("\n    " if first else ",\n    ") + line.rstrip("\n"))
                    first = False
            out.write("\n  ]\n}\n" if not first else "]\n}\n")

    def _close_encoders(self) -> None:
        for enc in (self._labels, self._overlay):
            if enc is not None:
                enc.close()

    def abort(self) -> None:
        """A stopped run: the journal and the partial label stream stay for --skip-existing;
        the partial overlay goes (a resume makes it again from the labels)."""
        for enc in (self._labels, self._overlay):
            if enc is not None:
                enc.abandon()
        if self._overlay is not None:
            self._overlay.path.unlink(missing_ok=True)
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()


def _pad_even(rgb: np.ndarray, even: bool) -> np.ndarray:
    """4:2:0 encoders need even sides: an odd frame gets its last row/column repeated."""
    h, w = rgb.shape[:2]
    if not even or (h % 2 == 0 and w % 2 == 0):
        return np.ascontiguousarray(rgb)
    return np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_failure_summary(folder: Path, source: str, header: dict, reason: str) -> None:
    """summary.json of a clip that could not be read at all (named error)."""
    write_json(
        folder / SUMMARY, {"input": source, "run": header, "complete": False, "error": reason}
    )


__all__ = ["ClipOutputs", "OVERLAY_CODECS", "LABEL_MODES", "write_failure_summary"]
