"""The client commands of ``dmq-gateway``: talk to a running gateway's API.

``nodes``, ``peers``, ``broadcast``, ``send``, ``subscribe``, ``htable``,
``registrations`` and ``dialogs`` print readable tables and lines, or the API's JSON
with ``--json``. The gateway is found with ``--url`` (env ``DMQ_URL``, default
``http://127.0.0.1:8000``) and authenticated with ``--token`` (env ``DMQ_API_TOKEN``).
An error prints one line to stderr (the API's problem ``detail``) and exits 1; a usage
error exits 2.

``subscribe`` tracks the epoch and the last offset it received, and however the
subscription ends (Ctrl-C, ``--count``, the gateway closing it) prints to stderr the
exact ``subscribe PEER --since N --epoch E`` command that resumes with no gap and no
duplicate.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds to wait for an answer that needs no DMQ round trip.
HTTP_TIMEOUT = 10.0
#: Seconds added to the longest wait a ``--wait`` request may take on the gateway.
WAIT_MARGIN = 10.0
#: How long a ``--wait`` without ``--timeout`` may take at most: the gateway then waits
#: Timer F + 1 (33 s by default), and never more than 300 s.
DEFAULT_WAIT = 300.0


class ClientError(Exception):
    """One sentence for stderr; the command exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1, *, note: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        #: A line printed after the error: what to do next (how to resume).
        self.note = note


# ---------------------------------------------------------------------- the parser


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the client commands to ``dmq-gateway``'s subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("gateway")
    group.add_argument(
        "--url",
        metavar="URL",
        help=f"the gateway's API (default: {DEFAULT_URL}) [env DMQ_URL]",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help="API token, if the gateway needs one (default: the first token of "
        "DMQ_API_TOKEN, else none) [env DMQ_API_TOKEN]",
    )
    group.add_argument(
        "--ca",
        metavar="PATH",
        help="PEM CA bundle an https:// gateway's certificate is checked against "
        "(default: the system's) [env DMQ_CA]",
    )
    group.add_argument(
        "--cert",
        metavar="PATH",
        help="PEM file with a client certificate and its key, for a gateway that asks "
        "for one (--http-tls-ca) [env DMQ_CERT]",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON instead of a table (default: off)",
    )

    body = argparse.ArgumentParser(add_help=False)
    source = body.add_argument_group("message body (default: standard input, if not a terminal)")
    exclusive = source.add_mutually_exclusive_group()
    exclusive.add_argument("--data", metavar="TEXT", help="the body, as text")
    exclusive.add_argument("--file", metavar="PATH", help="read the body from a file (- = stdin)")
    source.add_argument(
        "--content-type",
        metavar="CT",
        help="Content-Type of the KDMQ request (default: application/json if the body "
        "parses as JSON, text/plain; charset=utf-8 if it is other UTF-8 text, "
        "application/octet-stream otherwise; never a form encoding)",
    )
    source.add_argument(
        "--wait",
        action="store_true",
        help="wait for every node's reply and print them; exit 1 unless all answered 2xx "
        "(default: off, print what the gateway accepted)",
    )
    source.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        help="with --wait: seconds to wait at most (default: the gateway's Timer F + 1)",
    )

    commands.add_parser(
        "nodes",
        parents=[common],
        help="list the nodes of the bus (like kamcmd dmq.list_nodes)",
        description="List the nodes of the bus as the gateway sees them, itself first.",
    )
    commands.add_parser(
        "peers",
        parents=[common],
        help="list the peers registered on the gateway",
        description="List the peers registered on the gateway.",
    )
    body_rule = (
        " The body goes out byte for byte. Without --content-type it is sent as "
        "application/json when it parses as JSON (Kamailio's htable, usrloc and dialog "
        "replication speak JSON), as text/plain; charset=utf-8 when it is other UTF-8 "
        "text, and as application/octet-stream otherwise."
    )
    broadcast = commands.add_parser(
        "broadcast",
        parents=[common, body],
        help="send a message to a peer on every active node",
        description="Send a message to PEER on every active node but the gateway itself."
        + body_rule,
    )
    broadcast.add_argument("peer", metavar="PEER", help="the peer id, e.g. htable")
    send = commands.add_parser(
        "send",
        parents=[common, body],
        help="send a message to a peer on one node",
        description="Send a message to PEER on one NODE, whatever its status." + body_rule,
    )
    send.add_argument("peer", metavar="PEER", help="the peer id, e.g. htable")
    send.add_argument("node", metavar="NODE", help="the node's SIP URI, e.g. sip:10.0.0.6:5060")
    subscribe = commands.add_parser(
        "subscribe",
        parents=[common],
        help="print a peer's messages as they arrive",
        description="Print each message that arrives for PEER, with its offset, until "
        "Ctrl-C, --count messages or the gateway closes the subscription. When it ends, "
        "the command that resumes where it stopped is printed to standard error "
        "(--since N --epoch E).",
    )
    subscribe.add_argument("peer", metavar="PEER", help="the peer id, e.g. htable")
    subscribe.add_argument(
        "--since",
        metavar="N",
        type=_non_negative,
        help="first replay the history after offset N (default: none, only what arrives "
        "from now on)",
    )
    subscribe.add_argument(
        "--epoch",
        metavar="E",
        help="with --since: the epoch offset N belongs to; if the gateway has restarted "
        "since, a gap frame says so and the whole history is replayed (default: none, "
        "the current epoch)",
    )
    subscribe.add_argument(
        "--count",
        metavar="N",
        type=_positive,
        help="stop after N messages (default: no limit)",
    )

    add_htable_commands(commands, common)
    add_state_commands(commands, common)


