"""Clips and streams under `segdeploy infer --engine ray`: the frames of many clips spread
over the model actors, each clip's outputs written in order by the driver.

One Ray Data row per clip (or stream). `decode_clips` (a task per clip) decodes
it with segdeploy.runtime.video and preprocesses each frame with the local
engine's `prepare_image`, yielding batches of frame rows as it goes, so a clip
of any length streams through; a last row per clip carries what decoding met
(FrameCounts). The model stage is ray_engine's (`_ModelStage`, the actors);
`finish_frames` upsamples and writes each frame's label PNG like
ray_engine's write stage, and hands the labels (FFV1 stream) and the blended
overlay back. The driver reads the rows in order (Ray Data's preserve_order)
and feeds each clip's `ClipOutputs` (segdeploy.runtime.video_out), as the
local engine does: the label stream, the overlay video and the clip's
summary.json are the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.runtime import pipeline
from segdeploy.runtime.clips import VideoSettings, run_header, stream_name
from segdeploy.runtime.video import (
    ClipInfo,
    Frame,
    FrameChoice,
    FrameCounts,
    import_av,
    is_video_name,
    read_frames,
)
from segdeploy.runtime.video_out import FRAMES_DIR, OVERLAY_CODECS, ClipOutputs, frame_name

__all__ = ["ClipRun", "is_video_name"]

_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
_NO_PIXELS = np.zeros((3, 0, 0), np.float32)


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    col = np.empty(len(arrays), dtype=object)
    col[:] = list(arrays)
    return col


def _rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = rows[0].keys()
    out = {}
    for k in keys:
        values = [r[k] for r in rows]
        out[k] = _column(values) if isinstance(values[0], np.ndarray) else np.array(values, object)
    return out


def decode_clips(
    batch: dict[str, np.ndarray], *, cfg: pipeline.StageConfig, choice: dict, size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Stage 1 for clips: each row's clip -> batches of `size` preprocessed frame rows, then
    one end row (`counts`: what decoding met, or `reason`: why the clip could not be read)."""
    for source, stream in zip(batch["source"], batch["stream"], strict=True):
        counts, info, rows = FrameCounts(), [], []
        try:
            for frame in read_frames(
                str(source), FrameChoice(**choice), stream=bool(stream), info=info, counts=counts
            ):
                p = pipeline.prepare_image(frame.rgb, cfg)
                rows.append(_frame_row(source, frame, p, info[0]))
                if len(rows) >= size:
                    yield _rows(rows)
                    rows = []
            reason = ""
        except SegdeployError as err:
            reason = err.problem
        rows.append(_end_row(source, counts, reason))
        yield _rows(rows)


def _frame_row(source, frame: Frame, p: pipeline.Prepared, info: ClipInfo) -> dict[str, Any]:
    return {
        "source": str(source),
        "kind": "frame",
        "reason": "",
        "index": frame.index,
        "time": frame.time,
        "info": json.dumps(asdict(info)),
        "pixels": p.x,
        "height": p.size[0],
        "width": p.size[1],
        "image": p.image if p.image is not None else _NO_IMAGE,
    }


def _end_row(source, counts: FrameCounts, reason: str) -> dict[str, Any]:
    return {
        "source": str(source),
        "kind": "end",
        "reason": reason or "end",  # not empty: the model stage leaves the row alone
        "index": -1,
        "time": 0.0,
        "info": json.dumps(asdict(counts)),
        "pixels": _NO_PIXELS,
        "height": 0,
        "width": 0,
        "image": _NO_IMAGE,
    }


def finish_frames(
    batch: dict[str, np.ndarray], *, output: str, folders: dict, cfg, fused: bool, mode: str
) -> dict[str, np.ndarray]:
    """Stage 3 for clips: upsample, class shares, each frame's label PNG (when the labels
    are PNGs); the labels and overlay pixels go back to the driver for the streams."""
    keep = pipeline.Keep(labels=mode == "ffv1", overlay=cfg.palette is not None)
    classes, labels, overlays, reasons = [], [], [], []
    for i, kind in enumerate(batch["kind"]):
        res, reason = None, "" if kind == "frame" else str(batch["reason"][i])
        if kind == "frame":
            frame = Frame(int(batch["index"][i]), float(batch["time"][i]), None)
            folder = Path(output) / folders[str(batch["source"][i])]
            label = folder / FRAMES_DIR / frame_name(frame) if mode == "png" else None
            size = (int(batch["height"][i]), int(batch["width"][i]))
            image = np.asarray(batch["image"][i]) if cfg.palette is not None else None
            try:
                res = pipeline.finish_image(
                    np.asarray(batch["raw"][i]), size, label, cfg,
                    fused=fused, image=image, keep=keep,
                )  # fmt: skip
            except (SegdeployError, OSError, ValueError) as err:
                reason = f"cannot write outputs: {err}"
        classes.append(json.dumps(res.classes if res else []))
        labels.append(
            res.labels if res is not None and res.labels is not None else _NO_IMAGE[..., 0]
        )
        overlays.append(res.overlay if res is not None and res.overlay is not None else _NO_IMAGE)
        reasons.append(reason)
    keys = ("source", "kind", "index", "time", "info")
    out = {k: batch[k] for k in keys}
    out.update(
        reason=np.array(reasons, object),
        classes=np.array(classes, object),
        labels=_column(labels),
        overlay=_column(overlays),
        model_s=batch["model_s"],
        provider=batch["provider"],
    )
    return out


