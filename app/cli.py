"""The ``dmq-gateway`` command.

``dmq-gateway serve`` runs a DMQ node and its API; ``nodes``, ``peers``, ``broadcast``,
``send`` and ``subscribe`` talk to a running one (see :mod:`app.client`).

Every option of ``serve`` can also come from an environment variable ``DMQ_<NAME>``
(``--ping-interval`` -> ``DMQ_PING_INTERVAL``); repeatable options take several values
there separated by commas or spaces. A bad value stops the command at start with one
sentence naming the option and why.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app import client
from app.dmq.config import LOOPBACK_NETWORKS, IPNetwork, NodeConfig, is_valid_peer_id
from app.dmq.errors import ConfigError
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.gateway.config import GatewayConfig

log = logging.getLogger("dmq")


def _env_name(option: str) -> str:
    return "DMQ_" + option.lstrip("-").replace("-", "_").upper()


def _split_env(value: str) -> list[str]:
    return [part for part in value.replace(",", " ").split() if part]


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


#: (flag, kind, default, help); kind is "str", "float", "int", "list" or "flag".
SERVE_OPTIONS: list[tuple[str, str, Any, str]] = [
    (
        "--server-address",
        "str",
        "sip:127.0.0.1:5060",
        "SIP URI this node listens on and announces, e.g. sip:10.0.0.5:5060;transport=tcp",
    ),
    (
        "--notification-address",
        "list",
        [],
        "SIP URI of a node to join the bus through (repeatable)",
    ),
    (
        "--notification-channel",
        "str",
        "notification_peer",
        "peer id that carries membership messages",
    ),
    (
        "--multi-notify",
        "flag",
        False,
        "resolve the first notification address by SRV, then A, then AAAA, and notify "
        "every node found",
    ),
    ("--ping-interval", "float", 60.0, "seconds between pings of every node (at least 1)"),
    (
        "--peer",
        "list",
        [],
        "register a peer at start; it answers 200 and logs what it receives (repeatable)",
    ),
    (
        "--trusted",
        "list",
        [],
        "network (CIDR) whose KDMQ requests are accepted (repeatable; default: loopback)",
    ),
    ("--t1", "float", 0.5, "SIP timer T1 in seconds (round-trip estimate)"),
    ("--t2", "float", 4.0, "SIP timer T2 in seconds (longest retransmission interval)"),
    ("--timer-f", "float", None, "SIP Timer F in seconds (request timeout; default 64*T1)"),
    ("--max-tcp-message", "int", 1_048_576, "largest SIP message accepted on TCP, in bytes"),
    ("--http", "str", "127.0.0.1:8000", "HOST:PORT of the HTTP and WebSocket API"),
    (
        "--api-token",
        "list",
        [],
        "bearer token the API accepts (repeatable); required when --http is not loopback",
    ),
    (
        "--state-dir",
        "str",
        None,
        "directory for registered peers (default ~/.local/state/dmq-gateway/HOST_PORT)",
    ),
    (
        "--ws-queue-limit",
        "int",
        1000,
        "messages a WebSocket subscriber may fall behind before it is cut off (code 4008)",
    ),
    (
        "--ws-deflate",
        "flag",
        False,
        "offer permessage-deflate compression to WebSocket clients (about 45 KB more "
        "memory per connection)",
    ),
    ("--log-level", "str", "info", "debug, info, warning or error"),
    ("--log-format", "str", "text", "text or json (one JSON object per line)"),
    (
        "--drop-rate",
        "float",
        0.0,
        "fault injection for testing: drop this fraction of UDP datagrams in and out",
    ),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear sentence, exit code 2
        self.exit(2, f"dmq-gateway: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmq-gateway", description="A Kamailio-compatible DMQ node.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="run a DMQ node",
        description="Run a DMQ node. Each option can also be set with DMQ_<NAME>.",
    )
    for flag, kind, _default, text in SERVE_OPTIONS:
        env = _env_name(flag)
        help_text = f"{text} [env {env}]"
        if kind == "flag":
            serve.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind == "list":
            serve.add_argument(flag, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            serve.add_argument(flag, default=None, metavar=kind.upper(), help=help_text)
    client.add_commands(commands)
    return parser


def _raw_value(args: argparse.Namespace, flag: str, kind: str, default: Any) -> Any:
    """The option's value: command line first, then the environment, then the default."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None:
        return value
    env = os.environ.get(_env_name(flag))
    if env is None or env == "":
        return default
    if kind == "list":
        return _split_env(env)
    if kind == "flag":
        return _truthy(env)
    return env