def add_htable_commands(commands: argparse._SubParsersAction[Any], common: Any) -> None:
    """``dmq-gateway htable set|get|del|ls``: Kamailio's htables through the gateway."""
    htable = commands.add_parser(
        "htable",
        help="read Kamailio's htables from the gateway's replica, set and delete keys on "
        "every node",
        description="Kamailio's htables: read from the gateway's replica (kept live from "
        "the bus), written to every node of the bus as Kamailio's own htable actions.",
    )
    actions = htable.add_subparsers(dest="htable_command", required=True)
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        help="seconds to wait for every node's answer (default: the gateway's Timer F + 1)",
    )
    set_ = actions.add_parser(
        "set",
        parents=[common, wait],
        help="set a key on every node",
        description="Set TABLE=>KEY to VALUE on every node (and in the replica); print "
        "every node's answer; exit 1 unless all answered 2xx.",
    )
    set_.add_argument("table", metavar="TABLE")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", metavar="VALUE")
    set_.add_argument(
        "--int",
        action="store_true",
        help="VALUE is an integer (32 bits), as kamcmd htable.seti (default: a string)",
    )
    set_.add_argument(
        "--expires",
        metavar="S",
        type=_positive,
        help="the key expires in S seconds (tables with autoexpire; default: never)",
    )
    get = actions.add_parser(
        "get",
        parents=[common],
        help="a key's value from the replica",
        description="Print "
        "TABLE=>KEY's value from the gateway's replica; exit 1 if there is no such key.",
    )
    get.add_argument("table", metavar="TABLE")
    get.add_argument("key", metavar="KEY")
    delete = actions.add_parser(
        "del",
        parents=[common, wait],
        help="delete a key, or the keys matching a regex or prefix, on every node",
        description="Delete TABLE=>KEY on every node, or with --regex/--prefix every key "
        "whose name (or with --on value, string value) matches; print every node's answer.",
    )
    delete.add_argument("table", metavar="TABLE")
    delete.add_argument("key", metavar="KEY", nargs="?")
    how = delete.add_mutually_exclusive_group()
    how.add_argument("--regex", metavar="RE", help="a POSIX extended regex, case-insensitive")
    how.add_argument("--prefix", metavar="TEXT", help="keys (or values) starting with TEXT")
    delete.add_argument(
        "--on",
        choices=["name", "value"],
        default="name",
        help="with --regex/--prefix: match key names or string values (default: name)",
    )
    ls = actions.add_parser(
        "ls",
        parents=[common],
        help="list the tables, or a table's keys",
        description="Without TABLE, the replica's tables and how its sync went; with "
        "TABLE, its keys and values in key order, a page at a time.",
    )
    ls.add_argument("table", metavar="TABLE", nargs="?")
    ls.add_argument("--prefix", metavar="TEXT", default="", help="keys starting with TEXT")
    ls.add_argument("--after", metavar="KEY", help="the page after KEY (the last one shown)")
    ls.add_argument(
        "--limit", metavar="N", type=_positive, default=100, help="keys per page (default: 100)"
    )


