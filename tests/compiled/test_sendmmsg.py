"""``_sipscan.sendmmsg``: the contract the UDP driver relies on, on real sockets.

The driver hands it every datagram a turn produced and sends what it did not send
through the transport, so what is checked is exactly that contract: everything sent,
in order, over batches longer than one system call; a stop at the first datagram not
sent (a kernel refusal in the middle of a batch, an address it does not read), with
the count of those before it; ``start`` resuming after it. It runs on both cores
(``make test`` runs tests/compiled with ``DMQ_GATEWAY_CORE=pure`` too), so the
pure-Python stand-in keeps the same contract, and never closes the descriptor it was
lent (the event loop owns it).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from app.dmq import _sipscan

#: More than one sendmmsg(2) batch (64) of the extension, and not a multiple of it.
COUNT = 150


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)  # as the event loop's socket is
        yield sock


def received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


def nothing_more(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65536)
    except BlockingIOError:
        return True
    return False


def test_every_datagram_leaves_in_order(receiver: socket.socket, sender: socket.socket) -> None:
    target = receiver.getsockname()
    datagrams = [(b"datagram %d" % i, target) for i in range(COUNT)]
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, 0) == COUNT
    assert received(receiver, COUNT) == [data for data, _ in datagrams]
    assert nothing_more(receiver)
    # The descriptor is still the sender's and still works.
    sender.sendto(b"after", target)
    receiver.settimeout(5)
    assert receiver.recv(100) == b"after"


@pytest.mark.parametrize(
    ("refused", "why"),
    [
        (("255.255.255.255", 9), "the kernel refuses it (EACCES: broadcast not enabled)"),
        (("::1", 9), "an IPv6 address on an IPv4 socket"),
        (("localhost", 9), "a name, not an address (no look-up on the loop)"),
        (("127.0.0.1", 0), "port 0"),
    ],
)
def test_it_stops_at_the_first_datagram_not_sent_and_resumes_after_it(
    receiver: socket.socket, sender: socket.socket, refused: tuple[str, int], why: str
) -> None:
    target = receiver.getsockname()
    datagrams = [(b"datagram %d" % i, target) for i in range(COUNT)]
    stop = 70  # in the second batch of the extension
    datagrams[stop] = (b"refused", refused)
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, 0) == stop, why
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, stop + 1) == (
        COUNT - stop - 1
    )
    expected = [data for data, _ in datagrams[:stop] + datagrams[stop + 1 :]]
    assert received(receiver, COUNT - 1) == expected
    assert nothing_more(receiver)


def test_an_empty_datagram_is_left_to_the_transport(
    receiver: socket.socket, sender: socket.socket
) -> None:
    """The transport's rule for an empty datagram (it sends nothing) stays its own."""
    target = receiver.getsockname()
    datagrams = [(b"one", target), (b"", target), (b"three", target)]
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, 0) == 1
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, 2) == 1
    assert received(receiver, 2) == [b"one", b"three"]


def test_ipv6() -> None:
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        listener.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with listener, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        listener.settimeout(5)
        target = listener.getsockname()[:2]
        datagrams = [(b"v6 %d" % i, target) for i in range(COUNT)]
        datagrams.append((b"v4", ("127.0.0.1", target[1])))  # not an IPv6 address
        assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET6, datagrams, 0) == COUNT
        assert received(listener, COUNT) == [data for data, _ in datagrams[:COUNT]]


def test_nothing_left_to_send_is_zero(sender: socket.socket) -> None:
    datagrams = [(b"x", ("127.0.0.1", 9))]
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, [], 0) == 0
    assert _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, 1) == 0


def test_a_start_outside_the_list_is_an_error(sender: socket.socket) -> None:
    datagrams = [(b"x", ("127.0.0.1", 9))]
    for start in (-1, 2):
        with pytest.raises(ValueError, match="out of range"):
            _sipscan.sendmmsg(sender.fileno(), socket.AF_INET, datagrams, start)
