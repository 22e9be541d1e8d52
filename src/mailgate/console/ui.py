"""The web UI at ``/``: one page and its script and style sheet, shipped in the package
(no CDN, no build step), served under a strict Content-Security-Policy."""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

__all__ = ["UI_POLICY", "add_routes"]

#: The page may run only its own script and style sheet and talk only to this server; it
#: frames only this server's pages (a mail's HTML body, which has its own stricter
#: policy: see the API's ``/messages/{id}/html``).
UI_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}


def _file(name: str) -> bytes:
    return resources.files("mailgate.console").joinpath("static", name).read_bytes()


async def _serve(request: web.Request) -> web.Response:
    name, content_type = _FILES[request.path]
    return web.Response(
        body=_file(name),
        headers={"Content-Type": content_type, "Content-Security-Policy": UI_POLICY},
    )


def add_routes(app: web.Application) -> None:
    for path in _FILES:
        app.router.add_get(path, _serve)
