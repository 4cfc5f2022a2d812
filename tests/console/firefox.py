"""Headless Firefox driven over WebDriver BiDi, the protocol Firefox speaks itself.

Debian has no geckodriver package, and nothing may be downloaded here, so the tests talk
BiDi over a WebSocket (``--remote-debugging-port``) with the ``websockets`` client the
project already uses: open a session, navigate, evaluate a script, read the console.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect

from harness.ports import free_port

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")


class Firefox:
    """One BiDi session on the first tab of a headless Firefox."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        #: Console entries and JavaScript errors, as BiDi ``log.entryAdded`` events.
        self.log: list[dict[str, Any]] = []
        self.command("session.new", {"capabilities": {}})
        self.command("session.subscribe", {"events": ["log.entryAdded"]})
        tree = self.command("browsingContext.getTree", {})
        self.context = tree["contexts"][0]["context"]

    def command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("method") == "log.entryAdded":
                self.log.append(message["params"])
            elif message.get("id") == mine:
                if message.get("type") == "error":
                    raise RuntimeError(f"{method}: {message.get('message') or message}")
                result: dict[str, Any] = message["result"]
                return result

    def navigate(self, url: str) -> None:
        self.command(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}
        )

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (primitives only)."""
        result = self.command(
            "script.evaluate",
            {"expression": expression, "target": {"context": self.context}, "awaitPromise": True},
        )
        if result.get("type") == "exception":
            raise RuntimeError(f"{expression}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        return [str(e.get("text")) for e in self.log if e.get("level") == "error"]


@contextmanager
def firefox() -> Iterator[Firefox]:
    """A headless Firefox with a profile of its own, stopped by its pid on exit."""
    assert FIREFOX is not None
    port = free_port()
    profile = tempfile.mkdtemp(prefix="console-firefox-")
    proc = subprocess.Popen(
        [
            FIREFOX,
            "--headless",
            "--no-remote",
            "--profile",
            profile,
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ws = connect(f"ws://127.0.0.1:{port}/session", max_size=None, open_timeout=5)
                break
            except (OSError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Firefox did not open BiDi on port {port}") from None
                time.sleep(0.2)
        with ws:
            yield Firefox(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
