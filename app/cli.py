"""The ``dmq-gateway`` command.

``dmq-gateway serve`` runs a DMQ node and its API; ``nodes``, ``peers``, ``broadcast``,
``send`` and ``subscribe`` talk to a running one (see :mod:`app.client`).

Every option of ``serve`` can also come from an environment variable ``DMQ_<NAME>``
(``--ping-interval`` -> ``DMQ_PING_INTERVAL``); the options live in one typed model,
:class:`app.settings.ServeSettings`. A bad value stops the command at start with one
sentence naming the option (or the variable) and why, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from app import __version__, client, core, settings
from app.dmq.errors import ConfigError
from app.gateway.config import GatewayConfig

log = logging.getLogger("dmq")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear sentence, exit code 2
        self.exit(2, f"dmq-gateway: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmq-gateway", description="A Kamailio-compatible DMQ node.")
    parser.add_argument(
        "--version", action="version", version=f"dmq-gateway {__version__} (core: {core()})"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="run a DMQ node and its HTTP and WebSocket API",
        description="Run a DMQ node and its HTTP and WebSocket API. Each option can also "
        "be set with the environment variable shown, DMQ_<NAME>; repeatable options take "
        "several values there, separated by commas or spaces. The command line wins over "
        "the environment.",
    )
    settings.add_arguments(serve)
    client.add_commands(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Validate everything ``serve`` was given; raise ConfigError with one sentence."""
    return settings.from_namespace(args).gateway_config()


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
        return _serve(args)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    try:
        serve = settings.from_namespace(args)
    except ConfigError as exc:
        print(f"dmq-gateway: error: {exc}", file=sys.stderr)
        return 2
    try:
        config = serve.gateway_config()
        limits = serve.limits()
        configure_logging(config.log_level, config.log_format)
        if (warning := serve.cleartext_warning()) is not None:
            logging.getLogger("dmq").warning("%s", warning)
        from app.api import server  # uvicorn and FastAPI: only when serving

        server.run(config, limits)
    except ConfigError as exc:
        # Also raised once serving starts (a port in use...): name the option all the same.
        print(f"dmq-gateway: error: {serve.describe(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
