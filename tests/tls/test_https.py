"""The API over HTTPS and WSS (uvicorn's own TLS), with the CLI and a WebSocket client.

Gateway H serves its API with a certificate from the test CA; gateway M also asks API
clients for a certificate from that CA (``--http-tls-ca``). The ``dmq-gateway`` client
reaches them with ``--ca`` (and ``--cert``), and refuses an unknown server cleanly.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from app import cli
from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki

PATIENCE = 15.0
TOKEN = "https-test-token"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DMQ_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[Gateway, Gateway]]:
    workdir = tmp_path_factory.mktemp("https")
    h = Gateway("H", workdir, http_tls=pki.issue("127.0.0.1"), extra=["--peer", "secure"])
    m = Gateway(
        "M",
        workdir,
        http_tls=pki.issue("127.0.0.1"),
        tokens=[TOKEN],
        extra=["--http-tls-ca", pki.ca_path, "--public-health"],
    )
    with running([h, m]):
        h.start()
        # M's health check needs a client certificate: the harness has none, so M is
        # waited for through a client that has one.
        m.spawn()
        client_files = pki.issue("api-client")
        context = ssl.create_default_context(cafile=pki.ca_path)
        context.load_cert_chain(client_files.cert, client_files.key)

        def m_up() -> bool:
            try:
                return httpx.get(f"{m.url}/v1/health", verify=context, timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_until(m_up, PATIENCE, "M to answer over HTTPS with a client certificate")
        yield h, m


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_over_https_with_ca(
    gateways: tuple[Gateway, Gateway], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    h, _ = gateways
    assert h.url.startswith("https://")
    code, out, err = run(capsys, "nodes", "--url", h.url, "--ca", pki.ca_path, "--json")
    assert (code, err) == (0, "")
    assert [node["uri"] for node in json.loads(out)] == [h.uri]


def test_cli_refuses_a_server_it_cannot_verify(
    gateways: tuple[Gateway, Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    h, _ = gateways
    code, out, err = run(capsys, "nodes", "--url", h.url)  # the system's CAs only
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err


def test_cli_ca_that_cannot_be_read(
    gateways: tuple[Gateway, Gateway], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    h, _ = gateways
    missing = str(tmp_path / "nope.pem")
    code, _, err = run(capsys, "nodes", "--url", h.url, "--ca", missing)
    assert code == 1
    assert err.startswith(f"dmq-gateway: error: --ca '{missing}': cannot load it"), err


def test_wss_subscription_with_a_websocket_client_and_the_cli(
    gateways: tuple[Gateway, Gateway], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    h, _ = gateways
    g = Gateway("G", h.state_dir.parent, notify=[h])
    with running([g]):
        g.start()
        wait_until(lambda: (g.health() or {}).get("active_nodes") == 1, PATIENCE, "G to join H")
        subscribe_and_receive(h, g, pki, capsys)


def subscribe_and_receive(
    h: Gateway, g: Gateway, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    context = ssl.create_default_context(cafile=pki.ca_path)
    with connect(f"{h.ws_url}/v1/peers/secure/subscribe", ssl=context) as websocket:
        first = json.loads(websocket.recv(timeout=PATIENCE))
        assert first["type"] == "subscribed"
        # G, a plain gateway on H's bus, sends to H's peer over the bus.
        code, _, err = run(
            capsys, "send", "secure", h.uri, "--url", g.url, "--data", '{"over": "wss"}'
        )
        assert code == 0, err
        frame = json.loads(websocket.recv(timeout=PATIENCE))
        assert frame["type"] == "message" and json.loads(frame["body"]) == {"over": "wss"}
    code, out, err = run(
        capsys,
        *("subscribe", "secure", "--since", "0", "--count", "1", "--json"),
        *("--url", h.url, "--ca", pki.ca_path),
    )
    assert code == 0, err
    frames = [json.loads(line) for line in out.splitlines()]
    assert frames[0]["type"] == "subscribed"
    assert frames[1]["type"] == "message"


def test_client_certificate_required_by_http_tls_ca(
    gateways: tuple[Gateway, Gateway],
    pki: Pki,
    rogue_pki: Pki,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    _, m = gateways
    with dump_logs_on_failure(request, lambda: [m]):
        args = ("nodes", "--url", m.url, "--ca", pki.ca_path, "--token", TOKEN)
        # Refused in the handshake: the client says it could not talk to the gateway.
        code, _, err = run(capsys, *args)
        assert code == 1 and err.count("\n") == 1 and m.url in err, err
        code, _, err = run(capsys, *args, "--cert", rogue_pki.combined(rogue_pki.issue("x")))
        assert code == 1 and err.count("\n") == 1 and m.url in err, err
        good = pki.combined(pki.issue("api-client"))
        code, out, err = run(capsys, *args, "--cert", good, "--json")
        assert (code, err) == (0, "")
        assert [node["uri"] for node in json.loads(out)] == [m.uri]
