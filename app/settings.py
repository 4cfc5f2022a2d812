"""The options of ``dmq-gateway serve``, in one typed model.

:class:`ServeSettings` is the single table of options: each field is one option, with
its type, its default and its help text. The same model is fed by the command line
(``--ping-interval``), the environment (``DMQ_PING_INTERVAL``) and the defaults, in
that order of precedence; the command line parser is generated from it
(:func:`add_arguments`), so an option is declared once. Repeatable options take
several values in the environment, separated by commas or spaces.

:meth:`ServeSettings.gateway_config` then checks what only makes sense together (a
non-loopback address needs ``--trusted``, a peer can't be the notification channel...)
and builds the :class:`~app.gateway.config.GatewayConfig` and its
:class:`~app.dmq.config.NodeConfig`. Every problem is one :class:`ConfigError` sentence
naming the option as the user gave it: ``--ping-interval 0.5: ...`` when it came from
the command line, ``DMQ_PING_INTERVAL 0.5: ...`` when it came from the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.api.limits import MIN_WS_QUEUE_BYTES, ApiLimits, HttpTls, ServeLimits
from app.dmq.config import (
    LOOPBACK_NETWORKS,
    IPNetwork,
    NodeConfig,
    TlsConfig,
    is_valid_peer_id,
)
from app.dmq.errors import ConfigError
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.gateway.config import (
    DEFAULT_BUNDLE_MAX_BYTES,
    DEFAULT_BUNDLE_MAX_MESSAGES,
    GatewayConfig,
)
from app.gateway.reorder import DEFAULT_MAX_HELD
from app.gateway.store import HistoryStore, HistorySync
from app.transport.limits import TransportLimits
from app.transport.tls import build_contexts

log = logging.getLogger("dmq")

ENV_PREFIX = "DMQ_"


@dataclass(frozen=True, slots=True)
class Option:
    """How a setting looks on the command line, beyond its name and type."""

    #: The placeholder in ``--help`` (``--t1 SECONDS``); none for on/off options.
    metavar: str = ""
    #: The default in words, where the value itself would not say it (``64*T1``).
    default_text: str | None = None


#: A repeatable option: the command line repeats it, the environment lists the values
#: separated by commas or spaces (not JSON, hence NoDecode).
Repeated = Annotated[list[str], NoDecode]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
HistoryStoreName = Literal["sqlite", "memory"]
HistorySyncName = Literal["normal", "full"]


class ServeSettings(BaseSettings):
    """Every option of ``dmq-gateway serve``; the field name is the option's name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # An empty DMQ_X means "not set", as a shell's `DMQ_X= dmq-gateway serve` does.
        env_ignore_empty=True,
        # nan passes every `<` check; refuse it (and inf) where it is typed.
        allow_inf_nan=False,
        extra="forbid",
    )

    server_address: Annotated[
        str,
        Option("URI"),
        Field(
            description="SIP URI this node listens on (UDP, and TCP or TLS) and announces; "
            ";transport=tcp makes the bus use TCP to reach it, ;transport=tls TLS (with "
            "--tls-cert and --tls-key); the port must be explicit",
        ),
    ] = "sip:127.0.0.1:5060"
    notification_address: Annotated[
        Repeated,
        Option("URI"),
        Field(description="SIP URI of a node to join the bus through (repeatable)"),
    ] = []
    notification_channel: Annotated[
        str,
        Option("NAME"),
        Field(description="peer id that carries membership messages"),
    ] = "notification_peer"
    multi_notify: Annotated[
        bool,
        Option(),
        Field(
            description="resolve the first notification address by DNS SRV, then A, then "
            "AAAA, and notify every node found",
        ),
    ] = False
    ping_interval: Annotated[
        float,
        Option("SECONDS"),
        Field(description="seconds between pings of every node (at least 1)"),
    ] = 60.0
    peer: Annotated[
        Repeated,
        Option("NAME"),
        Field(
            description="register a peer at start; it answers 200 and logs what it "
            "receives (repeatable)",
        ),
    ] = []
    trusted: Annotated[
        Repeated,
        Option("CIDR", default_text="loopback"),
        Field(
            description="network whose KDMQ requests are accepted, others get 403 "
            "(repeatable); required when --server-address is not loopback",
        ),
    ] = []
    t1: Annotated[
        float,
        Option("SECONDS"),
        Field(description="SIP timer T1: the first UDP retransmission interval"),
    ] = 0.5
    t2: Annotated[
        float,
        Option("SECONDS"),
        Field(description="SIP timer T2: the longest UDP retransmission interval"),
    ] = 4.0
    timer_f: Annotated[
        float | None,
        Option("SECONDS", default_text="64*T1"),
        Field(description="SIP Timer F: a request unanswered this long gets a local 408"),
    ] = None
    max_tcp_message: Annotated[
        int,
        Option("BYTES"),
        Field(description="largest SIP message accepted on a TCP connection"),
    ] = 1_048_576
    tcp_max_header: Annotated[
        int,
        Option("BYTES"),
        Field(description="largest SIP header section accepted on a TCP connection"),
    ] = 16_384
    tcp_max_connections: Annotated[
        int,
        Option("N"),
        Field(description="inbound SIP TCP connections held at once; more are closed on accept"),
    ] = 256
    tcp_max_connections_per_source: Annotated[
        int,
        Option("N"),
        Field(description="inbound SIP TCP connections held at once from one address"),
    ] = 32
    tls_cert: Annotated[
        Path | None,
        Option("PATH"),
        Field(
            description="PEM certificate chain this node presents over SIP TLS "
            "(;transport=tls), as server and as client",
        ),
    ] = None
    tls_key: Annotated[
        Path | None,
        Option("PATH"),
        Field(description="PEM private key of --tls-cert (read from the file, never logged)"),
    ] = None
    tls_ca: Annotated[
        Path | None,
        Option("PATH", default_text="the system's"),
        Field(description="PEM CA bundle that other nodes' TLS certificates are checked against"),
    ] = None
    tls_verify_peer: Annotated[
        bool,
        Option(),
        Field(
            description="demand a certificate from --tls-ca of every node connecting over "
            "TLS; such a node is then trusted whatever its address (plain UDP and TCP "
            "still need --trusted)",
        ),
    ] = False
    tls_allow_name: Annotated[
        Repeated,
        Option("NAME"),
        Field(
            description="with --tls-verify-peer: a name (certificate CN, DNS or IP SAN) a "
            "connecting node's certificate must carry (repeatable; default any)",
        ),
    ] = []
    tls_handshake_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(description="a SIP TLS handshake that takes longer is abandoned"),
    ] = 10.0
    tcp_idle_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(description="a SIP TCP connection that receives nothing this long is closed"),
    ] = 120.0
    tcp_message_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(
            description="a SIP message on TCP must arrive in full this long after its first "
            "byte, or the connection is closed",
        ),
    ] = 10.0
    tcp_write_buffer: Annotated[
        int,
        Option("BYTES"),
        Field(
            description="bytes queued for a SIP TCP peer above which its connection is no "
            "longer read until it reads our replies",
        ),
    ] = 262_144
    tcp_max_buffered: Annotated[
        int,
        Option("BYTES"),
        Field(
            description="bytes of incomplete SIP messages held by all TCP connections "
            "together; the connection that goes over it is closed",
        ),
    ] = 67_108_864
    dns_max_lookups: Annotated[
        int,
        Option("N"),
        Field(description="host name look-ups in flight at once; more fail for now"),
    ] = 64
    dns_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(description="a host name look-up that takes longer counts as failed"),
    ] = 5.0
    dns_negative_ttl: Annotated[
        float,
        Option("SECONDS"),
        Field(description="a host name that failed to resolve is not looked up again this long"),
    ] = 30.0
    refusal_log_interval: Annotated[
        float,
        Option("SECONDS"),
        Field(
            description="refusals (untrusted KDMQ, connections over a cap...) are logged at "
            "most once per source and kind this often; each is counted in /metrics",
        ),
    ] = 10.0
    max_nodes: Annotated[
        int,
        Option("N"),
        Field(
            description="other nodes the node list holds at most; more named in node lists "
            "are refused (counted), an add fails",
        ),
    ] = 256
    max_new_nodes_per_list: Annotated[
        int,
        Option("N"),
        Field(description="new nodes taken from one node-list message at most"),
    ] = 32
    max_new_nodes_per_second: Annotated[
        float,
        Option("N"),
        Field(
            description="new nodes taken from node lists per second on average (bursts of "
            "--max-new-nodes-per-list)",
        ),
    ] = 32.0
    outbox_max_messages: Annotated[
        int,
        Option("N"),
        Field(
            description="messages waiting for one node that is down or did not answer; more "
            "are dropped (counted, a gap at the receiver); 0 turns store-and-forward off",
        ),
    ] = 10_000
    outbox_max_bytes: Annotated[
        int,
        Option("BYTES"),
        Field(description="bytes of the messages waiting for one node; more are dropped"),
    ] = 32 * 1024 * 1024
    outbox_max_age: Annotated[
        float,
        Option("SECONDS"),
        Field(
            description="a message waiting for a node longer is dropped; a node removed after "
            "missed pings keeps its outbox this long",
        ),
    ] = 600.0
    outbox_window: Annotated[
        int,
        Option("N"),
        Field(description="messages resent at once from an outbox to a node that answers again"),
    ] = 16
    max_in_flight_per_node: Annotated[
        int,
        Option("N"),
        Field(
            description="broadcasts and sends in flight at once to one node; more wait "
            "their turn, in order",
        ),
    ] = 256
    http_max_connections: Annotated[
        int,
        Option("N"),
        Field(
            description="HTTP and WebSocket connections held at once (subscribers "
            "included); more are closed on accept",
        ),
    ] = 4096
    http_header_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(description="time a client has to send a request's line and headers"),
    ] = 10.0
    http_keep_alive_timeout: Annotated[
        float,
        Option("SECONDS"),
        Field(description="an HTTP connection idle this long between requests is closed"),
    ] = 5.0
    http_max_header: Annotated[
        int,
        Option("BYTES"),
        Field(description="largest HTTP request line plus headers; more is 431"),
    ] = 16_384
    http_max_body: Annotated[
        int,
        Option("BYTES"),
        Field(
            description="largest JSON request body (peers, nodes); more is 413. A broadcast "
            "or send may carry up to --max-tcp-message",
        ),
    ] = 65_536
    ws_max_frame: Annotated[
        int,
        Option("BYTES"),
        Field(description="largest WebSocket frame a client may send; more closes with 1009"),
    ] = 65_536
    ws_max_frames_per_second: Annotated[
        float,
        Option("N"),
        Field(
            description="WebSocket frames per second a client may send (bursts as large); "
            "more closes with 1008",
        ),
    ] = 100.0
    http: Annotated[
        str,
        Option("HOST:PORT"),
        Field(
            description="where the HTTP and WebSocket API listens; not loopback needs --api-token",
        ),
    ] = "127.0.0.1:8000"
    http_tls_cert: Annotated[
        Path | None,
        Option("PATH"),
        Field(
            description="PEM certificate chain: the API speaks HTTPS and WSS (with --http-tls-key)"
        ),
    ] = None
    http_tls_key: Annotated[
        Path | None,
        Option("PATH"),
        Field(description="PEM private key of --http-tls-cert (read from the file, never logged)"),
    ] = None
    http_tls_ca: Annotated[
        Path | None,
        Option("PATH"),
        Field(
            description="PEM CA bundle: API clients must present a certificate from it "
            "(mutual TLS, on top of --api-token)",
        ),
    ] = None
    api_token: Annotated[
        Repeated,
        Option("TOKEN"),
        Field(
            description="bearer token the API accepts, at least 8 characters (repeatable); "
            "WebSocket clients may pass it as ?token=",
        ),
    ] = []
    api_token_file: Annotated[
        Path | None,
        Option("PATH"),
        Field(
            description="a file of API tokens, one a line (# starts a comment); kept out of "
            "the process list, unlike --api-token. Refused if every user may read it",
        ),
    ] = None
    public_health: Annotated[
        bool,
        Option(),
        Field(
            description="answer GET /v1/health without a token, for load balancers' health checks",
        ),
    ] = False
    state_dir: Annotated[
        Path | None,
        Option("DIR", default_text="~/.local/state/dmq-gateway/HOST_PORT"),
        Field(
            description="where registered peers, their histories and this gateway's origin "
            "stamps are kept across restarts (gateway.db)"
        ),
    ] = None
    history_store: Annotated[
        HistoryStoreName,
        Option("STORE"),
        Field(
            description="sqlite: peers' histories in --state-dir, kept across restarts "
            "(epochs and offsets too); memory: in memory, a new epoch at every start",
        ),
    ] = "sqlite"
    history_sync: Annotated[
        HistorySyncName,
        Option("MODE"),
        Field(
            description="normal: a stored message survives a crash of the process; full: "
            "also a power loss (one fsync per message)",
        ),
    ] = "normal"
    reorder_wait: Annotated[
        float | None,
        Option("SECONDS", default_text="4*Timer F"),
        Field(
            description="how long a message that arrived before earlier ones of its origin "
            "waits for them (which may still be retransmitted or resent from the sender's "
            "outbox); then they are given up and a gap entry says so",
        ),
    ] = None
    reorder_limit: Annotated[
        int,
        Option("N"),
        Field(
            description="early messages held per origin and peer; beyond it the missing "
            "ones are given up at once (a gap entry says so)",
        ),
    ] = DEFAULT_MAX_HELD
    bundle_max_messages: Annotated[
        int,
        Option("N"),
        Field(
            description="messages packed into one KDMQ request (a bundle) for a node that "
            "reads bundles (another gateway), when a batch or a publishing WebSocket has "
            "several for one peer; 1 sends every message on its own",
        ),
    ] = DEFAULT_BUNDLE_MAX_MESSAGES
    bundle_max_bytes: Annotated[
        int,
        Option("BYTES"),
        Field(
            description="bytes of body one bundle may have (at most what one message may "
            "carry on the node's transport)",
        ),
    ] = DEFAULT_BUNDLE_MAX_BYTES
    ws_queue_limit: Annotated[
        int,
        Option("N"),
        Field(
            description="messages a WebSocket subscriber may fall behind before it is cut "
            "off with close code 4008",
        ),
    ] = 1000
    ws_queue_bytes: Annotated[
        int,
        Option("BYTES"),
        Field(
            description="bytes of frames queued for one WebSocket subscriber (a replay page, "
            "or what a slow reader has not read); a live backlog over it is cut off with 4008",
        ),
    ] = 4 * 1024 * 1024
    ws_deflate: Annotated[
        bool,
        Option(),
        Field(
            description="offer permessage-deflate compression to WebSocket clients (about "
            "45 KB more memory per connection)",
        ),
    ] = False
    kamailio_mirrors: Annotated[
        str,
        Option("NAMES"),
        Field(
            description="the typed mirrors of Kamailio's own peers to run, comma-separated "
            "(htable, usrloc, dialog), or none",
        ),
    ] = "htable,usrloc,dialog"
    htable_autoexpire: Annotated[
        Repeated,
        Option("TABLE=SECONDS"),
        Field(
            description="an htable with Kamailio's autoexpire, as in its htable modparam, "
            "so that the mirror expires its cells when Kamailio does (repeatable)",
        ),
    ] = []
    dialog_sync: Annotated[
        bool,
        Option(),
        Field(
            description="ask one Kamailio node for a dialog sync at start, so that the "
            "dialog mirror learns the calls already up; off by default: the node asked "
            "then sends every dialog it holds to every node, one message per dialog",
        ),
    ] = False
    log_level: Annotated[
        LogLevel,
        Option("LEVEL"),
        Field(description="debug, info, warning or error"),
    ] = "info"
    log_format: Annotated[
        LogFormat,
        Option("FORMAT"),
        Field(description="text, or json for one JSON object per line"),
    ] = "text"
    drop_rate: Annotated[
        float,
        Option("FRACTION"),
        Field(
            description="fault injection for tests only: drop this fraction of UDP "
            "datagrams, in and out",
        ),
    ] = 0.0

    #: The fields given on the command line; the others came from DMQ_* or defaults.
    _from_cli: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator(
        "notification_address",
        "peer",
        "trusted",
        "api_token",
        "tls_allow_name",
        "htable_autoexpire",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: object) -> object:
        """DMQ_PEER='a, b c' is three peers; the command line gives a list already."""
        if isinstance(value, str):
            return value.replace(",", " ").split()
        return value

    @field_validator("log_level", "log_format", "history_store", "history_sync", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    # ------------------------------------------------------------------ naming

    def label(self, name: str) -> str:
        """The option as the user gave it: ``--t1`` or ``DMQ_T1`` (``--t1`` if unset)."""
        if name in self._from_cli or env_name(name) not in os.environ:
            return flag_name(name)
        return env_name(name)

    def describe(self, error: ConfigError) -> str:
        """One sentence for ``error``, naming the option its field comes from.

        A :class:`ConfigError` without a field already is that sentence. One with a
        field names a setting of :class:`NodeConfig` or :class:`GatewayConfig`, which
        becomes the option that sets it (``max_stream_message`` -> ``--max-tcp-message``);
        a field no option sets (``t4``) is left as the core named it.
        """
        if error.field is None:
            return str(error)
        option = CONFIG_FIELDS.get(error.field)
        if option is None:
            return str(error)
        label = self.label(option)
        if error.value is None:
            return f"{label}: {error.reason}"
        return f"{label} {_shown(error.value)}: {error.reason}"

    # ------------------------------------------------------------------ building

    def gateway_config(self) -> GatewayConfig:
        """Check the options together and build the gateway's and the node's config."""
        server = self._uri("server_address", self.server_address)
        notification = tuple(
            self._uri("notification_address", t) for t in self.notification_address
        )
        trusted = self._trusted(server)
        for peer in self.peer:
            if not is_valid_peer_id(peer):
                raise ConfigError(
                    f"{self.label('peer')} {peer!r}: a peer id is 1-128 letters, digits or "
                    "- _ . ! ~ * ' ( )"
                )
            if peer == self.notification_channel:
                raise ConfigError(
                    f"{self.label('peer')} {peer!r}: that is the notification channel "
                    f"({self.label('notification_channel')})"
                )
        # Checked here, one option at a time, so that the sentence names the option
        # given rather than every timer at once.
        for name in ("t1", "t2"):
            value: float = getattr(self, name)
            if value <= 0:
                raise ConfigError(
                    f"{self.label(name)} {_shown(value)}: must be a positive number of seconds"
                )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(
                f"{self.label('drop_rate')} {_shown(self.drop_rate)}: must be at least 0 "
                "and below 1"
            )
        if self.reorder_wait is not None and not 0 <= self.reorder_wait <= 3600:
            raise ConfigError(
                f"{self.label('reorder_wait')} {_shown(self.reorder_wait)}: must be 0 to 3600 "
                "seconds"
            )
        if not 1 <= self.reorder_limit <= 1_000_000:
            raise ConfigError(
                f"{self.label('reorder_limit')} {self.reorder_limit}: must be 1 to 1000000"
            )
        if not 1 <= self.bundle_max_messages <= 1000:
            raise ConfigError(
                f"{self.label('bundle_max_messages')} {self.bundle_max_messages}: must be 1 to 1000"
            )
        if not 256 <= self.bundle_max_bytes <= 1_048_576:
            raise ConfigError(
                f"{self.label('bundle_max_bytes')} {self.bundle_max_bytes}: must be 256 to 1048576"
            )
        if self.ws_queue_limit < 1:
            raise ConfigError(
                f"{self.label('ws_queue_limit')} {self.ws_queue_limit}: must be at least 1"
            )
        mirrors, autoexpire = self._mirrors()
        http_host, http_port = self._host_port()
        tokens = tuple(self.api_token) + self._token_file()
        if any(len(token) < 8 or not token.isprintable() or " " in token for token in tokens):
            # The token itself is a secret: not repeated in the message.
            raise ConfigError(
                f"{self.label('api_token')}: a token must be at least 8 printable "
                "characters, no spaces"
            )
        if not tokens and not _is_loopback(http_host):
            raise ConfigError(
                f"{self.label('http')} {self.http} is reachable beyond this machine, but no "
                "--api-token is set: pass --api-token (or DMQ_API_TOKEN), or bind the API "
                "to 127.0.0.1"
            )
        tls_config = self._tls_config(server, notification)
        try:
            node = NodeConfig(
                server_address=server,
                notification_addresses=notification,
                notification_channel=self.notification_channel,
                multi_notify=self.multi_notify,
                ping_interval=self.ping_interval,
                timers=TimerSettings(t1=self.t1, t2=self.t2, timer_f=self.timer_f),
                trusted=trusted,
                max_stream_message=self.max_tcp_message,
                tls=tls_config,
                max_nodes=self.max_nodes,
                max_new_nodes_per_list=self.max_new_nodes_per_list,
                max_new_nodes_per_second=self.max_new_nodes_per_second,
                outbox_max_messages=self.outbox_max_messages,
                outbox_max_bytes=self.outbox_max_bytes,
                outbox_max_age=self.outbox_max_age,
                outbox_window=self.outbox_window,
                max_in_flight_per_node=self.max_in_flight_per_node,
            )
        except ConfigError as exc:
            raise ConfigError(self.describe(exc)) from None
        return GatewayConfig(
            node=node,
            api_tokens=tokens,
            public_health=self.public_health,
            state_dir=self.state_dir or _default_state_dir(server),
            queue_limit=self.ws_queue_limit,
            history_store=HistoryStore(self.history_store),
            history_sync=HistorySync(self.history_sync),
            reorder_wait=self.reorder_wait,
            reorder_limit=self.reorder_limit,
            bundle_max_messages=self.bundle_max_messages,
            bundle_max_bytes=self.bundle_max_bytes,
            startup_peers=tuple(self.peer),
            drop_rate=self.drop_rate,
            http_host=http_host,
            http_port=http_port,
            ws_deflate=self.ws_deflate,
            log_level=self.log_level,
            log_format=self.log_format,
            kamailio_mirrors=mirrors,
            htable_autoexpire=autoexpire,
            dialog_sync=self.dialog_sync,
        )

    def _mirrors(self) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
        """--kamailio-mirrors as names, --htable-autoexpire as (table, seconds)."""
        from app.kamailio.mirrors import MIRROR_NAMES

        text = self.kamailio_mirrors.strip().lower()
        names: list[str] = []
        if text not in ("", "none"):
            for name in text.replace(",", " ").split():
                if name not in MIRROR_NAMES:
                    raise ConfigError(
                        f"{self.label('kamailio_mirrors')} {self.kamailio_mirrors!r}: "
                        f"{name!r} is not a mirror ({', '.join(MIRROR_NAMES)}, or none)"
                    )
                if name not in names:
                    names.append(name)
        tables: list[tuple[str, int]] = []
        for item in self.htable_autoexpire:
            table, _, seconds = item.partition("=")
            if not table or not seconds.isdigit() or not 0 < int(seconds) < 2**31:
                raise ConfigError(
                    f"{self.label('htable_autoexpire')} {item!r}: must be TABLE=SECONDS, "
                    "SECONDS a positive whole number"
                )
            tables.append((table, int(seconds)))
        return tuple(names), tuple(tables)

    def _tls_config(self, server: SipUri, notification: tuple[SipUri, ...]) -> TlsConfig | None:
        """The node's TLS settings, every file read once now so that a bad one stops the
        start with a sentence naming its option (the key's contents are never shown)."""
        given = [n for n in ("tls_cert", "tls_key", "tls_ca") if getattr(self, n) is not None]
        if self.tls_verify_peer or self.tls_allow_name:
            given.append("tls_verify_peer")
        if not given:
            if server.transport == "tls":
                raise ConfigError(
                    f"{self.label('server_address')} {server}: a TLS address needs "
                    f"{self.label('tls_cert')} and {self.label('tls_key')}"
                )
            return None
        if self.tls_cert is None or self.tls_key is None:
            missing = "tls_cert" if self.tls_cert is None else "tls_key"
            raise ConfigError(
                f"{self.label(missing)} is missing: TLS options need both "
                f"{self.label('tls_cert')} and {self.label('tls_key')}"
            )
        uses_tls = server.transport == "tls" or any(n.transport == "tls" for n in notification)
        if self.tls_verify_peer and server.transport != "tls":
            raise ConfigError(
                f"{self.label('tls_verify_peer')}: this node does not listen for TLS; give "
                f"{self.label('server_address')} a ;transport=tls address"
            )
        try:
            config = TlsConfig(
                cert=str(self.tls_cert),
                key=str(self.tls_key),
                ca=None if self.tls_ca is None else str(self.tls_ca),
                verify_peer=self.tls_verify_peer,
                allow_names=tuple(self.tls_allow_name),
                handshake_timeout=self.tls_handshake_timeout,
            )
            build_contexts(config, listen=server.transport == "tls")
        except ConfigError as exc:
            raise ConfigError(self.describe(exc)) from None
        if not uses_tls:
            # Harmless (node lists may name TLS nodes later), but likely a mistake.
            log.info("TLS options given, but neither this node nor a notification address uses TLS")
        return config

    def http_tls(self) -> HttpTls | None:
        """The API's HTTPS settings, every file checked now (one sentence per problem)."""
        if self.http_tls_cert is None and self.http_tls_key is None:
            if self.http_tls_ca is not None:
                raise ConfigError(
                    f"{self.label('http_tls_ca')}: client certificates need HTTPS; give "
                    f"{self.label('http_tls_cert')} and {self.label('http_tls_key')}"
                )
            return None
        if self.http_tls_cert is None or self.http_tls_key is None:
            missing = "http_tls_cert" if self.http_tls_cert is None else "http_tls_key"
            raise ConfigError(
                f"{self.label(missing)} is missing: HTTPS needs both "
                f"{self.label('http_tls_cert')} and {self.label('http_tls_key')}"
            )
        settings = HttpTls(
            cert=str(self.http_tls_cert),
            key=str(self.http_tls_key),
            ca=None if self.http_tls_ca is None else str(self.http_tls_ca),
        )
        names = {"tls_cert": "http_tls_cert", "tls_key": "http_tls_key", "tls_ca": "http_tls_ca"}
        try:
            build_contexts(
                TlsConfig(cert=settings.cert, key=settings.key, ca=settings.ca), listen=True
            )
        except ConfigError as exc:
            option = names.get(exc.field or "", exc.field or "")
            raise ConfigError(
                f"{self.label(option)} {_shown(exc.value)}: {exc.reason}"
                if exc.value is not None
                else f"{self.label(option)}: {exc.reason}"
            ) from None
        return settings

    def cleartext_warning(self) -> str | None:
        """The warning to log when tokens would cross the network unencrypted."""
        host, _ = self._host_port()
        if _is_loopback(host) or self.http_tls_cert is not None:
            return None
        return (
            f"the API listens on {self.http} beyond this machine without TLS: tokens and "
            f"messages travel in clear; give {self.label('http_tls_cert')} and "
            f"{self.label('http_tls_key')} for HTTPS and WSS"
        )

    def _token_file(self) -> tuple[str, ...]:
        """The tokens of --api-token-file: one a line, blank lines and # comments skipped."""
        path = self.api_token_file
        if path is None:
            return ()
        label = f"{self.label('api_token_file')} {str(path)!r}"
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{label}: cannot read it ({reason})") from None
        if mode & stat.S_IROTH:
            raise ConfigError(
                f"{label}: every user of this machine may read it (mode "
                f"{stat.S_IMODE(mode):04o}); make it private: chmod o-rwx {path}"
            )
        tokens = tuple(
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
        if not tokens:
            raise ConfigError(f"{label}: holds no token (one a line)")
        if any(len(token) < 8 or not token.isprintable() or " " in token for token in tokens):
            # The token itself is a secret: not repeated in the message.
            raise ConfigError(
                f"{label}: a token must be at least 8 printable characters, no spaces"
            )
        return tokens

    def limits(self) -> ServeLimits:
        """The bounds of the driver and the API, from their options."""
        positive = (
            "tcp_max_header",
            "tcp_max_connections",
            "tcp_max_connections_per_source",
            "tcp_idle_timeout",
            "tcp_message_timeout",
            "tcp_write_buffer",
            "tcp_max_buffered",
            "dns_max_lookups",
            "dns_timeout",
            "dns_negative_ttl",
            "refusal_log_interval",
            "tls_handshake_timeout",
            "http_max_connections",
            "http_header_timeout",
            "http_keep_alive_timeout",
            "http_max_header",
            "http_max_body",
            "ws_max_frame",
            "ws_max_frames_per_second",
        )
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{self.label(name)} {_shown(value)}: must be positive")
        if self.ws_queue_bytes < MIN_WS_QUEUE_BYTES:
            raise ConfigError(
                f"{self.label('ws_queue_bytes')} {self.ws_queue_bytes}: must be at least "
                f"{MIN_WS_QUEUE_BYTES} bytes"
            )
        transport = TransportLimits(
            max_connections=self.tcp_max_connections,
            max_connections_per_source=self.tcp_max_connections_per_source,
            idle_timeout=self.tcp_idle_timeout,
            message_timeout=self.tcp_message_timeout,
            max_head=self.tcp_max_header,
            write_high_water=self.tcp_write_buffer,
            max_buffered=self.tcp_max_buffered,
            max_dns_lookups=self.dns_max_lookups,
            dns_timeout=self.dns_timeout,
            dns_negative_ttl=self.dns_negative_ttl,
            log_interval=self.refusal_log_interval,
        )
        api = ApiLimits(
            max_connections=self.http_max_connections,
            header_timeout=self.http_header_timeout,
            keep_alive_timeout=self.http_keep_alive_timeout,
            max_head=self.http_max_header,
            max_body=self.http_max_body,
            max_message_body=self.max_tcp_message,
            ws_max_frame=self.ws_max_frame,
            ws_frames_per_second=self.ws_max_frames_per_second,
            ws_queue_bytes=self.ws_queue_bytes,
        )
        return ServeLimits(transport=transport, api=api, http_tls=self.http_tls())

    def _uri(self, name: str, text: str) -> SipUri:
        try:
            return SipUri.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{self.label(name)} {text!r}: not a SIP URI ({exc})") from None

    def _trusted(self, server: SipUri) -> tuple[IPNetwork, ...]:
        networks: list[IPNetwork] = []
        for text in self.trusted:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(
                    f"{self.label('trusted')} {text!r}: not a network in CIDR form, "
                    "e.g. 10.0.0.0/24"
                ) from None
        if networks:
            return tuple(networks)
        if not _is_loopback(server.host):
            raise ConfigError(
                f"{self.label('server_address')} {server} is not a loopback address, but "
                "only loopback is trusted: pass --trusted CIDR (repeatable) for the networks "
                "of your DMQ nodes"
            )
        return LOOPBACK_NETWORKS

    def _host_port(self) -> tuple[str, int]:
        host, sep, port = self.http.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{self.label('http')} {self.http!r}: must be HOST:PORT, e.g. 127.0.0.1:8000"
            )
        return host, int(port)


#: The settings of NodeConfig and GatewayConfig (as ConfigError names them) and the
#: option that sets each.
CONFIG_FIELDS: dict[str, str] = {
    "server_address": "server_address",
    "notification_addresses": "notification_address",
    "notification_channel": "notification_channel",
    "multi_notify": "multi_notify",
    "ping_interval": "ping_interval",
    "t1": "t1",
    "t2": "t2",
    "timer_f": "timer_f",
    "trusted": "trusted",
    "max_stream_message": "max_tcp_message",
    "drop_rate": "drop_rate",
    "api_tokens": "api_token",
    "public_health": "public_health",
    "state_dir": "state_dir",
    "queue_limit": "ws_queue_limit",
    "history_store": "history_store",
    "history_sync": "history_sync",
    "reorder_wait": "reorder_wait",
    "reorder_limit": "reorder_limit",
    "bundle_max_messages": "bundle_max_messages",
    "bundle_max_bytes": "bundle_max_bytes",
    "startup_peers": "peer",
    "http_host": "http",
    "http_port": "http",
    "ws_deflate": "ws_deflate",
    "log_level": "log_level",
    "log_format": "log_format",
    "kamailio_mirrors": "kamailio_mirrors",
    "htable_autoexpire": "htable_autoexpire",
    "dialog_sync": "dialog_sync",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "tls_ca": "tls_ca",
    "tls_allow_name": "tls_allow_name",
    "tls_handshake_timeout": "tls_handshake_timeout",
    "max_nodes": "max_nodes",
    "max_new_nodes_per_list": "max_new_nodes_per_list",
    "max_new_nodes_per_second": "max_new_nodes_per_second",
    "outbox_max_messages": "outbox_max_messages",
    "outbox_max_bytes": "outbox_max_bytes",
    "outbox_max_age": "outbox_max_age",
    "outbox_window": "outbox_window",
    "max_in_flight_per_node": "max_in_flight_per_node",
}


def flag_name(name: str) -> str:
    """``ping_interval`` -> ``--ping-interval``."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """``ping_interval`` -> ``DMQ_PING_INTERVAL``."""
    return ENV_PREFIX + name.upper()


def _shown(value: object) -> str:
    """A value as it reads in a sentence: strings quoted, numbers as typed."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list) and not isinstance(value, SipUri):
        return ", ".join(str(item) for item in value)
    return str(value)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_state_dir(server: SipUri) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "dmq-gateway" / f"{server.host}_{server.effective_port}"


# ---------------------------------------------------------------------- loading


def load(cli: Mapping[str, Any]) -> ServeSettings:
    """The settings: ``cli`` (options given on the command line), then ``DMQ_*``, then
    the defaults. A value of the wrong type raises one ConfigError sentence."""
    try:
        settings = ServeSettings(**cli)
    except ValidationError as exc:
        raise ConfigError(_type_error(exc, cli)) from None
    settings._from_cli = frozenset(cli)
    return settings


def _type_error(exc: ValidationError, cli: Mapping[str, Any]) -> str:
    """The first problem pydantic found, as one sentence naming the option."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    if name in cli or name not in ServeSettings.model_fields:
        label = flag_name(name)
    else:
        label = env_name(name)
    kind = error["type"]
    if kind in ("float_parsing", "float_type"):
        reason = "must be a number"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        reason = "must be a whole number"
    elif kind == "finite_number":
        reason = "must be a finite number"
    elif kind in ("bool_parsing", "bool_type"):
        reason = "must be true or false (1, yes, on or 0, no, off)"
    elif kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", "")
        reason = f"must be {expected}"
    elif kind == "extra_forbidden":
        return f"{label}: no such option"
    else:
        message = str(error["msg"])
        reason = message[:1].lower() + message[1:]
    return f"{label} {_shown(error.get('input'))}: {reason}"


# ---------------------------------------------------------------------- the parser


def _option(field: FieldInfo) -> Option:
    for item in field.metadata:
        if isinstance(item, Option):
            return item
    return Option()


def _default_text(field: FieldInfo, option: Option) -> str:
    if option.default_text is not None:
        return option.default_text
    default = field.get_default()
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == []:
        return "none"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _is_list(field: FieldInfo) -> bool:
    return isinstance(field.get_default(), list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command line option per field of :class:`ServeSettings`.

    Every option defaults to None, so that :func:`from_namespace` can tell what was
    typed from what was not (and let the environment decide the rest).
    """
    for name, field in ServeSettings.model_fields.items():
        option = _option(field)
        text = (
            f"{field.description} (default: {_default_text(field, option)}) [env {env_name(name)}]"
        ).replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(
                flag_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        elif _is_list(field):
            parser.add_argument(
                flag_name(name),
                dest=name,
                action="append",
                default=None,
                metavar=option.metavar,
                help=text,
            )
        else:
            parser.add_argument(
                flag_name(name), dest=name, default=None, metavar=option.metavar, help=text
            )


def from_namespace(args: argparse.Namespace) -> ServeSettings:
    """The settings from a parsed ``serve`` command line, the environment and defaults."""
    given = {
        name: getattr(args, name)
        for name in ServeSettings.model_fields
        if getattr(args, name, None) is not None
    }
    return load(given)
