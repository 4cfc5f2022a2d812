"""The gateway's durable state: one SQLite database, ``<state dir>/gateway.db``.

What it keeps, so that a restart (SIGTERM or ``kill -9``) changes nothing a client sees:

* ``peers``: one row per registered peer: its settings, its history epoch, and the
  highest offset trimmed away (so offsets go on where they stopped even when the
  history is empty). It replaces ``peers.json``, which is imported once.
* ``pages``: each peer's messages and gap entries. One row (a *page*) holds the
  entries ``first``..``last`` that one commit wrote for a peer's epoch, packed with
  :mod:`marshal`: the group commit of a loop turn's messages is one INSERT, not one
  per message, and trimming (to the peer's ``history`` count, ``history_max_age`` and
  ``history_bytes``) deletes whole pages; the peer's ``trimmed`` offset says where the
  history starts inside a page that straddles it. (The former ``history`` table, one
  row per message, is moved into pages once at open.)
* ``streams`` and ``held``: the receiver's next expected ``seq`` per (peer, origin,
  origin epoch, to), written in the same commit as the entries that moved it (one
  UPSERT per stream and commit), and the messages held in the reorder buffer
  (:mod:`app.gateway.reorder`).
* ``seen``: for ``reply: subscriber`` peers, the seqs delivered above a stream's
  watermark, so that deduplication survives a restart.
* ``origin_seq`` and ``meta``: this gateway's own origin epoch and the last ``seq`` it
  stamped per peer (:mod:`app.gateway.origin`).

Durability: the database is in WAL mode, and a message is committed before the node
answers it 200. The hub writes it inside the KDMQ handler and defers the answer; the
messages of one loop turn share one transaction, committed once by a ``call_soon``
that then sends all their 200s (group commit: a commit costs as much as many INSERTs,
and this is what keeps the durable history near the speed of memory). With
``synchronous=NORMAL`` (``--history-sync normal``) a commit is a write to the WAL with
no fsync: it survives the process crashing, not the machine losing power. ``full``
fsyncs the WAL on every commit and survives power loss, at the price of one fsync per
batch. The calls are synchronous on the event loop on purpose: a message costs an
append to a list, and a batch one page INSERT and one commit, a few tens of
microseconds, cheaper than a hop to a thread.

A database that cannot be opened or read (corrupt, not a database) is moved aside
with one error log line and the gateway starts with a new one, as it did for a
damaged ``peers.json``.
"""

from __future__ import annotations

import json
import logging
import marshal
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from app.gateway.models import PeerSettings

log = logging.getLogger("dmq.gateway")

