"""Issue 26: `segdeploy infer` on video clips and streams, with clips these tests make.

Every label map of a frame is compared with `segdeploy infer` on that frame written
as a PNG (the pixels a plain PyAV decode gives), so "faithful" means equal, not close.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from video_clips import av, decoded_frames, label_stream, scenes, write_clip

from segdeploy.cli import main
from segdeploy.runtime.video import PIXEL_CONVERSION, FrameChoice, read_frames


def _infer(model: Path, *args: str):
    return CliRunner().invoke(
        main, ["infer", "--model", str(model), "--provider", "cpu", "--threads", "1", *args]
    )


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _pngs(folder: Path) -> list[Path]:
    return sorted((folder / "frames").glob("*.png"))


def _as_png_labels(model: Path, frames: list[np.ndarray], tmp: Path) -> list[np.ndarray]:
    """`segdeploy infer` on each frame written as a PNG: the reference."""
    src, out = tmp / "png-frames", tmp / "png-out"
    src.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(src / f"{i:04d}.png")
    assert _infer(model, str(src), "-o", str(out), "--workers", "0").exit_code == 0
    return [np.asarray(Image.open(out / "png-frames" / f"{i:04d}.png")) for i in range(len(frames))]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """20 frames of 72x96 at 10 fps, H.264 4:2:0 (lossy: the test compares with what PyAV
    decodes, not with what was encoded)."""
    root = tmp_path_factory.mktemp("clip")
    return write_clip(root / "drive.mp4", scenes(20, (72, 96)))


# -- faithful frames ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "2"])
def test_each_frames_labels_equal_infer_on_that_frame_as_png(
    tiny_onnx_dir, clip, tmp_path, workers
):
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out), "--workers", workers)
    assert result.exit_code == 0, result.output
    folder = out / "drive.mp4"
    expected = _as_png_labels(tiny_onnx_dir, decoded_frames(clip), tmp_path)
    pngs = _pngs(folder)
    assert [p.name for p in pngs][:2] == ["000000_0.000s.png", "000001_0.100s.png"]
    assert len(pngs) == 20
    for png, ref in zip(pngs, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(png)), ref), png.name
    summary = _summary(folder / "summary.json")
    assert summary["frames"] == summary["decoded"] == 20 and summary["dropped"] == 0
    assert summary["clip"]["fps"] == 10.0 and summary["clip"]["duration"] == pytest.approx(2.0)
    assert summary["clip"]["pixel_conversion"] == PIXEL_CONVERSION
    assert [t["index"] for t in summary["timeline"]] == list(range(20))
    assert len({c["id"] for c in summary["classes"]}) >= 2  # not one flat class
    assert (folder / "classes.png").is_file()
    run = _summary(out / "summary.json")
    assert run["images"][0]["video"]["frames"] == 20 and run["totals"]["frames"] == 20


def test_ffv1_label_stream_equals_the_png_frames_on_every_pixel(tiny_onnx_dir, clip, tmp_path):
    png, mkv = tmp_path / "png", tmp_path / "mkv"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(png)).exit_code == 0
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(mkv), "--video-labels", "ffv1")
    assert result.exit_code == 0, result.output
    stream = label_stream(mkv / "drive.mp4" / "labels.mkv")
    pngs = [np.asarray(Image.open(p)) for p in _pngs(png / "drive.mp4")]
    assert len(stream) == len(pngs) == 20
    assert all(np.array_equal(a, b) for a, b in zip(stream, pngs, strict=True))
    assert not (mkv / "drive.mp4" / "frames").exists()
    # the stream keeps the clip's timestamps
    with av.open(str(mkv / "drive.mp4" / "labels.mkv")) as c:
        assert [round(f.time, 3) for f in c.decode(video=0)][:3] == [0.0, 0.1, 0.2]


def test_overlay_video_has_every_frame_at_its_time(tiny_onnx_dir, clip, tmp_path):
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(out), "--overlay").exit_code == 0
    with av.open(str(out / "drive.mp4" / "overlay.mp4")) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        frames = list(c.decode(s))
    assert len(frames) == 20 and (frames[0].height, frames[0].width) == (72, 96)
    assert [round(f.time, 3) for f in frames][-1] == 1.9
    assert not list((out / "drive.mp4").glob(".*"))  # no partial or journal left


def test_rotation_tag_turns_the_frames_upright(tiny_onnx_dir, tmp_path):
    """A phone clip: stored 64x96 landscape with a 90-degree (counterclockwise, FFmpeg's
    convention) display rotation; its labels are 96x64, those of the upright frame."""
    clip = write_clip(tmp_path / "phone.mov", scenes(4, (64, 96)), rotation=90)
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(out)).exit_code == 0
    upright = [np.rot90(f) for f in decoded_frames(clip)]
    expected = _as_png_labels(tiny_onnx_dir, upright, tmp_path)
    pngs = _pngs(out / "phone.mov")
    for png, ref in zip(pngs, expected, strict=True):
        labels = np.asarray(Image.open(png))
        assert labels.shape == (96, 64)
        assert np.array_equal(labels, ref)
    info = _summary(out / "phone.mov" / "summary.json")["clip"]
    assert (info["rotation"], info["width"], info["height"]) == (90, 64, 96)


def test_odd_width_420_clip_and_its_overlay(tiny_onnx_dir, tmp_path):
    """VP9 4:2:0 at 95x71: labels at the odd size; the H.264 overlay needs even sides and
    gets the last row and column repeated."""
    clip = write_clip(tmp_path / "odd.webm", scenes(5, (71, 95)), codec="libvpx-vp9")
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(out), "--overlay").exit_code == 0
    frames = decoded_frames(clip)
    assert frames[0].shape == (71, 95, 3)
    expected = _as_png_labels(tiny_onnx_dir, frames, tmp_path)
    for png, ref in zip(_pngs(out / "odd.webm"), expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(png)), ref)
    overlay = decoded_frames(out / "odd.webm" / "overlay.mp4")
    assert len(overlay) == 5 and overlay[0].shape == (72, 96, 3)
    assert _summary(out / "odd.webm" / "summary.json")["clip"]["pixel_format"] == "yuv420p"


# -- the pixel conversion -------------------------------------------------------------------


def _yuv444_clip(path: Path, y: int, u: int, v: int, colorspace: str | None) -> Path:
    """One flat frame with exact Y, U, V values (FFV1 keeps them), tagged or not."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=1)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv444p"
        if colorspace:
            s.codec_context.colorspace = getattr(av.video.reformatter.Colorspace, colorspace)
        f = av.VideoFrame(16, 16, "yuv444p")
        for plane, value in zip(f.planes, (y, u, v), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        if colorspace:
            f.colorspace = getattr(av.video.reformatter.Colorspace, colorspace)
        c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


def _limited_range_rgb(y: int, u: int, v: int, kr: float, kb: float) -> np.ndarray:
    """The textbook limited-range Y'CbCr -> R'G'B' for matrix (kr, kb)."""
    yy, cb, cr = (y - 16) / 219, (u - 128) / 224, (v - 128) / 224
    kg = 1 - kr - kb
    r = yy + 2 * (1 - kr) * cr
    b = yy + 2 * (1 - kb) * cb
    g = (yy - kr * r - kb * b) / kg
    return np.clip(np.rint(np.array([r, g, b]) * 255), 0, 255)


@pytest.mark.parametrize(
    ("colorspace", "kr", "kb"),
    [(None, 0.299, 0.114), ("ITU601", 0.299, 0.114), ("ITU709", 0.2126, 0.0722)],
    ids=["untagged-bt601", "bt601", "bt709"],
)
def test_pixel_conversion_is_the_tagged_matrix_limited_range(tmp_path, colorspace, kr, kb):
    yuv = (120, 90, 170)  # a saturated colour: BT.601 and BT.709 differ by ~10 levels
    clip = _yuv444_clip(tmp_path / "flat.mkv", *yuv, colorspace)
    frame = next(read_frames(str(clip), FrameChoice()))
    got = frame.rgb[8, 8].astype(int)
    assert np.abs(got - _limited_range_rgb(*yuv, kr, kb)).max() <= 2, got
    other = (0.2126, 0.0722) if kr == 0.299 else (0.299, 0.114)
    assert np.abs(got - _limited_range_rgb(*yuv, *other)).max() > 6  # the matrix matters


def test_rgb_coded_frames_are_passed_unconverted(tmp_path):
    """FFV1 in bgr0 (and H.264 in RGB at qp 0) keep RGB exactly: frames equal the source."""
    source = scenes(3, (33, 47))
    for name, codec, fmt, opts in [
        ("a.mkv", "ffv1", "bgr0", None),
        ("b.mkv", "libx264rgb", "rgb24", {"qp": "0"}),
    ]:
        clip = write_clip(tmp_path / name, source, codec=codec, pixel_format=fmt, options=opts)
        got = [f.rgb for f in read_frames(str(clip), FrameChoice())]
        assert all(np.array_equal(a, b) for a, b in zip(got, source, strict=True)), name


def test_a_clips_frames_share_one_swscale_context_and_convert_as_to_ndarray(tmp_path):
    """read_frames keeps one VideoReformatter for a clip (its swscale context is made once,
    not per frame), and it converts each frame as PyAV's own to_ndarray("rgb24") does,
    also when it meets frames of other sizes, formats, matrices and ranges."""
    from segdeploy.runtime.video import upright_rgb

    clip = write_clip(tmp_path / "drive.mp4", scenes(4, (36, 50)))
    frames = list(read_frames(str(clip), FrameChoice(), convert=False))
    assert len({id(f.decoded[2]) for f in frames}) == 1
    converter = frames[0].decoded[2]
    assert [f.convert().rgb.tolist() for f in frames] == [x.tolist() for x in decoded_frames(clip)]
    rng = np.random.default_rng(0)
    for (h, w), fmt, space, full in [
        ((36, 48), "yuv420p", "ITU709", False),
        ((35, 49), "yuv444p", "ITU601", True),
        ((20, 30), "yuv420p", None, True),
    ]:
        frame = av.VideoFrame(w, h, fmt)
        for plane in frame.planes:
            plane.update(rng.integers(0, 256, plane.buffer_size, dtype=np.uint8).tobytes())
        if space:
            frame.colorspace = getattr(av.video.reformatter.Colorspace, space)
        if full:
            frame.color_range = av.video.reformatter.ColorRange.JPEG
        want = frame.to_ndarray(format="rgb24")
        assert np.array_equal(upright_rgb(frame, 0, converter), want), (h, w, fmt, space)


# -- which frames ---------------------------------------------------------------------------


def test_every_start_end_and_max_fps_pick_frames_by_index_and_time(clip):
    def picked(**kw):
        return [(f.index, round(f.time, 3)) for f in read_frames(str(clip), FrameChoice(**kw))]

    assert [i for i, _ in picked(every=5)] == [0, 5, 10, 15]
    assert picked(start=0.5, end=0.8) == [(5, 0.5), (6, 0.6), (7, 0.7)]
    assert [i for i, _ in picked(max_fps=4)] == [0, 3, 6, 9, 12, 15, 18]
    assert [i for i, _ in picked(start=1.0, every=3)] == [12, 15, 18]


def test_a_start_past_the_end_says_so_with_the_clips_length(tiny_onnx_dir, clip, tmp_path):
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out), "--start", "30")
    assert result.exit_code == 1, result.output  # a failure row, not a crash
    (failure,) = _summary(out / "summary.json")["failures"]
    assert failure["reason"] == "no frame was segmented: none from --start 30 s: the clip lasts 2 s"
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(tmp_path / "o2"), "--start", "0.52",
                    "--end", "0.58")  # fmt: skip
    (failure,) = _summary(tmp_path / "o2" / "summary.json")["failures"]
    assert failure["reason"].endswith(
        "none from --start 0.52 s to --end 0.58 s: the clip lasts 2 s"
    )


