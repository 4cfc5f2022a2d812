"""The web console: a page at ``/`` that shows the bus, the peers, the traffic and the
node's counters live, from this same API.

The page and its script and stylesheet ship in the package (``app/api/console/``), so an
installed gateway serves them with no internet and nothing to build. They carry no data
of the gateway, so they load without a token; the page asks for the token and sends it
with every API call it makes, which the API checks as it checks any client's.

A strict Content-Security-Policy keeps the page to its own origin: a script, style,
font or image from anywhere else would be refused by the browser, not fetched.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.problems import ProblemError

router = APIRouter(include_in_schema=False)

#: Where the files are, inside the installed package.
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
#: The URL prefix of the page's own script and stylesheet (open without a token).
ASSETS = "/console"

#: The files the prefix serves, and their types; nothing else is read from disk.
FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: Everything the page loads comes from the gateway itself; its WebSocket too ('self'
#: covers ws: and wss: of the same host in current browsers).
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # An upgraded gateway serves an upgraded page: the browser checks before reusing it.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    try:
        return (CONSOLE_DIR / name).read_bytes()
    except OSError as exc:
        # A package installed without its data files: say so rather than a bare 500.
        raise ProblemError(
            404, f"the console file {name} is not installed with this gateway ({exc})"
        ) from None


@router.get("/")
async def console_page() -> Response:
    """The console page."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get(ASSETS + "/{name}")
async def console_asset(name: str) -> Response:
    """The page's script, stylesheet and icon."""
    media_type = FILES.get(name)
    if media_type is None:
        raise ProblemError(404, f"no console file {name!r}")
    return Response(_read(name), media_type=media_type, headers=HEADERS)