def add_state_commands(
    commands: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """``registrations`` and ``dialogs``: Kamailio's replicated state, cluster-wide."""
    registrations = commands.add_parser(
        "registrations",
        parents=[common],
        help="list the registrations of the bus (Kamailio's usrloc, cluster-wide)",
        description="List every contact registered on the bus, from the gateway's replica "
        "of Kamailio's dmq_usrloc: one AOR's contacts, or every AOR (starting with "
        "--prefix), one row per contact.",
    )
    registrations.add_argument(
        "aor", metavar="AOR", nargs="?", help="only this AOR's contacts (default: every AOR)"
    )
    registrations.add_argument(
        "--prefix", metavar="TEXT", default="", help="only AORs starting with TEXT"
    )
    registrations.add_argument(
        "--limit",
        metavar="N",
        type=_positive,
        default=1000,
        help="list at most N AORs (default: 1000)",
    )
    dialogs = commands.add_parser(
        "dialogs",
        parents=[common],
        help="list the calls up on the bus (Kamailio's dialogs, cluster-wide)",
        description="List the dialogs of the bus, from the gateway's replica of Kamailio's "
        "dialog replication, with the count in each state.",
    )
    dialogs.add_argument(
        "--state",
        choices=["unconfirmed", "early", "confirmed_na", "confirmed", "deleted"],
        help="only dialogs in this state (default: every live one)",
    )
    dialogs.add_argument(
        "--limit",
        metavar="N",
        type=_positive,
        default=1000,
        help="list at most N dialogs (default: 1000)",
    )


def _non_negative(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


# ---------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> int:
    """Run one client command; errors become one line on stderr and exit code 1."""
    try:
        return _COMMANDS[args.command](Gateway.from_args(args), args)
    except ClientError as exc:
        print(f"dmq-gateway: error: {exc.message}", file=sys.stderr)
        if exc.note:
            print(exc.note, file=sys.stderr)
        return exc.exit_code


class Gateway:
    """The gateway's API, over httpx."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        as_json: bool = False,
        ca: str | None = None,
        cert: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"--url {url!r}: must be http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.token = token or None
        self.as_json = as_json
        #: For https:// and wss://: the server's certificate is checked against ``ca``
        #: (the system's CAs without it); ``cert`` is presented when the server asks.
        self.ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl_context = _ssl_context(ca, cert)
        elif ca is not None or cert is not None:
            raise ClientError(
                f"--url {url!r}: --ca and --cert are for https:// gateways; use https://"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Gateway:
        url = args.url or os.environ.get("DMQ_URL") or DEFAULT_URL
        token = args.token
        if not token:
            # DMQ_API_TOKEN may list several tokens for serve; any one of them will do.
            listed = os.environ.get("DMQ_API_TOKEN", "").replace(",", " ").split()
            token = listed[0] if listed else None
        ca = getattr(args, "ca", None) or os.environ.get("DMQ_CA") or None
        cert = getattr(args, "cert", None) or os.environ.get("DMQ_CERT") or None
        return cls(url, token, as_json=args.json, ca=ca, cert=cert)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
        read_timeout: float = HTTP_TIMEOUT,
    ) -> httpx.Response:
        headers = self.headers
        if content_type is not None:
            headers["Content-Type"] = content_type
        timeout = httpx.Timeout(HTTP_TIMEOUT, read=read_timeout)
        try:
            response = httpx.request(
                method,
                self.url + path,
                params=params,
                content=content,
                headers=headers,
                timeout=timeout,
                verify=self.ssl_context if self.ssl_context is not None else True,
            )
        except httpx.ConnectError as exc:
            raise ClientError(_cannot_connect(self.url, exc)) from None
        except httpx.TimeoutException:
            raise ClientError(f"the gateway at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to the gateway at {self.url}: {exc}") from None
        if response.is_error:
            raise ClientError(_problem_line(response))
        return response


def _ssl_context(ca: str | None, cert: str | None) -> ssl.SSLContext:
    """A client context checking the gateway against ``ca`` (or the system's CAs)."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ClientError(f"--ca {ca!r}: cannot load it as a PEM CA bundle ({reason})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(cert)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ClientError(
                f"--cert {cert!r}: cannot load a certificate and its key from it ({reason})"
            ) from None
    return context


def _cannot_connect(url: str, exc: Exception) -> str:
    return (
        f"cannot connect to the gateway at {url} ({_reason(exc)}): is `dmq-gateway serve` "
        "running there, and is --url (DMQ_URL) right?"
    )


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0]


def _problem_line(response: httpx.Response) -> str:
    """The problem's detail, or the status line when the body is not a problem."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return f"{data['detail']} (HTTP {response.status_code})"
    return f"HTTP {response.status_code} {response.reason_phrase}"


def _peer_path(peer: str) -> str:
    return "/v1/peers/" + quote(peer, safe="")


def _print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned on the widest cell; the header and rows as lines."""
    materialised = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in materialised) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in materialised
    ]
    return "\n".join(lines) + "\n"


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{stamp} ({max(0.0, now - timestamp):.0f}s ago)"


