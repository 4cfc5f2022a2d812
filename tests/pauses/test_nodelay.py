"""Every accepted HTTP connection has Nagle's algorithm off, on the default asyncio
loop too (uvloop sets it itself; asyncio only for a socket whose proto says TCP).

With Nagle on, a response written in two pieces (uvicorn writes the head, then the
body) holds the body until the client ACKs the head, and a client delays that ACK by
some 40 ms. The check is the socket option on the server's side of a real connection.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from app.api.server import _listen_socket
from harness.ports import free_port


async def small_app(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send(  # type: ignore[operator]
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def test_accepted_http_sockets_have_tcp_nodelay_on_the_default_loop() -> None:
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("asyncio"), "this test is about asyncio's loop"
    port = free_port()
    listener = _listen_socket("127.0.0.1", port, "--http")
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    config = uvicorn.Config(small_app, loop="none", lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(2) == b"ok"
        [protocol] = server.server_state.connections
        accepted = protocol.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.close()
        await writer.wait_closed()
    finally:
        server.should_exit = True
        await task
