"""The chat page: one static HTML file (``static/index.html``: its CSS and JS inline) and the
libraries it vendors (``static/vendor/``: marked, DOMPurify, highlight.js, with their licenses).

It is served with a Content-Security-Policy that lets it load only its own files, run only its
own inline script (by hash) and no other, show images from ``data:`` URLs, talk only to this
server, and never be framed by another page.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi.responses import HTMLResponse

__all__ = ["STATIC_DIR", "page_response"]

#: The page and its vendored files.
STATIC_DIR = Path(__file__).with_name("static")


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in re.findall(r"<script>(.*?)</script>", html, flags=re.S))
    csp = (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html, csp


def page_response() -> HTMLResponse:
    """``GET /``: the page, with its security headers."""
    html, csp = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
