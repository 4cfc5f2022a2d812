"""Real ``dmq-gateway serve`` processes on loopback, for end-to-end API tests.

A :class:`Gateway` owns two ports picked once (SIP: free for both UDP and TCP; HTTP),
a state directory and a log file under the test's temporary directory. It can be
started, stopped gracefully (SIGTERM) or killed (SIGKILL), and started again on the
same ports and state directory. :func:`dump_logs_on_failure` prints what the gateways
logged during a test when that test failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

#: Timers short enough for tests: retransmit from 50 ms, give up after 1 s.
FAST_TIMERS = ("--t1", "0.05", "--t2", "0.2", "--timer-f", "1.0")

#: Lines of a gateway's log shown when it fails to start.
START_LOG_LINES = 60


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Gateway:
    """One ``dmq-gateway serve`` process; ``uri`` is its SIP address, ``url`` its API.

    ``notify`` takes gateways (or SIP URIs) to join the bus through; a gateway's URI is
    read when this one is spawned, since ports may change until a first start works.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        notify: Sequence[Gateway | str] = (),
        ping_interval: float = 1.0,
        extra: Sequence[str] = (),
        transport: str = "udp",
    ) -> None:
        self.name = name
        self.transport = transport
        self.state_dir = workdir / f"{name}-state"
        self.log_path = workdir / f"{name}.log"
        self.notify = tuple(notify)
        self.ping_interval = ping_interval
        self.extra = tuple(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        #: How many times the process was spawned.
        self.starts = 0
        #: Set once it answered: from then on it keeps its ports (restart reuses them).
        self.was_ready = False
        self._spawn_log_at = 0
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.sip_port = free_port()
        self.http_port = free_port()

    @property
    def uri(self) -> str:
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:127.0.0.1:{self.sip_port}{suffix}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"

    def __repr__(self) -> str:
        return f"Gateway({self.name}, {self.uri}, {self.url})"

    @property
    def args(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--server-address",
            self.uri,
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--state-dir",
            str(self.state_dir),
            "--ping-interval",
            str(self.ping_interval),
            "--log-level",
            "info",
            *FAST_TIMERS,
        ]
        for target in self.notify:
            args += [
                "--notification-address",
                target.uri if isinstance(target, Gateway) else target,
            ]
        return args + list(self.extra)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def spawn(self) -> Gateway:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        if self.alive:
            raise RuntimeError(f"{self} is already running")
        # Nothing from the caller's environment may change the gateway's options.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMQ_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.starts += 1
        self._spawn_log_at = self.log_size()
        with open(self.log_path, "ab") as log:
            log.write(f"==== {self.name} start #{self.starts}: {self.args}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        return self

    def health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET /v1/health of this gateway, or None when it does not answer (yet).

        An answer from another process that holds the port (naming another node)
        counts as none.
        """
        try:
            response = httpx.get(f"{self.url}/v1/health", timeout=timeout, trust_env=False)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        data: dict[str, Any] = response.json()
        return data if data.get("node") == self.uri else None

    def _lost_port_race(self) -> bool:
        """It exited at start because a port it was given was taken meanwhile."""
        return (
            not self.was_ready
            and self.proc is not None
            and self.proc.returncode == 2
            and "in use" in self.log_text(self._spawn_log_at)
        )

    def wait_ready(self, timeout: float = 20.0) -> Gateway:
        """Wait until GET /v1/health answers; fail with the log if the process dies.

        Before its first successful start a gateway that finds a port taken (another
        test run may have picked the same one) gets new ports and is spawned again.
        """
        deadline = time.monotonic() + timeout
        retries = 5
        while True:
            if self.proc is None or self.proc.poll() is not None:
                if retries and self._lost_port_race():
                    retries -= 1
                    self._pick_ports()
                    self.spawn()
                    continue
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(
                    f"{self} exited with {code} before it was ready; its log ends:\n"
                    + self.log_tail()
                )
            if self.health(timeout=0.5) is not None:
                self.was_ready = True
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"{self} did not answer GET /v1/health in {timeout} s; its log ends:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)

    def start(self, timeout: float = 20.0) -> Gateway:
        return self.spawn().wait_ready(timeout)

    def restart(self, timeout: float = 20.0) -> Gateway:
        """Start again on the same ports and state directory (after stop or kill)."""
        if self.alive:
            raise RuntimeError(f"{self} is still running; stop or kill it first")
        return self.start(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the node leaves the bus gracefully); SIGKILL if it hangs.

        Returns the exit code, or None when the process was not running.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self} did not exit within {timeout} s of SIGTERM; killed it"
            ) from None

    def kill(self) -> int | None:
        """SIGKILL: the node vanishes without telling the bus."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode

    # ------------------------------------------------------------------ logs

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, start: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(start)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = START_LOG_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def running(gateways: Iterable[Gateway]) -> Iterator[None]:
    """Make sure every gateway is stopped on the way out, even when a test breaks."""
    try:
        yield
    finally:
        for gateway in gateways:
            with contextlib.suppress(Exception):
                gateway.stop(timeout=10)
            gateway.kill()


@contextlib.contextmanager
def dump_logs_on_failure(
    request: pytest.FixtureRequest, gateways: Callable[[], Iterable[Gateway]]
) -> Iterator[None]:
    """Around one test: if it failed, print what each gateway logged meanwhile.

    Printed in teardown, so pytest shows it in the failure report under
    "Captured stdout teardown". ``gateways`` is called at both ends, so gateways
    started during the test are included (from the start of their log).
    """
    failed_before = request.session.testsfailed
    marks = {id(g): g.log_size() for g in gateways()}
    yield
    if request.session.testsfailed == failed_before:
        return
    for gateway in gateways():
        text = gateway.log_text(marks.get(id(gateway), 0))
        print(f"\n===== {gateway.name} ({gateway.uri}, {gateway.url}) log during the test =====")
        print(text.rstrip() or "(nothing)")
