"""Loopback ports for the servers the tests and benchmarks start."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

#: Ports this process handed out: a server not started yet has not bound its own.
_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port: int) -> bool:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        try:
            udp.bind(("127.0.0.1", port))
            tcp.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        return int(udp.getsockname()[1])


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now, never handed out before.

    Both, because a SIP node (ours or Kamailio) with a TCP address listens on UDP too.
    Picked outside the kernel's ephemeral range: a port from that range can be taken,
    between the pick and the server's bind, by any outgoing connection (health polls
    make many), and would then be taken again when a server restarts on its ports.
    Another process may still bind it first; :class:`harness.gateway.Gateway` retries.
    """
    low, high = _ephemeral_range()
    below, above = range(10000, low), range(high + 1, 65536)
    candidates = below if len(below) >= len(above) else above
    rng = random.Random()
    for _ in range(500):
        # Without room outside the ephemeral range, let the kernel pick one.
        port = rng.choice(candidates) if len(candidates) > 1000 else _kernel_port()
        with _lock:
            if port in _handed_out or not _is_free(port):
                continue
            _handed_out.add(port)
        return port
    raise RuntimeError("no loopback port is free for both UDP and TCP")
