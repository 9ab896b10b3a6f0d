"""Video as a source of frames: a clip file or a stream, decoded with PyAV (FFmpeg).

`read_frames` opens a clip or stream, decodes its first video stream with
FFmpeg's own threads and yields the frames a run takes (`--every`, `--start`,
`--end`, `--max-fps`) as upright RGB arrays, with what was dropped and why
counted in a `FrameCounts`. `FrameReader` runs that on two threads of its own
(decode; conversion and model input) with a bounded queue, so the host work
overlaps the model and memory stays flat however long the clip.

The pixel conversion is named here once, `PIXEL_CONVERSION`: libswscale turns
each decoded frame into RGB24 with the matrix (BT.601, BT.709, BT.2020...) and
range (limited or full) the frame is tagged with; untagged YUV is BT.601
limited range, as FFmpeg reads it. An RGB-coded frame (FFV1 in bgr0, H.264 in
RGB) is copied, not converted: its pixels are the ones encoded. The display
matrix (a phone's rotation tag) is applied after conversion, in multiples of
90 degrees, as FFmpeg's own command line does; flips are not applied.

PyAV is an extra (`pip install 'segdeploy[video]'`); this module imports it
only when a clip is opened, so `segdeploy infer` on photos never needs it.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError, first_line
from segdeploy.runtime.pipeline import available_cores

INSTALL_HINT = "pip install 'segdeploy[video]'"
#: File name endings read as clips (lower case); anything FFmpeg opens goes through --stream.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".mov", ".avi", ".webm"})
#: What every decoded frame goes through before the model (see the module's docstring).
PIXEL_CONVERSION = (
    "libswscale YUV->RGB24 with the frame's tagged matrix and range (untagged: BT.601, "
    "limited); RGB frames copied as decoded; display rotation applied in 90-degree steps"
)
#: Seconds a stream may stay silent before it counts as stopped.
STREAM_TIMEOUT_S = 10.0
#: Seconds a live stream's frame may lag the wall clock, with the pipeline full, before it
#: is dropped (and recorded) rather than queued: latency stays bounded when the model is
#: slower than the camera. A source faster than real time (a file served over HTTP) is
#: never behind, so it loses nothing.
LIVE_LAG_S = 2.0


def is_video_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def import_av(where: str | Path):
    """The `av` module, or a SegdeployError naming `where` and the install line."""
    try:
        import av
    except ImportError:
        raise SegdeployError(where, f"reading video needs PyAV: {INSTALL_HINT}") from None
    return av


@dataclass(frozen=True)
class FrameChoice:
    """Which frames of a clip a run takes: `--every`, `--start`, `--end`, `--max-fps`."""

    every: int = 1
    start: float = 0.0
    end: float | None = None
    max_fps: float | None = None

    def __post_init__(self):
        if self.every < 1:
            raise SegdeployError("--every", f"must be at least 1, got {self.every}")
        if self.start < 0:
            raise SegdeployError("--start", f"must be 0 or more seconds, got {self.start}")
        if self.end is not None and self.end <= self.start:
            raise SegdeployError("--end", f"must be after --start ({self.start} s), got {self.end}")
        if self.max_fps is not None and not self.max_fps > 0:
            raise SegdeployError("--max-fps", f"must be more than 0, got {self.max_fps}")


@dataclass
class Frame:
    """One decoded frame a run takes. `rgb` is None when the caller asked for no pixels."""

    index: int  # its number in the clip, from 0 at the clip's first frame
    time: float  # seconds from the clip's first frame
    rgb: np.ndarray | None  # H x W x 3 uint8, upright
    prepared: Any = None  # the model input, when FrameReader was given `prepare`
    #: (PyAV frame, rotation, the clip's VideoReformatter) not yet converted:
    #: `read_frames(convert=False)`; `convert` it.
    decoded: Any = field(default=None, repr=False)

    def convert(self) -> Frame:
        """Fill `rgb` from `decoded` (PIXEL_CONVERSION, then the rotation)."""
        if self.decoded is not None:
            self.rgb = upright_rgb(*self.decoded)
            self.decoded = None
        return self


@dataclass
class FrameCounts:
    """What decoding a clip met; goes into the clip's summary.json."""

    decoded: int = 0  # frames FFmpeg returned
    taken: int = 0  # frames handed on to be segmented
    skipped: int = 0  # left out by --every, --start, --end or --max-fps
    dropped: list[dict[str, Any]] = field(default_factory=list)  # undecodable, corrupt
    ended: str | None = None  # why reading stopped before the end of the input, if it did

    def drop(self, time_s: float | None, reason: str) -> None:
        self.dropped.append(
            {"time": None if time_s is None else round(time_s, 4), "reason": reason}
        )


