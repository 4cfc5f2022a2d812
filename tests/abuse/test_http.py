"""The HTTP API against a real gateway with low limits and a token: slow and idle
connections are closed, large heads are 431 and large bodies 413 without being read,
no body is read before the token is checked, the documents need the token, and no
token reaches the log. A normal client keeps being served throughout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from harness.gateway import Gateway, clean_env, gateway_command
from harness.ports import free_port
from harness.waiting import wait_until
from tests.abuse.support import Probe, closed_by_peer, descriptors, rss_mb

TOKEN = "abuse-token-1"
#: The most the gateway's RSS may grow during one attack, in MB.
RSS_CEILING_MB = 40.0

LIMITS = (
    "--http-max-connections",
    "40",
    "--http-header-timeout",
    "1",
    "--http-keep-alive-timeout",
    "1",
    "--http-max-header",
    "8192",
    "--http-max-body",
    "4096",
    "--max-tcp-message",
    "65536",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway("http", tmp_path_factory.mktemp("http"), tokens=[TOKEN], extra=LIMITS).start()
    try:
        yield served
    finally:
        served.stop()


def raw(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.http_port), timeout=5)


def read_response(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def test_slowloris_connections_are_closed_after_the_header_timeout(gateway: Gateway) -> None:
    wait_until(lambda: descriptors(gateway) < 40, 10, "earlier connections closed")
    baseline = descriptors(gateway)
    with Probe(gateway) as probe:
        socks = [raw(gateway) for _ in range(25)]
        try:
            for sock in socks:
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
            started = time.monotonic()
            assert all(closed_by_peer(s, 5) for s in socks)
            assert time.monotonic() - started < 5
        finally:
            for sock in socks:
                sock.close()
    assert probe.latencies and not probe.failures, probe.failures
    wait_until(lambda: descriptors(gateway) <= baseline + 2, 10, "descriptors back")


def test_connections_over_the_cap_are_closed_on_accept(gateway: Gateway) -> None:
    wait_until(lambda: descriptors(gateway) < 40, 10, "earlier connections closed")
    baseline = descriptors(gateway)
    socks = [raw(gateway) for _ in range(100)]
    try:
        time.sleep(0.3)
        # At most 40 are held (each a descriptor); the rest were closed at once.
        assert descriptors(gateway) <= baseline + 40
    finally:
        for sock in socks:
            sock.close()
    # Once the flood is gone (the header time-out frees the rest), it serves again.
    wait_until(lambda: gateway.health() is not None, 10, "served again")


def test_an_oversized_head_is_431_before_it_is_all_sent(gateway: Gateway) -> None:
    before = rss_mb(gateway)
    with raw(gateway) as sock:
        sock.sendall(b"GET /v1/health?" + b"q" * 20_000)
        response = read_response(sock)
        assert response.startswith(b"HTTP/1.1 431 "), response[:100]
        # A header line of 5 MB, sent after the refusal, is never taken in.
        with pytest.raises(OSError):
            for _ in range(100):
                sock.sendall(b"X-Big: " + b"h" * 50_000)
                time.sleep(0.01)
    assert rss_mb(gateway) - before < RSS_CEILING_MB


def test_no_body_is_read_before_the_token_is_checked(gateway: Gateway) -> None:
    # 150 MB announced, nothing sent: the 401 comes on the headers alone.
    with raw(gateway) as sock:
        sock.sendall(
            b"PUT /v1/peers/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 150000000\r\n\r\n"
        )
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 401 "), response[:200]
    assert b"www-authenticate: Bearer" in response


def test_a_body_larger_than_its_route_takes_is_413_on_its_length(gateway: Gateway) -> None:
    for path, size in (("/v1/peers/x/broadcast", 200_000_000), ("/v1/peers/x", 5_000)):
        with raw(gateway) as sock:
            sock.sendall(
                f"{'POST' if 'broadcast' in path else 'PUT'} {path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
            )
            response = read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 "), (path, response[:200])


def test_a_streamed_body_is_refused_as_it_exceeds_the_limit(gateway: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10_000):  # 640 MB if it were all read
            yield b"c" * 65_536

    start = gateway.log_size()
    response = httpx.post(
        f"{gateway.url}/v1/peers/x/broadcast",
        content=chunks(),
        headers={**gateway.headers, "content-type": "text/plain"},
        timeout=10,
    )
    assert response.status_code == 413, response.text
    assert "65536" in response.json()["detail"]
    time.sleep(0.3)  # the route ends just after the 413 goes out
    assert "Traceback" not in gateway.log_text(start)  # its stop is no error


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/asyncapi.json"])
def test_the_documents_need_the_token(gateway: Gateway, path: str) -> None:
    assert httpx.get(gateway.url + path, timeout=5).status_code == 401
    assert httpx.get(gateway.url + path, headers=gateway.headers, timeout=5).status_code == 200


def test_a_websocket_token_never_reaches_the_log(gateway: Gateway) -> None:
    httpx.put(f"{gateway.url}/v1/peers/logged", json={}, headers=gateway.headers, timeout=5)
    start = gateway.log_size()
    with ws_connect(f"{gateway.ws_url}/v1/peers/logged/subscribe?token={TOKEN}") as ws:
        assert '"subscribed"' in str(ws.recv(timeout=5))
    wait_until(lambda: "WebSocket" in gateway.log_text(start), 5, "the access line")
    assert TOKEN not in gateway.log_text(start)
    assert "token=***" in gateway.log_text(start)


def test_api_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# API tokens\nfile-token-1\n\nfile-token-2\n")
    os.chmod(token_file, 0o600)
    gateway = Gateway(
        "token-file", tmp_path, tokens=(), extra=("--api-token-file", str(token_file))
    )
    gateway.spawn()
    try:
        url = f"{gateway.url}/v1/health"
        wait_until(lambda: _status(url) == 401, 20, "the gateway up, asking for a token")
        for token in ("file-token-1", "file-token-2"):
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(url, headers=headers, timeout=5).status_code == 200
        assert not any("file-token" in arg for arg in gateway.args)  # not in `ps`
    finally:
        gateway.stop()


def test_a_token_file_every_user_may_read_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("file-token-1\n")
    os.chmod(token_file, 0o644)
    result = subprocess.run(
        [
            *gateway_command(),
            "serve",
            "--http",
            f"127.0.0.1:{free_port()}",
            "--server-address",
            f"sip:127.0.0.1:{free_port()}",
            "--api-token-file",
            str(token_file),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dmq-gateway: error: --api-token-file {str(token_file)!r}: every user of this "
        f"machine may read it (mode 0644); make it private: chmod o-rwx {token_file}"
    )


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None