# ---------------------------------------------------------------------- commands


def cmd_nodes(gateway: Gateway, args: argparse.Namespace) -> int:
    data = gateway.request("GET", "/v1/nodes").json()
    if gateway.as_json:
        _print_json(data, sys.stdout)
        return 0
    now = time.time()
    rows = [
        [
            node["uri"],
            node["status"],
            "yes" if node["local"] else "no",
            "-" if node["local"] else _when(node["last_reply"], now),
            str(node["failures"]),
        ]
        for node in data
    ]
    sys.stdout.write(table(["URI", "STATUS", "LOCAL", "LAST REPLY", "FAILURES"], rows))
    return 0


def cmd_peers(gateway: Gateway, args: argparse.Namespace) -> int:
    data = gateway.request("GET", "/v1/peers").json()
    if gateway.as_json:
        _print_json(data, sys.stdout)
        return 0
    if not data:
        print("no peers registered")
        return 0
    rows = [
        [
            peer["peer_id"],
            peer["reply"],
            f"{peer['epoch']}:{peer['offset']}",
            f"{peer['history_size']}/{peer['history']}",
            str(peer["subscribers"]),
            str(peer["received"]),
            "yes" if peer["persistent"] else "no",
            peer["description"],
        ]
        for peer in data
    ]
    headers = ["PEER", "REPLY", "EPOCH:OFFSET", "HISTORY", "SUBSCRIBERS", "RECEIVED"]
    sys.stdout.write(table([*headers, "PERSISTENT", "DESCRIPTION"], rows))
    return 0


