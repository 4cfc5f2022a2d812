"""What one gateway process runs with: the node's settings and the gateway's own.

:class:`GatewayConfig` is to the gateway what :class:`~app.dmq.config.NodeConfig` is to
the core: validated values, no parsing. It is built from the command line and the
``DMQ_*`` environment by the settings model, or directly by tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.dmq.config import NodeConfig
from app.gateway.reorder import DEFAULT_MAX_HELD, WAIT_PER_TIMER_F
from app.gateway.store import HistoryStore, HistorySync

#: Frames a WebSocket subscriber may have queued before it is cut off.
DEFAULT_QUEUE_LIMIT = 1000
#: Messages per bundle: past about a hundred the per-request cost is already a few
#: percent of the messages', and a larger bundle only lengthens the wait of its first.
DEFAULT_BUNDLE_MAX_MESSAGES = 100
#: Bytes of bundle body: 8 KiB keeps a UDP request to six IP fragments at a 1500-byte
#: MTU (losing any one loses the whole datagram, so fewer is safer under loss).
DEFAULT_BUNDLE_MAX_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything ``dmq-gateway serve`` runs with."""

    #: The embedded DMQ node's settings.
    node: NodeConfig
    #: Bearer tokens accepted by the API; none means no authentication (loopback only).
    api_tokens: tuple[str, ...] = ()
    #: Answer ``GET /v1/health`` without a token (for load balancers' health checks).
    public_health: bool = False
    #: Where registered peers (and, with the sqlite history store, their histories)
    #: are kept; None keeps nothing across restarts.
    state_dir: Path | None = None
    #: sqlite: histories in the state dir, kept across restarts; memory: a new epoch
    #: at every start.
    history_store: HistoryStore = HistoryStore.SQLITE
    #: normal: a commit survives a process crash; full: also power loss (fsync each).
    history_sync: HistorySync = HistorySync.NORMAL
    #: Seconds an early stamped message waits for the ones before it (None:
    #: :data:`~app.gateway.reorder.WAIT_PER_TIMER_F` times the node's Timer F).
    reorder_wait: float | None = None
    #: Early messages one stream may hold before the missing ones are given up.
    reorder_limit: int = DEFAULT_MAX_HELD
    #: Frames a WebSocket subscriber may have queued before it is cut off.
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    #: Messages one bundle may hold (:mod:`app.gateway.bundle`); 1 sends no bundles.
    bundle_max_messages: int = DEFAULT_BUNDLE_MAX_MESSAGES
    #: Bytes of body one bundle may have (entries and their framing).
    bundle_max_bytes: int = DEFAULT_BUNDLE_MAX_BYTES
    #: Peers registered at start (--peer): auto replies, not persisted.
    startup_peers: tuple[str, ...] = ()
    #: Fault injection for tests: fraction of UDP datagrams dropped.
    drop_rate: float = 0.0
    #: Where the HTTP and WebSocket API listens.
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    #: Offer permessage-deflate to WebSocket clients.
    ws_deflate: bool = False
    #: The Kamailio mirrors to run (app.kamailio: htable, usrloc, dialog); `serve`
    #: runs them all unless told otherwise, a config built in code none.
    kamailio_mirrors: tuple[str, ...] = ()
    #: (table, seconds): htables with Kamailio's autoexpire, for the htable mirror.
    htable_autoexpire: tuple[tuple[str, int], ...] = ()
    #: Ask one node for a dialog sync at start (off: in 5.6 it is a broadcast storm).
    dialog_sync: bool = False
    #: debug, info, warning or error.
    log_level: str = "info"
    #: text, or json for one JSON object per line.
    log_format: str = "text"

    @property
    def effective_reorder_wait(self) -> float:
        """``reorder_wait``, or the wait derived from the node's Timer F."""
        if self.reorder_wait is not None:
            return self.reorder_wait
        return WAIT_PER_TIMER_F * self.node.timers.timer_f_value