def test_variable_frame_rate_keeps_each_frames_own_time(tiny_onnx_dir, tmp_path):
    times = [0.0, 0.04, 0.5, 0.52, 1.3, 2.0]
    clip = write_clip(tmp_path / "vfr.mkv", scenes(6, (40, 48)), times=times)
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(out), "--max-fps", "2").exit_code == 0
    summary = _summary(out / "vfr.mkv" / "summary.json")
    assert [t["time"] for t in summary["timeline"]] == [0.0, 0.5, 1.3, 2.0]
    assert summary["skipped"] == 2 and summary["decoded"] == 6
    assert [p.name for p in _pngs(out / "vfr.mkv")][1] == "000002_0.500s.png"


# -- bad input ------------------------------------------------------------------------------


def test_truncated_and_unreadable_clips_are_named_and_the_run_goes_on(tiny_onnx_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    full = write_clip(src / "whole.mkv", scenes(20, (48, 64)), codec="ffv1", pixel_format="bgr0")
    data = full.read_bytes()
    (src / "cut.mkv").write_bytes(data[: len(data) * 6 // 10])  # streamable: frames until the cut
    mp4 = write_clip(tmp_path / "x.mp4", scenes(5, (48, 64))).read_bytes()
    (src / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])  # index (moov) at the end: unreadable
    (src / "empty.mp4").write_bytes(b"")
    with av.open(str(src / "audio.mkv"), "w") as c:  # audio only
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(src), "-o", str(out))
    assert result.exit_code == 1, result.output  # failures, not a crash
    assert "Traceback" not in result.output
    run = _summary(out / "summary.json")
    reasons = {Path(f["input"]).name: f["reason"] for f in run["failures"]}
    assert set(reasons) == {"cut.mp4", "empty.mp4", "audio.mkv"}
    assert reasons["audio.mkv"] == "no video stream (it holds audio)"
    assert reasons["cut.mp4"].startswith("cannot open as video: ")
    # FFmpeg's own words: no errno, no second copy of the path (the record names the file)
    assert "Errno" not in reasons["cut.mp4"] and "cut.mp4" not in reasons["cut.mp4"]
    done = {Path(r["input"]).name: r for r in run["images"]}
    assert done["whole.mkv"]["video"]["frames"] == 20
    cut = _summary(out / "in" / "cut.mkv" / "summary.json")
    assert 0 < cut["frames"] < 20 and cut["complete"]
    # the frames it has are the whole clip's first frames, exactly
    whole = _pngs(out / "in" / "whole.mkv")
    for png in _pngs(out / "in" / "cut.mkv"):
        twin = next(p for p in whole if p.name == png.name)
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin)))


