"""Schemathesis: openapi/openapi.json against a real ``dmq-gateway serve``.

Every operation of the committed document gets generated requests (valid and invalid)
and each response must be no server error, and have a documented status code, content
type and body schema. The gateway under test (no API token, so everything is
reachable) has a second real gateway on its bus, so broadcasts and sends get real
answers. A SIP URI the generator comes up with (a node to add, the node to send to)
is pointed at that second gateway, so nothing is ever sent beyond the two.

Generation is deterministic (the same cases every run) and bounded: 30 generated
examples per operation, besides schemathesis' own example and coverage cases.
``DMQ_SCHEMATHESIS_RANDOM=1`` draws new cases, ``DMQ_SCHEMATHESIS_EXAMPLES=N`` more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.dmq.sip import SipUri
from harness.gateway import Gateway

OPENAPI_JSON = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
PEERS = ("htable", "alpha")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "max-examples": int(os.environ.get("DMQ_SCHEMATHESIS_EXAMPLES", "30")),
            "database": "none",
            "deterministic": os.environ.get("DMQ_SCHEMATHESIS_RANDOM") != "1",
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_path(OPENAPI_JSON, config=CONFIG)


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    """A batch as NDJSON (documented as a string: one message object per line)."""
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


@dataclass(frozen=True)
class Bus:
    under_test: Gateway
    other: Gateway


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    under_test = Gateway("under-test", workdir)
    other = Gateway("other", workdir, notify=[under_test])
    try:
        under_test.start()
        other.start()
        for gateway in (under_test, other):
            ensure_peers(gateway)
        yield Bus(under_test, other)
    finally:
        other.stop()
        under_test.stop()


def ensure_peers(gateway: Gateway) -> None:
    for peer in PEERS:
        response = httpx.put(f"{gateway.url}/v1/peers/{peer}", json={}, timeout=5)
        assert response.status_code in (200, 201), response.text


def confined(text: Any, bus: Bus) -> Any:
    """A SIP URI pointed at the other gateway of the bus; anything else unchanged."""
    if not isinstance(text, str):
        return text
    try:
        uri = SipUri.parse(text)
    except ValueError:
        return text
    other = SipUri.parse(bus.other.uri)
    return str(SipUri(other.host, other.port, uri.user, uri.params, uri.scheme))


@schema.parametrize()
def test_api_conforms_to_openapi_json(case: schemathesis.Case[Any], bus: Bus) -> None:
    if isinstance(case.body, dict) and "uri" in case.body:
        case.body["uri"] = confined(case.body["uri"], bus)
    if case.query and "node" in case.query:
        case.query["node"] = confined(case.query["node"], bus)
    if case.path_parameters and isinstance(case.path_parameters.get("uri"), str):
        # Path parameters are held URL-encoded.
        uri = confined(unquote(case.path_parameters["uri"]), bus)
        case.path_parameters["uri"] = quote(str(uri), safe="")
    if case.method == "GET" and case.path_parameters:
        ensure_peers(bus.under_test)  # a DELETE case may have removed them
    case.call_and_validate(base_url=bus.under_test.url, checks=CHECKS, timeout=30)


#: Node URIs that once reached the resolver or the socket layer: a 500 (a host with an
#: empty or overlong label), or a 409 that still added a node no datagram could reach.
UNUSABLE_NODE_URIS = [
    "sip:a..b:5060",
    "sip:" + "a" * 64 + ".example:5060",
    "sip:\x00abc:5060",
    "sip:a b:5060",
    "sip:\u00e9t\u00e9.example:5060",
]


@pytest.mark.parametrize("uri", UNUSABLE_NODE_URIS)
def test_unusable_node_uris_are_422(bus: Bus, uri: str) -> None:
    url = bus.under_test.url
    responses = [
        httpx.post(f"{url}/v1/nodes", json={"uri": uri}, timeout=10),
        httpx.delete(f"{url}/v1/nodes/{quote(uri, safe='')}", timeout=10),
        httpx.post(f"{url}/v1/peers/htable/send", params={"node": uri}, content=b"x", timeout=10),
    ]
    for response in responses:
        assert response.status_code == 422, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"].startswith("uri: ")
    nodes = httpx.get(f"{url}/v1/nodes", timeout=10).json()
    assert {node["uri"] for node in nodes} == {bus.under_test.uri, bus.other.uri}


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("sip:name.invalid:5060", "does not resolve"),  # RFC 6761: never resolves
        ("sip:[::1]:5062", "listens on IPv4 only"),
    ],
)
def test_a_node_the_gateway_cannot_reach_is_not_added(bus: Bus, uri: str, why: str) -> None:
    response = httpx.post(f"{bus.under_test.url}/v1/nodes", json={"uri": uri}, timeout=30)
    assert response.status_code == 422, response.text
    assert why in response.json()["detail"]
    nodes = httpx.get(f"{bus.under_test.url}/v1/nodes", timeout=10).json()
    assert uri not in {node["uri"] for node in nodes}