def _body(args: argparse.Namespace) -> bytes:
    if args.data is not None:
        data: str = args.data
        return data.encode("utf-8")
    if args.file is not None and args.file != "-":
        try:
            return Path(args.file).read_bytes()
        except OSError as exc:
            raise ClientError(f"--file {args.file}: {exc.strerror or exc}") from None
    if args.file is None and sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def guess_content_type(body: bytes) -> str:
    """The Content-Type of a body given without one.

    JSON is what Kamailio's modules replicate (htable, usrloc, dialog), so a body that
    parses as JSON is ``application/json``; other text is plain text in UTF-8, and
    anything else is bytes. Never a form encoding: KDMQ bodies are not forms.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    try:
        json.loads(text)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


def _dispatch(gateway: Gateway, args: argparse.Namespace, path: str, params: dict[str, str]) -> int:
    if args.timeout is not None and not args.wait:
        raise ClientError("--timeout only applies with --wait", exit_code=2)
    if args.timeout is not None and not 0 < args.timeout <= 300:
        raise ClientError(f"--timeout {args.timeout:g}: must be above 0 and at most 300", 2)
    if args.wait:
        params["wait"] = "true"
        if args.timeout is not None:
            params["timeout"] = f"{args.timeout:g}"
    wait_for = (args.timeout if args.timeout is not None else DEFAULT_WAIT) + WAIT_MARGIN
    body = _body(args)
    response = gateway.request(
        "POST",
        path,
        params=params,
        content=body,
        content_type=args.content_type or guess_content_type(body),
        read_timeout=wait_for if args.wait else HTTP_TIMEOUT,
    )
    data = response.json()
    if gateway.as_json:
        _print_json(data, sys.stdout)
    if not args.wait:
        if not gateway.as_json:
            nodes = ", ".join(data["nodes"]) or "no node"
            print(f"accepted {data['id']} for {data['peer']}: sending to {nodes}")
        return 0
    results = data["results"]
    failed = [r for r in results if r["code"] is None or not 200 <= r["code"] < 300]
    if not gateway.as_json:
        if not results:
            print(f"{data['id']} for {data['peer']}: no node to send to")
        else:
            rows = [
                [
                    r["node"],
                    "timeout" if r["timeout"] else str(r["code"]),
                    r["reason"] or "",
                    _result_body(r),
                ]
                for r in results
            ]
            sys.stdout.write(table(["NODE", "CODE", "REASON", "BODY"], rows))
    if failed:
        print(
            f"dmq-gateway: {len(failed)} of {len(results)} nodes did not answer 2xx",
            file=sys.stderr,
        )
        return 1
    return 0


def _decoded_size(data: str) -> int:
    try:
        return len(base64.b64decode(data))
    except ValueError:
        return len(data) * 3 // 4


def _result_body(result: dict[str, Any]) -> str:
    body = result.get("body")
    if not body:
        return ""
    if result.get("encoding") == "base64":
        return f"<{_decoded_size(str(body))} bytes, base64>"
    text = str(body).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


def cmd_broadcast(gateway: Gateway, args: argparse.Namespace) -> int:
    return _dispatch(gateway, args, _peer_path(args.peer) + "/broadcast", {})


def cmd_send(gateway: Gateway, args: argparse.Namespace) -> int:
    return _dispatch(gateway, args, _peer_path(args.peer) + "/send", {"node": args.node})


def _websocket_url(gateway: Gateway, peer: str, query: dict[str, str]) -> str:
    parts = urlsplit(gateway.url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + _peer_path(peer) + "/subscribe"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


def format_frame(frame: dict[str, Any]) -> str:
    """A message frame as one readable line."""
    body = str(frame.get("body", ""))
    if frame.get("encoding") == "base64":
        shown = f"<{_decoded_size(body)} bytes, base64: {body[:60]}>"
    else:
        shown = body.replace("\r", "\\r").replace("\n", "\\n")
    content_type = frame.get("content_type") or "no content type"
    return f"#{frame.get('offset')} from {frame.get('from')} ({content_type}): {shown}"


@dataclass
class Position:
    """Where a subscription stands: all a resume needs.

    ``offset`` is the last offset received (or, before any message, the one frames
    follow from); ``epoch`` the history that offset belongs to. Both come from the
    ``subscribed`` frame when the gateway sends one, and from every message frame.
    """

    peer: str
    epoch: str | None = None
    offset: int | None = None
    #: The header line was printed (from the subscribed frame or the first message).
    announced: bool = False
    #: Any frame arrived: the gateway accepted the subscription.
    confirmed: bool = False

    def resume_command(self, gateway: Gateway, as_json: bool) -> str | None:
        """The exact command that picks up after the last message received."""
        if self.offset is None:
            return None
        words = ["dmq-gateway", "subscribe", self.peer, "--since", str(self.offset)]
        if self.epoch is not None:
            words += ["--epoch", self.epoch]
        if gateway.url != DEFAULT_URL:
            words += ["--url", gateway.url]
        if as_json:
            words.append("--json")
        return "to resume: " + shlex.join(words)


def cmd_subscribe(gateway: Gateway, args: argparse.Namespace) -> int:
    if args.epoch is not None and args.since is None:
        raise ClientError(
            f"--epoch {args.epoch} needs --since N: an epoch only says which history the "
            "offset N belongs to",
            exit_code=2,
        )
    query: dict[str, str] = {}
    if args.since is not None:
        query["since"] = str(args.since)
    if args.epoch is not None:
        query["epoch"] = args.epoch
    url = _websocket_url(gateway, args.peer, query)
    position = Position(args.peer, epoch=args.epoch, offset=args.since)
    received = 0
    try:
        with connect(
            url,
            additional_headers=gateway.headers,
            open_timeout=HTTP_TIMEOUT,
            max_size=None,
            ssl=gateway.ssl_context,
        ) as websocket:
            if not gateway.as_json:
                print(
                    f"connected to {gateway.url}, waiting for {args.peer} messages (Ctrl-C stops)",
                    file=sys.stderr,
                )
            try:
                while args.count is None or received < args.count:
                    text = websocket.recv()
                    frame = text if isinstance(text, str) else text.decode()
                    received += show_frame(frame, gateway, position)
            except KeyboardInterrupt:
                _print_resume(position, gateway)
                return 130
            except ConnectionClosed as exc:
                raise close_error(exc, position, gateway) from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise ClientError(
                f"the gateway at {gateway.url} refused the subscription (HTTP {status}): "
                "missing or wrong API token (--token or DMQ_API_TOKEN)"
            ) from None
        raise ClientError(
            f"the gateway at {gateway.url} refused the subscription (HTTP {status})"
        ) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise ClientError(_cannot_connect(gateway.url, exc)) from None
    _print_resume(position, gateway)
    return 0


def _print_resume(position: Position, gateway: Gateway) -> None:
    command = position.resume_command(gateway, gateway.as_json)
    if command is not None:
        print(command, file=sys.stderr)


def show_frame(text: str, gateway: Gateway, position: Position) -> int:
    """Print one frame and follow the position; 1 if it was a message, else 0."""
    if gateway.as_json:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    try:
        frame = json.loads(text)
    except ValueError:
        return 0
    if not isinstance(frame, dict):
        return 0
    position.confirmed = True
    kind = frame.get("type")
    lines: list[str] = []
    if kind == "subscribed":
        position.epoch = str(frame.get("epoch"))
        since, latest = frame.get("since"), frame.get("offset")
        if isinstance(since, int):
            position.offset = since
        header = f"subscribed to {position.peer}, epoch {position.epoch}, from offset {since}"
        if isinstance(since, int) and isinstance(latest, int) and latest > since:
            header += f", replaying up to offset {latest}"
        lines.append(header)
        position.announced = True
    elif kind == "message":
        epoch = str(frame.get("epoch"))
        if not position.announced or epoch != position.epoch:
            # No subscribed frame (an older gateway): the first message tells the epoch.
            lines.append(f"subscribed to {position.peer}, epoch {epoch}")
            position.announced = True
        position.epoch = epoch
        offset = frame.get("offset")
        if isinstance(offset, int):
            position.offset = offset
        lines.append(format_frame(frame))
    elif kind == "gap":
        lines.append(format_gap(frame))
        if frame.get("from") is None:
            # Another epoch: the offsets asked for mean nothing, the replay starts over.
            position.epoch = str(frame.get("epoch"))
            position.offset = 0
    elif kind == "error":
        print(f"error from the gateway: {frame.get('error')}", file=sys.stderr)
    if not gateway.as_json and lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    return 1 if kind == "message" else 0


def format_gap(frame: dict[str, Any]) -> str:
    """A gap frame as one readable line: what was lost, and why."""
    reason, epoch, to = frame.get("reason"), frame.get("epoch"), frame.get("to")
    if frame.get("from") is None:
        lost = f"; offsets 1..{to} are no longer held" if isinstance(to, int) and to >= 1 else ""
        return (
            f"gap: {reason} (epoch {frame.get('client_epoch')} is gone, this is epoch "
            f"{epoch}{lost})"
        )
    return f"gap: {reason} (offsets {frame.get('from')}..{to} of epoch {epoch} are lost)"


#: Close codes that mean the gateway itself went away (stopping or restarting).
_GATEWAY_STOPPED = {1001: "going away", 1012: "service restart"}


def close_error(exc: ConnectionClosed, position: Position, gateway: Gateway) -> ClientError:
    """The subscription ended from the other side: why, and how to resume."""
    close = exc.rcvd
    code, reason = (close.code, close.reason) if close is not None else (None, "")
    if code == 4008 and position.offset is None:
        # The gateway says where to resume (since=N) even if we never saw a message.
        found = re.search(r"since=(\d+)", reason)
        if found:
            position.offset = int(found.group(1))
    if code == 4004 and not position.confirmed:
        # Never subscribed: there is nothing to resume.
        return ClientError(reason or f"no peer {position.peer!r} is registered")
    note = position.resume_command(gateway, gateway.as_json)
    if code is None:
        return ClientError("the connection to the gateway was lost", note=note)
    if code == 4004:
        return ClientError(reason or f"peer {position.peer!r} was unregistered", note=note)
    if code == 4008:
        return ClientError(f"the gateway cut this subscriber off: {reason}", note=note)
    if code in _GATEWAY_STOPPED:
        return ClientError(
            f"the gateway at {gateway.url} stopped ({code}, {reason or _GATEWAY_STOPPED[code]})",
            note=note,
        )
    return ClientError(
        f"the gateway closed the subscription ({code}{': ' + reason if reason else ''})",
        note=note,
    )


# ---------------------------------------------------------------------- htable


def _htable_path(table: str, key: str | None = None) -> str:
    path = "/v1/htable/" + quote(table, safe="")
    return path if key is None else path + "/" + quote(key, safe="")


def _write_results(gateway: Gateway, data: dict[str, Any]) -> int:
    """Print every node's answer to an htable write; 1 unless all answered 2xx."""
    sent = [data["results"]] + ([data["expire"]] if data.get("expire") else [])
    if gateway.as_json:
        _print_json(data, sys.stdout)
    failed = 0
    total = 0
    for results in sent:
        for r in results["results"]:
            total += 1
            failed += r["code"] is None or not 200 <= r["code"] < 300
    if not gateway.as_json:
        rows = [
            [
                "set expiry" if index else "write",
                r["node"],
                "timeout" if r["timeout"] else str(r["code"]),
                r["reason"] or "",
            ]
            for index, results in enumerate(sent)
            for r in results["results"]
        ]
        if rows:
            sys.stdout.write(table(["ACTION", "NODE", "CODE", "REASON"], rows))
        else:
            print("no other node on the bus: applied to the gateway's replica only")
    if failed:
        print(f"dmq-gateway: {failed} of {total} answers were not 2xx", file=sys.stderr)
        return 1
    return 0