def test_a_corrupt_frame_mid_clip_is_a_recorded_dropped_frame(tiny_onnx_dir, tmp_path):
    """Motion JPEG: one damaged packet is one frame FFmpeg cannot decode; it is recorded
    as dropped, the frames after it keep their numbers. (FFV1 only logs a slice CRC
    mismatch and returns the frame; FFmpeg gives no per-frame signal to record.)"""
    clip = write_clip(tmp_path / "c.avi", scenes(10, (48, 64)), codec="mjpeg",
                      pixel_format="yuvj420p")  # fmt: skip
    with av.open(str(clip)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[5]
    data = bytearray(clip.read_bytes())
    for k in range(pos + size // 3, pos + size // 3 + 64):
        data[k] ^= 0x5A
    clip.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out))
    assert result.exit_code == 0, result.output
    summary = _summary(out / "c.avi" / "summary.json")
    assert summary["frames"] == 9 and summary["dropped"] == 1
    assert summary["dropped_frames"][0]["time"] == pytest.approx(0.5)
    assert summary["dropped_frames"][0]["reason"].startswith("undecodable: ")
    assert "Errno" not in summary["dropped_frames"][0]["reason"]
    assert [t["index"] for t in summary["timeline"]] == [0, 1, 2, 3, 4, 6, 7, 8, 9]