DB_NAME = "gateway.db"
#: How long a write on the event loop waits for the database's write lock held by
#: another connection (someone's ``sqlite3`` shell, a backup), in seconds. SQLite's
#: default, 5 s, froze the whole gateway (the node, every API request) that long on
#: each attempt; past this the turn's commit fails instead, its KDMQ requests are
#: answered 500 (their senders retransmit) and its API requests 503 with Retry-After.
BUSY_TIMEOUT = 0.1
#: Bytes of WAL file kept when the WAL starts over (a burst's growth beyond is given
#: back to the disk then; below, the file's blocks are reused without growing it).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: Files a write interrupted by a crash can leave in the state dir (see
#: StateStore._remove_temporaries); removed at every start.
TEMPORARY_PATTERNS = (".peers-*.json", ".peers-*.json.tmp", "peers.json.tmp")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    epoch TEXT NOT NULL,
    trimmed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS history (
    peer_id TEXT NOT NULL,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    at REAL NOT NULL,
    sender TEXT NOT NULL,
    content_type TEXT,
    body BLOB NOT NULL,
    gap TEXT,
    -- a stamped message delivered in order: its stream and seq
    origin TEXT,
    origin_epoch TEXT,
    recipient TEXT,
    seq INTEGER,
    PRIMARY KEY (peer_id, epoch, offset)
) WITHOUT ROWID;
-- the history: each page holds the entries first..last of one peer's epoch, as written
-- by one commit (one row per batch rather than one per message)
CREATE TABLE IF NOT EXISTS pages (
    peer_id TEXT NOT NULL,
    epoch TEXT NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (peer_id, epoch, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    peer_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    origin_epoch TEXT NOT NULL,
    recipient TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    PRIMARY KEY (peer_id, origin, origin_epoch, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (
    peer_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    origin_epoch TEXT NOT NULL,
    recipient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    arrived REAL NOT NULL,
    sender TEXT NOT NULL,
    content_type TEXT,
    body BLOB NOT NULL,
    PRIMARY KEY (peer_id, origin, origin_epoch, recipient, seq)
) WITHOUT ROWID;
-- reply: subscriber peers: seqs delivered above the stream's watermark (streams.next_seq)
CREATE TABLE IF NOT EXISTS seen (
    peer_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    origin_epoch TEXT NOT NULL,
    recipient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (peer_id, origin, origin_epoch, recipient, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS origin_seq (peer_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""


_UPSERT_STREAM = (
    "INSERT INTO streams (peer_id, origin, origin_epoch, recipient, next_seq) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)"
)
#: Entries per page when rows of the former one-row-per-message table are moved over.
MIGRATED_PAGE = 256


def _unpack(data: bytes) -> list[tuple[Any, ...]]:
    """The entries of a page: ``(offset, at, sender, content_type, body, gap)`` each;
    ValueError when the page is not what :meth:`StateStore._write_rows` wrote."""
    try:
        entries = marshal.loads(data)
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"not a page: {exc}") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, tuple) and len(e) == 6 for e in entries
    ):
        raise ValueError("not a list of entries")
    return entries


class HistorySync(StrEnum):
    """``--history-sync``: what a commit survives."""

    #: WAL, no fsync per commit: survives a process crash (``kill -9``).
    NORMAL = "normal"
    #: fsync per commit: survives power loss too.
    FULL = "full"


class HistoryStore(StrEnum):
    """``--history-store``: where peers' histories live."""

    SQLITE = "sqlite"
    #: In memory, a new epoch at every start (the registry is still kept).
    MEMORY = "memory"


@dataclass(frozen=True, slots=True)
class StoredPeer:
    settings: PeerSettings
    epoch: str
    trimmed: int


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One history row: a message, or (``gap`` set) a gap entry."""

    epoch: str
    offset: int
    at: float
    sender: str
    content_type: str | None
    body: bytes
    gap: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class HeldRow:
    peer_id: str
    origin: str
    origin_epoch: str
    to: str
    seq: int
    arrived: float
    sender: str
    content_type: str | None
    body: bytes


class StateStore:
    """The database of one gateway; every method runs on the event loop, briefly."""

    def __init__(self, state_dir: Path, *, sync: HistorySync = HistorySync.NORMAL) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.sync = sync
        self._db: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        #: Held while the worker thread checkpoints, and by close(): closing the
        #: checkpoint connection while a checkpoint runs on it crashes the process.
        self._checkpoint_lock = threading.Lock()
        self._closed = False
        #: History rows appended in the open transaction and not written yet: they go
        #: in with one ``executemany`` before anything else reads or trims the history,
        #: and at the latest just before the commit (binding and stepping one prepared
        #: statement for many rows, rather than one ``execute`` call per message).
        self._rows: list[tuple[Any, ...]] = []
        #: Checkpoint passes run, and the WAL's frames at the last one (/metrics).
        self.checkpoints = 0
        self.wal_frames = 0

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self._remove_temporaries()
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            broken = self.path.with_name(DB_NAME + ".broken")
            log.error("cannot read %s (%s); moved it to %s", self.path, exc, broken)
            os.replace(self.path, broken)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._db = self._connect()
        self._import_peers_json()
        self._migrate_history()

    def _migrate_history(self) -> None:
        """Move the rows of the former ``history`` table (one per message) into pages,
        once: their streams' positions first, then the entries, in pages of
        :data:`MIGRATED_PAGE`."""
        db = self.db
        if db.execute("SELECT 1 FROM history LIMIT 1").fetchone() is None:
            return
        moved = 0
        with self.transaction():
            db.execute(
                "INSERT INTO streams (peer_id, origin, origin_epoch, recipient, next_seq) "
                "SELECT peer_id, origin, origin_epoch, recipient, max(seq) + 1 FROM history "
                "WHERE seq IS NOT NULL GROUP BY peer_id, origin, origin_epoch, recipient "
                "ON CONFLICT DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)"
            )
            page: list[tuple[Any, ...]] = []
            where: tuple[str, str] | None = None
            rows = db.execute(
                "SELECT peer_id, epoch, offset, at, sender, content_type, body, gap "
                "FROM history ORDER BY peer_id, epoch, offset"
            ).fetchall()
            for peer_id, epoch, offset, at, sender, content_type, body, gap in rows:
                if where != (peer_id, epoch) or len(page) >= MIGRATED_PAGE:
                    if page and where is not None:
                        self._rows.extend((*where, entry, None) for entry in page)
                        self._write_rows()
                    page, where = [], (peer_id, epoch)
                page.append(
                    (
                        offset,
                        at,
                        sender,
                        content_type,
                        bytes(body),
                        None if gap is None else json.loads(gap),
                    )
                )
                moved += 1
            if page and where is not None:
                self._rows.extend((*where, entry, None) for entry in page)
                self._write_rows()
            db.execute("DELETE FROM history")
        log.info("moved %d history rows into pages in %s", moved, self.path)

    def _remove_temporaries(self) -> None:
        """Delete what a crash in the middle of a write can leave in the state dir.

        The former ``peers.json`` registry was written to a ``.peers-*.json`` temporary
        and renamed over the file; a process killed between the two left the
        temporary behind, and nothing ever read or removed it. The database's own
        ``-wal`` and ``-shm`` files are not temporaries (the WAL holds committed
        messages) and are left to SQLite.
        """
        for pattern in TEMPORARY_PATTERNS:
            for leftover in self.state_dir.glob(pattern):
                try:
                    leftover.unlink()
                except OSError as exc:
                    log.warning("cannot remove the leftover temporary %s: %s", leftover, exc)
                else:
                    log.info("removed the leftover temporary %s", leftover)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.sync.value.upper()}")
            # Checkpoints (copying the WAL into the database, with an fsync) run in a
            # thread (checkpoint()), not inside a commit on the event loop: that halves
            # the cost of a commit.
            db.execute("PRAGMA wal_autocheckpoint=0")
            # A WAL that a burst grew past this is cut back to it when it starts over.
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Reads the whole schema: a file that is not a database fails here.
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM peers").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @property
    def db(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise RuntimeError("the state store is not open")
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        # A checkpoint still running in its thread (a cancelled to_thread() call goes
        # on) finishes first.
        with self._checkpoint_lock:
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def checkpoint(self) -> int:
        """Copy the WAL into the database without blocking writers (PASSIVE), on a
        connection of its own: call it from one worker thread, periodically. After
        :meth:`close` it does nothing.

        Returns the frames the WAL held when the pass began, all of them now in the
        database; -1 when it could not copy them all, or did nothing. Frames committed
        while it ran are not copied: the WAL then cannot start over at the next write,
        and grows on behind them. Under a steady load a commit lands during every
        pass, and the WAL would grow without end; see :meth:`Gateway._checkpoint_loop`
        for how the gateway gets a pass with nothing behind it."""
        with self._checkpoint_lock:
            if self._closed:
                return -1
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            row = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
            # (busy, frames in the WAL, frames copied), as the pass began; frames are
            # -1 when the database is not in WAL mode.
            busy, frames, copied = row
            self.wal_frames = int(frames)
            return int(frames) if not busy and frames == copied else -1

    def wal_bytes(self) -> int:
        """The size of the WAL file: what a restart would replay, and disk in use."""
        try:
            return self.path.with_name(DB_NAME + "-wal").stat().st_size
        except OSError:
            return 0

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One commit for everything done inside (nested uses join the outer one)."""
        db = self.db
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN")
        try:
            yield db
            self._write_rows()
        except BaseException:
            self._rows.clear()
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def begin(self) -> None:
        """Open a transaction that later writes (and :meth:`transaction` blocks) join
        until :meth:`commit`: the hub's group commit, one commit per loop turn."""
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN")

    def commit(self) -> None:
        db = self.db
        if db.in_transaction:
            self._write_rows()
            db.execute("COMMIT")

    def rollback(self) -> None:
        self._rows.clear()
        db = self.db
        if db.in_transaction:
            db.execute("ROLLBACK")

    @contextmanager
    def savepoint(self) -> Iterator[sqlite3.Connection]:
        """Inside an open transaction: what is written inside is undone alone if it
        fails, so one message that cannot be stored does not take its batch with it
        (history rows not written yet are simply taken back)."""
        db = self.db
        pending = len(self._rows)
        db.execute("SAVEPOINT message")
        try:
            yield db
        except BaseException:
            del self._rows[pending:]
            db.execute("ROLLBACK TO message")
            db.execute("RELEASE message")
            raise
        db.execute("RELEASE message")

    def _write_rows(self) -> None:
        """Write the history entries appended since the last call: one page row per
        peer (usually one for the whole batch), and one UPSERT per ordered stream
        whose position moved."""
        rows = self._rows
        if not rows:
            return
        self._rows = []
        db = self.db
        pages: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        streams: dict[tuple[str, str, str, str], int] = {}
        for peer_id, epoch, entry, stream in rows:
            page = pages.get((peer_id, epoch))
            if page is None:
                page = pages[(peer_id, epoch)] = []
            page.append(entry)
            if stream is not None:
                key = stream[:4]
                seq = stream[4]
                if seq >= streams.get(key, 0):
                    streams[key] = seq + 1
        for (peer_id, epoch), entries in pages.items():
            db.execute(
                "INSERT OR REPLACE INTO pages (peer_id, epoch, first, last, entries) "
                "VALUES (?, ?, ?, ?, ?)",
                (peer_id, epoch, entries[0][0], entries[-1][0], marshal.dumps(entries)),
            )
        for key, next_seq in streams.items():
            db.execute(_UPSERT_STREAM, (*key, next_seq))

    def _import_peers_json(self) -> None:
        """Bring the peers of a ``peers.json`` (the registry's former home) in, once."""
        legacy = self.state_dir / "peers.json"
        if not legacy.exists():
            return
        try:
            data: Any = json.loads(legacy.read_text())
            peers = {str(k): PeerSettings.from_json(v) for k, v in data["peers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            broken = legacy.with_suffix(".json.broken")
            log.error("cannot read %s (%s); moved it to %s", legacy, exc, broken)
            os.replace(legacy, broken)
            return
        with self.transaction():
            for peer_id, settings in peers.items():
                self.db.execute(
                    "INSERT OR IGNORE INTO peers (peer_id, settings, epoch) VALUES (?, ?, ?)",
                    (peer_id, json.dumps(settings.to_json()), secrets.token_hex(4)),
                )
        os.replace(legacy, legacy.with_suffix(".json.imported"))
        log.info("imported %d peers from %s into %s", len(peers), legacy, self.path)

    # ------------------------------------------------------------------ registry

    def load_peers(self) -> dict[str, StoredPeer]:
        peers: dict[str, StoredPeer] = {}
        for peer_id, settings, epoch, trimmed in self.db.execute(
            "SELECT peer_id, settings, epoch, trimmed FROM peers"
        ):
            try:
                parsed = PeerSettings.from_json(json.loads(settings))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("stored peer %s has unreadable settings (%s); left out", peer_id, exc)
                continue
            peers[peer_id] = StoredPeer(parsed, epoch, trimmed)
        return peers

    def save_peer(self, peer_id: str, settings: PeerSettings, epoch: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO peers (peer_id, settings, epoch) VALUES (?, ?, ?) "
                "ON CONFLICT (peer_id) DO UPDATE SET settings = excluded.settings",
                (peer_id, json.dumps(settings.to_json()), epoch),
            )

    def delete_peer(self, peer_id: str) -> None:
        self._write_rows()
        with self.transaction() as db:
            for table in ("peers", "pages", "history", "streams", "held", "seen"):
                db.execute(f"DELETE FROM {table} WHERE peer_id = ?", (peer_id,))

    # ------------------------------------------------------------------ history

    def append(
        self,
        peer_id: str,
        epoch: str,
        offset: int,
        at: float,
        sender: str,
        content_type: str | None,
        body: bytes,
        gap: dict[str, Any] | None = None,
        stream: tuple[str, str, str, str, int] | None = None,
    ) -> None:
        """One entry; ``stream``: (peer_id, origin, origin epoch, to, seq) of a message
        delivered in order (its stream's position is written with it).

        Inside a transaction the entry is buffered and written with the others of the
        transaction as one page (:meth:`_write_rows`) before it commits; outside one,
        at once."""
        self._rows.append((peer_id, epoch, (offset, at, sender, content_type, body, gap), stream))
        if not self.db.in_transaction:
            with self.transaction():
                pass

    def load_history(
        self, peer_id: str, epoch: str, limit: int, after: int = 0
    ) -> list[StoredEntry]:
        """The newest ``limit`` entries of the peer's epoch after offset ``after`` (what
        trimming removed: a page may straddle it), oldest first. A page that cannot be
        read is logged and left out."""
        self._write_rows()
        newest: list[StoredEntry] = []
        if limit <= 0:
            return newest
        for first, last, data in self.db.execute(
            "SELECT first, last, entries FROM pages WHERE peer_id = ? AND epoch = ? "
            "AND last > ? ORDER BY first DESC",
            (peer_id, epoch, after),
        ):
            try:
                entries = _unpack(data)
            except ValueError as exc:
                log.error(
                    "history page %d..%d of peer %s is unreadable (%s); left out",
                    first,
                    last,
                    peer_id,
                    exc,
                )
                continue
            for offset, at, sender, content_type, body, gap in reversed(entries):
                if offset <= after:
                    break
                newest.append(StoredEntry(epoch, offset, at, sender, content_type, body, gap))
                if len(newest) >= limit:
                    break
            if len(newest) >= limit:
                break
        newest.reverse()
        return newest

    def latest_offset(self, peer_id: str, epoch: str) -> int:
        self._write_rows()
        row = self.db.execute(
            "SELECT max(last) FROM pages WHERE peer_id = ? AND epoch = ?", (peer_id, epoch)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def trim(self, peer_id: str, epoch: str, through_offset: int) -> None:
        """Drop the entries up to ``through_offset``: every page that ends there or
        before (a page straddling it is dropped with its last entry; ``trimmed`` in the
        peer's row says where the history starts)."""
        if through_offset <= 0:
            return
        self._write_rows()
        with self.transaction() as db:
            db.execute(
                "DELETE FROM pages WHERE peer_id = ? AND (epoch != ? OR last <= ?)",
                (peer_id, epoch, through_offset),
            )
            db.execute(
                "UPDATE peers SET trimmed = max(trimmed, ?) WHERE peer_id = ?",
                (through_offset, peer_id),
            )

    # ------------------------------------------------------------------ streams

    def forget_stream(self, key: tuple[str, str, str, str]) -> None:
        """The stream ended (a new origin epoch): its position and held messages go."""
        self._write_rows()  # (entries buffered before would write its position again)
        for table in ("streams", "held", "seen"):
            self.db.execute(
                f"DELETE FROM {table} WHERE peer_id = ? AND origin = ? AND origin_epoch = ? "
                "AND recipient = ?",
                key,
            )

    def load_streams(self) -> list[tuple[tuple[str, str, str, str], int]]:
        """Every stream's next seq (written with the entries that moved it)."""
        self._write_rows()
        return [
            ((p, o, e, t), n)
            for p, o, e, t, n in self.db.execute(
                "SELECT peer_id, origin, origin_epoch, recipient, next_seq FROM streams"
            )
        ]

    def mark_seen(self, key: tuple[str, str, str, str], seq: int, watermark: int | None) -> None:
        """An unordered stream (``reply: subscriber``) delivered ``seq``; ``watermark``:
        its new next seq when it moved (every seq below counts as seen, and the rows
        below go). Bounded like the memory state: at most ``--reorder-limit`` rows per
        stream stay above the watermark."""
        db = self.db
        if watermark is None or seq >= watermark:
            db.execute(
                "INSERT OR IGNORE INTO seen (peer_id, origin, origin_epoch, recipient, seq) "
                "VALUES (?, ?, ?, ?, ?)",
                (*key, seq),
            )
        if watermark is not None:
            db.execute(_UPSERT_STREAM, (*key, watermark))
            db.execute(
                "DELETE FROM seen WHERE peer_id = ? AND origin = ? AND origin_epoch = ? "
                "AND recipient = ? AND seq < ?",
                (*key, watermark),
            )

    def load_seen(self) -> dict[tuple[str, str, str, str], list[int]]:
        """Every unordered stream's seqs seen above its watermark."""
        seen: dict[tuple[str, str, str, str], list[int]] = {}
        for p, o, e, t, s in self.db.execute(
            "SELECT peer_id, origin, origin_epoch, recipient, seq FROM seen"
        ):
            seen.setdefault((p, o, e, t), []).append(s)
        return seen

    def hold(self, row: HeldRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO held (peer_id, origin, origin_epoch, recipient, seq, "
            "arrived, sender, content_type, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.peer_id,
                row.origin,
                row.origin_epoch,
                row.to,
                row.seq,
                row.arrived,
                row.sender,
                row.content_type,
                row.body,
            ),
        )

    def unhold(self, key: tuple[str, str, str, str], seq: int) -> None:
        self.db.execute(
            "DELETE FROM held WHERE peer_id = ? AND origin = ? AND origin_epoch = ? "
            "AND recipient = ? AND seq = ?",
            (*key, seq),
        )

    def load_held(self) -> list[HeldRow]:
        return [
            HeldRow(p, o, e, t, s, a, snd, ct, bytes(b))
            for p, o, e, t, s, a, snd, ct, b in self.db.execute(
                "SELECT peer_id, origin, origin_epoch, recipient, seq, arrived, sender, "
                "content_type, body FROM held ORDER BY seq"
            )
        ]

    # ------------------------------------------------------------------ our own stamps

    def origin_epoch(self) -> str:
        """This gateway's origin epoch, drawn the first time and kept from then on."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'origin_epoch'").fetchone()
        if row is not None:
            return str(row[0])
        epoch = secrets.token_hex(4)
        with self.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('origin_epoch', ?)", (epoch,))
        return epoch

    def load_origin_seqs(self) -> dict[str, int]:
        """Stream name (the peer id, or ``peer>node`` for sends) -> the last seq used."""
        return {p: s for p, s in self.db.execute("SELECT peer_id, seq FROM origin_seq")}

    def save_origin_seqs(self, seqs: Iterable[tuple[str, int]]) -> None:
        """Write the last seq used per stream, in the open transaction (the hub's
        group commit), or in one of its own."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO origin_seq (peer_id, seq) VALUES (?, ?) "
                "ON CONFLICT DO UPDATE SET seq = excluded.seq",
                seqs,
            )