def _shown_value(cell: dict[str, Any]) -> str:
    value = str(cell["value"]).replace("\r", "\\r").replace("\n", "\\n")
    return value if cell["type"] == "str" else f"{value} (int)"


def cmd_htable(gateway: Gateway, args: argparse.Namespace) -> int:
    command = args.htable_command
    timeout = getattr(args, "timeout", None)
    params: dict[str, str] = {}
    if timeout is not None:
        if not 0 < timeout <= 300:
            raise ClientError(f"--timeout {timeout:g}: must be above 0 and at most 300", 2)
        params["timeout"] = f"{timeout:g}"
    read_timeout = (timeout if timeout is not None else DEFAULT_WAIT) + WAIT_MARGIN
    if command == "set":
        value: str | int = args.value
        if args.int:
            try:
                value = int(args.value)
            except ValueError:
                raise ClientError(f"--int: {args.value!r} is not an integer", 2) from None
        body: dict[str, Any] = {"value": value}
        if args.expires is not None:
            body["expires"] = args.expires
        response = gateway.request(
            "PUT",
            _htable_path(args.table, args.key),
            params=params,
            content=json.dumps(body).encode(),
            content_type="application/json",
            read_timeout=read_timeout,
        )
        return _write_results(gateway, response.json())
    if command == "del":
        if (args.key is None) == (args.regex is None and args.prefix is None):
            raise ClientError("del: give a KEY, or --regex or --prefix (not both)", 2)
        if args.key is not None:
            response = gateway.request(
                "DELETE",
                _htable_path(args.table, args.key),
                params=params,
                read_timeout=read_timeout,
            )
        else:
            match = "regex" if args.regex is not None else "prefix"
            body = {"match": match, "on": args.on, "pattern": args.regex or args.prefix}
            response = gateway.request(
                "POST",
                _htable_path(args.table) + "/delete",
                params=params,
                content=json.dumps(body).encode(),
                content_type="application/json",
                read_timeout=read_timeout,
            )
        return _write_results(gateway, response.json())
    if command == "get":
        cell = gateway.request("GET", _htable_path(args.table, args.key)).json()
        if gateway.as_json:
            _print_json(cell, sys.stdout)
        else:
            print(cell["value"])
        return 0
    if args.table is None:
        data = gateway.request("GET", "/v1/htable").json()
        if gateway.as_json:
            _print_json(data, sys.stdout)
            return 0
        rows = [
            [t["table"], str(t["cells"]), "yes" if t["expiring"] else "no"] for t in data["tables"]
        ]
        sys.stdout.write(table(["TABLE", "KEYS", "EXPIRING"], rows))
        sync = data["sync"]
        donor = f" from {sync['donor']}" if sync["donor"] else ""
        print(f"sync: {sync['state']}{donor} ({sync['requests_sent']} requests sent)")
        return 0
    query = {"prefix": args.prefix, "limit": str(args.limit)}
    if args.after is not None:
        query["after"] = args.after
    data = gateway.request("GET", _htable_path(args.table), params=query).json()
    if gateway.as_json:
        _print_json(data, sys.stdout)
        return 0
    now = time.time()
    rows = [
        [
            cell["key"],
            _shown_value(cell),
            "never" if cell["expires"] is None else f"in {max(0, cell['expires'] - now):.0f}s",
        ]
        for cell in data["keys"]
    ]
    sys.stdout.write(table(["KEY", "VALUE", "EXPIRES"], rows))
    if data["next"] is not None:
        print(
            f"{len(rows)} of {data['cells']} keys; next page: dmq-gateway htable ls "
            f"{shlex.quote(args.table)}"
            + (f" --prefix {shlex.quote(args.prefix)}" if args.prefix else "")
            + f" --after {shlex.quote(data['next'])}",
            file=sys.stderr,
        )
    return 0


