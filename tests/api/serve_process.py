"""One real ``dmq-gateway serve`` process on loopback, with or without API tokens.

Used by the auth, CLI client and schemathesis tests: free loopback ports for SIP and
HTTP, a state directory and a log file in a temporary directory, ready once
``GET /v1/health`` answers 200, stopped by pid with SIGTERM (SIGKILL if it hangs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

#: SIP timers short enough for tests: retransmit from 50 ms, give up after 1 s.
FAST_TIMERS = ("--t1", "0.05", "--t2", "0.2", "--timer-f", "1.0")


def dmq_gateway_command() -> list[str]:
    """The installed ``dmq-gateway`` script of this virtualenv, or ``python -m app.cli``."""
    script = Path(sys.executable).with_name("dmq-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("dmq-gateway")
    return [found] if found else [sys.executable, "-m", "app.cli"]


def clean_env() -> dict[str, str]:
    """This environment without any DMQ_* variable, so nothing changes the options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """``dmq-gateway serve`` on free loopback ports; ``uri`` is SIP, ``url`` the API."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "gateway",
        tokens: Sequence[str] = (),
        notify: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.sip_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.sip_port:  # pragma: no cover - vanishingly rare
            self.http_port = free_port()
        self.uri = f"sip:127.0.0.1:{self.sip_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.ws_url = f"ws://127.0.0.1:{self.http_port}"
        self.tokens = tuple(tokens)
        self.state_dir = workdir / f"{name}-state"
        self.log_path = workdir / f"{name}.log"
        self.args = [
            *dmq_gateway_command(),
            "serve",
            "--server-address",
            self.uri,
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--state-dir",
            str(self.state_dir),
            "--ping-interval",
            "1",
            "--log-level",
            "info",
            *FAST_TIMERS,
        ]
        for token in self.tokens:
            self.args += ["--api-token", token]
        for address in notify:
            self.args += ["--notification-address", address]
        self.args += list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ServeProcess({self.name}, {self.uri}, {self.url})"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[0]}"} if self.tokens else {}

    def start(self, timeout: float = 20.0) -> ServeProcess:
        """Start the process and wait until ``GET /v1/health`` answers 200."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=clean_env(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            try:
                response = httpx.get(f"{self.url}/v1/health", headers=self.headers, timeout=0.5)
                if response.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"{self} did not answer GET /v1/health in {timeout} s:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by pid and wait; SIGKILL by pid if it does not exit in ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
