"""Issue 26 under `--engine ray`: the frames of several clips spread over the model actors,
each clip's outputs written in order, identical to the local engine's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_ray import _digests, _infer, ray_cluster  # noqa: F401 (the module's cluster)
from video_clips import label_stream, scenes, write_clip


def test_engine_ray_segments_clips_like_the_local_engine(ray_cluster, tiny_onnx_dir, tmp_path):  # noqa: F811
    root = tmp_path / "clips"
    root.mkdir()
    write_clip(root / "a.mp4", scenes(9, (48, 64)))
    write_clip(root / "b.mkv", scenes(7, (45, 61), seed=3), codec="ffv1", pixel_format="bgr0")
    (root / "cut.mp4").write_bytes(b"\x00" * 100)  # unreadable: a named failure
    common = ["--model", str(tiny_onnx_dir), str(root), "--provider", "cpu", "--overlay"]
    for labels in ("png", "ffv1"):
        local, ray = tmp_path / f"local-{labels}", tmp_path / f"ray-{labels}"
        extra = ["--video-labels", labels, "--batch-size", "2"]
        assert _infer(*common, *extra, "-o", str(local)).exit_code == 1
        result = _infer(
            "--engine", "ray", "--ray-address", ray_cluster, "--actors", "2",
            *common, *extra, "-o", str(ray),
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        for clip in ("a.mp4", "b.mkv"):
            a = json.loads((local / "clips" / clip / "summary.json").read_text())
            b = json.loads((ray / "clips" / clip / "summary.json").read_text())
            assert b["timeline"] == a["timeline"] and b["frames"] == a["frames"] > 0
            assert b["classes"] == a["classes"]
            if labels == "ffv1":
                x = label_stream(local / "clips" / clip / "labels.mkv")
                y = label_stream(ray / "clips" / clip / "labels.mkv")
                assert len(x) == len(y) == a["frames"]
                assert all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))
            overlay = label_stream(ray / "clips" / clip / "overlay.mp4")
            assert len(overlay) == a["frames"]
        if labels == "png":
            frames = {k: v for k, v in _digests(local).items() if "/frames/" in k}
            assert frames and frames == {k: v for k, v in _digests(ray).items() if "/frames/" in k}
        summary = json.loads((ray / "summary.json").read_text())
        assert [Path(f["input"]).name for f in summary["failures"]] == ["cut.mp4"]
        assert summary["totals"]["frames"] == 16