@dataclass(frozen=True)
class ClipInfo:
    """The video stream's description, read when the clip is opened."""

    codec: str
    width: int  # as displayed: after the rotation
    height: int
    pixel_format: str
    rotation: int  # degrees counterclockwise, a multiple of 90
    fps: float | None  # the stream's average rate, None when FFmpeg cannot tell
    duration: float | None  # seconds, from the container, None for a live stream
    frames: int | None  # as the container declares it (0 or None: unknown)

    def as_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "width": self.width,
            "height": self.height,
            "pixel_format": self.pixel_format,
            "rotation": self.rotation,
            "fps": None if self.fps is None else round(self.fps, 4),
            "duration": None if self.duration is None else round(self.duration, 4),
            "declared_frames": self.frames or None,
            "pixel_conversion": PIXEL_CONVERSION,
        }


def _rotation(frame) -> int:
    """The display matrix's rotation, snapped to a multiple of 90 (0 when untagged)."""
    try:
        angle = frame.rotation
    except (AttributeError, ValueError, TypeError):
        return 0
    if angle is None or not math.isfinite(angle):
        return 0
    return int(round(angle / 90.0)) * 90 % 360


def upright_rgb(frame, rotation: int, reformatter) -> np.ndarray:
    """The frame as H x W x 3 uint8 RGB (PIXEL_CONVERSION), turned upright.

    `reformatter`: a PyAV VideoReformatter kept for all the frames of a clip (`read_frames`
    makes one), so that its libswscale context is made once, not per frame. The same call
    as `frame.to_ndarray(format="rgb24")` (same matrix, range and interpolation: the
    pixels are equal), on one swscale thread: by default swscale starts a thread per core
    for each new context, so every frame of a clip started and stopped threads beside the
    conversion thread (3-8 context switches a frame); measured on CamVid's 480x360 H.264
    frames, 0.11 ms a frame against 0.19-0.22, and no context switch (2-core AVX2 EPYC)."""
    rgb = reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
    if rotation:
        # FFmpeg's angle is counterclockwise, as np.rot90's k is.
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb


def ffmpeg_reason(err) -> str:
    """FFmpeg's own words for a PyAV error ("Invalid data found when processing input"),
    without the errno and file name its str() adds: the caller names the file."""
    return getattr(err, "strerror", None) or first_line(err)


