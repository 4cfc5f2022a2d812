"""Closing the state store while its worker thread checkpoints.

The gateway checkpoints the WAL with ``asyncio.to_thread``; cancelling that call at
stop does not stop the thread, so ``close()`` can meet a checkpoint in progress on the
checkpoint connection. Closing an SQLite connection under a running statement crashed
the whole process (a segmentation fault at SIGTERM); here both race many times.
"""

from __future__ import annotations

import threading
from pathlib import Path

from app.gateway.store import StateStore


def _checkpoints(store: StateStore, started: threading.Event, errors: list[BaseException]) -> None:
    try:
        started.set()
        for _ in range(200):
            store.checkpoint()
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_close_waits_for_a_running_checkpoint_and_later_ones_do_nothing(tmp_path: Path) -> None:
    for round_ in range(60):
        store = StateStore(tmp_path / f"s{round_}")
        store.open()
        with store.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS filler (x BLOB)")
            db.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 4096,)] * 64)
        errors: list[BaseException] = []
        started = threading.Event()
        worker = threading.Thread(target=_checkpoints, args=(store, started, errors))
        worker.start()
        started.wait(5)
        store.close()
        worker.join(30)
        assert not worker.is_alive()
        assert errors == []
        store.checkpoint()  # after close: nothing, no error
