"""The built-in chat page at ``/``: package data, no build step, nothing from other hosts.

The page has a Content-Security-Policy of its own (scripts and styles from this server only,
connections to this server only); the security middleware keeps it instead of the API's.
The libraries it renders answers with are in ``static/vendor/`` (their versions, licences and how
to update them are in its README). Only the files listed here are served, looked up by exact
name, so no request path reaches the file system.

@.architecture
role: web page routes
jobs: [static_serving]
"""

from __future__ import annotations

import hashlib
from importlib import resources

from quart import Blueprint, Response, request
from quart_schema import hide

from aether.api.responses import json_error

blueprint = Blueprint("web", __name__)

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The page and its files: public (they hold nothing but the page; the API behind them is not).
PAGE_PATHS = frozenset({"/"})
PAGE_FILES_PREFIX = "/static/"
_STATIC = resources.files("aether.web") / "static"
_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": _JS,
    "app.css": _CSS,
    "vendor/markdown-it.umd.min.js": _JS,
    "vendor/purify.min.js": _JS,
    "vendor/highlight.min.js": _JS,
    "vendor/a11y-dark.min.css": _CSS,
    "vendor/LICENSE-markdown-it.txt": _TEXT,
    "vendor/LICENSE-markdown-it-bundled.txt": _TEXT,
    "vendor/LICENSE-dompurify.txt": _TEXT,
    "vendor/LICENSE-highlight.js.txt": _TEXT,
}
_CONTENT = {name: _STATIC.joinpath(*name.split("/")).read_bytes() for name in _ASSETS}
# A browser keeps the files and asks each time whether they changed (a 304 costs no body): the
# vendored libraries alone are about 260 kB, and an upgrade of the package must show at once.
_ETAGS = {name: f'"{hashlib.sha256(body).hexdigest()[:32]}"' for name, body in _CONTENT.items()}


def _asset(name: str) -> Response:
    etag = _ETAGS[name]
    if etag in request.headers.get("If-None-Match", ""):
        response = Response(b"", status=304)
    else:
        response = Response(_CONTENT[name], content_type=_ASSETS[name])
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-cache"
    response.headers["ETag"] = etag
    return response


@blueprint.get("/")
@hide
async def index() -> Response:
    return _asset("index.html")


# Two one-segment routes, not a ``<path:...>`` one: the app's own (unused) static route is a
# path route, and Werkzeug would rank it first.
@blueprint.get("/static/<name>")
@hide
async def static_asset(name: str) -> Response:
    if name not in _ASSETS or name == "index.html":
        return json_error(404, "not_found", "no such file")
    return _asset(name)


@blueprint.get("/static/vendor/<name>")
@hide
async def vendor_asset(name: str) -> Response:
    return await static_asset("vendor/" + name)
