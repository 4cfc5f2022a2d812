"""Secrets stay out of the logs: a gateway with debug logging, SIP TLS and an API
token from a file, asked with a wrong token (header and ``?token=``) and with the right
one, logs neither token nor any line of its private key. And an API reachable beyond
loopback without TLS says, at start, that tokens travel in clear."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.api.gateway_procs import running
from tests.tls.conftest import Pki

TOKEN = "right-token-7c1e2b9d"
WRONG = "wrong-token-5a8f3e60"


def test_debug_log_holds_no_token_and_no_key(tmp_path: Path, pki: Pki) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    files = pki.issue()
    g = Gateway(
        "S",
        tmp_path,
        transport="tls",
        tls=files,
        log_level="debug",
        extra=["--api-token-file", str(token_file), "--peer", "p"],
    )
    with running([g]):
        g.spawn()
        wrong = {"Authorization": f"Bearer {WRONG}"}
        right = {"Authorization": f"Bearer {TOKEN}"}

        def answered() -> bool:
            try:
                return httpx.get(f"{g.url}/v1/nodes", headers=wrong, timeout=1).status_code == 401
            except httpx.HTTPError:
                return False

        wait_until(answered, 20, "the gateway to refuse a wrong token")
        assert httpx.get(f"{g.url}/v1/nodes", headers=right, timeout=5).status_code == 200
        with (
            pytest.raises(InvalidStatus),
            connect(f"{g.ws_url}/v1/peers/p/subscribe?token={WRONG}"),
        ):
            pass
        with connect(f"{g.ws_url}/v1/peers/p/subscribe?token={TOKEN}") as websocket:
            websocket.recv(timeout=5)
        g.stop()
    text = g.log_text()
    assert "DEBUG" in text  # debug logging was really on
    assert TOKEN not in text and WRONG not in text
    key_lines = [
        line
        for line in Path(files.key).read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    assert key_lines and not any(line in text for line in key_lines)


def test_api_beyond_loopback_without_tls_warns(tmp_path: Path) -> None:
    g = Gateway("W", tmp_path, tokens=[TOKEN])
    g.extra = ("--http", f"0.0.0.0:{g.http_port}")  # after the harness's own --http
    with running([g]):
        g.start()
    assert "tokens and messages travel in clear" in g.log_text()


def test_api_beyond_loopback_with_tls_does_not_warn(tmp_path: Path, pki: Pki) -> None:
    g = Gateway("T", tmp_path, tokens=[TOKEN], http_tls=pki.issue("127.0.0.1"))
    g.extra = ("--http", f"0.0.0.0:{g.http_port}")
    with running([g]):
        g.start()
    assert "travel in clear" not in g.log_text()
