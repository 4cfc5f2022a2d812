"""Fixtures for interop tests against real Kamailio nodes (see harness/kamailio.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from harness.kamailio import (
    KamailioNode,
    KamailioNodeFactory,
    Transport,
    kamailio_available,
    stop_all,
)
from harness.ports import free_port

KAMAILIO_MISSING = "kamailio is not installed (apt-get install kamailio)"


def require_kamailio() -> None:
    """Skip the calling test when Kamailio is missing, or fail it when CI=true.

    In CI a missing Kamailio is a broken environment, not a reason to skip silently.
    """
    if kamailio_available():
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{KAMAILIO_MISSING}; CI=true, so this is an error, not a skip")
    pytest.skip(KAMAILIO_MISSING)


@pytest.fixture
def kamailio_required() -> None:
    """Use as ``@pytest.mark.usefixtures("kamailio_required")``."""
    require_kamailio()


@pytest.fixture
def kamailio_node(kamailio_required: None, tmp_path: Path) -> Iterator[KamailioNodeFactory]:
    """A factory of started Kamailio nodes in ``tmp_path``; all are stopped at teardown.

    ``kamailio_node(port=None, *, transport="udp", notification_addresses=(), ...)``
    picks a free port when none is given. On failure, the nodes' logs are under
    ``tmp_path/kamailio-N/kamailio.log``.
    """
    nodes: list[KamailioNode] = []

    def make(
        port: int | None = None,
        *,
        transport: Transport = "udp",
        notification_addresses: Sequence[str] = (),
        ping_interval: int = 5,
        fr_timer_ms: int = 2000,
        multi_notify: bool | None = None,
    ) -> KamailioNode:
        node = KamailioNode(
            tmp_path / f"kamailio-{len(nodes)}",
            port if port is not None else free_port(),
            transport=transport,
            notification_addresses=notification_addresses,
            ping_interval=ping_interval,
            fr_timer_ms=fr_timer_ms,
            multi_notify=multi_notify,
            autostart=False,
        )
        nodes.append(node)  # registered first, so a node that fails to start is cleaned up
        node.start()
        return node

    try:
        yield make
    finally:
        stop_all(reversed(nodes))