# -- streams --------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    cut: float | None = None  # serve only this share of the file, then hang up

    def log_message(self, *args):  # quiet
        pass

    def copyfile(self, source, outputfile):
        if self.cut is None:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: int(len(data) * self.cut)])


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL, handler class)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_loopback_http_stream_gives_the_files_labels(tiny_onnx_dir, http_server, tmp_path):
    root, url, _ = http_server
    clip = write_clip(root / "cam.mkv", scenes(12, (48, 64)), codec="ffv1", pixel_format="bgr0")
    out, ref = tmp_path / "out", tmp_path / "ref"
    result = _infer(tiny_onnx_dir, "--stream", f"{url}/cam.mkv", "-o", str(out), "--every", "2")
    assert result.exit_code == 0, result.output
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(ref), "--every", "2").exit_code == 0
    folder = out / f"127.0.0.1_{url.rsplit(':', 1)[1]}_cam.mkv"
    got, expected = _pngs(folder), _pngs(ref / "cam.mkv")
    assert [p.name for p in got] == [p.name for p in expected] and len(got) == 6
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_a_stream_that_stops_keeps_its_frames_and_the_run_goes_on(
    tiny_onnx_dir, http_server, tmp_path
):
    root, url, handler = http_server
    write_clip(root / "cam.mkv", scenes(20, (48, 64)), codec="ffv1", pixel_format="bgr0")
    handler.cut = 0.5
    out = tmp_path / "out"
    streams = ["--stream", f"{url}/cam.mkv", "--stream", f"{url}/missing.mkv"]
    result = _infer(tiny_onnx_dir, *streams, "-o", str(out))
    assert result.exit_code == 1, result.output  # the missing one
    run = _summary(out / "summary.json")
    assert [Path(f["input"]).name for f in run["failures"]] == ["missing.mkv"]
    assert "cannot open as video" in run["failures"][0]["reason"]
    stopped = run["images"][0]["video"]
    assert 0 < stopped["frames"] < 20


