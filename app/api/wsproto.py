"""uvicorn's sans-IO WebSocket protocol, writing the frames of one loop turn at once.

uvicorn writes every ``websocket.send`` to the socket as it comes: one
``transport.write`` (a system call, when the socket buffer has room) per frame. A
subscriber that is sent a page of a hundred frames in one turn paid a hundred, about a
sixth of a receiving gateway's CPU at several thousand messages a second, and a
publisher's acks the same on the sending side. :class:`CoalescingWebSocketProtocol`
keeps uvicorn's protocol as it is and changes only that: the frames are encoded at
once (so ``websocket.send`` still fails at once on a closed connection), and written
together at the end of the turn, or as soon as :data:`FLUSH_BYTES` are waiting.

Order is kept: whatever else the protocol writes (a close, a pong, a ping) drains the
same buffer of encoded frames first, so nothing overtakes a frame. Flow control is
uvicorn's (``send`` waits while the transport is paused), and at most
:data:`FLUSH_BYTES` wait per connection.
"""

from __future__ import annotations

from asyncio import Handle

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

#: Bytes of frames that wait for the end of the turn at most; more are written at once.
FLUSH_BYTES = 64 * 1024


class CoalescingWebSocketProtocol(WebSocketsSansIOProtocol):
    """See the module: one ``transport.write`` per loop turn for the frames sent in it."""

    _flush_handle: Handle | None = None
    _waiting = 0

    async def send(self, message: ASGISendEvent) -> None:
        if (
            message["type"] != "websocket.send"
            or not self.handshake_complete
            or self.close_sent
            or self.initial_response is not None
        ):
            self._write_frames()  # whatever else goes out goes after them
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        data = message.get("bytes")
        text = message.get("text")
        try:
            if data is not None:
                self.conn.send_binary(data)
                self._waiting += len(data)
            elif text is not None:
                encoded = text.encode()
                self.conn.send_text(encoded)
                self._waiting += len(encoded)
        except InvalidState:
            raise ClientDisconnected() from None
        if self._waiting >= FLUSH_BYTES:
            self._write_frames()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._write_frames)

    def _write_frames(self) -> None:
        """Write every frame encoded since the last write, in one call."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._waiting:
            return
        self._waiting = 0
        output = self.conn.data_to_send()
        if output and not self.transport.is_closing():
            self.transport.write(b"".join(output))
