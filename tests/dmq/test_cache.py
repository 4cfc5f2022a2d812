"""The bounded cache the core's hot path uses for keys other nodes choose."""

from __future__ import annotations

import pytest

from app.dmq.cache import BoundedCache
from app.dmq.config import NodeConfig
from app.dmq.node import CACHE_SIZE, DmqNode
from app.dmq.sip import SipUri


def test_it_forgets_the_oldest_entry_only() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    for i, key in enumerate("abcd"):
        assert cache.put(key, i) == i
    assert list(cache.items()) == [("b", 1), ("c", 2), ("d", 3)]
    assert cache.get("a") is None
    cache.put("b", 10)  # an update keeps its place and the size
    assert len(cache) == 3 and cache.get("b") == 10


def test_a_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="maxsize must be at least 1, not 0"):
        BoundedCache(0)


def test_caller_chosen_peer_ids_do_not_grow_the_node_without_bound() -> None:
    # Every send goes out at once (none waits behind the cap on messages in flight).
    node = DmqNode(
        NodeConfig(
            server_address=SipUri.parse("sip:127.0.0.1:5091"),
            max_in_flight_per_node=CACHE_SIZE + 50,
        )
    )
    node.add_node(SipUri.parse("sip:127.0.0.1:5090"), 0.0)
    for i in range(CACHE_SIZE + 50):
        node.send(f"peer{i}", b"x", None, SipUri.parse("sip:127.0.0.1:5090"), 0.0)
    assert len(node._from_cache) == CACHE_SIZE
    assert "peer0" not in node._from_cache
    assert f"peer{CACHE_SIZE + 49}" in node._from_cache
