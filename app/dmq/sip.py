"""A sans-IO codec for the small, exact subset of SIP that DMQ uses.

Theory of operation
-------------------
DMQ is RFC 3261 SIP reduced to one non-INVITE method (``KDMQ``) and its final
responses. This module turns bytes into :class:`SipRequest` / :class:`SipResponse`
objects and back, and nothing more: it knows no sockets, clocks or transactions.

* :func:`parse_message` takes one whole message (a UDP datagram, or one frame cut by
  :class:`StreamFramer` from a TCP stream) and returns a message or raises
  :class:`SipParseError`. It never raises anything else, whatever the bytes. The error
  carries the status code a reply should use and, when the request line and headers
  could be read, the partly parsed request so that the caller can still answer it
  (RFC 3261 section 8.2 / 21.4.1 "400 Bad Request").
* :class:`StreamFramer` implements RFC 3261 section 18.3 framing for TCP: it buffers
  bytes, cuts messages by their ``Content-Length``, accepts several messages in one read
  or one message over many reads, and skips the CRLF keep-alives of RFC 5626.
* Header names are matched case-insensitively and compact forms (``v``, ``f``, ``t``,
  ``i``, ``l``, ``c``...) are expanded (RFC 3261 section 7.3.3). A ``Via`` header with
  several comma-separated values becomes several values, in order, exactly as if they
  had been sent on separate lines (section 7.3.1).

Errors are "remote" errors in h11's sense: they describe what the other side sent,
and become a 4xx reply or a counted drop; they never escape the node as exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from app.dmq import _sipscan

#: Whether the native fast paths for the plain shape of a message, Via and CSeq
#: (_sipscan.c, built with the compiled core) are there. Each returns None for anything
#: else, which the Python code below reads, so results and errors are the same with or
#: without them.
_native: bool = _sipscan.AVAILABLE

SIP_VERSION = "SIP/2.0"
#: The largest UDP payload an IPv4 datagram can carry (65 535 - 8 - 20).
MAX_UDP_MESSAGE = 65_507
#: Default ceiling for one message on a TCP stream; configurable per node.
DEFAULT_MAX_STREAM_MESSAGE = 1_048_576

#: RFC 3261 section 7.3.3 (and later RFCs) compact header forms.
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

#: How header names are written on the way out; others are title-cased.
_DISPLAY_NAMES = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "max-forwards": "Max-Forwards",
    "content-type": "Content-Type",
    "content-length": "Content-Length",
    "user-agent": "User-Agent",
    "server": "Server",
    "allow": "Allow",
    "www-authenticate": "WWW-Authenticate",
}


def display_name(name: str) -> str:
    """The conventional spelling of a canonical (lower-case) header name."""
    known = _DISPLAY_NAMES.get(name)
    if known is not None:
        return known
    return "-".join(part.capitalize() for part in name.split("-"))


_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")


#: Tokens every DMQ message carries (methods); checked by a set look-up before the
#: regular expression, which costs a call and a match for each.
_KNOWN_TOKENS = frozenset(("KDMQ", "OPTIONS", "ACK", "INVITE", "BYE", "CANCEL", "REGISTER"))


def _is_token(text: str) -> bool:
    return text in _KNOWN_TOKENS or _TOKEN_RE.fullmatch(text) is not None


class SipParseError(Exception):
    """What the other side sent is not a SIP message we can accept.

    ``status`` is the response code that fits (400 for syntax, 413 when too large,
    505 for a version we don't speak). ``request`` is the request as far as it could be
    read, or ``None`` when not even its headers could be; only with a request that has
    the headers a reply needs can the error be answered instead of dropped.
    """

    def __init__(self, reason: str, *, status: int = 400, request: SipRequest | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.request = request


class Headers:
    """An ordered multi-map of SIP headers with case-insensitive, compact-aware names.

    Names are stored in canonical lower-case long form; values keep their text. The
    first value of each name is indexed, because the node reads the same few headers
    (Via, From, To, Call-ID, CSeq) of every message.
    """

    __slots__ = ("_items", "_vias", "first")

    def __init__(
        self,
        items: list[tuple[str, str]] | None = None,
        first: dict[str, str] | None = None,
        vias: list[str] | None = None,
    ) -> None:
        self._items: list[tuple[str, str]] = items if items is not None else []
        #: The Via values in order, when the parser collected them (read on every
        #: request and copied into every response).
        self._vias = vias
        if first is None:
            first = {}
            for name, value in self._items:
                if name not in first:
                    first[name] = value
        #: Canonical name -> its first value. Read it directly on a hot path (one
        #: C-level dict look-up instead of a method call) with a canonical name; do
        #: not modify it: :meth:`add`, :meth:`set` and :meth:`remove` keep it right.
        self.first = first

    @staticmethod
    def canonical(name: str) -> str:
        lowered = name.strip().lower()
        return COMPACT_FORMS.get(lowered, lowered)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header, or ``default``."""
        value = self.first.get(name)
        if value is None:
            value = self.first.get(self.canonical(name))
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        if name == "via" and self._vias is not None:
            return list(self._vias)
        key = self.canonical(name)
        return [value for item_name, value in self._items if item_name == key]

    @property
    def vias(self) -> list[str]:
        """Every Via value, top first (do not modify the list)."""
        if self._vias is None:
            self._vias = [value for item_name, value in self._items if item_name == "via"]
        return self._vias

    def _reindex(self) -> None:
        self._vias = None
        first: dict[str, str] = {}
        for name, value in self._items:
            if name not in first:
                first[name] = value
        self.first = first

    def add(self, name: str, value: str) -> None:
        key = self.canonical(name)
        self._items.append((key, value))
        self.first.setdefault(key, value)
        if key == "via":
            self._vias = None

    def set(self, name: str, value: str) -> None:
        """Replace every value of a header with one value, keeping its position."""
        key = self.canonical(name)
        out: list[tuple[str, str]] = []
        placed = False
        for item in self._items:
            if item[0] == key:
                if not placed:
                    out.append((key, value))
                    placed = True
            else:
                out.append(item)
        if not placed:
            out.append((key, value))
        self._items = out
        self._reindex()

    def remove(self, name: str) -> None:
        key = self.canonical(name)
        self._items = [item for item in self._items if item[0] != key]
        self._reindex()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Headers:
        return Headers(list(self._items), dict(self.first))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


#: Raw header names seen on the wire -> canonical name; names repeat from message to
#: message, so validating and normalising each once saves most of the header work.
#: Bounded by bytes as well as by count: only names up to _NAME_CACHE_MAX_LENGTH
#: characters are kept (real header names are short), so the cache holds at most
#: 512 * 64 characters however many huge names arrive.
_NAME_CACHE: dict[str, str] = {}
_NAME_CACHE_LIMIT = 512
_NAME_CACHE_MAX_LENGTH = 64


def _canonical_name(raw: str) -> str | None:
    """Canonical form of a raw header name, or None when it is not a token."""
    name = raw.strip().lower()
    if not _is_token(name):
        return None
    name = COMPACT_FORMS.get(name, name)
    if len(raw) <= _NAME_CACHE_MAX_LENGTH and len(_NAME_CACHE) < _NAME_CACHE_LIMIT:
        _NAME_CACHE[raw] = name
    return name


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    lines = [start_line]
    for name, value in headers:
        if name == "content-length":
            continue
        lines.append(f"{display_name(name)}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode() + body


@dataclass(slots=True)
class SipRequest:
    """A SIP request. ``Content-Length`` is always written from ``body``."""

    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def __init__(
        self, method: str, uri: str, headers: Headers | None = None, body: bytes = b""
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.method = method
        self.uri = uri
        self.headers = Headers() if headers is None else headers
        self.body = body

    def to_bytes(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} {SIP_VERSION}", self.headers, self.body)


@dataclass(slots=True)
class SipResponse:
    """A SIP response. ``Content-Length`` is always written from ``body``."""

    code: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def __init__(
        self, code: int, reason: str, headers: Headers | None = None, body: bytes = b""
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.code = code
        self.reason = reason
        self.headers = Headers() if headers is None else headers
        self.body = body

    def to_bytes(self) -> bytes:
        return _serialize(f"{SIP_VERSION} {self.code} {self.reason}", self.headers, self.body)


SipMessage = SipRequest | SipResponse


def _split_list_value(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas in quotes or <...>."""
    if "," not in value:
        return [value]
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    index = 0
    while index < len(value):
        ch = value[index]
        if quoted:
            if ch == "\\":
                index += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:index].strip())
            start = index + 1
        index += 1
    parts.append(value[start:].strip())
    return [part for part in parts if part]


def _find_head_end(data: bytes) -> tuple[int, int]:
    """Where the header block ends and how long its terminator is, or (-1, 0)."""
    first_lf = data.find(b"\n")
    if first_lf > 0 and data[first_lf - 1] != 0x0D:
        # LF-only line ends: the empty line is "\n\n", and a CRLF CRLF further on
        # belongs to the body (searching for it first would cut the message there).
        end = data.find(b"\n\n")
        if end >= 0:
            return end, 2
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return end, 4
    end = data.find(b"\n\n")
    if end >= 0:
        return end, 2
    return -1, 0


def parse_message(data: bytes, *, max_size: int = MAX_UDP_MESSAGE) -> SipMessage:
    """Parse one whole SIP message.

    Returns a :class:`SipRequest` or :class:`SipResponse`; raises only
    :class:`SipParseError`. A body longer than ``Content-Length`` is cut to it (RFC 3261
    section 18.3 for datagrams); a shorter one is an error.
    """
    if len(data) > max_size:
        raise SipParseError(f"message of {len(data)} bytes exceeds {max_size}", status=513)
    # RFC 3261 section 7.5: leading CRLFs before a message are ignored.
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
    if _native:
        scanned = _sipscan.scan(data)
        if scanned is not None:
            method_, uri_, code_, reason_, items_, first_, vias_, body_ = scanned
            if method_ is None:
                return SipResponse(code_, reason_, Headers(items_, first_, vias_), body_)
            return SipRequest(method_, uri_, Headers(items_, first_, vias_), body_)
    head_end, term_len = _find_head_end(data)
    if head_end < 0:
        raise SipParseError("no empty line ends the headers")
    try:
        head = data[:head_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(f"headers are not UTF-8 (byte {exc.start})") from None
    if term_len == 4:
        lines = head.split("\r\n")
    else:
        lines = [line.removesuffix("\r") for line in head.split("\n")]
    # A lone CR or LF inside a line would smuggle a header into whatever copies the
    # value (a reply copies Via, From, To, Call-ID), so it is a syntax error.
    if head.count("\n") != len(lines) - 1 or head.count("\r") != (
        len(lines) - 1 if term_len == 4 else head.count("\r\n")
    ):
        raise SipParseError("stray CR or LF inside the headers")
    start_line = lines[0]
    # The start line is read into plain values and the message built once its headers
    # and body are known: building it first would build a Headers to throw away.
    method: str | None = None
    uri = reason = ""
    code = 0
    version_error: SipParseError | None = None
    if start_line.startswith("SIP/"):
        code, reason = _parse_status_line(start_line)
    else:
        method, uri, version = _parse_request_line(start_line)
        if version != SIP_VERSION:
            # A 505 reply copies Via, From, To, Call-ID and CSeq like any other
            # (RFC 3261 section 8.2.6.2): read the headers before raising it.
            version_error = SipParseError(f"unsupported version {version[:20]!r}", status=505)

    header_lines = lines[1:]
    if "\n " in head or "\n\t" in head:
        header_lines = _unfold(method, uri, header_lines)
    items: list[tuple[str, str]] = []
    first: dict[str, str] = {}
    vias: list[str] = []
    for raw in header_lines:
        raw_name, sep, value = raw.partition(":")
        if not sep:
            raise _error(method, uri, f"header line without a colon: {raw[:40]!r}")
        cached = _NAME_CACHE.get(raw_name)
        if cached is None:
            cached = _canonical_name(raw_name)
            if cached is None:
                raise _error(method, uri, f"bad header name {raw_name.strip()[:40]!r}")
        name = cached
        value = value.strip()
        if name == "via":
            parts = _split_list_value(value) if "," in value else [value]
            for part in parts:
                items.append((name, part))
                vias.append(part)
            if name not in first and parts:
                first[name] = parts[0]
            continue
        items.append((name, value))
        if name not in first:
            first[name] = value
    headers = Headers(items, first, vias)
    if version_error is not None:
        version_error.request = SipRequest(method or "", uri, headers)
        raise version_error
    content_length = first.get("content-length")

    body = data[head_end + term_len :]
    if content_length is not None:
        try:
            length = int(content_length)
        except ValueError:
            raise _error(
                method, uri, f"Content-Length is not a number: {content_length!r}", headers
            ) from None
        if length < 0:
            raise _error(method, uri, "Content-Length is negative", headers)
        if len(body) < length:
            raise _error(
                method,
                uri,
                f"body has {len(body)} bytes but Content-Length says {length}",
                headers,
            )
        if len(body) > length:
            body = body[:length]
    if method is None:
        return SipResponse(code, reason, headers, body)
    return SipRequest(method, uri, headers, body)


def _unfold(method: str | None, uri: str, lines: list[str]) -> list[str]:
    """Join continuation lines to the header line they continue.

    RFC 3261 section 7.3.1: a line starting with white space continues the previous
    header (obsolete line folding). Unfolding comes before anything reads a value, so
    that a folded Via list is split as a whole (not only its last part) and a folded
    Content-Length is read whole.
    """
    out: list[str] = []
    for raw in lines:
        if raw[:1] in (" ", "\t"):
            if not out:
                raise _error(method, uri, "header block starts with a continuation line")
            out[-1] = f"{out[-1]} {raw.strip()}"
        else:
            out.append(raw)
    return out


def _error(
    method: str | None, uri: str, reason: str, headers: Headers | None = None
) -> SipParseError:
    """A 400 that carries the request as far as it was read: its start line, and its
    headers when they were all read (``method`` is None for a response)."""
    request = None
    if method is not None:
        request = SipRequest(method, uri, headers if headers is not None else Headers())
    return SipParseError(reason, status=400, request=request)


def _parse_request_line(line: str) -> tuple[str, str, str]:
    """The method, Request-URI and version of a request line; the version is checked
    by the caller, since an unsupported one is answered (505) once the headers are
    read."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError(f"bad request line {line[:60]!r}")
    method, uri, version = parts
    if not _is_token(method):
        raise SipParseError(f"bad method {method[:20]!r}")
    if not uri or ":" not in uri:
        raise SipParseError(f"bad Request-URI {uri[:60]!r}")
    return method, uri, version


def _parse_status_line(line: str) -> tuple[int, str]:
    version, _, rest = line.partition(" ")
    code_text, _, reason = rest.partition(" ")
    if version != SIP_VERSION:
        raise SipParseError(f"unsupported version {version[:20]!r}")
    # isascii: str.isdigit() is true for digits like "²" that int() refuses.
    if (
        len(code_text) != 3
        or not (code_text.isascii() and code_text.isdigit())
        or not 100 <= int(code_text) <= 699
    ):
        raise SipParseError(f"bad status code {code_text[:20]!r}")
    return int(code_text), reason


class StreamFramer:
    """Cut a TCP byte stream into whole SIP messages (RFC 3261 section 18.3).

    Feed it whatever a read returned; it yields each complete message's bytes. On a
    stream, ``Content-Length`` is mandatory: without it, with a header section longer
    than ``max_head`` or a message larger than ``max_size``, the stream can't be
    resynchronised, so :meth:`feed` raises :class:`SipParseError` and the connection
    must be closed. Both caps are checked as the bytes arrive: a message announcing
    more than ``max_size`` is refused on its headers, not after its body.

    Linear in the bytes received: the search for the end of the headers resumes where
    the previous read left it, and once the headers are read the framer only counts
    bytes until the body is complete (a peer trickling a message in tiny reads costs
    no more than one sending it at once).
    """

    __slots__ = ("_buffer", "_need", "_scanned", "max_head", "max_size")

    def __init__(
        self, max_size: int = DEFAULT_MAX_STREAM_MESSAGE, max_head: int | None = None
    ) -> None:
        self._buffer = bytearray()
        self.max_size = max_size
        #: Largest header section (start line and headers) accepted.
        self.max_head = max_size if max_head is None else min(max_head, max_size)
        #: Bytes of the buffer already searched for the empty line (no match there).
        self._scanned = 0
        #: Length of the message being received, once its headers are read.
        self._need: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete (0 between messages)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        messages: list[bytes] = []
        pos = 0
        try:
            while pos < len(buffer):
                if self._need is None:
                    if self._scanned == 0:
                        # RFC 5626 keep-alives (CRLF) between messages.
                        while pos < len(buffer) and buffer[pos] in (13, 10):
                            pos += 1
                        if pos == len(buffer):
                            break
                    self._need = self._head(buffer, pos)
                    if self._need is None:
                        break
                need = self._need
                if len(buffer) - pos < need:
                    break
                messages.append(bytes(buffer[pos : pos + need]))
                pos += need
                self._need = None
                self._scanned = 0
        finally:
            if pos:
                del buffer[:pos]
        return messages

    def _head(self, buffer: bytearray, pos: int) -> int | None:
        """The length of the message starting at ``pos``, or None while its headers
        are incomplete."""
        # Resume a little before where the last search stopped: the empty line may
        # straddle two reads.
        start = pos + max(self._scanned - 3, 0)
        crlf = buffer.find(b"\n\r\n", start)
        lf = buffer.find(b"\n\n", start, crlf + 2 if crlf >= 0 else len(buffer))
        if lf >= 0:
            head_end, term_len = lf - pos, 2
        elif crlf >= 0 and crlf > pos and buffer[crlf - 1] == 13:
            head_end, term_len = crlf - 1 - pos, 4
        elif crlf >= 0:
            head_end, term_len = crlf - pos, 3
        else:
            self._scanned = len(buffer) - pos
            if self._scanned > self.max_head:
                raise SipParseError(f"no end of headers within {self.max_head} bytes", status=513)
            return None
        if head_end > self.max_head:
            raise SipParseError(
                f"header section of {head_end} bytes exceeds {self.max_head}", status=513
            )
        length = _stream_content_length(bytes(buffer[pos : pos + head_end]))
        total = head_end + term_len + length
        if total > self.max_size:
            raise SipParseError(f"message of {total} bytes exceeds {self.max_size}", status=513)
        return total


def _stream_content_length(head: bytes) -> int:
    lines = head.split(b"\n")
    for index in range(1, len(lines)):
        name, sep, value = lines[index].partition(b":")
        if sep and name.strip().lower() in (b"content-length", b"l"):
            # A folded value continues on the lines that start with white space, as
            # parse_message reads it (RFC 3261 section 7.3.1).
            for more in lines[index + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                value += b" " + more
            try:
                length = int(value.strip())
            except ValueError:
                raise SipParseError("Content-Length is not a number") from None
            if length < 0:
                raise SipParseError("Content-Length is negative")
            return length
    raise SipParseError("a message on a stream must carry Content-Length")


# --------------------------------------------------------------------------- URIs


class SipUri(NamedTuple):
    """A ``sip:``/``sips:`` URI: ``sip:[user@]host[:port][;params]``.

    ``port`` is ``None`` when the URI names none; :attr:`effective_port` applies the
    default (5060, or 5061 for TLS).
    """

    host: str
    port: int | None = None
    user: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    scheme: str = "sip"

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a URI; raise ``ValueError`` with a one-line reason when it is not one."""
        raw = text.strip()
        if raw.startswith("<") and raw.endswith(">"):
            raw = raw[1:-1]
        scheme, sep, rest = raw.partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in ("sip", "sips"):
            raise ValueError(f"{text!r} is not a sip: URI")
        rest, _, _headers = rest.partition("?")
        user: str | None = None
        if "@" in rest:
            user, _, rest = rest.rpartition("@")
            user = user.partition(":")[0]
            if not user:
                raise ValueError(f"{text!r} has an empty user part")
        hostport, _, param_text = rest.partition(";")
        params: list[tuple[str, str | None]] = []
        if param_text:
            for chunk in param_text.split(";"):
                if not chunk:
                    continue
                name, eq, value = chunk.partition("=")
                params.append((name.strip().lower(), value.strip() if eq else None))
        host, port = _split_hostport(hostport, text)
        return cls(host, port, user, tuple(params), scheme)

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value if value is not None else ""
        return None

    @property
    def transport(self) -> str:
        """``udp``, ``tcp``, ``tls`` or ``sctp``; ``sips:`` means TLS."""
        value = self.param("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 5061 if self.transport == "tls" else 5060

    def with_user(self, user: str | None) -> SipUri:
        return SipUri(self.host, self.port, user, self.params, self.scheme)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.scheme}:"
        if self.user:
            text += f"{self.user}@"
        text += host
        if self.port is not None:
            text += f":{self.port}"
        for name, value in self.params:
            text += f";{name}" if value is None else f";{name}={value}"
        return text


def _split_hostport(hostport: str, original: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ValueError(f"{original!r} has an unclosed IPv6 reference")
        host = hostport[1:close]
        rest = hostport[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{original!r} has text after its IPv6 host")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"{original!r} has no host")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{original!r} has a bad port {port_text!r}")
        port = int(port_text)
    return host.lower(), port


class NameAddr(NamedTuple):
    """A ``From``/``To`` value: ``["display"] <uri>;params`` or ``uri;params``."""

    uri: SipUri
    params: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        raw = text.strip()
        open_at = raw.find("<")
        if open_at >= 0:
            close_at = raw.find(">", open_at)
            if close_at < 0:
                raise ValueError(f"{text!r} has an unclosed <")
            uri = SipUri.parse(raw[open_at + 1 : close_at])
            param_text = raw[close_at + 1 :]
        else:
            # addr-spec form: parameters after the URI belong to the header
            # (RFC 3261 section 20.10), so split them off before parsing the URI.
            uri_text, _, param_text = raw.partition(";")
            uri = SipUri.parse(uri_text)
        params: list[tuple[str, str | None]] = []
        for chunk in param_text.split(";"):
            chunk = chunk.strip()
            if not chunk:
                continue
            name, eq, value = chunk.partition("=")
            params.append((name.strip().lower(), value.strip() if eq else None))
        return cls(uri, tuple(params))

    @property
    def tag(self) -> str | None:
        for name, value in self.params:
            if name == "tag":
                return value
        return None


class Via(NamedTuple):
    """One ``Via`` value: ``SIP/2.0/UDP host[:port];params``."""

    transport: str
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> Via:
        if _native:
            fast = _sipscan.parse_via(text, cls)
            if fast is not None:
                return fast
        protocol, _, rest = text.strip().partition(" ")
        pieces = protocol.split("/")
        if len(pieces) != 3 or pieces[0].upper() != "SIP" or not pieces[2]:
            raise ValueError(f"bad Via protocol {protocol[:30]!r}")
        rest = rest.strip()
        sent_by, _, param_text = rest.partition(";")
        host, port = _split_hostport(sent_by.strip(), text)
        params: list[tuple[str, str | None]] = []
        for chunk in param_text.split(";"):
            chunk = chunk.strip()
            if not chunk:
                continue
            name, eq, value = chunk.partition("=")
            params.append((name.strip().lower(), value.strip() if eq else None))
        return cls(pieces[2].lower(), host, port, tuple(params))

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value if value is not None else ""
        return None

    @property
    def branch(self) -> str | None:
        return self.param("branch")


def via_param(via: Via, name: str) -> str | None:
    """``via.param(name)`` as a plain function: the compiled core calls it directly,
    where a method of a NamedTuple is looked up and called like any Python method
    (the branch and rport of every request are read through it)."""
    for key, value in via.params:
        if key == name:
            return value if value is not None else ""
    return None


def parse_cseq(value: str) -> tuple[int, str]:
    """``CSeq: 10 KDMQ`` -> ``(10, "KDMQ")``; ``ValueError`` when malformed."""
    if _native:
        fast = _sipscan.parse_cseq(value)
        if fast is not None:
            return fast
    number, _, method = value.strip().partition(" ")
    method = method.strip()
    if not number.isdigit() or not _is_token(method):
        raise ValueError(f"bad CSeq {value[:40]!r}")
    return int(number), method
