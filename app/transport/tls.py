"""TLS for the bus: the contexts a node listens and connects with, built once at start.

Every file is read here, when the node starts, so that an unreadable certificate, a key
that does not belong to it or a CA bundle that is not PEM stops the node with one
sentence naming the option (a :class:`ConfigError` whose ``field`` is the setting),
never later at the first handshake. The key's contents are never put in a message.

Defaults are modern: TLS 1.2 at least, no compression, no renegotiation, the
library's default cipher list. With ``verify_peer`` the listening context demands a
client certificate from the configured CA; a peer that has none fails the handshake
and never reaches the SIP layer. :func:`peer_allowed` applies the optional allow-list
of names to the certificate the handshake accepted.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.dmq.config import TlsConfig
from app.dmq.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The two contexts of a node: one to accept connections, one to open them."""

    server: ssl.SSLContext | None
    client: ssl.SSLContext
    config: TlsConfig | None


def _check_readable(path: str, field: str) -> None:
    file = Path(path)
    try:
        with file.open("rb") as handle:
            head = handle.read(65536)
    except OSError as exc:
        raise ConfigError(f"cannot read it ({exc.strerror})", field=field, value=path) from None
    if b"-----BEGIN " not in head:
        raise ConfigError("not a PEM file (no -----BEGIN line)", field=field, value=path)


def harden(context: ssl.SSLContext) -> None:
    """The modern defaults, set explicitly rather than left to the Python and OpenSSL
    in use: TLS 1.2 at least, no compression (CRIME), no renegotiation, the server's
    cipher order. The bus's contexts and the API's HTTPS context both get them."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _load_identity(context: ssl.SSLContext, config: TlsConfig) -> None:
    try:
        context.load_cert_chain(config.cert, config.key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise ConfigError(
                f"the key in {config.key!r} does not belong to this certificate",
                field="tls_cert",
                value=config.cert,
            ) from None
        if "PEM" in reason.upper() and "KEY" in reason.upper():
            raise ConfigError(
                "not a usable PEM private key (an encrypted key needs its passphrase removed)",
                field="tls_key",
                value=config.key,
            ) from None
        raise ConfigError(
            f"cannot be loaded with its key ({reason})", field="tls_cert", value=config.cert
        ) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"holds no usable CA certificate ({exc.reason or exc})", field="tls_ca", value=ca
        ) from None


def build_contexts(config: TlsConfig | None, *, listen: bool) -> TlsContexts:
    """The contexts for ``config`` (``None``: no identity of our own, servers are checked
    against the system's CAs). ``listen``: this node accepts TLS connections.

    Raises :class:`ConfigError` naming the setting for every file that cannot be read,
    is not PEM, or does not fit the others.
    """
    if config is None:
        if listen:
            raise ConfigError(
                "a TLS address needs a certificate and key (--tls-cert, --tls-key)",
                field="server_address",
            )
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        harden(client)
        return TlsContexts(None, client, None)
    _check_readable(config.cert, "tls_cert")
    _check_readable(config.key, "tls_key")
    if config.ca is not None:
        _check_readable(config.ca, "tls_ca")

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    harden(client)
    client.check_hostname = config.check_hostname
    client.verify_mode = ssl.CERT_REQUIRED
    if config.ca is not None:
        _load_ca(client, config.ca)
    else:
        client.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load_identity(client, config)  # presented when a server asks (mutual TLS)

    server: ssl.SSLContext | None = None
    if listen:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        harden(server)
        _load_identity(server, config)
        if config.verify_peer:
            assert config.ca is not None  # TlsConfig refuses verify_peer without a CA
            _load_ca(server, config.ca)
            server.verify_mode = ssl.CERT_REQUIRED
    return TlsContexts(server, client, config)


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate (``getpeercert()``) carries: subject CNs, DNS and IP
    SANs, lower-case."""
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value).lower())
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(str(value).lower())
        elif kind == "IP Address":
            try:
                names.append(str(ipaddress.ip_address(str(value).strip())))
            except ValueError:
                continue
    return names


def peer_allowed(cert: dict[str, Any] | None, allow_names: tuple[str, ...]) -> bool:
    """Whether a verified peer certificate carries a name of the allow-list (any name
    when the list is empty)."""
    if not allow_names:
        return True
    if not cert:
        return False
    allowed = {name.lower() for name in allow_names}
    return any(name in allowed for name in certificate_names(cert))