class ClipDriver:
    """The driver's side: rows in order -> each clip's ClipOutputs; a record per clip."""

    def __init__(self, clips: dict[str, ClipOutputs]):
        self.clips = clips
        self.frames = 0

    def take(self, row: dict[str, Any]) -> dict[str, Any] | None:
        out = self.clips[row["source"]]
        if row["kind"] == "end":
            counts = FrameCounts(**json.loads(row["info"]))
            if row["reason"] != "end":
                out.abort()
                return {"input": row["source"], "reason": row["reason"]}
            return out.finish(counts)
        frame = Frame(int(row["index"]), float(row["time"]), None)
        if out.info is None:
            out.start(ClipInfo(**json.loads(row["info"])))
        if row["reason"]:
            out.drop(frame, row["reason"])
            return None
        labels = row["labels"] if out.mode == "ffv1" else None
        overlay = row["overlay"] if out.overlay_codec is not None else None
        name = frame_name(frame) if out.mode == "png" else None
        out.add(frame, json.loads(row["classes"]), labels, overlay, name)
        self.frames += 1
        return None

    def close(self) -> None:
        for out in self.clips.values():
            if not out.summary_path.exists():
                out.abort()


def clip_dataset(ray, rows, *, cfg, choice: FrameChoice, model_stage, out: Path, fused, mode):
    """decode -> model actors -> finish, over one row per clip; lazy until iterated."""
    batch_size = model_stage["batch_size"]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # each clip's frames reach the driver in order
    folders = {r["source"]: r["out"] for r in rows}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(
        decode_clips,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"cfg": cfg, "choice": asdict(choice), "size": batch_size},
    )
    ds = ds.map_batches(batch_format="numpy", batch_size=batch_size, **model_stage["kwargs"])
    return ds.map_batches(
        finish_frames,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={
            "output": str(out),
            "folders": folders,
            "cfg": cfg,
            "fused": fused,
            "mode": mode,
        },
    )


class ClipRun:
    """The clips and streams of one `--engine ray` run: planned by the driver (`add_file`,
    the streams of `video`), run after the photos on the same actors (`run`)."""

    def __init__(
        self, ray, probe, out: Path, video, overlay: bool, skip_existing: bool, model_stage
    ):
        self.ray, self.probe, self.out = ray, probe, out
        self.video = video or VideoSettings()
        self.video.check()
        self.overlay = overlay
        self.skip_existing = skip_existing
        self.model_stage = model_stage
        self.header = run_header(probe, self.video, overlay)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.outputs: dict[str, ClipOutputs] = {}
        self.driver = ClipDriver(self.outputs)
        for url in self.video.streams:
            import_av("--stream")
            self._add(url, Path(stream_name(url)), stream=True)

    @property
    def frames(self) -> int:
        return self.driver.frames

    def add_file(self, path: Path, rel) -> None:
        import_av(path)
        self._add(str(Path(path).absolute()), Path(rel).parent / Path(path).name, stream=False)

    def _add(self, source: str, rel: Path, *, stream: bool) -> None:
        from segdeploy.runtime.palette import palette_for

        codec = OVERLAY_CODECS[self.video.overlay_codec] if self.overlay else None
        out = ClipOutputs(
            self.out / rel, str(rel), source, mode=self.video.labels, overlay=codec,
            palette=palette_for(self.probe.num_labels) if self.overlay else None,
            id2label=self.probe.id2label, header=self.header,
        )  # fmt: skip
        if self.skip_existing and out.complete() is not None:
            self.skipped.append({"input": source, "output": str(rel), "skipped": True,
                                 "summary": f"{rel}/summary.json"})  # fmt: skip
            return
        self.outputs[source] = out
        self.rows.append({"source": source, "stream": stream, "out": str(rel)})

    def run(self, record, bar) -> None:
        """Every clip through decode -> actors -> finish; records to `record` in order."""
        for rec in self.skipped:
            record(rec)
        if not self.rows:
            return
        cfg = pipeline.StageConfig.for_segmenter(self.probe, overlay=self.overlay, output=self.out)
        ds = clip_dataset(
            self.ray, self.rows, cfg=cfg, choice=self.video.choice(),
            model_stage={"batch_size": self.probe.batch_size, "kwargs": self.model_stage},
            out=self.out, fused=self.probe.fused, mode=self.video.labels,
        )  # fmt: skip
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["kind"])):
                rec = self.driver.take({k: v[i] for k, v in batch.items()})
                if rec is not None:
                    record(rec)
                else:
                    bar.update(1)

    def close(self) -> None:
        self.driver.close()