def _pages(
    gateway: Gateway, path: str, params: dict[str, str], limit: int
) -> tuple[dict[str, Any], list[Any], bool]:
    """Follow ``next`` until ``limit`` items: the last page, every item, and whether
    more were left."""
    items: list[Any] = []
    while True:
        page: dict[str, Any] = gateway.request(
            "GET", path, params={**params, "limit": str(min(1000, limit - len(items)))}
        ).json()
        items += page["items"]
        if page["next"] is None:
            return page, items, False
        if len(items) >= limit:
            return page, items, True
        params = {**params, "after": page["next"]}


def _expires_in(expires: int, now: float) -> str:
    if expires == 0:
        return "permanent"
    return f"{max(0, round(expires - now))}s"


def cmd_registrations(gateway: Gateway, args: argparse.Namespace) -> int:
    now = time.time()
    headers = ["AOR", "CONTACT", "EXPIRES IN", "Q", "USER AGENT", "NODE", "RUID"]

    def row(aor: str, contact: dict[str, Any]) -> list[str]:
        q = contact["q"]
        return [
            aor,
            contact["contact"],
            _expires_in(contact["expires"], now),
            "-" if q is None else f"{q:g}",
            contact["user_agent"] or "-",
            contact["node"],
            contact["ruid"],
        ]

    if args.aor is not None:
        data = gateway.request("GET", "/v1/registrations/" + quote(args.aor, safe="@")).json()
        if gateway.as_json:
            _print_json(data, sys.stdout)
            return 0
        sys.stdout.write(table(headers, [row(data["aor"], c) for c in data["contacts"]]))
        return 0
    params = {"prefix": args.prefix} if args.prefix else {}
    page, items, more = _pages(gateway, "/v1/registrations", params, args.limit)
    if gateway.as_json:
        _print_json({**page, "items": items, "next": page["next"] if more else None}, sys.stdout)
        return 0
    rows = [row(item["aor"], contact) for item in items for contact in item["contacts"]]
    if rows:
        sys.stdout.write(table(headers, rows))
    sync = page["sync"]
    donor = f" from {sync['donor']}" if sync.get("donor") else ""
    print(
        f"{page['matched']} AORs shown of {page['aors']}, {page['contacts']} contacts "
        f"in all (sync: {sync['state']}{donor})"
    )
    if more:
        print(f"more AORs after {items[-1]['aor']!r}: raise --limit", file=sys.stderr)
    return 0


