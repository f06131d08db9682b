"""The chat page: static files shipped inside the package (no build step, nothing fetched from elsewhere)."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def static_file(path: str) -> tuple[bytes, str] | None:
    """The page's file at a URL path (``/`` is the page itself): its bytes and content type, or None. Only the
    files in the static folder are served, by their plain names."""
    name = "index.html" if path in ("", "/") else path.removeprefix("/static/")
    if path not in ("", "/") and not path.startswith("/static/"):
        return None
    files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in TYPES}
    if name not in files:
        return None
    return files[name].read_bytes(), TYPES[files[name].suffix]
