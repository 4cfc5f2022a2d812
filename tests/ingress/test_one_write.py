"""Each HTTP response of a real gateway leaves in one TCP segment, head and body together.

uvicorn writes a response's head when the app starts it and its body when the app sends
it, so every answer cost two ``send`` calls and two segments (the accepted sockets have
TCP_NODELAY); the gateway's HTTP protocol holds the head until the body's first write
(app/api/guard.py ``_HeadWithBody``). The client counts the segments that carried data
to it (``tcpi_data_segs_in`` of ``TCP_INFO``, Linux), so a response written in two
pieces is seen as two whatever the timing; pure ACKs are not counted.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.gateway import Gateway

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO is Linux's")

#: Offset of ``tcpi_data_segs_in`` (u32) in Linux's ``struct tcp_info`` (since 4.6).
DATA_SEGS_IN = 152
TOKEN = "one-write-token"


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < DATA_SEGS_IN + 4:
        pytest.skip("this kernel's tcp_info has no tcpi_data_segs_in")
    return int(struct.unpack_from("I", info, DATA_SEGS_IN)[0])


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status, head and body of one response (its body sized by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir: Path = tmp_path_factory.mktemp("one-write")
    gw = Gateway("a", workdir, tokens=(TOKEN,), extra=("--peer", "news")).start()
    try:
        yield gw
    finally:
        gw.stop()


def request(method: str, target: str, body: bytes = b"", close: bool = False) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {TOKEN}",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CASES = [
    # The fast path's 202, FastAPI's router (a timeout only FastAPI parses), a routed
    # GET and a problem+json 404.
    ("fast path 202", "POST", "/v1/peers/news/broadcast", b"hello", 202),
    ("routed 202", "POST", "/v1/peers/news/broadcast?timeout=3e1", b"hello", 202),
    ("routed GET", "GET", "/v1/health", b"", 200),
    ("problem 404", "GET", "/v1/peers/nobody", b"", 404),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_response_is_one_segment(
    gateway: Gateway, case: tuple[str, str, str, bytes, int]
) -> None:
    _, method, target, body, status = case
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for _ in range(5):  # keep-alive: every response on the connection, not the first
            before = data_segments_in(sock)
            sock.sendall(request(method, target, body))
            got, head, answer = read_response(sock)
            assert got == status, (head, answer)
            assert answer, "a response with a body"
            assert data_segments_in(sock) - before == 1, head


def test_a_response_that_closes_the_connection_leaves_whole(gateway: Gateway) -> None:
    """``Connection: close``: the held head is written before the transport closes."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request("POST", "/v1/peers/news/broadcast", b"bye", close=True))
        status, head, body = read_response(sock)
        assert status == 202, (head, body)
        assert b'"peer":"news"' in body
        assert sock.recv(100) == b""  # then closed
