"""API tokens, against a real ``dmq-gateway serve`` started with ``--api-token``.

Also the two refusals of ``serve`` at start: an API reachable beyond this machine with
no token, and a non-loopback SIP address with no ``--trusted``. Both must exit with
code 2 and one sentence before anything is bound.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app import cli
from harness.gateway import Gateway, clean_env, gateway_command
from harness.ports import free_port

TOKEN = "secret-token-1"
PEER = "auth-test"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway("auth", tmp_path_factory.mktemp("auth"), tokens=[TOKEN]).start()
    try:
        response = httpx.put(
            f"{served.url}/v1/peers/{PEER}", json={}, headers=served.headers, timeout=5
        )
        assert response.status_code in (200, 201), response.text
        yield served
    finally:
        served.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"] == "Bearer"
    problem = response.json()
    assert problem["status"] == 401
    assert problem["title"] == "Unauthorized"
    assert problem["detail"]


@pytest.mark.parametrize("path", ["/v1/health", "/v1/nodes", "/v1/peers", "/metrics"])
def test_missing_token_is_401_problem(gateway: Gateway, path: str) -> None:
    assert_unauthorized(httpx.get(gateway.url + path, timeout=5))


def test_wrong_token_is_401(gateway: Gateway) -> None:
    assert_unauthorized(httpx.get(f"{gateway.url}/v1/nodes", headers=bearer("wrong-token-1")))
    # A right token under another scheme is no bearer token either.
    response = httpx.get(f"{gateway.url}/v1/nodes", headers={"Authorization": f"Basic {TOKEN}"})
    assert_unauthorized(response)


def test_writes_need_the_token_too(gateway: Gateway) -> None:
    assert_unauthorized(httpx.put(f"{gateway.url}/v1/peers/other", json={}))
    assert_unauthorized(httpx.post(f"{gateway.url}/v1/peers/{PEER}/broadcast", content=b"x"))
    assert_unauthorized(httpx.delete(f"{gateway.url}/v1/peers/{PEER}"))
    assert httpx.get(f"{gateway.url}/v1/peers/other", headers=bearer(TOKEN)).status_code == 404


def test_right_token_is_200(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.url}/v1/health", headers=bearer(TOKEN), timeout=5)
    assert response.status_code == 200
    assert response.json()["node"] == gateway.uri
    assert httpx.get(f"{gateway.url}/v1/nodes", headers=bearer(TOKEN)).status_code == 200


def subscribers(gateway: Gateway) -> int:
    response = httpx.get(f"{gateway.url}/v1/peers/{PEER}", headers=bearer(TOKEN), timeout=5)
    assert response.status_code == 200
    count: int = response.json()["subscribers"]
    return count


def assert_subscribed(gateway: Gateway, websocket: ClientConnection) -> None:
    """The handshake succeeded and the gateway counts this client as a subscriber."""
    deadline = time.monotonic() + 5
    while subscribers(gateway) < 1:
        assert time.monotonic() < deadline, "the gateway never counted the subscriber"
        time.sleep(0.02)
    websocket.ping().wait(5)  # still open


@pytest.mark.parametrize("token", [None, "wrong-token-1"])
def test_websocket_without_the_token_is_refused(gateway: Gateway, token: str | None) -> None:
    url = f"{gateway.ws_url}/v1/peers/{PEER}/subscribe"
    if token is not None:
        url += f"?token={token}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=5).close()
    assert refused.value.response.status_code == 403


def test_websocket_with_query_token(gateway: Gateway) -> None:
    url = f"{gateway.ws_url}/v1/peers/{PEER}/subscribe?token={TOKEN}"
    with connect(url, open_timeout=5) as websocket:
        assert_subscribed(gateway, websocket)


def test_websocket_with_bearer_header(gateway: Gateway) -> None:
    url = f"{gateway.ws_url}/v1/peers/{PEER}/subscribe"
    with connect(url, additional_headers=bearer(TOKEN), open_timeout=5) as websocket:
        assert_subscribed(gateway, websocket)


def test_cli_client_sends_the_token(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DMQ_API_TOKEN", raising=False)
    assert cli.main(["nodes", "--url", gateway.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmq-gateway: error: ") and "(HTTP 401)" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["nodes", "--url", gateway.url, "--token", TOKEN]) == 0
    assert gateway.uri in capsys.readouterr().out
    monkeypatch.setenv("DMQ_API_TOKEN", TOKEN)
    assert cli.main(["peers", "--url", gateway.url, "--json"]) == 0
    assert PEER in capsys.readouterr().out


# ------------------------------------------------------------------ refusals at start


def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*gateway_command(), "serve", "--state-dir", str(tmp_path / "state"), *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


def assert_refused_at_start(result: subprocess.CompletedProcess[str], mentions: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    # One sentence and nothing else: no log line, so nothing was started or bound.
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dmq-gateway: error: ")
    assert mentions in lines[0]


def test_public_http_without_a_token_is_refused(tmp_path: Path) -> None:
    port = free_port()
    # Hold the port: had serve tried to bind it, it would fail with another message.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("0.0.0.0", port))
        held.listen()
        started = time.monotonic()
        result = run_serve(
            tmp_path,
            "--http",
            f"0.0.0.0:{port}",
            "--server-address",
            f"sip:127.0.0.1:{free_port()}",
        )
    assert_refused_at_start(result, "--api-token")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "state").exists()


def test_public_sip_address_without_trusted_is_refused(tmp_path: Path) -> None:
    result = run_serve(
        tmp_path,
        "--server-address",
        "sip:192.0.2.10:5060",
        "--http",
        f"127.0.0.1:{free_port()}",
    )
    assert_refused_at_start(result, "--trusted")
    assert not (tmp_path / "state").exists()