def _number(flag: str, raw: Any, kind: str) -> float | int | None:
    if raw is None:
        return None
    if isinstance(raw, int | float):
        return raw
    try:
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        noun = "a whole number" if kind == "int" else "a number"
        raise ConfigError(f"{flag} {raw!r}: must be {noun}") from None


def _uri(flag: str, text: str) -> SipUri:
    try:
        return SipUri.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: not a SIP URI ({exc})") from None


def _host_port(flag: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {text!r}: must be HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Validate everything ``serve`` was given; raise ConfigError with one sentence."""
    values: dict[str, Any] = {}
    for flag, kind, default, _ in SERVE_OPTIONS:
        raw = _raw_value(args, flag, kind, default)
        if kind in ("float", "int"):
            raw = _number(flag, raw, kind)
        values[flag] = raw

    server = _uri("--server-address", values["--server-address"])
    notification = tuple(
        _uri("--notification-address", text) for text in values["--notification-address"]
    )
    trusted: list[IPNetwork] = []
    for text in values["--trusted"]:
        try:
            trusted.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"--trusted {text!r}: not a network in CIDR form") from None
    if not trusted:
        if not _is_loopback(server.host):
            raise ConfigError(
                f"--server-address {server} is not a loopback address, but only loopback "
                "is trusted: pass --trusted CIDR (repeatable) for the networks of your DMQ "
                "nodes"
            )
        trusted = list(LOOPBACK_NETWORKS)
    for peer in values["--peer"]:
        if not is_valid_peer_id(peer):
            raise ConfigError(
                f"--peer {peer!r}: a peer id is 1-128 letters, digits or - _ . ! ~ * ' ( )"
            )
        if peer == values["--notification-channel"]:
            raise ConfigError(f"--peer {peer!r}: that is the notification channel")
    log_level = str(values["--log-level"]).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level {log_level!r}: must be debug, info, warning or error")
    log_format = str(values["--log-format"]).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format {log_format!r}: must be text or json")
    drop_rate = float(values["--drop-rate"])
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"--drop-rate {drop_rate}: must be at least 0 and below 1")
    node = NodeConfig(
        server_address=server,
        notification_addresses=notification,
        notification_channel=values["--notification-channel"],
        multi_notify=bool(values["--multi-notify"]),
        ping_interval=float(values["--ping-interval"]),
        timers=TimerSettings(
            t1=float(values["--t1"]),
            t2=float(values["--t2"]),
            timer_f=values["--timer-f"],
        ),
        trusted=tuple(trusted),
        max_stream_message=int(values["--max-tcp-message"]),
    )
    http_host, http_port = _host_port("--http", str(values["--http"]))
    tokens = tuple(values["--api-token"])
    if any(len(token) < 8 or not token.isprintable() or " " in token for token in tokens):
        raise ConfigError("--api-token: a token must be at least 8 printable characters, no spaces")
    if not tokens and not _is_loopback(http_host):
        raise ConfigError(
            f"--http {values['--http']} is reachable beyond this machine, but no --api-token "
            "is set: pass --api-token (or DMQ_API_TOKEN), or bind the API to 127.0.0.1"
        )
    state_dir = values["--state-dir"]
    if state_dir is None:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        state_dir = base / "dmq-gateway" / f"{server.host}_{server.effective_port}"
    queue_limit = int(values["--ws-queue-limit"])
    if queue_limit < 1:
        raise ConfigError(f"--ws-queue-limit {queue_limit}: must be at least 1")
    return GatewayConfig(
        node=node,
        startup_peers=tuple(values["--peer"]),
        http_host=http_host,
        http_port=http_port,
        api_tokens=tokens,
        state_dir=Path(state_dir),
        queue_limit=queue_limit,
        ws_deflate=bool(values["--ws-deflate"]),
        log_level=log_level,
        log_format=log_format,
        drop_rate=drop_rate,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("peer", "sender", "call_id", "content_type", "bytes"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "serve":
            return client.run(args)
        settings = settings_from_args(args)
        configure_logging(settings.log_level, settings.log_format)
        from app.api import server  # uvicorn and FastAPI: only when serving

        server.run(settings)
    except ConfigError as exc:
        print(f"dmq-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
