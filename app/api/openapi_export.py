"""Write the API's documents, generated from the code, to ``openapi/``.

``python -m app.api.openapi_export`` (``make openapi``) writes

* ``openapi/openapi.json`` - the OpenAPI document of the HTTP API (``app.openapi()``);
* ``openapi/websocket.json`` - an AsyncAPI 3.0 document of the WebSocket endpoint
  ``GET /v1/peers/{peer_id}/subscribe`` (:mod:`app.api.asyncapi`), also served at
  ``/asyncapi.json``.

``--check`` writes nothing and exits 1 when a file differs from what the code generates.
The app is built on a dummy node configuration; its lifespan never runs, so nothing is
bound and nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.api.app import create_app
from app.api.asyncapi import asyncapi_document
from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig

#: Where the documents live: ``openapi/`` at the top of the repository.
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "openapi"
OPENAPI_FILE = "openapi.json"
WEBSOCKET_FILE = "websocket.json"


def _app_document() -> dict[str, Any]:
    node = NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5060"))
    document: dict[str, Any] = create_app(GatewayConfig(node=node)).openapi()
    return document


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the HTTP API, exactly as the app serves it."""
    return _app_document()


def render(document: dict[str, Any]) -> str:
    """The file's text: sorted keys, indent 2, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    """File name -> the text the code generates for it."""
    return {
        OPENAPI_FILE: render(openapi_document()),
        WEBSOCKET_FILE: render(asyncapi_document()),
    }


def stale_files(directory: Path) -> list[Path]:
    """The files in ``directory`` that are missing or differ from what the code generates."""
    stale = []
    for name, text in generated().items():
        path = directory / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.api.openapi_export",
        description="Write openapi/openapi.json and openapi/websocket.json from the code.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a file is missing or out of date",
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"where the files go (default {DEFAULT_DIR})"
    )
    args = parser.parse_args(argv)
    directory: Path = args.dir
    if args.check:
        stale = stale_files(directory)
        for path in stale:
            print(
                f"{_shown(path)} is out of date with the code: run `make openapi` "
                "(python -m app.api.openapi_export) and commit the result",
                file=sys.stderr,
            )
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in generated().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
