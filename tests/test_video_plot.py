"""A clip's classes.png, drawn by a plot process beside the run (segdeploy.runtime.share_plot):
it is there and a PNG, its summary.json names it, a failed plot is one clear line,
and a run without clips never starts matplotlib."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from video_clips import scenes, write_clip

from segdeploy.cli import main
from segdeploy.data.synthetic import ID2LABEL
from segdeploy.runtime import clips as clips_module
from segdeploy.runtime.share_plot import SharePlots, share_series


def _infer(model: Path, *args: str):
    return CliRunner().invoke(
        main, ["infer", "--model", str(model), "--provider", "cpu", "--threads", "1", *args]
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "drive.mp4", scenes(12, (72, 96)))


def test_the_plot_is_a_png_and_the_summary_names_it(tiny_onnx_dir, clip, tmp_path):
    out = tmp_path / "out"
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out))
    assert result.exit_code == 0, result.output
    folder = out / "drive.mp4"
    with Image.open(folder / "classes.png") as im:
        assert im.format == "PNG" and im.size == (800, 350)  # 8 x 3.5 in at 100 dpi
        im.verify()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["outputs"]["plot"] == "classes.png" and "plot_error" not in summary
    # written atomically: no temporary or journal left beside it
    assert sorted(p.name for p in folder.iterdir()) == ["classes.png", "frames", "summary.json"]


def test_the_series_plotted_is_each_frames_shares(tiny_onnx_dir, clip, tmp_path):
    """Fewer frames than bins: every frame is a bin of its own, its shares unchanged."""
    out = tmp_path / "out"
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(out)).exit_code == 0
    summary = json.loads((out / "drive.mp4" / "summary.json").read_text())
    journal = tmp_path / "journal.jsonl"  # the summary's timeline, as the journal held it
    lines = [json.dumps({"run": summary["run"]})]
    lines += [json.dumps(t) for t in summary["timeline"]]
    journal.write_text("\n".join(lines) + "\n")
    series = share_series(journal, ID2LABEL, "drive.mp4")
    present = sorted({int(k) for t in summary["timeline"] for k in t["shares"]})
    assert series.labels == [ID2LABEL[i] for i in present]
    expected = [[t["shares"].get(str(i), 0.0) for i in present] for t in summary["timeline"]]
    assert np.allclose(series.means, expected)
    assert len(series.centres) == 12 and series.title == "drive.mp4"


def test_a_plot_that_fails_is_one_line_and_the_summary_says_so(tmp_path, caplog):
    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"run": {}}\n{"index": 0, "time": 0.0, "shares": {"1": 1.0}}\n')
    series = share_series(journal, {0: "a", 1: "b"}, "t")
    dest = tmp_path / "classes.png"
    dest.mkdir()  # a folder holds the plot's name: it cannot be replaced
    errors: list = []
    plots = SharePlots()
    try:
        plots.draw(series, dest, errors.append)
        with caplog.at_level(logging.ERROR):
            plots.wait()
    finally:
        plots.close()
    assert len(errors) == 1 and errors[0].startswith("cannot draw the class-share plot: ")
    assert "Error" in errors[0] and "\n" not in errors[0]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith(f"{dest}: cannot draw the class-share plot: ")
    assert "\n" not in record.getMessage()


def test_a_failed_plot_in_a_run_leaves_a_summary_without_it(tiny_onnx_dir, clip, tmp_path):
    """classes.png cannot be replaced (a folder holds its name): the run still ends, with
    one error line, and the clip's summary.json says why there is no plot."""
    out = tmp_path / "out"
    (out / "drive.mp4" / "classes.png").mkdir(parents=True)
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    summary = json.loads((out / "drive.mp4" / "summary.json").read_text())
    assert summary["complete"] and "plot" not in summary["outputs"]
    assert summary["plot_error"].startswith("cannot draw the class-share plot: ")
    assert (out / "drive.mp4" / "classes.png").is_dir()  # what was there is untouched


def test_only_a_run_with_a_clip_starts_the_plot_process(tiny_onnx_dir, clip, tmp_path, monkeypatch):
    started = []
    real = clips_module.SharePlots.start

    def start(self):
        started.append(self)
        real(self)

    monkeypatch.setattr(clips_module.SharePlots, "start", start)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, frame in enumerate(scenes(3, (72, 96))):
        Image.fromarray(frame).save(photos / f"{i}.png")
    assert _infer(tiny_onnx_dir, str(photos), "-o", str(tmp_path / "a")).exit_code == 0
    assert started == []
    assert _infer(tiny_onnx_dir, str(clip), "-o", str(tmp_path / "b")).exit_code == 0
    assert len(started) >= 1 and (tmp_path / "b" / "drive.mp4" / "classes.png").is_file()


def test_the_run_itself_never_imports_matplotlib(tiny_onnx_dir, clip, tmp_path):
    """The plot process does: the process running the model stays free of it."""
    out = tmp_path / "out"
    code = (
        "import sys\nfrom segdeploy.cli import main\n"
        f"rc = main(['infer', '--model', {str(tiny_onnx_dir)!r}, {str(clip)!r}, '-o', "
        f"{str(out)!r}, '--provider', 'cpu'], standalone_mode=False)\n"
        "print('MATPLOTLIB', 'matplotlib' in sys.modules)\nsys.exit(rc or 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MATPLOTLIB False" in proc.stdout
    assert (out / "drive.mp4" / "classes.png").is_file()
