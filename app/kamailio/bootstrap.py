"""Bootstrap a replica by asking exactly ONE node of the bus for a sync.

Kamailio 5.6 sends its sync request (htable ``{"action":1}``, usrloc ``{"action":3}``)
to every node, and every node answers with all it holds: one join of a modest cluster
cost 1.9 MB of KDMQ bodies where one donor's answer was 0.5 MB. And a Kamailio node
does not absorb retransmissions: each copy of a sync request that reaches it is
answered again in full. :class:`SyncBootstrap` does neither:

* it asks one node at a time: a Kamailio node (its User-Agent or Server header says
  so, or it sent this peer's messages without an ``X-DMQ-Origin`` stamp) first, then a
  node that has not said what it runs; never a gateway, which holds a replica and
  donates nothing. If the node answers with an error, answers as a mirror
  (:data:`MIRROR_BODY`), or says nothing within ``answer_timeout``, it asks the next;
  with no such node active, it waits for one;
* each request is sent exactly once (:meth:`Gateway.send_once`: no UDP retransmission,
  no outbox, no resend), so no node ever answers the same request twice; a request
  lost on the way costs ``answer_timeout`` and one request to another node;
* it is done as soon as an answer arrives from the node asked (the mirror calls
  :meth:`answer_seen` for each sync answer), or that node answers 200;
* when every node that may hold data was lost (a partition) and one is back, it syncs
  again, from one node (a 5.6 node re-syncs from every node then).

The mirror hands :meth:`init` to :meth:`Gateway.attach_tap` as the peer's init hook,
which the node runs once it first reaches another node, after merging the node list
that node answered with (``settle`` adds a delay, none by default).
When the gateway itself is asked for a sync, the mirror answers :data:`MIRROR_REPLY`:
a replica is not an authority, and answering with it would add one more donor to a
5.6 join's storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.dmq.errors import DmqUsageError
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri

if TYPE_CHECKING:
    from app.gateway.service import Gateway

log = logging.getLogger("dmq.kamailio")

#: The body of a gateway mirror's 200 to a sync request: it holds a replica, not the
#: data, and donates nothing (Kamailio's 200s carry no body, and its modules ignore the
#: bodies of the replies they get).
MIRROR_BODY = b'{"mirror":true,"donates":false}'
MIRROR_REPLY = PeerReply(200, "OK", "application/json", MIRROR_BODY)

#: How a gateway names itself in its User-Agent and Server headers.
GATEWAY_AGENT = "dmq-gateway"

#: Seconds to wait for the node asked to answer (its first sync answer, or its 200).
DEFAULT_ANSWER_TIMEOUT = 5.0
#: Seconds after the node first reaches the bus before the first request: none, as the
#: node list the first answer carried is merged before the init hook runs.
DEFAULT_SETTLE = 0.0
#: Seconds between rounds when no node could donate.
DEFAULT_RETRY_INTERVAL = 5.0
#: Rounds over every active node before giving up (logged).
DEFAULT_MAX_ROUNDS = 5


def host_port(uri: SipUri) -> str:
    """``host:port`` of a node or sender URI: how a sender is matched to a node."""
    return f"{uri.host}:{uri.effective_port}"


@dataclass(slots=True)
class BootstrapStatus:
    """Where a bootstrap stands (``GET /v1/htable`` shows it)."""

    state: str = "waiting"  # waiting (for the bus), requesting, synced, failed, off
    donor: str | None = None
    requests_sent: int = 0
    asked: list[str] = field(default_factory=list)
    #: Syncs after the bus came back from a partition.
    resyncs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "donor": self.donor,
            "requests_sent": self.requests_sent,
            "asked": list(self.asked),
            "resyncs": self.resyncs,
        }


class SyncBootstrap:
    """Asks one node for a sync of ``peer_id`` with ``request`` (see the module)."""

    def __init__(
        self,
        gateway: Gateway,
        peer_id: str,
        request: bytes,
        *,
        content_type: str = "application/json",
        answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
        settle: float = DEFAULT_SETTLE,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
    ) -> None:
        self.gateway = gateway
        self.peer_id = peer_id
        self.request = request
        self.content_type = content_type
        self.answer_timeout = answer_timeout
        self.settle = settle
        self.retry_interval = retry_interval
        self.max_rounds = max_rounds
        self.status = BootstrapStatus()
        #: host:port of nodes seen sending this peer's messages without an origin
        #: stamp: Kamailio nodes, which hold the data, asked first.
        self.kamailio_nodes: set[str] = set()
        #: The sender last added to kamailio_nodes (its messages come in runs).
        self._observed: SipUri | None = None
        self._target: str | None = None
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ hooks

    def init(self) -> None:
        """The peer's init hook: start asking (once)."""
        if self._task is None and self.status.state == "waiting":
            self._task = asyncio.get_running_loop().create_task(self._run())
            self.gateway.on_stop(self.cancel)

    def observe(self, message: PeerMessage) -> None:
        """Note who speaks for the peer (every message of the peer, before parsing)."""
        sender = message.sender
        if message.origin is None and sender != self._observed and len(self.kamailio_nodes) < 1024:
            self.kamailio_nodes.add(host_port(sender))
            self._observed = sender

    def answer_seen(self, sender: SipUri) -> bool:
        """A sync answer arrived from ``sender``; True if it answers our request."""
        if self._target is not None and host_port(sender) == self._target:
            self._answered.set()
            return True
        return False

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # ------------------------------------------------------------------ the rounds

    def _candidates(self, asked: set[str]) -> list[tuple[str, str]]:
        """Active nodes not asked this round that may hold data, as (host:port, uri):
        Kamailio nodes first, then nodes that have not said what they run. Gateways
        (``dmq-gateway`` in their User-Agent or Server header) are never asked: a
        mirror donates nothing."""
        agents = self.gateway.node_agents()
        found = []
        for node in self.gateway.nodes():
            if node.local or node.status != "active":
                continue
            key = f"{node.host}:{node.port}"
            agent = agents.get(key, "")
            if key in asked or agent.startswith(GATEWAY_AGENT):
                continue
            found.append((key, node.uri))
        random.shuffle(found)

        def rank(item: tuple[str, str]) -> int:
            known = item[0] in self.kamailio_nodes
            return 0 if known or agents.get(item[0], "").startswith("kamailio") else 1

        found.sort(key=rank)
        return found

    async def _run(self) -> None:
        if self.settle > 0:
            await asyncio.sleep(self.settle)
        while await self._sync():
            await self._watch()
            self.status.resyncs += 1
            log.info("%s: the bus is back after a partition: syncing again", self.peer_id)

    async def _sync(self) -> bool:
        """Ask one node after the other until one donates; False after max_rounds."""
        status = self.status
        failed_rounds = 0
        while failed_rounds < self.max_rounds:
            asked: set[str] = set()
            while True:
                candidates = self._candidates(asked)
                if not candidates:
                    break
                key, uri = candidates[0]
                asked.add(key)
                status.state = "requesting"
                if await self._ask(key, uri):
                    status.state = "synced"
                    status.donor = uri
                    log.info("%s: replica synced from %s", self.peer_id, uri)
                    return True
            if asked:
                failed_rounds += 1
            # No node that may hold data is active yet (only gateways, or nobody):
            # wait for one, asking nobody meanwhile.
            status.state = "waiting"
            await asyncio.sleep(self.retry_interval)
        status.state = "failed"
        log.warning(
            "%s: no node donated a sync in %d rounds (asked: %s); the replica holds what "
            "arrives live",
            self.peer_id,
            self.max_rounds,
            ", ".join(status.asked),
        )
        return False

    async def _watch(self) -> None:
        """Return once every node that may hold data was lost and one is back: what
        Kamailio does when its node list shrinks to itself (a partition), with one
        donor. A re-sync adds and updates keys; a key deleted meanwhile stays until
        deleted again (a sync says what is, not what is gone)."""
        lost = False
        while True:
            await asyncio.sleep(self.retry_interval)
            present = bool(self._candidates(set()))
            if not present:
                lost = True
            elif lost:
                return

    async def _ask(self, key: str, uri: str) -> bool:
        """Ask one node, once; True when it is the donor."""
        self._target = key
        self._answered.clear()
        try:
            _, reply = self.gateway.send_once(
                self.peer_id, SipUri.parse(uri), self.request, self.content_type
            )
        except (DmqUsageError, ValueError) as exc:
            log.info("%s: cannot ask %s for a sync: %s", self.peer_id, uri, exc)
            return False
        self.status.requests_sent += 1
        self.status.asked.append(uri)
        answered = asyncio.ensure_future(self._answered.wait())
        try:
            await asyncio.wait(
                (answered, reply), timeout=self.answer_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            answered.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answered
        if self._answered.is_set():
            return True
        if reply.done() and not reply.cancelled() and reply.exception() is None:
            results = reply.result().results
            if results:
                result = results[0]
                if 200 <= result.code < 300 and result.body != MIRROR_BODY:
                    return True  # answered 200: its answers (if any) are on their way
                why = "a mirror with nothing to donate" if result.code < 300 else result.code
                log.info("%s: %s did not donate a sync (%s)", self.peer_id, uri, why)
                return False
        log.info(
            "%s: %s did not answer a sync request in %gs; asking another node",
            self.peer_id,
            uri,
            self.answer_timeout,
        )
        return False
