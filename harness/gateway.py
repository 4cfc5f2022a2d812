"""Real ``dmq-gateway serve`` processes on loopback, for the tests and the benchmarks.

A :class:`Gateway` owns two ports (SIP: free for both UDP and TCP; HTTP), a state
directory and a log file under a work directory. It can be started, stopped gracefully
(SIGTERM), killed (SIGKILL) and started again on the same ports and state directory.
Processes are signalled by pid only, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

#: SIP timers short enough for tests: retransmit from 50 ms, give up after 1 s.
FAST_TIMERS = ("--t1", "0.05", "--t2", "0.2", "--timer-f", "1.0")

#: Lines of a gateway's log shown when it fails to start.
START_LOG_LINES = 60

#: How often a gateway that lost a port to another process gets new ports.
PORT_RETRIES = 5


def gateway_command() -> list[str]:
    """The ``dmq-gateway`` script of this virtualenv, else on PATH, else ``python -m app.cli``."""
    script = Path(sys.executable).with_name("dmq-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("dmq-gateway")
    return [found] if found else [sys.executable, "-m", "app.cli"]


def clean_env() -> dict[str, str]:
    """This environment without any ``DMQ_*`` variable, so nothing changes the options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one TLS identity and the CA its peers are checked against."""

    cert: str
    key: str
    ca: str


class Gateway:
    """One ``dmq-gateway serve`` process; ``uri`` is its SIP address, ``url`` its API.

    ``notify`` takes gateways or SIP URIs to join the bus through; a gateway's URI is
    read when this one is spawned, since its ports may change until a first start
    works. ``tokens`` become ``--api-token`` options (the first one authenticates the
    health checks, see :attr:`headers`). ``timers`` are SIP timer options, fast by
    default; pass ``()`` for the gateway's own defaults. ``host`` is the address its SIP
    and HTTP ports listen on, and ``command_prefix`` what the command runs under: a
    gateway on a host of a :class:`harness.netns.Lab` gets both (and a token and the
    lab's network as trusted) from :meth:`harness.netns.Host.gateway_options`.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        notify: Sequence[Gateway | str] = (),
        tokens: Sequence[str] = (),
        transport: str = "udp",
        ping_interval: float = 1.0,
        log_level: str = "info",
        timers: Sequence[str] = FAST_TIMERS,
        extra: Sequence[str] = (),
        host: str = "127.0.0.1",
        command_prefix: Sequence[str] = (),
        tls: TlsFiles | None = None,
        http_tls: TlsFiles | None = None,
    ) -> None:
        self.name = name
        #: SIP TLS identity (``--tls-cert``, ``--tls-key``, ``--tls-ca``); with
        #: ``transport="tls"`` the node listens for TLS.
        self.tls = tls
        #: The API's HTTPS identity: :attr:`url` is then ``https://``, checked against
        #: its ``ca``.
        self.http_tls = http_tls
        self.host = host
        self.command_prefix = tuple(command_prefix)
        self.transport = transport
        workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / f"{name}-state"
        self.log_path = workdir / f"{name}.log"
        self.notify = tuple(notify)
        self.tokens = tuple(tokens)
        self.ping_interval = ping_interval
        self.log_level = log_level
        self.timers = tuple(timers)
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

    # ------------------------------------------------------------------ addresses

    @property
    def uri(self) -> str:
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{self.host}:{self.sip_port}{suffix}"

    @property
    def url(self) -> str:
        scheme = "https" if self.http_tls is not None else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.http_tls is not None else "ws"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx's ``verify=`` needs to reach :attr:`url`."""
        if self.http_tls is None:
            return True
        return ssl.create_default_context(cafile=self.http_tls.ca)

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization`` with the first token, or nothing when the API is open."""
        return {"Authorization": f"Bearer {self.tokens[0]}"} if self.tokens else {}

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self} was never started")
        return self.proc.pid

    def __repr__(self) -> str:
        return f"Gateway({self.name}, {self.uri}, {self.url})"

    @property
    def args(self) -> list[str]:
        args = [
            *gateway_command(),
            "serve",
            "--server-address",
            self.uri,
            "--http",
            f"{self.host}:{self.http_port}",
            "--state-dir",
            str(self.state_dir),
            "--ping-interval",
            f"{self.ping_interval:g}",
            "--log-level",
            self.log_level,
            *self.timers,
        ]
        for token in self.tokens:
            args += ["--api-token", token]
        if self.tls is not None:
            args += ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key]
            args += ["--tls-ca", self.tls.ca]
        if self.http_tls is not None:
            args += ["--http-tls-cert", self.http_tls.cert, "--http-tls-key", self.http_tls.key]
        for target in self.notify:
            address = target.uri if isinstance(target, Gateway) else target
            args += ["--notification-address", address]
        return args + list(self.extra)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def spawn(self) -> Gateway:
        """Start the process without waiting for it (see :meth:`wait_ready`).

        In a session of its own, so that a Ctrl-C meant for the test run or benchmark
        reaches only that; it is stopped by its pid.
        """
        if self.alive:
            raise RuntimeError(f"{self} is already running")
        self.starts += 1
        self._spawn_log_at = self.log_size()
        args = self.args
        with open(self.log_path, "ab") as log:
            log.write(f"==== {self.name} start #{self.starts}: {args}\n".encode())
            log.flush()
            # ``ip netns exec`` execs the command: the pid is the gateway's own.
            self.proc = subprocess.Popen(
                [*self.command_prefix, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=clean_env(),
                start_new_session=True,
            )
        return self

    def health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET /v1/health of this gateway, or None when it does not answer (yet).

        An answer from another process that holds the port (naming another node)
        counts as none.
        """
        try:
            response = httpx.get(
                f"{self.url}/v1/health",
                headers=self.headers,
                timeout=timeout,
                trust_env=False,
                verify=self.verify,
            )
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
        process may have bound it between the pick and the gateway's bind) gets new
        ports and is spawned again.
        """
        deadline = time.monotonic() + timeout
        retries = PORT_RETRIES
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

        Returns the exit code, or None when the process was never started.
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
