"""SIP over TCP against a real gateway process with low limits: every bound holds while
a normal client (``GET /v1/health``) keeps being served.

Ceilings: the gateway's RSS may grow by at most :data:`RSS_CEILING_MB` during an
attack (an unbounded gateway grows by hundreds of MB at the benchmark's sizes, tens at
these), and its descriptors come back to what they were.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.abuse.support import (
    Probe,
    closed_by_peer,
    descriptors,
    kdmq,
    rss_mb,
    send_until_blocked,
)

#: The most the gateway's RSS may grow during one attack, in MB.
RSS_CEILING_MB = 40.0

LIMITS = (
    "--tcp-max-connections",
    "12",
    "--tcp-max-connections-per-source",
    "8",
    "--tcp-idle-timeout",
    "2",
    "--tcp-message-timeout",
    "1",
    "--tcp-max-header",
    "4096",
    "--tcp-write-buffer",
    "65536",
    "--tcp-max-buffered",
    "3000000",
)


def is_closed(sock: socket.socket) -> bool:
    """Whether the other end has closed ``sock`` already (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.sip_port), timeout=5)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that trusts loopback (so our client is a trusted node)."""
    gateway = Gateway(
        "tcp-trusted", tmp_path_factory.mktemp("tcp"), transport="tcp", extra=LIMITS
    ).start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def untrusting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that trusts a network we are not in: every request gets 403."""
    gateway = Gateway(
        "tcp-untrusting",
        tmp_path_factory.mktemp("tcp-u"),
        transport="tcp",
        extra=(*LIMITS, "--trusted", "10.255.0.0/16"),
    ).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_a_client_that_never_reads_its_replies_stops_being_read(trusted: Gateway) -> None:
    # Distinct requests (distinct branches) to a peer nobody registered: each gets a
    # 404 that the client never reads. The gateway stops reading the connection once
    # its replies pile up, so our writes block after a bounded amount.
    blob = b"".join(kdmq(trusted.sip_port) for _ in range(2000))
    before = rss_mb(trusted)
    with Probe(trusted) as probe, connect(trusted) as sock:
        sent = send_until_blocked(sock, blob, limit=200 * len(blob), timeout=1.5)
        grown = rss_mb(trusted) - before
    assert sent < 100 * len(blob), f"{sent} bytes taken without back-pressure"
    assert grown < RSS_CEILING_MB, f"RSS grew {grown:.1f} MB"
    assert probe.latencies and not probe.failures, probe.failures


def test_an_untrusted_connection_gets_one_refusal_then_is_closed(untrusting: Gateway) -> None:
    start = untrusting.log_size()
    with connect(untrusting) as sock:
        sock.sendall(b"".join(kdmq(untrusting.sip_port) for _ in range(50)))
        data = b""
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"SIP/2.0 403 ")
    assert data.count(b"SIP/2.0 ") == 1  # the other 49 were never read
    wait_until(lambda: "untrusted" in untrusting.log_text(start), 5, "the refusal logged")
    assert untrusting.log_text(start).count("untrusted") == 1


def test_connection_caps_refuse_on_accept_and_free_their_descriptors(trusted: Gateway) -> None:
    wait_until(lambda: descriptors(trusted) < 40, 10, "earlier connections closed")
    baseline = descriptors(trusted)
    socks = [connect(trusted) for _ in range(20)]
    try:
        # 8 per source (we are one source): the others are closed at once (well
        # before the 2 s idle time-out closes the 8).
        time.sleep(0.5)
        closed = [is_closed(s) for s in socks]
        assert closed.count(False) == 8, closed
        assert descriptors(trusted) <= baseline + 8
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: descriptors(trusted) <= baseline, 10, "descriptors back")


def test_large_announced_messages_are_refused_on_their_headers(trusted: Gateway) -> None:
    # Content-Length over --max-tcp-message (1 MB): closed on the headers alone.
    with connect(trusted) as sock:
        head = kdmq(trusted.sip_port).split(b"Content-Length: ")[0]
        sock.sendall(head + b"Content-Length: 2000000\r\n\r\n")
        assert closed_by_peer(sock, 5)