def cmd_dialogs(gateway: Gateway, args: argparse.Namespace) -> int:
    params = {"state": args.state} if args.state else {}
    page, items, more = _pages(gateway, "/v1/dialogs", params, args.limit)
    if gateway.as_json:
        _print_json({**page, "items": items, "next": page["next"] if more else None}, sys.stdout)
        return 0
    now = time.time()
    rows = [
        [
            d["id"],
            d["state"],
            d["callid"],
            d["from_uri"],
            d["to_uri"],
            f"{max(0, round(now - d['start_ts']))}s" if d["start_ts"] else "-",
        ]
        for d in items
    ]
    if rows:
        sys.stdout.write(table(["ID", "STATE", "CALL-ID", "FROM", "TO", "UP FOR"], rows))
    counts = ", ".join(f"{state} {n}" for state, n in page["counts"].items())
    print(f"{page['total']} dialogs ({counts})")
    if more:
        print("more dialogs: raise --limit", file=sys.stderr)
    return 0


_COMMANDS: dict[str, Callable[[Gateway, argparse.Namespace], int]] = {
    "nodes": cmd_nodes,
    "peers": cmd_peers,
    "broadcast": cmd_broadcast,
    "send": cmd_send,
    "subscribe": cmd_subscribe,
    "htable": cmd_htable,
    "registrations": cmd_registrations,
    "dialogs": cmd_dialogs,
}
