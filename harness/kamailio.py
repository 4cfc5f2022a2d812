"""Run real Kamailio DMQ nodes on loopback, for interop tests and benchmarks.

A :class:`KamailioNode` runs ``examples/kamailio/kamailio.cfg`` (dmq + htable "ht"
replicated over DMQ), the very file a user starts from, with its settings given as
``-A NAME=VALUE`` defines on the command line (the file's documented way): listen
address, server and notification address, ctl socket in the node's work dir. It starts
``kamailio`` in the foreground as a child process in its own session and talks to it
with ``kamcmd``. Everything listens on 127.0.0.1, unless a node is given another
``host`` and a ``command_prefix`` such as ``ip netns exec NS`` (a host of
:class:`harness.netns.Lab`).

Typical use (``free_port`` from :mod:`harness.ports`, ``wait_until`` from
:mod:`harness.waiting`)::

    a = KamailioNode(tmp_path / "a", free_port())
    b = KamailioNode(tmp_path / "b", free_port(), notification_addresses=[a.server_address])
    with a, b:
        wait_until(lambda: len(b.active_peers()) == 1, 10, "b sees a")
        a.htable_sets("ht", "greeting", "hello")
        wait_until(lambda: b.htable_get("ht", "greeting") == "hello", 5, "replication")
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypedDict

import psutil

__all__ = [
    "DmqNodeInfo",
    "KamailioError",
    "KamailioNode",
    "KamailioNodeFactory",
    "KamcmdError",
    "Transport",
    "kamailio_available",
    "kamailio_version",
    "parse_kamcmd_output",
    "stop_all",
]

Transport = Literal["udp", "tcp", "tls"]

KAMAILIO = "kamailio"
KAMCMD = "kamcmd"
LOOPBACK = "127.0.0.1"
DEFAULT_TABLE = "ht"

#: The configuration every node runs: the example users start from.
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "kamailio" / "kamailio.cfg"
#: The same node as a registrar and call proxy replicating registrations and dialogs
#: (dmq_usrloc, dialog) beside the htable; it takes the same defines, and more.
REGISTRAR_CONFIG = EXAMPLE_CONFIG.with_name("registrar.cfg")
#: A node whose htable (ht, hx with autoexpire, big), usrloc and dialog state is
#: replicated over DMQ, with SIP routes that fill and prune tables (the mirror tests).
STATE_CONFIG = Path(__file__).resolve().parent / "kamailio_state.cfg"

# Where distribution packages put the modules. If none of these exists, no -L is
# given and Kamailio uses its compiled-in module path.
_DEBIAN_MODULE_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/kamailio/modules"),
    Path("/usr/lib/aarch64-linux-gnu/kamailio/modules"),
    Path("/usr/lib64/kamailio/modules"),
    Path("/usr/lib/kamailio/modules"),
)

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107


class KamailioError(RuntimeError):
    """Kamailio did not start, or misbehaved in a way the harness cannot handle."""


class KamcmdError(KamailioError):
    """``kamcmd`` failed, or the RPC returned an error (kamcmd exits 0 on RPC faults)."""


class DmqNodeInfo(TypedDict):
    """One entry of ``dmq.list_nodes``."""

    host: str
    port: int | None  # None when the node's URI has no port
    proto: str  # "udp", "tcp", "tls", ... or "*" when the URI has no transport parameter
    resolved_ip: str
    status: str  # 5.6: "active", "disabled", "timeout" or "pending"
    last_notification: int
    local: bool


class KamailioNodeFactory(Protocol):
    """Signature of the ``kamailio_node`` pytest fixture (see conftest.py)."""

    def __call__(
        self,
        port: int | None = None,
        *,
        transport: Transport = "udp",
        notification_addresses: Sequence[str] = (),
        ping_interval: int = 5,
        fr_timer_ms: int = 2000,
        multi_notify: bool | None = None,
    ) -> KamailioNode: ...


# --------------------------------------------------------------------------- helpers


def kamailio_available() -> bool:
    """True when both the ``kamailio`` and ``kamcmd`` binaries can be found."""
    return _which(KAMAILIO) is not None and _which(KAMCMD) is not None


def _which(name: str) -> str | None:
    # Debian installs both into /usr/sbin, which is not on every user's PATH.
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def _binary(name: str) -> str:
    found = _which(name)
    if found is None:
        raise KamailioError(f"{name} is not installed (apt-get install kamailio)")
    return found


def kamailio_version() -> str:
    """``kamailio -v``'s first line, e.g. ``kamailio 5.6.3 (x86_64/linux)``."""
    out = subprocess.run(
        [_binary(KAMAILIO), "-v"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for line in out.splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return out.strip().splitlines()[0] if out.strip() else "unknown"


# A parsed kamcmd value: scalars stay strings, structs become dicts, arrays lists.
KamcmdValue = str | dict[str, "KamcmdValue"] | list["KamcmdValue"]


def parse_kamcmd_output(text: str) -> list[KamcmdValue]:
    """Parse kamcmd's pretty-printed output into a list of top-level values.

    kamcmd prints one top-level value per line or one ``{ ... }`` block per struct::

        {
            host: 127.0.0.1
            item: {
                name: x
            }
            slot: {
                {
                    name: y
                }
            }
        }

    A ``key: {`` whose first entry is itself ``{`` is an array of structs.
    Scalars are returned as strings (kamcmd does not print types).
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    pos = 0

    def parse_block() -> KamcmdValue:
        # Called just after an opening "{" (or "key: {"); reads until the matching "}".
        nonlocal pos
        if pos < len(lines) and lines[pos] == "{":
            items: list[KamcmdValue] = []
            while pos < len(lines) and lines[pos] == "{":
                pos += 1
                items.append(parse_block())
            if pos < len(lines) and lines[pos] == "}":
                pos += 1
            return items
        fields: dict[str, KamcmdValue] = {}
        while pos < len(lines):
            line = lines[pos]
            pos += 1
            if line == "}":
                return fields
            key, sep, value = line.partition(":")
            if not sep:
                continue  # not "key: value"; ignore rather than fail
            value = value.strip()
            if value == "{":
                fields[key.strip()] = parse_block()
            else:
                fields[key.strip()] = value
        return fields

    out: list[KamcmdValue] = []
    while pos < len(lines):
        line = lines[pos]
        pos += 1
        if line == "{":
            out.append(parse_block())
        else:
            out.append(line)
    return out


def _port_or_none(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


def _int_or_zero(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        return 0


# ------------------------------------------------------------------------ the node

_live_nodes: set[KamailioNode] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - safety net only
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        with contextlib.suppress(Exception):
            node.kill()


class KamailioNode:
    """A real Kamailio 5.x DMQ node (dmq + htable) running as a child process.

    The process is started by the constructor (unless ``autostart=False``; then call
    :meth:`start` or use the node as a context manager). :meth:`stop` or leaving the
    ``with`` block stops it and every process it forked.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        transport: Transport = "udp",
        notification_addresses: Sequence[str] = (),
        ping_interval: int = 5,
        fr_timer_ms: int = 2000,
        multi_notify: bool | None = None,
        children: int = 8,
        dmq_workers: int | None = None,
        log_level: int = 2,
        startup_timeout: float = 15.0,
        autostart: bool = True,
        host: str = LOOPBACK,
        command_prefix: Sequence[str] = (),
        tls_files: tuple[str, str, str] | None = None,
        config: Path = EXAMPLE_CONFIG,
        extra_defines: Sequence[str] = (),
    ) -> None:
        #: The configuration file run (:data:`EXAMPLE_CONFIG`, :data:`STATE_CONFIG` or
        #: :data:`REGISTRAR_CONFIG`) and defines added to :meth:`defines`
        #: (``HX_EXPIRE=5``...).
        self.config = Path(config)
        self.extra_defines = list(extra_defines)
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be 'udp', 'tcp' or 'tls', not {transport!r}")
        if transport == "tls" and tls_files is None:
            raise ValueError("a TLS node needs tls_files=(certificate, key, CA) PEM paths")
        #: (certificate, key, CA) PEM paths for the ``tls`` module.
        self.tls_files = tls_files
        if ping_interval < 5:
            raise ValueError("Kamailio's minimum ping_interval is 5 s")
        if len(notification_addresses) > 1:
            raise ValueError("Kamailio 5.6 takes one notification address")
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.transport: Transport = transport
        self.notification_addresses = list(notification_addresses)
        self.ping_interval = ping_interval
        self.fr_timer_ms = fr_timer_ms
        self.multi_notify = multi_notify
        self.children = children
        self.dmq_workers = dmq_workers
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        # Another address and a prefix such as ``ip netns exec NS`` run the node on a
        # host of a harness.netns.Lab; kamcmd still reaches it through the ctl socket,
        # a path in the file system, from any network namespace.
        self._host = host
        self.command_prefix = tuple(command_prefix)

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "kamailio.log"
        self._sock_tmpdir: Path | None = None
        sock = self.workdir / "ctl.sock"
        if len(os.fsencode(sock)) > _MAX_UNIX_SOCKET_PATH:
            self._sock_tmpdir = Path(tempfile.mkdtemp(prefix="kam-"))
            sock = self._sock_tmpdir / "ctl.sock"
        self.ctl_socket = sock
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        if autostart:
            self.start()

    # ---------------------------------------------------------------- properties

    @property
    def server_address(self) -> str:
        """The node's DMQ ``server_address``: ``sip:127.0.0.1:PORT[;transport=tcp|tls]``."""
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{self._host}:{self.port}{suffix}"

    @property
    def host(self) -> str:
        return self._host

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise KamailioError("node not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<KamailioNode {self.server_address} {state}>"

    # ------------------------------------------------------------------- config

    def defines(self) -> list[str]:
        """The ``-A NAME=VALUE`` defines that set up :data:`EXAMPLE_CONFIG` for this node."""
        listen = f"{self._host}:{self.port}"
        defines = [
            f"LISTEN=udp:{listen}",
            f'SERVER_ADDRESS="{self.server_address}"',
            f'CTL_SOCKET="unixs:{self.ctl_socket}"',
            f"PING_INTERVAL={self.ping_interval}",
            f"FR_TIMER={self.fr_timer_ms}",
            f"CHILDREN={self.children}",
            f"DEBUG_LEVEL={self.log_level}",
        ]
        if self.transport == "tcp":
            defines += ["WITH_TCP", f"LISTEN_TCP=tcp:{listen}"]
        if self.transport == "tls" and self.tls_files is not None:
            cert, key, ca = self.tls_files
            defines += [
                "WITH_TLS",
                f"LISTEN_TLS=tls:{listen}",
                f'TLS_CERT="{cert}"',
                f'TLS_KEY="{key}"',
                f'TLS_CA="{ca}"',
            ]
        if self.notification_addresses:
            defines.append(f'NOTIFICATION_ADDRESS="{self.notification_addresses[0]}"')
        else:
            defines.append("SEED_NODE")
        if self.config == STATE_CONFIG:
            defines += [
                f'JSONRPC_FIFO="{self.workdir / "rpc.fifo"}"',
                f'JSONRPC_REPLY_DIR="{self.workdir}/"',
            ]
        if self.dmq_workers is not None:
            defines.append(f"DMQ_WORKERS={self.dmq_workers}")
        if self.multi_notify:
            defines.append("MULTI_NOTIFY")
        return defines + self.extra_defines

    def command(self) -> list[str]:
        """The kamailio command line: foreground, logging to stderr, 64 MB shared memory."""
        cmd = [_binary(KAMAILIO), "-DD", "-E", "-f", str(self.config)]
        module_dir = next((d for d in _DEBIAN_MODULE_DIRS if d.is_dir()), None)
        if module_dir is not None:
            cmd += ["-L", str(module_dir)]
        for define in self.defines():
            cmd += ["-A", define]
        return [
            *self.command_prefix,
            *cmd,
            "-w",
            str(self.workdir),
            "-Y",
            str(self.workdir),
            "-m",
            "64",
            "-M",
            "8",
        ]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start Kamailio on the example configuration; wait until its ctl socket answers."""
        if self._proc is not None:
            raise KamailioError(f"{self!r} was already started")
        with contextlib.suppress(FileNotFoundError):
            self.ctl_socket.unlink()
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # own session and process group: stop() signals it
            )
        with _live_lock:
            _live_nodes.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while True:
            proc = self._proc
            assert proc is not None
            if proc.poll() is not None:
                raise KamailioError(
                    f"kamailio for {self.server_address} exited with code {proc.returncode} "
                    f"during startup; log tail:\n{self.log_tail()}"
                )
            if self.ctl_socket.exists():
                try:
                    self.kamcmd("core.version", timeout=2.0)
                    return
                except (KamcmdError, subprocess.TimeoutExpired) as exc:
                    last_error = str(exc)
            if time.monotonic() >= deadline:
                raise KamailioError(
                    f"kamailio for {self.server_address} did not answer on {self.ctl_socket} "
                    f"within {self.startup_timeout:g} s ({last_error or 'no ctl socket'}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the node's process group, SIGKILL it after ``timeout`` s; reap. Idempotent."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the node's whole process group at once and reap it. Idempotent."""
        self._terminate(signal.SIGKILL, 5.0)

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or self._stopped:
            self._cleanup()
            return
        pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
        # Until the leader is reaped its pid (= the group id) cannot be reused, so the
        # group may be signalled safely as long as we have not called wait() on it.
        if proc.returncode is None:
            _signal_group(pgid, sig)
            if not _wait_exited_no_reap(proc.pid, timeout) and sig != signal.SIGKILL:
                _signal_group(pgid, signal.SIGKILL)
                _wait_exited_no_reap(proc.pid, 5.0)
            # Children that outlive the leader (they normally exit with it) get SIGKILL.
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, exclude=proc.pid, timeout=5.0)
        elif _group_members(pgid, exclude=proc.pid):
            # The leader died and was already reaped (e.g. by poll()); orphaned workers
            # may still hold the group.
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, exclude=proc.pid, timeout=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        self._stopped = True
        self._cleanup()

    def _cleanup(self) -> None:
        with _live_lock:
            _live_nodes.discard(self)
        if self._sock_tmpdir is not None:
            shutil.rmtree(self._sock_tmpdir, ignore_errors=True)
            self._sock_tmpdir = None

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------------- logs

    def log_text(self) -> str:
        """Everything Kamailio wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ----------------------------------------------------------------------- RPC

    def kamcmd(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``kamcmd -s unixs:CTL_SOCKET -- ARGS...`` and return its stdout.

        Raises :class:`KamcmdError` when kamcmd fails or the RPC answers with a fault
        (kamcmd prints ``error: CODE - REASON`` and still exits 0 for those).
        kamcmd converts numeric-looking arguments to integers; prefix an argument with
        ``s:`` to force a string.
        """
        # "--": arguments such as "-5" are values, not kamcmd options
        cmd = [_binary(KAMCMD), "-s", f"unixs:{self.ctl_socket}", "--", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        out = res.stdout
        err = res.stderr.strip()
        if res.returncode != 0 or out.startswith("error:") or err.startswith("ERROR"):
            detail = (out.strip() + " " + err).strip()
            raise KamcmdError(f"kamcmd {' '.join(args)} (rc={res.returncode}): {detail}")
        return out

    def list_nodes(self) -> list[DmqNodeInfo]:
        """``dmq.list_nodes``: every node this Kamailio knows, itself included."""
        nodes: list[DmqNodeInfo] = []
        for entry in parse_kamcmd_output(self.kamcmd("dmq.list_nodes")):
            if not isinstance(entry, dict):
                continue
            fields = {k: v for k, v in entry.items() if isinstance(v, str)}
            nodes.append(
                DmqNodeInfo(
                    host=fields.get("host", ""),
                    port=_port_or_none(fields.get("port", "")),
                    proto=fields.get("proto", ""),
                    resolved_ip=fields.get("resolved_ip", ""),
                    status=fields.get("status", ""),
                    last_notification=_int_or_zero(fields.get("last_notification", "0")),
                    local=fields.get("local", "0").strip() not in ("", "0"),
                )
            )
        return nodes

    def peers(self, status: str | None = None) -> list[DmqNodeInfo]:
        """The non-local nodes of :meth:`list_nodes`, optionally only those with ``status``."""
        return [
            n
            for n in self.list_nodes()
            if not n["local"] and (status is None or n["status"] == status)
        ]

    def active_peers(self) -> list[DmqNodeInfo]:
        return self.peers("active")

    def knows(self, host: str, port: int, status: str | None = "active") -> bool:
        """True if ``host:port`` is in the node list (with ``status``, unless None)."""
        return any(
            n["host"] == host and n["port"] == port and (status is None or n["status"] == status)
            for n in self.list_nodes()
        )

    def dmq_remove(self, uri: str) -> None:
        """``dmq.remove URI``: drop a (non-local) node from the list."""
        self.kamcmd("dmq.remove", f"s:{uri}")

    def htable_sets(self, table: str, key: str, value: str) -> None:
        """``htable.sets``: set a string value; Kamailio replicates it over DMQ."""
        self.kamcmd("htable.sets", f"s:{table}", f"s:{key}", f"s:{value}")

    def htable_seti(self, table: str, key: str, value: int) -> None:
        """``htable.seti``: set an integer value; Kamailio replicates it over DMQ."""
        self.kamcmd("htable.seti", f"s:{table}", f"s:{key}", str(int(value)))

    def htable_delete(self, table: str, key: str) -> None:
        """``htable.delete``: remove a key; Kamailio replicates the delete over DMQ."""
        self.kamcmd("htable.delete", f"s:{table}", f"s:{key}")

    def htable_get(self, table: str, key: str) -> str | int | None:
        """``htable.get``: the value (str or int, as stored), or None if the key is absent.

        Values are read from kamcmd's text output, so a string value containing a line
        break followed by ``flags:`` would be cut short.
        """
        try:
            out = self.kamcmd("htable.get", f"s:{table}", f"s:{key}")
        except KamcmdError as exc:
            if "doesn't exist" in str(exc) or "not found" in str(exc).lower():
                return None
            raise
        return _parse_htable_item(out)

    def htable_setex(self, table: str, key: str, seconds: int) -> None:
        """``htable.setex``: the key expires in ``seconds`` (autoexpire tables only)."""
        self.kamcmd("htable.setex", f"s:{table}", f"s:{key}", str(int(seconds)))

    def jsonrpc(self, method: str, *params: str | int, timeout: float = 30.0) -> Any:
        """A JSON-RPC call through the state config's FIFO (no size limit, unlike
        kamcmd's replies); the ``result``, or KamcmdError with the ``error``."""
        reply_name = f"reply-{os.urandom(4).hex()}"
        reply_path = self.workdir / reply_name
        os.mkfifo(reply_path)
        request = {
            "jsonrpc": "2.0",
            "method": method,
            "params": list(params),
            "reply_name": reply_name,
            "id": 1,
        }
        result: dict[str, Any] = {}

        def read() -> None:
            with open(reply_path, "rb") as reply:
                result["data"] = reply.read()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            with open(self.workdir / "rpc.fifo", "w") as fifo:
                fifo.write(json.dumps(request) + "\n")
            reader.join(timeout)
            if "data" not in result:
                with open(reply_path, "wb"):  # unblock the reader
                    pass
                raise KamcmdError(f"jsonrpc {method}: no reply in {timeout} s")
        finally:
            with contextlib.suppress(OSError):
                reply_path.unlink()
        answer = json.loads(result["data"])
        if "error" in answer:
            raise KamcmdError(f"jsonrpc {method}: {answer['error']}")
        return answer.get("result")

    def htable_dump(self, table: str) -> dict[str, str | int]:
        """``htable.dump`` (JSON-RPC): every key of the table and its value."""
        cells: dict[str, str | int] = {}
        for slot in self.jsonrpc("htable.dump", table) or []:
            for entry in slot.get("slot", []):
                value = entry["value"]
                cells[entry["name"]] = int(value) if entry.get("type") == "int" else value
        return cells

    def message(self, user: str, headers: dict[str, str], timeout: float = 60.0) -> str:
        """Send a SIP MESSAGE to ``user`` at this node over UDP; return its status line
        (the state config's ``fill`` and ``rm`` routes answer once done)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((LOOPBACK, 0))
            sock.settimeout(timeout)
            port = sock.getsockname()[1]
            tag = os.urandom(4).hex()
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            request = (
                f"MESSAGE sip:{user}@{self._host}:{self.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK{tag}\r\n"
                f"From: <sip:harness@{LOOPBACK}:{port}>;tag={tag}\r\n"
                f"To: <sip:{user}@{self._host}:{self.port}>\r\n"
                f"Call-ID: {tag}@harness\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 10\r\n"
                f"{extra}Content-Length: 0\r\n\r\n"
            )
            sock.sendto(request.encode(), (self._host, self.port))
            while True:
                data, _ = sock.recvfrom(65535)
                line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                if not line.startswith("SIP/2.0 1"):
                    return line
        finally:
            sock.close()

    def fill_htable(self, count: int, prefix: str = "key-") -> None:
        """Set ``big=>PREFIX<i>`` for i < count in one request (state config only)."""
        status = self.message("fill", {"X-Count": str(count), "X-Prefix": prefix})
        if not status.startswith("SIP/2.0 200"):
            raise KamailioError(f"fill of {count} keys: {status}")

    def dmq_broadcast(self, peer: str, body: str) -> None:
        """``dmq_bcast_message(peer, body, "application/json")`` from this node's script
        (state config only): any body, one a module would refuse included."""
        status = self.message("bcast", {"X-Peer": peer, "X-Body": body})
        if not status.startswith("SIP/2.0 200"):
            raise KamailioError(f"broadcast on {peer}: {status}")

    def htable_rm(self, op: str, on: str, pattern: str) -> None:
        """``sht_rm_name_re``/``sht_rm_value_re``/``sht_rm_name``/``sht_rm_value`` on
        table ``ht`` (``op`` re or sw, ``on`` name or value; state config only)."""
        status = self.message("rm", {"X-Op": op, "X-On": on, "X-Pattern": pattern})
        if not status.startswith("SIP/2.0 200"):
            raise KamailioError(f"removal {op} {on} {pattern!r}: {status}")


def _parse_htable_item(out: str) -> str | int | None:
    # {\n\titem: {\n\t\tname: K\n\t\tvalue: V\n\t\tflags: F\n\t\texpire: E\n\t}\n}
    marker = "\tvalue: "
    start = out.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = out.find("\n\t\tflags: ", start)
    if end < 0:
        end = out.find("\n", start)
    value = out[start:end] if end >= 0 else out[start:]
    flags_text = out[end:].split("flags:", 1)[1].split("\n", 1)[0].strip() if end >= 0 else ""
    flags = _int_or_zero(flags_text) if flags_text else 2
    if flags & 2:  # AVP_VAL_STR
        return value
    try:
        return int(value.strip())
    except ValueError:
        return value


# ------------------------------------------------------------- process helpers


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_exited_no_reap(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (our child) has exited, leaving it a zombie (WNOWAIT)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped
        if info is not None and info.si_pid == pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _group_members(pgid: int, exclude: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` other than ``exclude``."""
    members: list[int] = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.pid == exclude or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


def _wait_group_gone(pgid: int, exclude: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_members(pgid, exclude):
        if time.monotonic() >= deadline:
            _signal_group(pgid, signal.SIGKILL)
            return
        time.sleep(0.02)


def stop_all(nodes: Iterable[KamailioNode]) -> None:
    """Stop several nodes one after the other, ignoring errors (for teardown code)."""
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()