def test_half_sent_messages_are_closed_after_the_message_timeout(trusted: Gateway) -> None:
    # Each announces 900 KB and sends 600 KB, then waits: held no longer than
    # --tcp-message-timeout (1 s), never more than --tcp-max-buffered in all, and the
    # memory comes back.
    before = rss_mb(trusted)
    start = trusted.log_size()
    message = kdmq(trusted.sip_port, body=b"b" * 900_000)
    with Probe(trusted) as probe:
        socks = [connect(trusted) for _ in range(8)]
        try:
            for sock in socks:
                sock.sendall(message[:600_000])
            started = time.monotonic()
            assert all(closed_by_peer(s, 10) for s in socks)
            waited = time.monotonic() - started
        finally:
            for sock in socks:
                sock.close()
    assert waited < 8, f"held for {waited:.1f} s"
    assert not probe.failures, probe.failures
    # 8 x 600 KB is over --tcp-max-buffered (3 MB): the later ones were closed at once.
    assert "incomplete messages held on all connections, over 3000000" in trusted.log_text(start)
    wait_until(lambda: rss_mb(trusted) - before < RSS_CEILING_MB, 10, "memory back")


def test_a_trickled_message_is_closed_after_the_message_timeout(trusted: Gateway) -> None:
    # 64 bytes every 50 ms: never idle, but the message never completes in time.
    message = kdmq(trusted.sip_port, body=b"t" * 100_000)
    with connect(trusted) as sock:
        sock.settimeout(0.05)
        closed = False
        deadline = time.monotonic() + 6
        for offset in range(0, len(message), 64):
            try:
                sock.sendall(message[offset : offset + 64])
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            if time.monotonic() > deadline:
                break
    assert closed


def test_a_header_section_over_its_cap_closes_the_connection(trusted: Gateway) -> None:
    with connect(trusted) as sock:
        sock.sendall(b"KDMQ sip:x@127.0.0.1 SIP/2.0\r\n")
        sock.sendall(b"X-Filler: " + b"f" * 8000 + b"\r\n")  # no end of headers
        assert closed_by_peer(sock, 5)


def test_an_idle_connection_is_closed(trusted: Gateway) -> None:
    with connect(trusted) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, 10)
        assert time.monotonic() - started >= 1.5  # --tcp-idle-timeout 2


def test_header_names_are_not_kept_however_many_and_large(trusted: Gateway) -> None:
    before = rss_mb(trusted)
    for index in range(60):
        request = kdmq(trusted.sip_port).replace(
            b"Max-Forwards", b"X-" + bytes([97 + index % 26]) * 500_000 + str(index).encode()
        )
        with connect(trusted) as sock:
            sock.sendall(request)
            closed_by_peer(sock, 0.2)
    # 60 names of 500 KB would pin 30 MB; the header cap (4 KB) refuses them anyway,
    # and the codec keeps only names up to 64 characters.
    assert rss_mb(trusted) - before < RSS_CEILING_MB


def test_a_dead_outbound_connection_is_not_reused(tmp_path: Path) -> None:
    # A "node" that accepts our gateway's TCP connection and never answers: after
    # Timer F (1 s) without a byte back, the gateway closes it and its next request
    # (a ping, every second) opens a new connection.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(10)
    gateway = Gateway(
        "tcp-outbound",
        tmp_path,
        transport="tcp",
        notify=[f"sip:127.0.0.1:{port};transport=tcp"],
        extra=LIMITS,
    ).spawn()
    try:
        first, _ = listener.accept()
        with first:
            assert first.recv(65536).startswith(b"KDMQ ")
            assert closed_by_peer(first, 6), "the dead connection was kept"
        second, _ = listener.accept()
        with second:
            assert second.recv(65536).startswith(b"KDMQ ")
    finally:
        listener.close()
        gateway.kill()


def test_a_listed_name_that_is_not_idna_over_tcp(trusted: Gateway) -> None:
    # A node list naming a host whose label is too long for IDNA: the look-up fails
    # as a bad name, nothing is left unretrieved, and the node goes on serving.
    start = trusted.log_size()
    bad = "a" * 70 + ".example"
    body = f"sip:{bad}:5060;transport=tcp;status=active\r\n".encode()
    request = kdmq(trusted.sip_port, peer="notification_peer", body=body)
    with connect(trusted) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"SIP/2.0 200")
    wait_until(lambda: "cannot resolve" in trusted.log_text(start), 10, "the look-up failed")
    time.sleep(1.5)  # the pings that follow try the name again
    log = trusted.log_text(start)
    assert "never retrieved" not in log
    assert "Traceback" not in log
    assert trusted.health() is not None
