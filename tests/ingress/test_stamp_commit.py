"""Our origin seqs are committed per loop turn, not per message, and still before the
message leaves: a real gateway process, a real receiving DMQ node in a thread of its
own that reads the gateway's state database the moment each datagram reaches it, and a
``kill -9`` in the middle of a burst.

The commit of many stamps in one turn is what makes a POST cheap; what must not change
is the guarantee behind it: a receiver never gets a seq the gateway could hand out
again after a crash, or its reorderer would hold (or drop as a duplicate) the new
message carrying it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.dmq.peers import PeerMessage, PeerReply
from app.gateway.config import GatewayConfig
from app.gateway.origin import parse_origin
from app.gateway.service import Gateway as Service
from app.gateway.store import DB_NAME
from app.transport.server import DmqServer
from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.gateway.conftest import Node, node_config, running, stop_all

PEER = "stamps"
BATCH = 200
SINGLE_POSTS = 100


@dataclass
class Arrival:
    body: bytes
    epoch: str
    seq: int
    #: The gateway's committed seq for the stream when the datagram got here.
    committed: int


@dataclass
class Receiver:
    """A DMQ node on its own thread and event loop (the gateway's commits cannot be
    waited for by sharing a loop with it); each message's stamp is checked against a
    second connection to the gateway's database as it arrives."""

    database: Path
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.config = node_config()
        self.uri = str(self.config.server_address)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10), "the receiving node did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _run(self) -> None:
        server = DmqServer(self.config)
        db = sqlite3.connect(self.database)

        def handler(message: PeerMessage) -> PeerReply:
            stamp = parse_origin(message.origin)
            assert stamp is not None, "a broadcast of the gateway came without its stamp"
            row = db.execute("SELECT seq FROM origin_seq WHERE peer_id = ?", (PEER,)).fetchone()
            with self.lock:
                self.arrivals.append(
                    Arrival(message.body, stamp.epoch, stamp.seq, row[0] if row else 0)
                )
            return PeerReply()

        server.register_peer(PEER, handler)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(grace=0.2)
            db.close()

    def seen(self) -> list[Arrival]:
        with self.lock:
            return list(self.arrivals)


async def burst(client: httpx.AsyncClient, gateway: Gateway) -> None:
    """A batch (its messages stamped in one turn) beside concurrent single POSTs (many
    of them in one turn); the gateway may vanish in the middle."""
    batch = [{"body": f"b{n}"} for n in range(BATCH)]

    async def post(path: str, **kwargs: object) -> None:
        with contextlib.suppress(httpx.HTTPError):  # killed under it
            await client.post(f"{gateway.url}/v1/peers/{PEER}/{path}", **kwargs)  # type: ignore[arg-type]

    await asyncio.gather(
        post("broadcast/batch", json=batch),
        *(post("broadcast", content=f"s{n}") for n in range(SINGLE_POSTS)),
    )


async def test_no_seq_leaves_uncommitted_nor_is_reused_after_kill_9(tmp_path: Path) -> None:
    gateway = Gateway("a", tmp_path).start()
    receiver: Receiver | None = None
    try:
        receiver = Receiver(gateway.state_dir / DB_NAME).start()
        async with httpx.AsyncClient(timeout=10) as client:
            joined = await client.post(f"{gateway.url}/v1/nodes", json={"uri": receiver.uri})
            assert joined.status_code == 201, joined.text
            # One burst that completes, then one cut short by SIGKILL as soon as the
            # first of its messages arrived.
            await burst(client, gateway)
            first = BATCH + SINGLE_POSTS
            arrived = receiver.seen
            wait_until(lambda: len(arrived()) >= first, 10, "the first burst's messages")

            def kill_at_first_arrival() -> None:
                wait_until(lambda: len(arrived()) > first, 10, "the second burst's first")
                gateway.kill()

            await asyncio.gather(burst(client, gateway), asyncio.to_thread(kill_at_first_arrival))
            await asyncio.to_thread(gateway.restart)
            joined = await client.post(f"{gateway.url}/v1/nodes", json={"uri": receiver.uri})
            assert joined.status_code in (200, 201), joined.text
            for n in range(5):
                answer = await client.post(
                    f"{gateway.url}/v1/peers/{PEER}/broadcast?wait=true", content=f"r{n}"
                )
                assert answer.status_code == 200, answer.text
        after = receiver.seen()
    finally:
        gateway.kill()
        if receiver is not None:
            receiver.stop()

    assert after, "nothing arrived"
    for arrival in after:
        assert arrival.seq <= arrival.committed, (
            f"seq {arrival.seq} arrived with only seq {arrival.committed} committed"
        )
    # The origin epoch is kept across the restart: the seqs go on from the highest one
    # that may have left, never from one already used.
    assert len({a.epoch for a in after}) == 1
    before = {a.seq for a in after if not a.body.startswith(b"r")}
    new = [a.seq for a in after if a.body.startswith(b"r")]
    assert len(before) > BATCH + SINGLE_POSTS, "nothing of the second burst arrived"
    assert len(new) >= 5, f"the POSTs after the restart did not arrive: {new}"
    assert min(new) > max(before), (
        f"after kill -9 the gateway reused seqs up to {max(before)}: {sorted(new)}"
    )


