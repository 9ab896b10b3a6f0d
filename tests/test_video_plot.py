"""A clip's classes.png (segdeploy.runtime.share_plot): it is there and a PNG, its
summary.json names it, it shows each class's share, a failed plot is one clear line, and
a run never imports matplotlib."""

from __future__ import annotations

import json
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
from segdeploy.runtime.share_plot import (
    FINE,
    LEGEND_CHARS,
    ShareSeries,
    _legend,
    _time_ticks,
    chart,
    draw_shares,
    share_series,
)


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
    assert np.allclose(series.centres, [t["time"] for t in summary["timeline"]])


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path):
    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"run": {}}\n{"index": 0, "time": 0.0, "shares": {"1": 1.0}}\n')
    series = share_series(journal, {0: "a", 1: "b"}, "t")
    dest = tmp_path / "classes.png"
    dest.mkdir()  # a folder holds the plot's name: it cannot be replaced
    error = draw_shares(series, dest)
    assert error.startswith("cannot draw the class-share plot: ") and "Error" in error
    assert "\n" not in error
    assert dest.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.png", "journal.jsonl"]


def _constant(shares: list[float], colours: list[tuple[int, int, int]], seconds: float = 10.0):
    return ShareSeries(
        centres=np.linspace(0.0, seconds, 50),
        means=np.tile(shares, (50, 1)),
        labels=[f"class {i}" for i in range(len(shares))],
        colours=np.array(colours) / 255.0,
        title="t",
    )


def test_each_class_is_drawn_as_tall_as_its_share_in_id_order_from_the_bottom():
    """Down the chart's middle column: each class's colour over its share of the stack's
    height (the stack is what the three colours cover), the first id at the bottom."""
    colours = [(230, 20, 20), (20, 200, 20), (20, 20, 230)]
    image = np.asarray(chart(_constant([0.2, 0.5, 0.3], colours)))
    column = image[:, image.shape[1] // 3]
    rows = [np.flatnonzero((column == c).all(axis=1)) for c in colours]
    heights = np.array([len(r) for r in rows], dtype=float)
    assert np.allclose(heights / heights.sum(), [0.2, 0.5, 0.3], atol=0.02)
    assert rows[0].min() > rows[1].max() and rows[1].min() > rows[2].max()  # y grows down


def test_time_ticks_are_round_steps_inside_the_clip():
    assert [t for t, _ in _time_ticks(0.0, 15.57)] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [text for _, text in _time_ticks(0.0, 600.0)][-1] == "600"
    assert [text for _, text in _time_ticks(0.02, 0.37)] == [
        "0.05", "0.10", "0.15", "0.20", "0.25", "0.30", "0.35",
    ]  # fmt: skip
    assert _time_ticks(3.2, 3.2) == [(3.2, "3.2")]
    for c0, c1 in [(0.0, 15.57), (1.5, 7000.0), (0.0, 0.01), (12.0, 13.0)]:
        ticks = [t for t, _ in _time_ticks(c0, c1)]
        assert 2 <= len(ticks) <= 8 and c0 - 1e-9 <= ticks[0] and ticks[-1] <= c1 + 1e-9


def test_the_legend_keeps_the_largest_classes_when_they_do_not_fit():
    shares = np.full(60, 0.5 / 59)
    shares[37] = 0.5
    colours = [(i * 4, 100, 100) for i in range(60)]
    rows = _legend(_constant(list(shares), colours), top=0, bottom=200 * FINE)
    assert len(rows) == 200 // 16 and rows[-1] == (f"+ {60 - len(rows) + 1} more", None)
    assert ("class 37", colours[37]) in rows
    names = [int(text.split()[1]) for text, c in rows[:-1]]
    assert names == sorted(names)  # in id order
    every = _legend(_constant([0.5, 0.5], colours[:2]), top=0, bottom=200 * FINE)
    assert every == [("class 0", colours[0]), ("class 1", colours[1])]
    long = ShareSeries(
        centres=np.array([0.0, 1.0]), means=np.array([[1.0], [1.0]]), colours=np.zeros((1, 3)),
        labels=["person, individual, someone, somebody, mortal, soul"], title="t",
    )  # fmt: skip
    [(text, _)] = _legend(long, top=0, bottom=200 * FINE)
    assert text == "person, individual, someo..." and len(text) == LEGEND_CHARS


def test_a_failed_plot_in_a_run_leaves_a_summary_without_it(tiny_onnx_dir, clip, tmp_path):
    """classes.png cannot be replaced (a folder holds its name): the run still ends, with
    one error line, and the clip's summary.json says why there is no plot."""
    out = tmp_path / "out"
    (out / "drive.mp4" / "classes.png").mkdir(parents=True)
    result = _infer(tiny_onnx_dir, str(clip), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    [line] = [x for x in result.output.splitlines() if "cannot draw the class-share plot" in x]
    assert str(out / "drive.mp4" / "classes.png") in line
    summary = json.loads((out / "drive.mp4" / "summary.json").read_text())
    assert summary["complete"] and "plot" not in summary["outputs"]
    assert summary["plot_error"].startswith("cannot draw the class-share plot: ")
    assert (out / "drive.mp4" / "classes.png").is_dir()  # what was there is untouched


def test_the_run_itself_never_imports_matplotlib(tiny_onnx_dir, clip, tmp_path):
    """The plot is Pillow's (segdeploy.runtime.share_plot): matplotlib's import and first
    figure cost a run about 1 s of CPU."""
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


def test_the_docs_figure_script_writes_a_clips_plot(tiny_onnx_dir, tmp_path):
    """scripts/video_figure.py (docs/video.md's picture) still runs: a clip in, its plot out."""
    root = Path(__file__).resolve().parents[1]
    dest = tmp_path / "figure.png"
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "video_figure.py"), "--model",
         str(tiny_onnx_dir), "-o", str(dest)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(dest) as im:
        assert im.format == "PNG" and im.size == (800, 350)
