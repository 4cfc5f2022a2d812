"""The committed API documents in openapi/ are what the code generates, and complete."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest

from app.api import openapi_export
from app.api.routes import subscribe
from app.gateway.frames import ErrorFrame, GapFrame, MessageFrame, ReplyFrame, SubscribedFrame

OPENAPI_DIR = Path(__file__).resolve().parents[2] / "openapi"

#: Every HTTP operation of API v1, with the operation id clients generate code from.
#: Changing an id breaks generated clients: do it on purpose, in a new API version.
OPERATIONS = {
    ("get", "/v1/health"): "get_health",
    ("get", "/v1/nodes"): "list_nodes",
    ("post", "/v1/nodes"): "add_node",
    ("delete", "/v1/nodes/{uri}"): "remove_node",
    ("get", "/v1/peers"): "list_peers",
    ("get", "/v1/peers/{peer_id}"): "get_peer",
    ("put", "/v1/peers/{peer_id}"): "put_peer",
    ("delete", "/v1/peers/{peer_id}"): "delete_peer",
    ("post", "/v1/peers/{peer_id}/broadcast"): "broadcast",
    ("post", "/v1/peers/{peer_id}/send"): "send",
    ("post", "/v1/peers/{peer_id}/broadcast/batch"): "broadcast_batch",
    ("post", "/v1/peers/{peer_id}/send/batch"): "send_batch",
    ("get", "/metrics"): "get_metrics",
    ("get", "/v1/htable"): "htable_tables",
    ("get", "/v1/htable/{table}"): "htable_table",
    ("get", "/v1/htable/{table}/{key}"): "htable_get",
    ("put", "/v1/htable/{table}/{key}"): "htable_set",
    ("delete", "/v1/htable/{table}/{key}"): "htable_delete",
    ("post", "/v1/htable/{table}/delete"): "htable_delete_matching",
    ("get", "/v1/registrations"): "registrations_list",
    ("get", "/v1/registrations/{aor}"): "registrations_aor",
    ("get", "/v1/dialogs"): "dialogs_list",
    ("get", "/v1/dialogs/{dialog_id}"): "dialogs_get",
}

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def committed(name: str) -> dict[str, Any]:
    path = OPENAPI_DIR / name
    assert path.exists(), f"{path} is missing: run `make openapi` and commit it"
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


@pytest.mark.parametrize("name", [openapi_export.OPENAPI_FILE, openapi_export.WEBSOCKET_FILE])
def test_committed_document_is_what_the_code_generates(name: str) -> None:
    path = OPENAPI_DIR / name
    expected = openapi_export.generated()[name]
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    f"openapi/{name} (committed)",
                    f"openapi/{name} (generated)",
                )
            )[:60]
        )
        pytest.fail(
            f"openapi/{name} is out of date with the code: run `make openapi` and commit "
            f"the result.\n{diff}",
            pytrace=False,
        )


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


@pytest.mark.parametrize("source", ["committed", "generated"])
def test_every_operation_is_documented_with_a_stable_id(source: str) -> None:
    document = (
        committed(openapi_export.OPENAPI_FILE)
        if source == "committed"
        else openapi_export.openapi_document()
    )
    found = {key: op.get("operationId") for key, op in operations(document).items()}
    assert found == OPERATIONS


def test_query_parameters_of_broadcast_and_send() -> None:
    ops = operations(committed(openapi_export.OPENAPI_FILE))

    def query(key: tuple[str, str]) -> dict[str, bool]:
        return {p["name"]: p["required"] for p in ops[key]["parameters"] if p["in"] == "query"}

    assert query(("post", "/v1/peers/{peer_id}/broadcast")) == {"wait": False, "timeout": False}
    assert query(("post", "/v1/peers/{peer_id}/send")) == {
        "node": True,
        "wait": False,
        "timeout": False,
    }


def test_errors_are_documented_as_problem_json() -> None:
    document = committed(openapi_export.OPENAPI_FILE)
    schemas = document["components"]["schemas"]
    assert "Problem" in schemas
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body is never sent
    for (method, path), operation in operations(document).items():
        responses = operation["responses"]
        assert "401" in responses, f"{method} {path} does not document 401"
        for code, response in responses.items():
            if int(code) >= 400:
                assert list(response["content"]) == ["application/problem+json"], (
                    method,
                    path,
                    code,
                )


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_websocket_document_describes_frames_close_codes_and_query() -> None:
    document = committed(openapi_export.WEBSOCKET_FILE)
    assert document["asyncapi"].startswith("3.")
    for ref in refs(document):
        resolve(document, ref)  # every reference points somewhere
    channel = document["channels"]["peerSubscribe"]
    assert channel["address"] == "/v1/peers/{peer_id}/subscribe"
    assert set(channel["parameters"]) == {"peer_id"}
    query = channel["bindings"]["ws"]["query"]["properties"]
    assert set(query) == {"since", "epoch", "token"}
    codes = {entry["code"] for entry in channel["x-close-codes"]}
    assert codes == {1008, 1009, 1012, 4004, 4008} == set(subscribe.CLOSE_CODES)

    def payloads(operation: str) -> set[str]:
        names = set()
        for message in document["operations"][operation]["messages"]:
            payload = resolve(document, resolve(document, message["$ref"])["$ref"])["payload"]
            names.add(payload["$ref"].rsplit("/", 1)[1])
        return names

    sent = document["operations"]["streamPeerMessages"]
    received = document["operations"]["receiveReplies"]
    assert (sent["action"], received["action"]) == ("send", "receive")
    assert payloads("streamPeerMessages") == {
        SubscribedFrame.__name__,
        MessageFrame.__name__,
        GapFrame.__name__,
        ErrorFrame.__name__,
    }
    assert payloads("receiveReplies") == {ReplyFrame.__name__}
    schemas = document["components"]["schemas"]
    assert "from" in schemas["MessageFrame"]["properties"]  # the alias, not from_
    assert schemas["ReplyFrame"]["additionalProperties"] is False


def test_check_flag_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert openapi_export.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "make openapi" in capsys.readouterr().err
    assert openapi_export.main(["--dir", str(tmp_path)]) == 0
    assert openapi_export.main(["--check", "--dir", str(tmp_path)]) == 0
    stale = tmp_path / openapi_export.WEBSOCKET_FILE
    stale.write_text(stale.read_text() + " ", encoding="utf-8")
    capsys.readouterr()
    assert openapi_export.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert openapi_export.WEBSOCKET_FILE in err and openapi_export.OPENAPI_FILE not in err


def test_every_reference_of_the_openapi_document_resolves() -> None:
    """A dangling ``$ref`` makes ReDoc refuse the whole document (seen: a body schema
    named in a route's raw request body but never added to the components)."""
    document = openapi_export.openapi_document()
    for ref in refs(document):
        assert resolve(document, ref) is not None, f"{ref} does not resolve"
