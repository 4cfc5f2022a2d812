"""The settings of one DMQ node, validated once, with Kamailio's names and defaults."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field

from app.dmq.errors import ConfigError
from app.dmq.sip import DEFAULT_MAX_STREAM_MESSAGE, SipUri
from app.dmq.transaction import TimerSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Loopback only: a node trusts nothing else unless told to.
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

DEFAULT_NOTIFICATION_CHANNEL = "notification_peer"
SUPPORTED_TRANSPORTS = ("udp", "tcp", "tls")
#: A SIP option tag: a token (RFC 3261 section 25.1).
_OPTION_TAG = re.compile(r"[A-Za-z0-9.!%*_+`'~-]{1,64}")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Where this node's TLS identity and trust come from: file paths and choices only.

    The core never opens a file or a socket; the driver (``app.transport.tls``) reads
    these files and builds the contexts, once, at start.
    """

    #: PEM certificate chain this node presents, as server and as client.
    cert: str
    #: PEM private key of ``cert``; read from the file, never logged.
    key: str
    #: PEM CA bundle that peers' certificates are checked against; ``None``: the
    #: system's, and then only servers are checked (a client's certificate is not asked).
    ca: str | None = None
    #: Ask every TLS peer (inbound too) for a certificate from ``ca`` and refuse those
    #: without one; such a peer is then trusted whatever its address (mutual TLS as
    #: node trust, instead of ``trusted`` networks).
    verify_peer: bool = False
    #: With ``verify_peer``: the names (subject CN, DNS or IP SAN) a peer certificate
    #: must carry one of; empty: any certificate from ``ca``.
    allow_names: tuple[str, ...] = ()
    #: Check that a server we connect to is the host its node URI names.
    check_hostname: bool = True
    #: Seconds a TLS handshake may take, inbound and outbound.
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.verify_peer and not self.ca:
            raise ConfigError(
                "verifying peers needs the CA their certificates come from", field="tls_ca"
            )
        if self.allow_names and not self.verify_peer:
            raise ConfigError(
                "an allow-list of names needs peer verification on", field="tls_allow_name"
            )
        if not (self.handshake_timeout > 0 and math.isfinite(self.handshake_timeout)):
            raise ConfigError(
                "must be a positive, finite number of seconds",
                field="tls_handshake_timeout",
                value=self.handshake_timeout,
            )


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a :class:`~app.dmq.node.DmqNode` needs to know at start."""

    #: The address this node listens on and announces (Kamailio's ``server_address``),
    #: e.g. ``sip:127.0.0.1:5060`` or ``sip:10.0.0.5:5060;transport=tcp``.
    server_address: SipUri
    #: Nodes to join through (Kamailio's ``notification_address``, repeatable).
    notification_addresses: tuple[SipUri, ...] = ()
    #: The peer id that carries membership (Kamailio's ``notification_channel``).
    notification_channel: str = DEFAULT_NOTIFICATION_CHANNEL
    #: Resolve the first notification address by SRV, then A, then AAAA, and notify
    #: every node found (Kamailio's ``multi_notify``).
    multi_notify: bool = False
    #: Seconds between pings (Kamailio's ``ping_interval``, default 60).
    ping_interval: float = 60.0
    #: SIP timers T1, T2, T4 and Timer F.
    timers: TimerSettings = field(default_factory=TimerSettings)
    #: Source networks whose KDMQ requests are accepted; others get 403.
    trusted: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    #: Largest message accepted on a TCP stream.
    max_stream_message: int = DEFAULT_MAX_STREAM_MESSAGE
    #: Sent as ``User-Agent`` on requests and ``Server`` on responses.
    user_agent: str = "dmq-gateway/0.1"
    #: SIP option tags sent as ``Supported`` on KDMQ requests and responses (none: no
    #: header, as Kamailio sends): what the embedding service understands beyond plain
    #: KDMQ. Each node's own tags are kept in :attr:`Node.option_tags`.
    option_tags: tuple[str, ...] = ()
    #: Outbox bounds, per node (:mod:`app.dmq.outbox`): messages held for a node that
    #: is not active or did not answer. Beyond ``outbox_max_messages`` or
    #: ``outbox_max_bytes`` (bodies and extra headers) a new message is dropped; a
    #: message older than ``outbox_max_age`` seconds is dropped. A node removed after
    #: missed pings keeps its outbox *parked* (broadcasts go on queueing into it)
    #: for ``outbox_max_age`` seconds after its removal, so that it gets everything
    #: in order when it answers again; at most ``max_nodes`` nodes are parked. 0
    #: messages turns store-and-forward off (every message that cannot go now is
    #: dropped, counted, and nothing is parked).
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 32 * 1024 * 1024
    outbox_max_age: float = 600.0
    #: Resent messages in flight at once to one node that answers again.
    outbox_window: int = 16
    #: Messages (broadcasts and sends) in flight at once to one node: beyond it a
    #: message waits its turn, in order, until an earlier one is answered. A burst
    #: (a batch, a fast publisher) then never has more requests on the way to a node
    #: than its socket buffer can hold; retransmissions of an overflowed buffer would
    #: cost far more than the wait.
    max_in_flight_per_node: int = 256
    #: Before a missed ping disables (or removes) a node, look for other signs of
    #: life: a second ping sent halfway through Timer F when the first has no answer
    #: yet, any other answer, or a request from the node since the ping left. A node
    #: that is really gone is still disabled when the first ping's Timer F fires, as
    #: without this; off, a node is disabled on any single missed ping (Kamailio).
    probe_before_disabling: bool = True
    #: The most nodes the node list holds besides this one: beyond it, nodes named in
    #: other nodes' lists are refused (counted, and logged at most once a minute) and
    #: an operator's add fails. Every node held costs pings, and forwarding to it.
    max_nodes: int = 256
    #: New nodes taken from one node-list body at most (the rest are refused), and
    #: per second on average, in bursts of up to ``max_new_nodes_per_list``: what a
    #: neighbour, trusted or not, can make us allocate and forward is bounded.
    max_new_nodes_per_list: int = 32
    max_new_nodes_per_second: float = 32.0
    #: TLS identity and trust; needed when this node or a node it reaches uses
    #: ``;transport=tls``.
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        """Refuse a bad setting with a :class:`ConfigError` that names the field (its
        name here, not a command-line option: the command line maps one to the other)
        and says in one sentence what is wrong with it."""
        server = self.server_address
        if server.transport not in SUPPORTED_TRANSPORTS:
            raise ConfigError(
                "the transport must be udp, tcp or tls", field="server_address", value=server
            )
        if server.port is None:
            raise ConfigError(
                "give the port explicitly, because other nodes match us by the exact "
                "host:port we announce",
                field="server_address",
                value=server,
            )
        if server.user:
            raise ConfigError(
                "a node address has no user part", field="server_address", value=server
            )
        for address in self.notification_addresses:
            if address.transport not in SUPPORTED_TRANSPORTS:
                raise ConfigError(
                    "the transport must be udp, tcp or tls",
                    field="notification_addresses",
                    value=address,
                )
        if not self.notification_channel or not _is_user(self.notification_channel):
            raise ConfigError(
                "must be a non-empty SIP user name (letters, digits, - _ . ! ~ * ' ( ))",
                field="notification_channel",
                value=self.notification_channel,
            )
        if not self.ping_interval >= 1:  # also refuses NaN
            raise ConfigError(
                "must be at least 1 second", field="ping_interval", value=self.ping_interval
            )
        t = self.timers
        for name, seconds in (("t1", t.t1), ("t2", t.t2), ("t4", t.t4)):
            if not (seconds > 0 and math.isfinite(seconds)):
                raise ConfigError(
                    "must be a positive, finite number of seconds", field=name, value=seconds
                )
        if t.t2 < t.t1:
            raise ConfigError(
                f"must not be smaller than t1 ({t.t1:g} s), the first retransmission interval",
                field="t2",
                value=t.t2,
            )
        if t.timer_f is not None and not (t.timer_f > 0 and math.isfinite(t.timer_f)):
            raise ConfigError(
                "must be a positive, finite number of seconds", field="timer_f", value=t.timer_f
            )
        for name, count in (
            ("outbox_max_messages", self.outbox_max_messages),
            ("outbox_max_bytes", self.outbox_max_bytes),
        ):
            if not (isinstance(count, int) and count >= 0):
                raise ConfigError("must be a whole number, 0 or more", field=name, value=count)
        if not (self.outbox_max_age > 0 and math.isfinite(self.outbox_max_age)):
            raise ConfigError(
                "must be a positive, finite number of seconds",
                field="outbox_max_age",
                value=self.outbox_max_age,
            )
        for tag in self.option_tags:
            if not (isinstance(tag, str) and _OPTION_TAG.fullmatch(tag)):
                raise ConfigError(
                    "an option tag is a SIP token (letters, digits, - . ! % * _ + ` ' ~)",
                    field="option_tags",
                    value=tag,
                )
        if not (isinstance(self.max_in_flight_per_node, int) and self.max_in_flight_per_node >= 1):
            raise ConfigError(
                "must be a whole number, at least 1",
                field="max_in_flight_per_node",
                value=self.max_in_flight_per_node,
            )
        if not (isinstance(self.outbox_window, int) and self.outbox_window >= 1):
            raise ConfigError(
                "must be a whole number, at least 1",
                field="outbox_window",
                value=self.outbox_window,
            )
        for name, count in (
            ("max_nodes", self.max_nodes),
            ("max_new_nodes_per_list", self.max_new_nodes_per_list),
        ):
            if not (isinstance(count, int) and count >= 1):
                raise ConfigError("must be a whole number, at least 1", field=name, value=count)
        rate = self.max_new_nodes_per_second
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(
                "must be a positive, finite number", field="max_new_nodes_per_second", value=rate
            )
        if server.transport == "tls" and self.tls is None:
            raise ConfigError(
                "a TLS address needs a certificate and key (--tls-cert, --tls-key)",
                field="server_address",
                value=server,
            )
        if self.max_stream_message < 1024:
            raise ConfigError(
                "must be at least 1024 bytes",
                field="max_stream_message",
                value=self.max_stream_message,
            )


_USER_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/"
)


def _is_user(text: str) -> bool:
    return all(ch in _USER_CHARS for ch in text)


def is_valid_peer_id(text: str) -> bool:
    """A peer id is the user part of a Request-URI, so it must be a SIP user name."""
    return bool(text) and len(text) <= 128 and all(ch in _PEER_ID_CHARS for ch in text)


_PEER_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()"
)
