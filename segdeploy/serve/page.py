"""`GET /`: one HTML page (page.html) to drop an image and see its overlay, class shares
and latency; the model's name, classes and colours are written into it."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PLACEHOLDER = "/*INFO*/null"


def render_page(info: Any) -> str:
    """page.html with `info` (app.ServiceInfo) as the script's INFO object."""
    html = resources.files("segdeploy.serve").joinpath("page.html").read_text(encoding="utf-8")
    data = {
        "name": info.name,
        "variant": info.variant,
        "classes": {str(k): v for k, v in info.id2label.items()},
        "palette": info.palette,
    }
    # "</" would end the <script> element early (a class named "</script>").
    return html.replace(PLACEHOLDER, json.dumps(data).replace("</", "<\\/"))
