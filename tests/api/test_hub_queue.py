"""The hub's per-subscriber queue limit, on a DmqServer that is never started."""

from __future__ import annotations

import itertools

from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.gateway.hub import Ending, Hub, PeerChannel
from app.gateway.models import PeerSettings
from app.transport.server import DmqServer

SENDER = SipUri.parse("sip:127.0.0.1:5062")
_ids = itertools.count(1)


def hub_with_peer(queue_limit: int, history: int) -> tuple[Hub, PeerChannel]:
    server = DmqServer(NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5060")))
    hub = Hub(server, queue_limit=queue_limit)
    channel, _ = hub.register("p", PeerSettings(history=history), persist=False)
    return hub, channel


def arrive(channel: PeerChannel, count: int) -> None:
    for _ in range(count):
        n = next(_ids)
        channel.append(str(SENDER), "text/plain", f"m{n}".encode())


def test_live_limit_is_reached_when_the_live_backlog_is_full() -> None:
    hub, channel = hub_with_peer(queue_limit=5, history=100)
    subscriber = hub.subscribe("p", None, None).subscriber
    arrive(channel, 5)
    assert subscriber.ending is None
    arrive(channel, 1)
    assert subscriber.ending is Ending.OVERFLOW
    assert channel.overflows == 1


def test_replay_comes_in_pages_and_does_not_raise_the_live_limit() -> None:
    hub, channel = hub_with_peer(queue_limit=5, history=100)
    arrive(channel, 20)
    subscriber = hub.subscribe("p", 0, channel.epoch).subscriber
    # One page of the replay is queued, no more than the queue limit.
    assert [offset for offset, _ in subscriber.frames] == [1, 2, 3, 4, 5]
    # Messages arriving during the replay do not overflow it: the pages reach them.
    arrive(channel, 5)
    assert subscriber.ending is None
    # The client reads all but the last three (each page queued as the last is taken)...
    taken = [subscriber.frames.popleft()[0] for _ in range(22)]
    assert taken == list(range(1, 23))
    assert [offset for offset, _ in subscriber.frames] == [23, 24, 25]
    # ...and stops: five live messages fill its queue, the next one overflows it, as
    # for any subscriber (the replayed frames still queued count for nothing).
    arrive(channel, 5)
    assert subscriber.ending is None
    arrive(channel, 1)
    assert subscriber.ending is Ending.OVERFLOW
