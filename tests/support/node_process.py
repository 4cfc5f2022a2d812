"""A DMQ node in its own process, driven by a test over stdin/stdout.

Run as ``python -m tests.support.node_process [--seed N] [serve options]``: it takes
exactly the options of ``dmq-gateway serve`` (parsed by the same code), plus ``--seed``
for the ``--drop-rate`` random generator, runs a real
:class:`~app.transport.server.DmqServer` on real sockets, and speaks JSON lines:

* stdin, one command per line: ``{"cmd": "nodes"}``, ``{"cmd": "broadcast", "peer":
  P, "body": TEXT, "content_type": CT}``, ``{"cmd": "send", ..., "node": URI}``,
  ``{"cmd": "stats"}``, ``{"cmd": "add_node", "uri": URI}``, ``{"cmd": "stop"}``
  (graceful leave, then exit), and ``{"cmd": "send_many", "peer": P, "node": URI,
  "count": N, "prefix": TEXT, "concurrency": C, "content_type": CT}``, which sends N
  bodies ``f"{prefix}{i}"`` (i = 0..N-1) to one node, at most C at a time, and answers
  with the final code of each (in order of i) and how long it took. Each command may
  carry an ``"id"``, echoed in the answer.
* stdout, one JSON object per line: ``{"event": "ready", ...}`` once listening,
  ``{"event": "message", ...}`` for every KDMQ request delivered to a ``--peer``,
  ``{"event": "status", ...}`` for every node status change, and ``{"reply": ...,
  "id": ...}`` answering a command.

Messages are reported, not logged, so that a test can count deliveries exactly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from app.api.server import event_loop_factory
from app.cli import build_parser, configure_logging, settings_from_args
from app.dmq.events import Event, NodeStatusChanged, SendOperation
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.transport.server import DmqServer


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def operation_json(operation: SendOperation) -> dict[str, Any]:
    return {
        "operation": operation.id,
        "targets": [str(t) for t in operation.targets],
        "results": [
            {
                "node": str(r.node),
                "code": r.code,
                "reason": r.reason,
                "body": r.body.decode("utf-8", "replace"),
                "timed_out": r.timed_out,
            }
            for r in operation.results
        ],
    }


async def send_many(server: DmqServer, command: dict[str, Any]) -> dict[str, Any]:
    """Send ``count`` bodies to one node, at most ``concurrency`` in flight at once."""
    loop = asyncio.get_running_loop()
    peer = command["peer"]
    node = SipUri.parse(command["node"])
    prefix = command.get("prefix", "")
    content_type = command.get("content_type")
    count = int(command["count"])
    slots = asyncio.Semaphore(int(command.get("concurrency", 50)))
    codes: list[int] = [0] * count

    async def one(index: int) -> None:
        async with slots:
            operation = await server.send(peer, f"{prefix}{index}".encode(), content_type, node)
            codes[index] = operation.results[0].code if operation.results else 0

    started = loop.time()
    await asyncio.gather(*(one(i) for i in range(count)))
    return {"codes": codes, "elapsed": loop.time() - started}


def node_json(server: DmqServer) -> list[dict[str, Any]]:
    return [
        {
            "uri": str(n.uri),
            "host": n.host,
            "port": n.port,
            "transport": n.transport,
            "status": n.status.value,
            "local": n.local,
        }
        for n in server.node.nodes
    ]


def split_seed(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take the harness-only ``--seed N`` out of ``argv``; the rest is ``serve``'s."""
    rest: list[str] = []
    seed: int | None = None
    items = iter(argv)
    for arg in items:
        if arg == "--seed":
            seed = int(next(items))
        elif arg.startswith("--seed="):
            seed = int(arg.partition("=")[2])
        else:
            rest.append(arg)
    return seed, rest


async def main(argv: list[str]) -> None:
    seed, serve_argv = split_seed(argv)
    args = build_parser().parse_args(["serve", *serve_argv])
    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    server = DmqServer(settings.node, drop_rate=settings.drop_rate, seed=seed)

    def recorder(peer_id: str) -> Any:
        def handler(message: PeerMessage) -> PeerReply:
            emit(
                {
                    "event": "message",
                    "peer": peer_id,
                    "body": message.body.decode("utf-8", "replace"),
                    "content_type": message.content_type,
                    "sender": str(message.sender),
                    "call_id": message.call_id,
                }
            )
            return PeerReply()

        return handler

    def init_hook(peer_id: str) -> Any:
        def hook() -> None:
            emit({"event": "init", "peer": peer_id})

        return hook

    for peer_id in settings.startup_peers:
        server.register_peer(peer_id, recorder(peer_id), init=init_hook(peer_id))

    def on_status(event: Event) -> None:
        if not isinstance(event, NodeStatusChanged):
            return
        emit(
            {
                "event": "status",
                "node": str(event.node),
                "old": event.old.value if event.old else None,
                "new": event.new.value if event.new else None,
                "reason": event.reason,
            }
        )

    server.event_listeners.append(on_status)
    await server.start()
    emit({"event": "ready", "uri": str(server.local_uri)})

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def handle(command: dict[str, Any]) -> None:
        ident = command.get("id")
        try:
            reply: Any
            cmd = command["cmd"]
            if cmd == "nodes":
                reply = node_json(server)
            elif cmd == "broadcast":
                operation = await server.broadcast(
                    command["peer"], command["body"].encode(), command.get("content_type")
                )
                reply = operation_json(operation)
            elif cmd == "send":
                operation = await server.send(
                    command["peer"],
                    command["body"].encode(),
                    command.get("content_type"),
                    SipUri.parse(command["node"]),
                )
                reply = operation_json(operation)
            elif cmd == "send_many":
                reply = await send_many(server, command)
            elif cmd == "add_node":
                server.add_node(SipUri.parse(command["uri"]))
                reply = node_json(server)
            elif cmd == "stats":
                stats = server.node.stats
                tx = server.node.transactions.stats
                reply = {
                    "received": {f"{p}:{c}": n for (p, c), n in stats.received.items()},
                    "sent": {f"{p}:{c}": n for (p, c), n in stats.sent.items()},
                    "retransmissions_sent": tx.retransmissions_sent,
                    "retransmissions_absorbed": tx.retransmissions_absorbed,
                    "responses_resent": tx.responses_resent,
                    "timeouts": tx.timeouts,
                    "transport_errors": tx.transport_errors,
                    "stray_responses": tx.stray_responses,
                    "malformed_answered": stats.malformed_answered,
                    "malformed_dropped": stats.malformed_dropped,
                    "dropped_datagrams": server.stats.dropped_datagrams,
                }
            elif cmd == "stop":
                stopping.set()
                reply = "stopping"
            else:
                raise ValueError(f"unknown command {cmd!r}")
            emit({"reply": reply, "id": ident})
        except Exception as exc:
            emit({"error": f"{type(exc).__name__}: {exc}", "id": ident})

    handling: set[asyncio.Task[None]] = set()

    async def read_commands() -> None:
        while not stopping.is_set():
            line = await reader.readline()
            if not line:
                stopping.set()
                return
            if line.strip():
                task = asyncio.ensure_future(handle(json.loads(line)))
                handling.add(task)
                task.add_done_callback(handling.discard)

    read_task = asyncio.ensure_future(read_commands())
    await stopping.wait()
    read_task.cancel()
    await server.stop()
    emit({"event": "stopped"})


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main(sys.argv[1:]))