def open_input(av, source: str, *, stream: bool):
    """(container, video stream) of a clip file or a stream URL; SegdeployError when it has
    no video or cannot be opened. Streams get a read timeout, so one that stops ends."""
    options = {}
    timeout = None
    if stream:
        timeout = (STREAM_TIMEOUT_S, STREAM_TIMEOUT_S)
        if source.startswith("file:"):  # a file being written: read on as it grows
            options = {"follow": "1", "rw_timeout": str(int(STREAM_TIMEOUT_S * 1e6))}
    try:
        container = av.open(source, "r", options=options, timeout=timeout)
    except av.error.FFmpegError as err:
        raise SegdeployError(source, f"cannot open as video: {ffmpeg_reason(err)}") from None
    except OSError as err:
        raise SegdeployError(source, f"cannot read: {err.strerror or err}") from None
    try:
        videos = container.streams.video
        if not videos:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise SegdeployError(source, f"no video stream (it holds {', '.join(kinds)})")
        video = videos[0]
        # FFmpeg's frame and slice threads, half the cores: the rest run the model and the
        # workers. On 2 cores that is 1 thread: measured 61-69 frames/s of the tiny model
        # against 37-41 with FFmpeg's default (one per core), which crowded out the workers.
        video.thread_type = "AUTO"
        video.codec_context.thread_count = max(1, available_cores() // 2)
    except BaseException:
        container.close()
        raise
    return container, video


def clip_info(container, video, first_frame, rotation: int) -> ClipInfo:
    ctx = video.codec_context
    rate = video.average_rate or video.guessed_rate
    duration = None
    if video.duration is not None and video.time_base is not None:
        duration = float(video.duration * video.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    w, h = first_frame.width, first_frame.height
    if rotation in (90, 270):
        w, h = h, w
    return ClipInfo(
        codec=ctx.name,
        width=int(w),
        height=int(h),
        pixel_format=first_frame.format.name,
        rotation=rotation,
        fps=float(rate) if rate else None,
        duration=duration,
        frames=int(video.frames or 0),
    )


def _seek(container, video, start: float) -> None:
    """Seek to the keyframe at or before `start` s (decoding from there finds the frame)."""
    if start <= 0 or video.time_base is None:
        return
    offset = int(start / video.time_base) + (video.start_time or 0)
    with contextlib.suppress(Exception):  # not seekable (a pipe): decode from the start
        container.seek(offset, stream=video, backward=True, any_frame=False)


def _decoded(av, container, video, counts: FrameCounts) -> Iterator[Any]:
    """Every frame FFmpeg can decode; a packet that fails is a dropped frame, a container
    that breaks off (truncated file, stream stopped) ends the clip with `counts.ended`."""
    tb = video.time_base
    packets = container.demux(video)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as err:  # demuxing broke: truncated, stream stopped
            counts.ended = f"reading stopped: {ffmpeg_reason(err)}"
            break
        try:
            frames = packet.decode()
        except av.error.FFmpegError as err:
            t = float(packet.pts * tb) if packet.pts is not None and tb else None
            counts.drop(t, f"undecodable: {ffmpeg_reason(err)}")
            continue
        yield from frames


def read_frames(
    source: str,
    choice: FrameChoice,
    *,
    stream: bool = False,
    bare: int = 0,
    info: list | None = None,
    counts: FrameCounts | None = None,
    convert: bool = True,
) -> Iterator[Frame]:
    """The frames of `source` that `choice` takes, in order; the first `bare` of them come
    without pixels (a resumed run passing on frames it has: no conversion). The first
    frame's ClipInfo is appended to `info`. A clip with no frame at all raises
    SegdeployError. `convert=False`: frames come with `decoded` set instead of `rgb`, for
    the caller to `convert` elsewhere (FrameReader's second thread)."""
    av = import_av(source)
    counts = counts if counts is not None else FrameCounts()
    container, video = open_input(av, source, stream=stream)
    with container:
        if not stream:
            _seek(container, video, choice.start)
        tb = video.time_base or Fraction(1, 1000)
        rate = video.average_rate or video.guessed_rate
        origin = None  # the clip's first timestamp (stream start time, else the first frame)
        if not stream and video.start_time is not None:
            origin = video.start_time
        counted = -1  # index by counting, once the first frame's index is known
        last_taken: float | None = None
        rotation = 0
        lost = 0  # dropped frames already counted into the index
        reformatter = av.video.reformatter.VideoReformatter()  # the clip's (upright_rgb)
        for frame in _decoded(av, container, video, counts):
            counts.decoded += 1
            # A packet that did not decode was a frame: the frames after it keep their numbers.
            missing, lost = len(counts.dropped) - lost, len(counts.dropped)
            if frame.pts is None:
                counts.drop(None, "no timestamp")
                continue
            if origin is None:
                origin = frame.pts
            t = float((frame.pts - origin) * tb)
            if counted < 0:
                rotation = _rotation(frame)
                if info is not None:
                    info.append(clip_info(container, video, frame, rotation))
                # After a seek the count starts from the timestamp (exact at a constant rate).
                counted = int(round(t * float(rate))) if rate and t > 0 else 0
            else:
                counted += 1 + missing
            if getattr(frame, "is_corrupt", False):
                counts.drop(t, "corrupt frame (FFmpeg flagged it)")
                continue
            if t < choice.start - 1e-6:
                counts.skipped += 1
                continue
            if choice.end is not None and t >= choice.end - 1e-6:
                counts.skipped += 1
                break
            if not _wanted(counted, t, choice, last_taken):
                counts.skipped += 1
                continue
            last_taken = t
            counts.taken += 1
            if counts.taken <= bare:
                yield Frame(counted, t, None)
            elif convert:
                yield Frame(counted, t, upright_rgb(frame, rotation, reformatter))
            else:
                yield Frame(counted, t, None, decoded=(frame, rotation, reformatter))
        if counts.decoded == 0:
            reason = counts.ended or "no frame could be decoded"
            raise SegdeployError(source, f"no video frames ({reason})")


def _wanted(index: int, t: float, choice: FrameChoice, last: float | None) -> bool:
    if choice.every > 1 and index % choice.every:
        return False
    # --max-fps: at least 1/max_fps s after the last frame taken (half a frame of slack for
    # timestamps rounded by the container).
    return not (choice.max_fps and last is not None and t - last < 0.999 / choice.max_fps)


# -- the decoding thread -----------------------------------------------------------------

_END = object()


class FrameReader:
    """`read_frames` on threads of its own, through a bounded queue, so that a clip's host
    work overlaps the model: one thread demuxes and decodes (FFmpeg, without the GIL), a
    second converts each frame to RGB (libswscale, without the GIL) and, with `prepare`,
    makes its model input (Pillow's resize and numpy release the GIL). Two threads, not
    one: on one thread, decode then conversion then model input ran the tiny model's
    clip at 228 frames/s against 407 with the two overlapped (CamVid's 480x360 frames,
    2-core AVX2 EPYC), and that thread was what the model waited for (1.9 s of a 2.9 s
    run). Frames need no round trip through worker processes: measured on the tiny
    model, shipping each decoded frame to a worker made a clip 2-4x slower than the
    same frames as JPEGs.

    Iterating yields the frames in order; an exception in either thread (SegdeployError
    for a clip that cannot be read) is raised in the caller at the point it happened.
    `close()` stops the threads early (Ctrl-C), which then close the file.
    """

    def __init__(
        self,
        source: str,
        choice: FrameChoice,
        *,
        depth: int = 16,
        live: bool = False,
        lag: float = LIVE_LAG_S,
        prepare=None,
        **kwargs,
    ):
        self.live, self.lag = live, lag
        self._prepare = prepare  # rgb -> model input, run on the conversion thread too
        self._origin: float | None = None  # wall clock at the live stream's time 0
        self.info: list[ClipInfo] = []
        self.counts = FrameCounts()
        # Holds a Future per frame, in order: at most `depth` frames decoded ahead.
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._convert = ThreadPoolExecutor(1, thread_name_prefix="segdeploy-video-convert")
        args = (source, choice)
        kwargs = {**kwargs, "info": self.info, "counts": self.counts, "convert": False}
        self._thread = threading.Thread(
            target=self._run, args=(args, kwargs), name="segdeploy-video-decode", daemon=True
        )
        self._thread.start()

    def _run(self, args, kwargs) -> None:
        try:
            for frame in read_frames(*args, **kwargs):
                if self._late(frame):
                    self.counts.taken -= 1
                    self.counts.drop(frame.time, f"dropped: over {self.lag:g} s behind the stream")
                    continue
                if not self._put(self._convert.submit(self._finish, frame)):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the caller, raised there
            self._put(err)

    def _finish(self, frame: Frame) -> Frame:
        """The conversion thread's part of a frame: RGB, then the model input."""
        frame.convert()
        if self._prepare is not None and frame.rgb is not None:
            frame.prepared = self._prepare(frame.rgb)
        return frame

    def _late(self, frame: Frame) -> bool:
        """A live stream's frame that the full pipeline could only take too late."""
        if not self.live:
            return False
        now = time.monotonic()
        if self._origin is None:
            self._origin = now - frame.time
        return self._queue.full() and now - self._origin - frame.time > self.lag

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.result()  # the frame, converted; or its conversion's exception

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._convert.shutdown(wait=True, cancel_futures=True)
