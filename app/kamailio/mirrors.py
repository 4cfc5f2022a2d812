"""The Kamailio mirrors of one gateway: which run, their wiring, their metrics.

A *mirror* follows one of Kamailio's own peers (``htable``, ``usrloc``, ``dialog``)
through a tap (:meth:`Gateway.attach_tap`): it sees every message of its peer id,
keeps a typed replica, publishes changes to :class:`~app.kamailio.stream.ChangeStream`
s, and answers as the Kamailio module would when no raw peer of that id is registered.

Coexistence with a raw peer of the same id: the raw peer answers (auto 200, or its
subscriber), so raw subscribers keep seeing every body exactly as sent; the mirror
still sees and applies each message, and its 400 for a body it cannot read is then not
the SIP reply (it is still counted). Unregistering the raw peer makes the mirror the
peer again.

A mirror implements :class:`Mirror`; :data:`FACTORIES` maps each name of
``--kamailio-mirrors`` to the function that builds it. To add one: a module with the
mirror class, and one line in :func:`_factories`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.dmq.peers import PeerMessage, PeerReply
from app.kamailio.malformed import MalformedBodies
from app.kamailio.stream import ChangeStream

if TYPE_CHECKING:
    from app.gateway.config import GatewayConfig
    from app.gateway.service import Gateway

log = logging.getLogger("dmq.kamailio")

#: Every mirror name --kamailio-mirrors takes, in its default order.
MIRROR_NAMES = ("htable", "usrloc", "dialog")


class Mirror(Protocol):
    """What the registry, the metrics and the routes need of a mirror."""

    #: Its name in --kamailio-mirrors and in metrics.
    name: str
    #: The peer id it taps.
    peer_id: str
    description: str
    malformed: MalformedBodies
    streams: dict[str, ChangeStream]

    def handle(self, message: PeerMessage) -> PeerReply | None:
        """The tap: every message of the peer id; the reply when no raw peer."""

    def init(self) -> None:
        """Run once the node first reaches another node (bootstrap a sync)."""

    def close(self) -> None:
        """The gateway is stopping: end subscriptions, stop timers."""

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics: name -> value (``cells``, ``applied``...)."""


MirrorFactory = Callable[["Gateway", "GatewayConfig"], Mirror]


def _factories() -> dict[str, MirrorFactory]:
    from app.kamailio.htable import HtableMirror

    def htable(gateway: Gateway, config: GatewayConfig) -> Mirror:
        return HtableMirror(
            gateway, autoexpire=dict(config.htable_autoexpire), queue_limit=config.queue_limit
        )

    factories: dict[str, MirrorFactory] = {"htable": htable}
    factories["usrloc"] = _usrloc
    factories["dialog"] = _dialog
    return factories


def _usrloc(gateway: Gateway, config: GatewayConfig) -> Mirror:
    from app.kamailio.registrations import RegistrationsMirror

    return RegistrationsMirror(gateway, queue_limit=config.queue_limit)


def _dialog(gateway: Gateway, config: GatewayConfig) -> Mirror:
    from app.kamailio.dialogs import DialogsMirror

    return DialogsMirror(gateway, queue_limit=config.queue_limit, sync=config.dialog_sync)


class Mirrors:
    """The mirrors running in one gateway, by name."""

    def __init__(self, mirrors: Iterable[Mirror] = ()) -> None:
        self.by_name: dict[str, Mirror] = {m.name: m for m in mirrors}

    def get(self, name: str) -> Mirror | None:
        return self.by_name.get(name)

    def __iter__(self) -> Iterator[Mirror]:
        return iter(self.by_name.values())

    def close(self) -> None:
        for mirror in self:
            mirror.close()


def attach_mirrors(gateway: Gateway, config: GatewayConfig) -> Mirrors:
    """Build the mirrors ``config.kamailio_mirrors`` names and tap their peer ids.

    Call before :meth:`Gateway.start`. A name without an implementation in this build
    is logged and skipped."""
    factories = _factories()
    built = []
    for name in config.kamailio_mirrors:
        factory = factories.get(name)
        if factory is None:
            log.info("the %s mirror is not part of this build; skipped", name)
            continue
        mirror = factory(gateway, config)
        gateway.attach_tap(
            mirror.peer_id, mirror.handle, init=mirror.init, description=mirror.description
        )
        built.append(mirror)
    mirrors = Mirrors(built)
    gateway.on_stop(mirrors.close)
    return mirrors


class MirrorCollector(Collector):
    """The mirrors' numbers in /metrics, read at scrape time."""

    def __init__(self, mirrors: Mirrors) -> None:
        self.mirrors = mirrors

    def collect(self) -> Iterator[Metric]:
        malformed = CounterMetricFamily(
            "dmq_kamailio_malformed",
            "bodies a Kamailio mirror could not read (answered 400 as Kamailio does), by "
            "mirror, sending node and kind",
            labels=["mirror", "sender", "kind"],
        )
        changes = CounterMetricFamily(
            "dmq_kamailio_changes",
            "changes published to a mirror's change streams, by mirror and stream",
            labels=["mirror", "stream"],
        )
        subscribers = GaugeMetricFamily(
            "dmq_kamailio_change_subscribers",
            "WebSocket clients of a mirror's change streams",
            labels=["mirror"],
        )
        numbers = GaugeMetricFamily(
            "dmq_kamailio_mirror",
            "a mirror's replica and traffic: cells held, messages applied, sync requests "
            "sent and answered, sync cells received... (label what)",
            labels=["mirror", "what"],
        )
        for mirror in self.mirrors:
            for (sender, kind), count in sorted(mirror.malformed.counts.items()):
                malformed.add_metric([mirror.name, sender, kind], count)
            total = 0
            for name, stream in sorted(mirror.streams.items()):
                changes.add_metric([mirror.name, name], stream.offset)
                total += len(stream.subscribers)
            subscribers.add_metric([mirror.name], total)
            for what, value in sorted(mirror.stats().items()):
                numbers.add_metric([mirror.name, what], value)
        yield malformed
        yield changes
        yield subscribers
        yield numbers