# -- stopping and resuming ------------------------------------------------------------------

_KILL_AFTER = """
import os, signal, sys
from segdeploy.runtime import video_out
add = video_out.ClipOutputs.add
def killing_add(self, *args, **kwargs):
    add(self, *args, **kwargs)
    if self.frames == {k}:
        os.kill(os.getpid(), signal.{sig})
video_out.ClipOutputs.add = killing_add
from segdeploy.cli import main
sys.exit(main({args!r}, standalone_mode=False))
"""


@pytest.mark.parametrize(
    ("labels", "sig"), [("png", "SIGKILL"), ("ffv1", "SIGKILL"), ("ffv1", "SIGINT")]
)
def test_a_stopped_run_resumes_from_the_first_frame_not_written(
    tiny_onnx_dir, clip, tmp_path, labels, sig
):
    args = ["infer", "--model", str(tiny_onnx_dir), str(clip), "--threads", "1",
            "--video-labels", labels, "--overlay", "--workers", "0"]  # fmt: skip
    ref = tmp_path / "ref"
    assert _infer(tiny_onnx_dir, *args[3:], "-o", str(ref)).exit_code == 0
    out = tmp_path / "out"
    code = _KILL_AFTER.format(k=3, sig=sig, args=[*args, "-o", str(out)])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (-signal.SIGKILL, 130), proc.stderr
    folder = out / "drive.mp4"
    assert not (folder / "summary.json").exists() and (folder / ".frames.partial.jsonl").exists()
    result = _infer(tiny_onnx_dir, *args[3:], "-o", str(out), "--skip-existing")
    assert result.exit_code == 0, result.output
    summary = _summary(folder / "summary.json")
    assert summary["frames"] == 20 and 1 <= summary["resumed"] < 20
    if sig == "SIGKILL":  # Ctrl-C lets the frames in flight finish; a kill does not
        assert summary["resumed"] <= 3
    mine, theirs = ref / "drive.mp4", folder
    if labels == "png":
        a = [np.asarray(Image.open(p)) for p in _pngs(mine)]
        b = [np.asarray(Image.open(p)) for p in _pngs(theirs)]
    else:
        a, b = label_stream(mine / "labels.mkv"), label_stream(theirs / "labels.mkv")
    assert len(a) == len(b) == 20 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(decoded_frames(theirs / "overlay.mp4")) == 20
    assert summary["timeline"] == _summary(mine / "summary.json")["timeline"]
    # A complete clip is skipped whole the next time.
    again = _infer(tiny_onnx_dir, *args[3:], "-o", str(out), "--skip-existing")
    assert _summary(out / "summary.json")["totals"]["skipped"] == 1, again.output


