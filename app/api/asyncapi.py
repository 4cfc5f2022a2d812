"""The AsyncAPI 3.0 document of the WebSocket ``GET /v1/peers/{peer_id}/subscribe``.

Generated from the frame models the gateway builds its frames with
(:mod:`app.gateway.frames`), the endpoint's close codes and query parameters; served at
``/asyncapi.json`` and written to ``openapi/websocket.json`` by ``make openapi``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app import __version__
from app.api.routes import subscribe
from app.api.routes.peers import PEER_ID_DESCRIPTION
from app.gateway.frames import (
    AckFrame,
    ErrorFrame,
    GapFrame,
    MessageFrame,
    PublishErrorFrame,
    PublishFrame,
    ReplyFrame,
    SubscribedFrame,
)

#: The frames the server sends, with their message names in the AsyncAPI document.
SERVER_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("subscribed", SubscribedFrame),
    ("message", MessageFrame),
    ("gap", GapFrame),
    ("error", ErrorFrame),
)
#: The frames a client sends.
CLIENT_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (("reply", ReplyFrame),)

CHANNEL = "peerSubscribe"

#: The publishing WebSocket's frames (``GET /v1/peers/{peer_id}/publish``).
PUBLISH_SERVER_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("ack", AckFrame),
    ("publishError", PublishErrorFrame),
)
PUBLISH_CLIENT_FRAMES: tuple[tuple[str, type[BaseModel]], ...] = (("publish", PublishFrame),)
PUBLISH_CHANNEL = "peerPublish"


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _frame_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation")
        for _, model in SERVER_FRAMES
        + CLIENT_FRAMES
        + PUBLISH_SERVER_FRAMES
        + PUBLISH_CLIENT_FRAMES
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


def asyncapi_document() -> dict[str, Any]:
    """An AsyncAPI 3.0 document of ``GET /v1/peers/{peer_id}/subscribe``.

    AsyncAPI describes the application's side: the gateway *sends* message, gap and
    error frames and *receives* reply frames.
    """
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
    document = _subscribe_document(close_text, close_codes, messages, channel_messages)
    _add_publish(document)
    _add_changes(document)
    return document


def _add_changes(document: dict[str, Any]) -> None:
    """The Kamailio mirrors' change streams (``GET .../changes``): the subscribe path's
    subscribed and gap frames, then change frames; same query, same resume rules."""
    from app.kamailio import ws
    from app.kamailio.frames import ChangeFrame

    _, top = models_json_schema(
        [(ChangeFrame, "validation")], ref_template="#/components/schemas/{model}"
    )
    document["components"]["schemas"].update(top.get("$defs", {}))
    messages = document["components"]["messages"]
    messages["change"] = _message("change", ChangeFrame, "Gateway to client")
    names = ("subscribed", "gap", "change", "error")
    close_codes = [
        {"code": code, "meaning": meaning} for code, meaning in sorted(ws.CLOSE_CODES.items())
    ]
    for channel, (address, title, parameters) in ws.CHANGE_CHANNELS.items():
        document["channels"][channel] = {
            "address": address,
            "title": title,
            "description": (
                "Stream the changes of a mirror of Kamailio's state, as the gateway "
                "applies them to its replica: a subscribed frame first (peer is the "
                "stream's name), a gap frame when a resume asks for more than the stream "
                "holds (it keeps the latest changes, in memory: every start of the gateway "
                "is a new epoch), then one change frame per change. since, epoch and "
                "token work as on the subscribe path. The client sends nothing (an error "
                "frame answers anything it sends)."
            ),
            "parameters": {name: {"description": text} for name, text in parameters.items()},
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
            "bindings": {
                "ws": {
                    "method": "GET",
                    "query": {
                        "type": "object",
                        "properties": dict(subscribe.QUERY_PARAMETERS),
                        "additionalProperties": False,
                    },
                    "bindingVersion": "0.1.0",
                }
            },
            "x-close-codes": close_codes,
        }
        document["operations"][f"stream{channel[0].upper()}{channel[1:]}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "title": title,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names],
        }


def _add_publish(document: dict[str, Any]) -> None:
    """The publishing WebSocket: publish frames in, ack (or error) frames out, in order."""
    from app.api.routes import publish

    messages = document["components"]["messages"]
    names = []
    for name, model in PUBLISH_SERVER_FRAMES:
        messages[name] = _message(name, model, "Gateway to client")
        names.append(name)
    for name, model in PUBLISH_CLIENT_FRAMES:
        messages[name] = _message(name, model, "Client to gateway")
        names.append(name)
    channel_ref = {"$ref": f"#/channels/{PUBLISH_CHANNEL}"}
    document["channels"][PUBLISH_CHANNEL] = {
        "address": publish.PUBLISH_PATH,
        "title": "publish to a peer",
        "description": (
            "Broadcast messages to a peer (or, with ?node=URI, send them to that node) over "
            "one connection: one publish frame each, acknowledged in the order sent by an "
            "ack frame with every node's result (as POST broadcast?wait=true), or an error "
            "frame with the status the same refusal gets over HTTP. The messages leave in "
            f"the order sent. With {publish.MAX_UNACKED} publishes unacknowledged the "
            "gateway stops reading the connection until acks go out (TCP slows the "
            "publisher). The handshake is refused (HTTP 403) without a valid API token "
            "when the gateway has any; an unknown ?node closes with 1008."
        ),
        "parameters": {"peer_id": {"description": PEER_ID_DESCRIPTION}},
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
        "bindings": {
            "ws": {
                "method": "GET",
                "query": {
                    "type": "object",
                    "properties": {
                        "node": {
                            "type": "string",
                            "description": "send every message to this node (its SIP URI) "
                            "instead of broadcasting",
                        },
                        "token": dict(subscribe.QUERY_PARAMETERS["token"]),
                    },
                    "additionalProperties": False,
                },
                "bindingVersion": "0.1.0",
            }
        },
    }
    document["operations"]["acknowledgePublishes"] = {
        "action": "send",
        "channel": channel_ref,
        "title": "acknowledge each publish, in order",
        "messages": [
            {"$ref": f"#/channels/{PUBLISH_CHANNEL}/messages/{name}"}
            for name, _ in PUBLISH_SERVER_FRAMES
        ],
    }
    document["operations"]["receivePublishes"] = {
        "action": "receive",
        "channel": channel_ref,
        "title": "publish a message to the bus",
        "messages": [
            {"$ref": f"#/channels/{PUBLISH_CHANNEL}/messages/{name}"}
            for name, _ in PUBLISH_CLIENT_FRAMES
        ],
    }


def _subscribe_document(
    close_text: str,
    close_codes: list[dict[str, Any]],
    messages: dict[str, Any],
    channel_messages: dict[str, Any],
) -> dict[str, Any]:
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
                "parameters": {"peer_id": {"description": PEER_ID_DESCRIPTION}},
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
                "summary": "a subscribed frame first (where the stream starts); a gap frame "
                "next when a resume asks for more than the history holds; then message "
                "frames as KDMQ requests arrive for the peer; an error frame for a client "
                "frame that was refused (not well formed, or a reply that came after its "
                "message was answered)",
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
