"""The API over HTTPS and WSS (uvicorn's own TLS), with the CLI and a WebSocket client.

Gateway H serves its API with a certificate from the test CA; gateway M also asks API
clients for a certificate from that CA (``--http-tls-ca``). The ``dmq-gateway`` client
reaches them with ``--ca`` (and ``--cert``), and refuses an unknown server cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from app import cli
from app.api.server import HardenedConfig
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


def tls_client(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks ``version`` only (older versions need OpenSSL's security
    level 0, which this client takes: it is the server that must refuse)."""
    context = ssl.create_default_context(cafile=pki.ca_path)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
        context.minimum_version = context.maximum_version = version
    return context


def test_https_refuses_tls_1_1_and_serves_tls_1_2(
    gateways: tuple[Gateway, Gateway], pki: Pki
) -> None:
    """The API's HTTPS is held to TLS 1.2 at least: a client that offers 1.1 only is
    refused by the server, while this same OpenSSL does speak 1.1 with a server that
    allows it (checked first, so that the refusal is the gateway's and not the local
    library's)."""
    h, _ = gateways
    old = ssl.TLSVersion.TLSv1_1
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = old
    leaf = pki.issue("127.0.0.1")
    permissive.load_cert_chain(leaf.cert, leaf.key)
    if not _local_handshake(permissive, tls_client(pki, old)):
        pytest.skip("this OpenSSL cannot make a TLS 1.1 handshake at all")
    # The server ends the handshake: with a protocol_version alert, or (uvloop) by
    # closing the connection; either way no TLS 1.1 session is made.
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", h.http_port), timeout=PATIENCE) as raw,
    ):
        tls_client(pki, old).wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", h.http_port), timeout=PATIENCE) as raw:
        client = tls_client(pki, ssl.TLSVersion.TLSv1_2)
        with client.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.version() == "TLSv1.2"


def _local_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    """Whether ``client`` and ``server`` complete a handshake over a socket pair."""
    left, right = socket.socketpair()
    outcome: list[bool] = []

    def serve() -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            server.wrap_socket(right, server_side=True).close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client.wrap_socket(left, server_hostname="127.0.0.1").close()
        outcome.append(True)
    except (ssl.SSLError, OSError):
        outcome.append(False)
    finally:
        left.close()
        thread.join(PATIENCE)
        right.close()
    return outcome[0]


def test_the_https_context_holds_the_modern_defaults(pki: Pki) -> None:
    """The context uvicorn builds from ``--http-tls-cert`` is hardened explicitly: the
    minimum version, no compression and no renegotiation (the last is not OpenSSL's
    default, so this fails if the hardening is ever lost)."""
    files = pki.issue("127.0.0.1")
    config = HardenedConfig(
        _empty_app, ssl_certfile=files.cert, ssl_keyfile=files.key, log_config=None
    )
    config.load()
    context = config.ssl
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION


async def _empty_app(scope: object, receive: object, send: object) -> None:
    """An ASGI application that is never called: the test loads a configuration only."""
