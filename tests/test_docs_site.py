"""The docs site says what the code does: the promises name real tests, the summary.json
page names every key a run writes, and the generated tables come from the results files.
(`make docs` builds the site with --strict in CI: broken links and missing pages fail it.)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_tables", DOCS / "hooks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- promises --------------------------------------------------------------------------------


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_promise_names_tests_that_exist():
    rows = [
        r for r in (DOCS / "promises.md").read_text().splitlines() if re.match(r"^\| \d+ \|", r)
    ]
    assert len(rows) >= 19
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        refs = re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", cell)
        assert refs, f"no test named in: {row[:80]}"
        current = None
        for file, name in refs:
            current = file or current
            assert current and (ROOT / "tests" / current).is_file(), f"{current} in {row[:60]}"
            if name:
                assert name in _test_names(ROOT / "tests" / current), f"{current}::{name}"


# -- summary.json ----------------------------------------------------------------------------


def _documented(section: str) -> set[str]:
    text = (DOCS / "reference" / "summary-json.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", body, re.MULTILINE))


def test_summary_json_page_names_every_key_a_run_writes(tiny_onnx_dir, tmp_path):
    from segdeploy.runtime.infer import run_infer

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    kwargs = dict(provider="cpu", threads=1, workers=0, overlay=True, progress=False)
    run_infer([photos], tiny_onnx_dir, out, **kwargs)
    summary = json.loads((out / "summary.json").read_text())
    run_infer([photos], tiny_onnx_dir, out, skip_existing=True, **kwargs)
    again = json.loads((out / "summary.json").read_text())
    from segdeploy.runtime.tiles import TileOptions

    run_infer([photos], tiny_onnx_dir, tmp_path / "tiled", tiling=TileOptions(32), **kwargs)
    tiled = json.loads((tmp_path / "tiled" / "summary.json").read_text())

    top = _documented("Top level")
    assert set(summary) <= top and top - set(summary) == {"stopped"}  # only on a stopped run
    images = _documented("`images[]`")
    written = {k for rec in summary["images"] + again["images"] + tiled["images"] for k in rec}
    assert written == images
    assert {k for rec in summary["failures"] for k in rec} == _documented("`failures[]`")
    assert set(summary["totals"]) == _documented("`totals`")


# -- generated tables ------------------------------------------------------------------------


def test_benchmark_tables_are_built_from_the_results_files():
    hook = _hook()
    camvid = json.loads((ROOT / "benchmarks/results/camvid_cpu.json").read_text())
    first = camvid["results"][0]
    table = hook.render("camvid_cpu")
    assert f"| {first['backend']} | {first['batch_size']} |" in table
    assert f"{first['end_to_end_images_per_s']:.2f}" in table
    for name in hook.RENDERERS:
        rendered = hook.render(name)
        assert "|---" in rendered, name
        assert "/work/" not in rendered and "shared/data" not in rendered, name  # no machine paths
    with pytest.raises(KeyError, match="no table named"):
        hook.render("nope")


def test_code_tables_follow_the_code(monkeypatch):
    from segdeploy import folders
    from segdeploy.validate import verdicts

    hook = _hook()
    monkeypatch.setitem(verdicts.MIN_AGREEMENT, "int8", 0.97)
    assert "| int8 | 0.01 mean IoU | 0.1 x max(1, largest" in hook.render("validation_floors")
    assert "97.00%" in hook.render("validation_floors")
    monkeypatch.setitem(folders.VARIANT_FILES, "bf16", "model_bf16.onnx")
    assert "| `bf16` | `model_bf16.onnx` | `validation_bf16.json` |" in hook.render(
        "folder_variants"
    )


def test_every_table_marker_of_the_pages_is_known():
    hook = _hook()
    used = {m for page in DOCS.rglob("*.md") for m in hook.MARKER.findall(page.read_text())}
    assert used and used <= set(hook.RENDERERS)
    assert set(hook.RENDERERS) <= used  # no renderer left unused


def test_nav_lists_every_page_and_only_pages_that_exist():
    text = (ROOT / "mkdocs.yml").read_text()
    nav = re.findall(r"^\s+- (?:.*: )?([\w/.-]+\.md)$", text.split("\nnav:", 1)[1], re.M)
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(nav) == pages
