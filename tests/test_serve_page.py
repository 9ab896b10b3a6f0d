"""The page at `GET /` in a real headless browser: Debian's chromium (apt-get install
chromium), driven by Playwright (no browser download). Picking a file and dropping one
both show the overlay, the class shares and the latency; a file that is not an image shows
the service's reason. Slow: it starts a browser and the service."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import free_port, photo_bytes, ray_environment, wait_gone

pytest.importorskip("ray.serve", reason="the serve extra is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
httpx = pytest.importorskip("httpx")

from segdeploy.serve.service import serving  # noqa: E402
from segdeploy.serve.settings import ServeSettings  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Drops a file on the page's drop zone as a user's drag and drop does.
DROP = """([selector, name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, {type: "image/png"}));
    document.querySelector(selector).dispatchEvent(
        new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


def drive_page(url: str, photo: Path, screenshot: Path, drop: bytes | None = None) -> dict:
    """Open the page, pick `photo` (and drop `drop`), screenshot it; what it shows."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.body.dataset.done === '1'", timeout=60_000)
            shown = {
                "title": page.title(),
                "overlay_size": page.eval_on_selector(
                    "#overlay", "i => [i.naturalWidth, i.naturalHeight]"
                ),
                "overlay_visible": page.is_visible("#overlay"),
                "latency": page.inner_text("#latency"),
                "timings": page.inner_text("#timings"),
                "shares": page.eval_on_selector_all(
                    "#shares tr", "rows => rows.map(r => r.cells[0].innerText)"
                ),
            }
            page.screenshot(path=str(screenshot))
            if drop is not None:
                page.evaluate(DROP, ["#drop", "dropped.png", base64.b64encode(drop).decode()])
                page.wait_for_function("document.body.dataset.done === '2'", timeout=60_000)
                shown["dropped_size"] = page.eval_on_selector(
                    "#overlay", "i => [i.naturalWidth, i.naturalHeight]"
                )
            shown["errors"] = errors
            return shown
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: apt-get install chromium")
def test_the_page_shows_overlay_shares_and_latency(tiny_onnx_dir, tmp_path):
    photo = tmp_path / "street.jpg"
    photo.write_bytes(photo_bytes("jpeg", 1, size=(120, 160)))
    dropped = photo_bytes("png", 2, size=(60, 90))
    settings = ServeSettings(model_dir=str(tiny_onnx_dir), port=free_port(), provider="cpu")
    with ray_environment() as ray_dir:
        with serving(settings) as running:
            shown = drive_page(running.url, photo, tmp_path / "page.png", drop=dropped)
            answer = httpx.post(
                f"{running.url}/v1/segment",
                content=photo.read_bytes(),
                headers={"Content-Type": "image/jpeg", "Accept": "application/json"},
            ).json()
            refused = _pick_not_an_image(running.url, tmp_path)
        assert not wait_gone(ray_dir)
    assert shown["errors"] == []
    assert shown["title"] == "segdeploy serve" and shown["overlay_visible"]
    assert shown["overlay_size"] == [160, 120] and shown["dropped_size"] == [90, 60]
    assert re.fullmatch(r"\d+ ms", shown["latency"])
    assert re.match(r"server \d+ ms: model \d+", shown["timings"])
    assert [s.strip() for s in shown["shares"]] == [s["name"] for s in answer["shares"]]
    with Image.open(tmp_path / "page.png") as shot:
        assert shot.size == (1280, 720)
        # the overlay is on screen: the drop zone is no longer plain white
        colours = shot.crop((40, 80, 700, 600)).convert("RGB").getcolors(1 << 20)
        assert len(colours) > 50
    assert "not an image" in refused


def _pick_not_an_image(url: str, tmp_path: Path) -> str:
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('status').className === 'err'")
            return page.inner_text("#status")
        finally:
            browser.close()


def test_page_data_is_escaped(tmp_path):
    """A class name cannot end the page's script early (the names go into it as JSON)."""
    from segdeploy.serve.model import ServiceInfo
    from segdeploy.serve.page import render_page

    info = ServiceInfo("m", "fp32", "cpu", {0: "</script><b>x"}, "uint8", ["#000000"])
    html = render_page(info)
    assert "</script><b>" not in html and "<\\/script><b>x" in html
    assert html.count("</script>") == 1