def test_a_refusal_in_the_middle_of_a_turn_leaves_no_hole(tmp_path: Path) -> None:
    """Messages stamped in one turn, one of them refused by the node (too large): the
    refused one uses up no seq, the others are numbered on without a gap, and the
    turn's last seq is what the store holds."""
    config = GatewayConfig(node=node_config(), state_dir=tmp_path / "state")
    with running(config) as client:
        receiver = Node(client, node_config()).start()
        receiver.listen(PEER)
        try:
            assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
            gateway: Service = client.app.state.gateway  # type: ignore[attr-defined]
            too_large = b"x" * 100_000  # more than a UDP datagram takes

            async def one_turn() -> list[object]:
                bodies = [b"m%d" % n for n in range(20)]
                bodies.insert(7, too_large)
                return await asyncio.gather(
                    *(gateway.broadcast(PEER, body, "text/plain") for body in bodies),
                    return_exceptions=True,
                )

            outcomes = receiver.call(one_turn)
            assert [type(o).__name__ for o in outcomes].count("MessageTooLargeError") == 1
            wait_until(lambda: len(receiver.received) >= 20, 10, "the 20 messages")
        finally:
            stop_all(client, [receiver])
    stamps = [parse_origin(m.origin) for m in receiver.received]
    assert sorted(s.seq for s in stamps if s is not None) == list(range(1, 21))
    db = sqlite3.connect(tmp_path / "state" / DB_NAME)
    try:
        row = db.execute("SELECT seq FROM origin_seq WHERE peer_id = ?", (PEER,)).fetchone()
    finally:
        db.close()
    assert row == (20,)


def test_seqs_a_failed_commit_left_are_written_before_the_next_stamp(tmp_path: Path) -> None:
    """A turn whose commit fails (another connection holds the database's write lock
    past the busy timeout): its message still leaves (its request was answered), and
    its seq is written by the next stamp's commit, even one of another stream, so a
    restart goes on after it."""
    config = GatewayConfig(node=node_config(), state_dir=tmp_path / "state")
    database = tmp_path / "state" / DB_NAME
    with running(config) as client:
        receiver = Node(client, node_config()).start()
        receiver.listen(PEER)
        try:
            assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
            assert client.post(f"/v1/peers/{PEER}/broadcast").status_code == 202
            locker = sqlite3.connect(database, timeout=0)
            locker.execute("BEGIN IMMEDIATE")
            try:
                assert client.post(f"/v1/peers/{PEER}/broadcast").status_code == 202
            finally:
                locker.rollback()
                locker.close()
            answer = client.post(f"/v1/peers/{PEER}/send?node={receiver.uri}&wait=true")
            assert answer.status_code == 200, answer.text
            wait_until(lambda: len(receiver.received) >= 3, 10, "the three messages")
        finally:
            stop_all(client, [receiver])
    db = sqlite3.connect(database)
    try:
        rows = dict(db.execute("SELECT peer_id, seq FROM origin_seq").fetchall())
    finally:
        db.close()
    assert rows == {PEER: 2, f"{PEER}>{receiver.uri}": 1}


def test_a_store_that_cannot_commit_is_a_503_problem_not_a_bare_500(tmp_path: Path) -> None:
    """While another process holds the database's write lock past the busy time-out, a
    broadcast whose seq cannot be committed is refused with a 503 problem saying why
    (and Retry-After), and the same request succeeds once the lock is gone."""
    config = GatewayConfig(node=node_config(), state_dir=tmp_path / "state")
    database = tmp_path / "state" / DB_NAME
    with running(config) as client:
        receiver = Node(client, node_config()).start()
        receiver.listen(PEER)
        try:
            assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
            locker = sqlite3.connect(database, timeout=0)
            locker.execute("BEGIN IMMEDIATE")
            try:
                # The first one's turn cannot commit, yet it was accepted: it leaves.
                assert client.post(f"/v1/peers/{PEER}/broadcast").status_code == 202
                # The next must write the seq left over first, and cannot.
                refused = client.post(f"/v1/peers/{PEER}/broadcast")
            finally:
                locker.rollback()
                locker.close()
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"] == "1"
            assert "state store could not commit" in refused.json()["detail"]
            assert client.post(f"/v1/peers/{PEER}/broadcast").status_code == 202
            wait_until(lambda: len(receiver.received) >= 2, 10, "the two accepted messages")
        finally:
            stop_all(client, [receiver])


def test_the_event_loop_waits_a_tenth_of_a_second_for_a_lock_held_elsewhere(
    tmp_path: Path,
) -> None:
    """The store's writes run on the event loop: SQLite's default busy time-out (5 s)
    would freeze the node and the API that long for someone's open shell."""
    from app.gateway.store import BUSY_TIMEOUT, StateStore

    (tmp_path / "state").mkdir()
    store = StateStore(tmp_path / "state")
    store.open()
    try:
        (waits_ms,) = store.db.execute("PRAGMA busy_timeout").fetchone()
    finally:
        store.close()
    assert waits_ms == round(BUSY_TIMEOUT * 1000) == 100
