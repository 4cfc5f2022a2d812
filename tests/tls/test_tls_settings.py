"""The TLS options of ``dmq-gateway serve``: every unreadable, non-PEM or mismatched
file, and every option missing its partner, stops the start with one sentence naming
the option (exit 2); a private key's contents never appear in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import cli
from app.dmq.config import TlsConfig
from tests.tls.conftest import Pki

TLS_ADDRESS = "sip:127.0.0.1:5999;transport=tls"
SECRET = "PRIVATE-KEY-MATERIAL-4f9a"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("DMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))


def error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = cli.main(["serve", *argv])
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.startswith("dmq-gateway: error: ") and err.count("\n") == 1, err
    return err.removeprefix("dmq-gateway: error: ").rstrip("\n")


def identity(pki: Pki) -> list[str]:
    files = pki.issue()
    return ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]


def test_a_valid_tls_configuration(pki: Pki) -> None:
    files = pki.issue()
    config = cli.settings_from_args(
        cli.build_parser().parse_args(
            [
                "serve",
                "--server-address",
                TLS_ADDRESS,
                *("--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca),
                "--tls-verify-peer",
                *("--tls-allow-name", "a.bus", "--tls-allow-name", "b.bus"),
            ]
        )
    )
    assert config.node.tls == TlsConfig(
        cert=files.cert,
        key=files.key,
        ca=files.ca,
        verify_peer=True,
        allow_names=("a.bus", "b.bus"),
    )
    assert config.node.server_address.transport == "tls"


def test_tls_address_without_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    message = error(capsys, "--server-address", TLS_ADDRESS)
    assert message == (
        f"--server-address {TLS_ADDRESS}: a TLS address needs --tls-cert and --tls-key"
    )


def test_certificate_without_key(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    files = pki.issue()
    message = error(capsys, "--server-address", TLS_ADDRESS, "--tls-cert", files.cert)
    assert message == "--tls-key is missing: TLS options need both --tls-cert and --tls-key"


def test_unreadable_certificate(
    capsys: pytest.CaptureFixture[str], pki: Pki, tmp_path: Path
) -> None:
    files = pki.issue()
    missing = str(tmp_path / "nowhere.pem")
    message = error(
        capsys, "--server-address", TLS_ADDRESS, "--tls-cert", missing, "--tls-key", files.key
    )
    assert message == f"--tls-cert '{missing}': cannot read it (No such file or directory)"


def test_key_that_is_not_pem_is_not_shown(
    capsys: pytest.CaptureFixture[str], pki: Pki, tmp_path: Path
) -> None:
    files = pki.issue()
    key = tmp_path / "key.txt"
    key.write_text(SECRET)
    message = error(
        capsys, "--server-address", TLS_ADDRESS, "--tls-cert", files.cert, "--tls-key", str(key)
    )
    assert message == f"--tls-key '{key}': not a PEM file (no -----BEGIN line)"
    assert SECRET not in message


def test_key_of_another_certificate(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    one, other = pki.issue(), pki.issue()
    message = error(
        capsys, "--server-address", TLS_ADDRESS, "--tls-cert", one.cert, "--tls-key", other.key
    )
    assert message == (
        f"--tls-cert '{one.cert}': the key in '{other.key}' does not belong to this certificate"
    )


def test_ca_that_is_not_pem(capsys: pytest.CaptureFixture[str], pki: Pki, tmp_path: Path) -> None:
    files = pki.issue()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    message = error(
        capsys,
        *("--server-address", TLS_ADDRESS, "--tls-cert", files.cert, "--tls-key", files.key),
        *("--tls-ca", str(ca)),
    )
    assert message.startswith(f"--tls-ca '{ca}': holds no usable CA certificate (")


def test_verify_peer_needs_a_ca(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    files = pki.issue()
    message = error(
        capsys,
        *("--server-address", TLS_ADDRESS, "--tls-cert", files.cert, "--tls-key", files.key),
        "--tls-verify-peer",
    )
    assert message == "--tls-ca: verifying peers needs the CA their certificates come from"


def test_allow_name_needs_verify_peer(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    message = error(
        capsys, "--server-address", TLS_ADDRESS, *identity(pki), "--tls-allow-name", "a.bus"
    )
    assert message == "--tls-allow-name: an allow-list of names needs peer verification on"


def test_verify_peer_needs_a_tls_address(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    message = error(capsys, *identity(pki), "--tls-verify-peer")
    assert message == (
        "--tls-verify-peer: this node does not listen for TLS; give --server-address a "
        ";transport=tls address"
    )


def test_handshake_timeout_must_be_positive(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    message = error(
        capsys, "--server-address", TLS_ADDRESS, *identity(pki), "--tls-handshake-timeout", "0"
    )
    assert message == "--tls-handshake-timeout 0: must be a positive, finite number of seconds"


def test_environment_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki: Pki
) -> None:
    files = pki.issue()
    missing = str(tmp_path / "gone.pem")
    monkeypatch.setenv("DMQ_SERVER_ADDRESS", TLS_ADDRESS)
    monkeypatch.setenv("DMQ_TLS_CERT", missing)
    monkeypatch.setenv("DMQ_TLS_KEY", files.key)
    message = error(capsys)
    assert message == f"DMQ_TLS_CERT '{missing}': cannot read it (No such file or directory)"


def test_http_certificate_without_key(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    files = pki.issue()
    message = error(capsys, "--http-tls-cert", files.cert)
    assert message == (
        "--http-tls-key is missing: HTTPS needs both --http-tls-cert and --http-tls-key"
    )


def test_http_client_ca_needs_https(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    message = error(capsys, "--http-tls-ca", pki.ca_path)
    assert message == (
        "--http-tls-ca: client certificates need HTTPS; give --http-tls-cert and --http-tls-key"
    )


def test_http_key_of_another_certificate(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    one, other = pki.issue(), pki.issue()
    message = error(capsys, "--http-tls-cert", one.cert, "--http-tls-key", other.key)
    assert message == (
        f"--http-tls-cert '{one.cert}': the key in '{other.key}' does not belong to this "
        "certificate"
    )
