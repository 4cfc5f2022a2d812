"""Write the API's documents, generated from the code, to ``openapi/``.

``python -m app.api.openapi_export`` (``make openapi``) writes

* ``openapi/openapi.json`` - the OpenAPI document of the HTTP API (``app.openapi()``);
* ``openapi/websocket.json`` - an AsyncAPI 3.0 document of the WebSocket endpoint
  ``GET /v1/peers/{peer_id}/subscribe``: its query parameters, its close codes and its
  frames, from the pydantic frame models of :mod:`app.api.schemas`.

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

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app import __version__
from app.api.app import create_app
from app.api.routes import subscribe
from app.api.schemas import ErrorFrame, GapFrame, MessageFrame, ReplyFrame
from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig

#: Where the documents live: ``openapi/`` at the top of the repository.
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "openapi"
OPENAPI_FILE = "openapi.json"
WEBSOCKET_FILE = "websocket.json"

#: The frames the server sends, with their message names in the AsyncAPI document.
SERVER_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("message", MessageFrame),
    ("gap", GapFrame),
    ("error", ErrorFrame),
)
#: The frames a client sends.
CLIENT_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (("reply", ReplyFrame),)

CHANNEL = "peerSubscribe"


def _app_document() -> dict[str, Any]:
    node = NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5060"))
    document: dict[str, Any] = create_app(GatewayConfig(node=node)).openapi()
    return document


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the HTTP API, exactly as the app serves it."""
    return _app_document()


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _frame_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation") for _, model in SERVER_FRAMES + CLIENT_FRAMES
    ]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    return schemas


def _message(name: str, model: type[BaseModel], direction: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": f"{name} frame",
        "summary": _summary(model),
        "description": f"{direction}, as one JSON text frame.",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
    }


def websocket_document() -> dict[str, Any]:
    """An AsyncAPI 3.0 document of ``GET /v1/peers/{peer_id}/subscribe``.

    AsyncAPI describes the application's side: the gateway *sends* message, gap and
    error frames and *receives* reply frames.
    """
    http = _app_document()
    peer_id_parameter = http["paths"]["/v1/peers/{peer_id}"]["get"]["parameters"][0]
    close_codes = [
        {"code": code, "meaning": meaning}
        for code, meaning in sorted(subscribe.CLOSE_CODES.items())
    ]
    close_text = "\n".join(f"* {c['code']} - {c['meaning']}" for c in close_codes)
    messages: dict[str, Any] = {}
    for name, model in SERVER_FRAMES:
        messages[name] = _message(name, model, "Gateway to client")
    for name, model in CLIENT_FRAMES:
        messages[name] = _message(name, model, "Client to gateway")
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    channel_ref = {"$ref": f"#/channels/{CHANNEL}"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "dmq-gateway WebSocket API",
            "version": __version__,
            "description": (
                "What arrives over the DMQ bus for a peer, streamed to WebSocket clients. "
                "The HTTP API is in openapi.json. Each frame is one JSON text frame; "
                "offsets count the peer's messages within one epoch.\n\n"
                "Close codes besides the standard ones:\n\n" + close_text
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": "127.0.0.1:8000",
                "protocol": "ws",
                "description": "the --http address of dmq-gateway serve",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/queryToken"},
                ],
            }
        },
        "channels": {
            CHANNEL: {
                "address": subscribe.PATH,
                "title": "a peer's messages",
                "description": (
                    "Stream what arrives for a peer. Without since, the stream starts with "
                    "the next message; with since (and the epoch it belongs to), every "
                    "message held in the peer's history after that offset is replayed "
                    "first, so a client that reconnects misses nothing the history still "
                    "holds. The handshake is refused (HTTP 403) without a valid API token "
                    "when the gateway has any."
                ),
                "parameters": {"peer_id": {"description": peer_id_parameter["description"]}},
                "messages": channel_messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": dict(subscribe.QUERY_PARAMETERS),
                            "additionalProperties": False,
                        },
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {
                                    "type": "string",
                                    "description": "Bearer <token>, when the gateway has "
                                    "API tokens (or use ?token=)",
                                }
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
                "x-close-codes": close_codes,
            }
        },
        "operations": {
            "streamPeerMessages": {
                "action": "send",
                "channel": channel_ref,
                "title": "stream a peer's messages",
                "summary": "message frames as KDMQ requests arrive for the peer; a gap frame "
                "first when a resume asks for more than the history holds; an error frame "
                "for a client frame that was not understood",
                "messages": [
                    {"$ref": f"#/channels/{CHANNEL}/messages/{name}"} for name, _ in SERVER_FRAMES
                ],
            },
            "receiveReplies": {
                "action": "receive",
                "channel": channel_ref,
                "title": "answer a message (reply: subscriber)",
                "summary": "for a peer registered with reply=subscriber, the first reply "
                "frame for a message id becomes the SIP reply to that KDMQ request",
                "messages": [
                    {"$ref": f"#/channels/{CHANNEL}/messages/{name}"} for name, _ in CLIENT_FRAMES
                ],
            },
        },
        "components": {
            "schemas": _frame_schemas(),
            "messages": messages,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token given to --api-token",
                },
                "queryToken": {
                    "type": "httpApiKey",
                    "in": "query",
                    "name": "token",
                    "description": "the same API token as ?token=",
                },
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    """The file's text: sorted keys, indent 2, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    """File name -> the text the code generates for it."""
    return {
        OPENAPI_FILE: render(openapi_document()),
        WEBSOCKET_FILE: render(websocket_document()),
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
