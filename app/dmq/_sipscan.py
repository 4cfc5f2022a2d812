"""The native fast paths of the SIP codec are not built: this module stands in.

``_sipscan.c`` (built with the compiled core) replaces this module when present: the
import system prefers an extension to a source file of the same name, and
``DMQ_GATEWAY_CORE=pure`` imports only sources, so the pure-Python core never runs
native code. :mod:`app.dmq.sip` reads :data:`AVAILABLE` and, being False here, does
not call the codec's functions; their signatures are the extension's, for the type
checker. :func:`sendmmsg` is the exception: the driver calls it on either core, and here
it sends one datagram per system call, with the same contract.
"""

from __future__ import annotations

import socket
from typing import TypeVar

T = TypeVar("T")

#: True in the extension.
AVAILABLE = False

ScanResult = tuple[
    str | None, str, int, str, list[tuple[str, str]], dict[str, str], list[str], bytes
]


def scan(data: bytes) -> ScanResult | None:
    """The message read in one pass, or None: parse it with the Python code."""
    return None


def parse_via(text: str, cls: type[T]) -> T | None:
    """``cls(transport, host, port, params)``, or None: parse it with the Python code."""
    return None


def parse_cseq(value: str) -> tuple[int, str] | None:
    """``(number, method)``, or None: parse it with the Python code."""
    return None


def scan_set(body: bytes) -> tuple[str, str, str | int, int] | None:
    """``app.kamailio.htable_codec.read_set`` for the usual SET body, or None: read it
    with the Python code."""
    return None


#: One datagram to send: its bytes and the (address, port) it goes to.
Datagram = tuple[bytes, tuple[str, int]]


def sendmmsg(fd: int, family: int, datagrams: list[Datagram], start: int) -> int:
    """Send ``datagrams[start:]`` over the datagram socket ``fd``, in order; return how
    many were sent from ``start``.

    It stops at the first datagram not sent (a full send buffer, an unreachable
    network, an address that is not one of ``family``, any error) and raises nothing
    for it: the caller sends that one through its transport, which buffers it or
    reports why. The extension does the same in batches (``sendmmsg(2)``)."""
    if not 0 <= start <= len(datagrams):
        raise ValueError("sendmmsg(): fd or start out of range")
    # A socket object over the loop's descriptor, detached again below: it must
    # never close the descriptor, which the transport owns. With the family, type
    # and protocol given, making it is no system call.
    sock = socket.socket(family, socket.SOCK_DGRAM, 0, fd)
    try:
        for index in range(start, len(datagrams)):
            data, address = datagrams[index]
            if not data:
                return index - start  # the transport's rule: it sends nothing
            try:
                # An address only, as the extension reads it: a name given to
                # sendto would be looked up here, blocking the loop.
                socket.inet_pton(family, address[0])
                sock.sendto(data, socket.MSG_DONTWAIT, address)
            except (OSError, ValueError, TypeError, OverflowError):
                return index - start
        return len(datagrams) - start
    finally:
        sock.detach()