def test_without_pyav_a_clip_exits_2_with_the_install_line(
    tiny_onnx_dir, clip, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "drive.mp4" in line and "pip install 'segdeploy[video]'" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # A clip found in a folder: the same line, when the run meets it.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "drive.mp4").write_bytes(clip.read_bytes())
    result = _infer(tiny_onnx_dir, str(tmp_path / "in"), "-o", str(tmp_path / "out2"))
    assert result.exit_code == 2, result.output
    assert "pip install 'segdeploy[video]'" in result.output.strip().splitlines()[-1]
    # A stream: the same line, before anything is written.
    result = _infer(tiny_onnx_dir, "--stream", str(clip), "-o", str(tmp_path / "out3"))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "--stream" in line and "pip install 'segdeploy[video]'" in line
    assert not (tmp_path / "out3").exists()


def test_no_frame_memory_grows_with_the_clip(tiny_onnx_dir, tmp_path):
    """The reader, the pipeline and the writers hold a bounded number of frames: the peak
    RSS of a run over a clip 8x longer grows by less than 30 frames' worth
    (benchmarks/bench_video.py measures a longer one)."""
    sizes = {}
    frames = scenes(10, (360, 480))
    for n in (30, 240):
        clip = write_clip(tmp_path / f"c{n}.mkv", frames * (n // 10), codec="ffv1",
                          pixel_format="bgr0")  # fmt: skip
        code = (
            "from segdeploy.cli import main\n"
            f"main(['infer','--model',{str(tiny_onnx_dir)!r},{str(clip)!r},'-o',"
            f"{str(tmp_path / f'o{n}')!r},'--threads','1','--workers','0','--video-labels','ffv1'],"
            " standalone_mode=False)\n"
            # VmHWM: this process's peak; ru_maxrss would carry over pytest's (at exec)
            "print('RSS', [x for x in open('/proc/self/status') if 'VmHWM' in x][0].split()[1])\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        sizes[n] = int(proc.stdout.split("RSS")[-1])
    assert sizes[240] - sizes[30] < 15_000, sizes  # kB; 210 frames held would be 109 MB of RGB


@pytest.mark.slow
def test_camvid_frames_as_a_clip_get_the_labels_of_the_frames_as_pngs(
    camvid, tiny_onnx_dir, tmp_path
):
    """Held-in CamVid frames (one driving sequence of the training split, 480x360) as a
    lossless clip (FFV1 in bgr0) and as H.264 4:2:0: every frame's labels equal infer on
    the same pixels as PNGs, in both label formats, on 100% of pixels."""
    photos = sorted((camvid / "images" / "train").glob("0001TP_*.jpg"))[:12]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    lossless = write_clip(tmp_path / "seq.mkv", frames, codec="ffv1", pixel_format="bgr0")
    lossy = write_clip(tmp_path / "seq.mp4", frames, options={"crf": "18"})
    for clip, pixels in ((lossless, frames), (lossy, decoded_frames(lossy))):
        expected = _as_png_labels(tiny_onnx_dir, pixels, tmp_path / clip.suffix[1:])
        png, mkv = tmp_path / f"png-{clip.name}", tmp_path / f"mkv-{clip.name}"
        assert _infer(tiny_onnx_dir, str(clip), "-o", str(png)).exit_code == 0
        assert (
            _infer(tiny_onnx_dir, str(clip), "-o", str(mkv), "--video-labels", "ffv1").exit_code
            == 0
        )
        got = [np.asarray(Image.open(p)) for p in _pngs(png / clip.name)]
        stream = label_stream(mkv / clip.name / "labels.mkv")
        assert len(got) == len(stream) == len(expected) == 12
        for a, b, ref in zip(got, stream, expected, strict=True):
            assert a.shape == (360, 480)
            assert np.array_equal(a, ref) and np.array_equal(b, ref)


def test_a_live_stream_drops_frames_when_the_pipeline_falls_behind(clip):
    """Live sources never wait for a slow pipeline longer than the lag: such frames are
    recorded as dropped, the others arrive in order. (A source faster than real time, as
    in the HTTP tests above, is never behind.)"""
    import time

    from segdeploy.runtime.video import FrameReader

    reader = FrameReader(str(clip), FrameChoice(), depth=1, live=True, lag=0.2)
    got = []
    for frame in reader:  # a model four times slower than the 10 fps clip
        got.append(frame.index)
        time.sleep(0.4)
    reader.close()
    dropped = reader.counts.dropped
    assert dropped and all(d["reason"] == "dropped: over 0.2 s behind the stream" for d in dropped)
    assert len(got) + len(dropped) == 20 and got == sorted(got) and got[0] == 0
    assert reader.counts.taken == len(got)
