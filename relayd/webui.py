"""The web terminal's static files: `GET /` and `GET /assets/<name>`.

The page and its vendored xterm.js are built from npm packages by `make web`
(`web/build.sh`) into `relayd/web/assets/`, which ships as package data, so an
installed daemon serves them with no network. Without them relayd still runs
and `/` says how to build them.

Only files directly inside the assets directory with a known extension are
served: a name is a single path segment of plain characters, so `..`, slashes
and percent-escapes never reach the filesystem. Every answer carries a strict
Content-Security-Policy (no inline script or style, same-origin everything).
"""

from __future__ import annotations

import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .http import HttpResponse

ASSETS_DIR = Path(__file__).parent / "web" / "assets"
ASSETS_PREFIX = "/assets/"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), usb=(), serial=()"),
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}

# Revalidate every time: a daemon upgrade must never pair a new page with an old script.
CACHE_CONTROL = "no-cache"

_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+$")

MISSING_ASSETS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relayd: web terminal not built</title>
<link rel="icon" href="data:,">
</head>
<body>
<main>
<h1>relayd serial-console gateway</h1>
<p>The web terminal is not built into this installation, so only the API is served.</p>
<p>To build it, run <code>make web</code> in relayd's source tree (it needs Node.js and npm:
it installs <code>@xterm/xterm</code> and <code>@xterm/addon-fit</code> from the lock file
and copies the page into <code>relayd/web/assets/</code>), then reinstall or restart relayd
and reload this page.</p>
<p>Meanwhile, connect with <code>relayd connect</code> or any WebSocket client speaking
<code>relayd.console.v1</code> at <code>/v1/vms/{vm}/console</code>.</p>
</main>
</body>
</html>
"""


@dataclass(frozen=True)
class _Asset:
    mtime_ns: int
    size: int
    body: bytes
    etag: str


_cache: dict[Path, _Asset] = {}


def static_response(
    path: str, *, if_none_match: str | None = None, root: Path | None = None
) -> HttpResponse | None:
    """The answer for `/` or `/assets/<name>`, or None when there is no such file.

    Args:
        path: the request path, as received (not percent-decoded).
        if_none_match: the request's `If-None-Match`, for a 304 when unchanged.
        root: the assets directory (default: the one shipped in the package).
    """
    root = ASSETS_DIR if root is None else root
    if path == "/":
        response = _file_response(root, "index.html", if_none_match)
        if response is None:
            response = HttpResponse(200, MISSING_ASSETS_PAGE, CONTENT_TYPES[".html"])
            response.headers.extend(SECURITY_HEADERS)
            response.headers.append(("Cache-Control", "no-store"))
        return response
    if path.startswith(ASSETS_PREFIX):
        return _file_response(root, path[len(ASSETS_PREFIX) :], if_none_match)
    return None


def _file_response(root: Path, name: str, if_none_match: str | None) -> HttpResponse | None:
    """A file directly inside `root`, by a single plain name; None for anything else."""
    if _ASSET_NAME.fullmatch(name) is None:
        return None
    content_type = CONTENT_TYPES.get(Path(name).suffix.lower())
    if content_type is None:
        return None
    asset = _load(root / name)
    if asset is None:
        return None
    headers = [*SECURITY_HEADERS, ("Cache-Control", CACHE_CONTROL), ("ETag", asset.etag)]
    if if_none_match is not None and asset.etag in _etags(if_none_match):
        return HttpResponse(304, b"", content_type, headers)
    return HttpResponse(200, asset.body, content_type, headers)


def _load(file: Path) -> _Asset | None:
    """Read (or reuse) a regular file; a rebuilt file is picked up by its mtime and size."""
    try:
        st = file.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):  # no symlinks out of the directory, no devices
        return None
    cached = _cache.get(file)
    if cached is not None and (cached.mtime_ns, cached.size) == (st.st_mtime_ns, st.st_size):
        return cached
    try:
        body = file.read_bytes()
    except OSError:
        return None
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    asset = _Asset(st.st_mtime_ns, st.st_size, body, etag)
    _cache[file] = asset
    return asset


def _etags(header: str) -> set[str]:
    """The entity tags of an `If-None-Match` header (weak ones compare by their opaque tag)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
