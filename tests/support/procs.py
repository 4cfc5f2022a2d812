"""Start, drive and stop :mod:`tests.support.node_process` nodes from a test."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.gateway import FAST_TIMERS

ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    """One node process. ``uri`` is its server address."""

    _ids = itertools.count(1)

    def __init__(
        self,
        port: int,
        *,
        transport: str = "udp",
        notify: list[str] | None = None,
        peers: tuple[str, ...] = ("htable",),
        ping_interval: float = 1.0,
        extra: list[str] | None = None,
        log_path: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.port = port
        self.transport = transport
        self.uri = f"sip:127.0.0.1:{port}" + (
            "" if transport == "udp" else f";transport={transport}"
        )
        args = [
            sys.executable,
            "-m",
            "tests.support.node_process",
            "--server-address",
            self.uri,
            "--ping-interval",
            str(ping_interval),
            "--log-level",
            "info",
            *FAST_TIMERS,
        ]
        for address in notify or []:
            args += ["--notification-address", address]
        for peer in peers:
            args += ["--peer", peer]
        if seed is not None:
            args += ["--seed", str(seed)]
        args += extra or []
        self.args = args
        self.log_path = log_path
        #: Every event below carries ``"at"``: ``time.monotonic()`` in the test process
        #: when its line was read.
        self.messages: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.inits: list[str] = []
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()

    def start(self, timeout: float = 15.0) -> NodeProcess:
        """Start the process and wait until it listens."""
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> NodeProcess:
        """Start the process without waiting (see :meth:`wait_ready`)."""
        self.ready.clear()
        self.stopped.clear()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with (
            open(self.log_path, "a") if self.log_path else open(os.devnull, "w")
        ) as stderr:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
                env=env,
            )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def wait_ready(self, timeout: float = 15.0) -> NodeProcess:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc is not None and self.proc.poll() is not None:
                self._close_stdin()
                raise AssertionError(
                    f"node {self.uri} exited with {self.proc.returncode} before it was ready"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"node {self.uri} did not become ready in {timeout} s")
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = item.get("event")
            item["at"] = time.monotonic()
            with self._lock:
                if event == "message":
                    self.messages.append(item)
                elif event == "status":
                    self.statuses.append(item)
                elif event == "init":
                    self.inits.append(item["peer"])
                elif event == "ready":
                    self.ready.set()
                elif event == "stopped":
                    self.stopped.set()
                elif "id" in item and item["id"] in self._replies:
                    self._replies[item["id"]].put(item)
        proc.stdout.close()

    def command(self, cmd: str, timeout: float = 30.0, **fields: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        ident = next(self._ids)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        self._replies[ident] = box
        self.proc.stdin.write(json.dumps({"cmd": cmd, "id": ident, **fields}) + "\n")
        self.proc.stdin.flush()
        try:
            item = box.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"node {self.uri} did not answer {cmd!r}") from None
        finally:
            del self._replies[ident]
        if "error" in item:
            raise RuntimeError(item["error"])
        return item["reply"]

    def send_command_nowait(self, cmd: str, **fields: Any) -> int:
        """Send a command without waiting; its answer is discarded."""
        assert self.proc is not None and self.proc.stdin is not None
        ident = next(self._ids)
        self.proc.stdin.write(json.dumps({"cmd": cmd, "id": ident, **fields}) + "\n")
        self.proc.stdin.flush()
        return ident

    def nodes(self) -> dict[str, str]:
        """Other nodes as {uri: status}."""
        return {n["uri"]: n["status"] for n in self.command("nodes") if not n["local"]}

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: the node leaves the bus, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(AssertionError, BrokenPipeError, RuntimeError):
            self.command("stop", timeout=timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_stdin()

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a word."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_stdin()

    def _close_stdin(self) -> None:
        # stdout is closed by the reader thread at end of file.
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
