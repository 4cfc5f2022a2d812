"""Bundles: several consecutive stamped messages of one origin in one KDMQ request.

Every KDMQ request costs a client transaction on the sender and a server transaction,
a parse and an answer on the receiver, whatever its body; at a few thousand messages
per second that overhead, not the messages, is what the CPU is spent on. A gateway that
has a run of messages for one peer therefore packs them into one request for each node
that said it reads bundles (the ``Supported: dmq-bundle`` option tag of SIP, RFC 3261
section 20.37, on the node's requests and answers), and sends them one by one to every
other node, Kamailio's included, exactly as before.

On the wire a bundle is an ordinary KDMQ request with

* the stamp of its first message and the number of messages it holds:
  ``X-DMQ-Origin: <sip:10.0.0.5:5060>;epoch=E;seq=S;count=N`` covers seqs S..S+N-1;
* ``Content-Type: application/vnd.dmq-gateway.bundle``;
* a body of one version byte (``0x01``) followed by N entries, each
  ``u8 content-type length | content type (UTF-8) | u32 body length (big-endian) | body``
  (a content-type length of 0 means the message had none). Bodies are bytes, framed by
  their length, so anything a single message may carry a bundle carries too.

The receiver handles entry *i* exactly as a single message stamped ``seq=S+i`` and
answers the bundle once; :func:`decode` refuses a body that does not frame exactly
``count`` entries, with a sentence that says what is wrong (the receiver's 400 reason).
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

#: The SIP option tag (``Supported:``) of a node that reads bundles.
OPTION_TAG: Final = "dmq-bundle"
#: The Content-Type of a bundle.
CONTENT_TYPE: Final = "application/vnd.dmq-gateway.bundle"
#: The first byte of every bundle body: the version of the framing.
VERSION: Final = 1
#: The longest content type an entry can carry (its length is one byte); a message
#: with a longer one is sent on its own.
MAX_CONTENT_TYPE: Final = 255
#: The most entries a receiver reads from one bundle (a sender's bound is far lower).
MAX_ENTRIES: Final = 10_000
#: Bytes of framing per entry beside its content type and body.
ENTRY_OVERHEAD: Final = 5

_U32 = struct.Struct(">I")
_COUNT = re.compile(r";\s*count\s*=\s*([0-9]{1,6})\s*(?:;|$)", re.IGNORECASE)


class BundleError(ValueError):
    """A bundle that cannot be read; the message says what is wrong."""


class Entry(NamedTuple):
    """One message of a bundle."""

    content_type: str | None
    body: bytes


def entry_size(content_type: str | None, body: bytes) -> int:
    """Bytes one message takes in a bundle body."""
    return ENTRY_OVERHEAD + len((content_type or "").encode()) + len(body)


def fits(content_type: str | None) -> bool:
    """Whether a message with this content type can be an entry."""
    return content_type is None or len(content_type.encode()) <= MAX_CONTENT_TYPE


def encode(entries: Iterable[tuple[bytes, str | None]]) -> bytes:
    """The bundle body of ``(body, content_type)`` pairs, in order.

    Raises BundleError for a content type longer than :data:`MAX_CONTENT_TYPE` bytes
    (the sender keeps such a message out of its bundles)."""
    parts = [bytes((VERSION,))]
    append = parts.append
    pack = _U32.pack
    for body, content_type in entries:
        kind = (content_type or "").encode()
        if len(kind) > MAX_CONTENT_TYPE:
            raise BundleError(
                f"a content type of {len(kind)} bytes does not fit in a bundle entry "
                f"(at most {MAX_CONTENT_TYPE})"
            )
        append(bytes((len(kind),)))
        append(kind)
        append(pack(len(body)))
        append(body)
    return b"".join(parts)


def decode(body: bytes, count: int, *, max_body: int | None = None) -> list[Entry]:
    """The ``count`` entries of a bundle body, or BundleError saying what is wrong.

    ``max_body`` bounds each entry's body (the largest body a single message may have
    on this node): a bundle is no way around the limits of single messages."""
    if not 1 <= count <= MAX_ENTRIES:
        raise BundleError(f"bundle count {count} is not 1 to {MAX_ENTRIES}")
    if not body:
        raise BundleError("bundle body is empty")
    if body[0] != VERSION:
        raise BundleError(f"bundle version {body[0]} is not understood (only {VERSION})")
    view = memoryview(body)
    end = len(body)
    at = 1
    entries: list[Entry] = []
    unpack = _U32.unpack_from
    while at < end:
        index = len(entries)
        if index >= count:
            raise BundleError(f"bundle holds more than the {count} entries its stamp counts")
        kind_length = body[at]
        at += 1
        if at + kind_length + 4 > end:
            raise BundleError(f"bundle entry {index} is cut short (its header)")
        try:
            kind = bytes(view[at : at + kind_length]).decode() if kind_length else None
        except UnicodeDecodeError:
            raise BundleError(f"bundle entry {index}: content type is not UTF-8") from None
        if kind is not None and not kind.isprintable():
            raise BundleError(f"bundle entry {index}: content type has control characters")
        at += kind_length
        (length,) = unpack(body, at)
        at += 4
        if at + length > end:
            raise BundleError(
                f"bundle entry {index} is cut short: {length} bytes announced, {end - at} left"
            )
        if max_body is not None and length > max_body:
            raise BundleError(
                f"bundle entry {index}: a body of {length} bytes is over this node's "
                f"limit of {max_body}"
            )
        entries.append(Entry(kind, bytes(view[at : at + length])))
        at += length
    if len(entries) != count:
        raise BundleError(f"bundle holds {len(entries)} entries, its stamp counts {count}")
    return entries


def stamp_count(origin: str | None) -> int | None:
    """The ``count`` parameter of an ``X-DMQ-Origin`` value (None: not a bundle's)."""
    if not origin:
        return None
    end = origin.find(">")
    match = _COUNT.search(origin, end + 1 if end >= 0 else 0)
    return int(match.group(1)) if match else None


def with_count(header: str, count: int) -> str:
    """An ``X-DMQ-Origin`` value with the bundle's ``count``."""
    return f"{header};count={count}"


def chunks(sizes: Sequence[int], max_messages: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split messages of these entry sizes (in order) into runs ``(start, stop)`` of
    at most ``max_messages`` entries and ``max_bytes`` of body (version byte included);
    a message too large for any bundle (a size of -1, or over ``max_bytes`` on its own)
    is a run of one, sent as a single message."""
    runs: list[tuple[int, int]] = []
    start = 0
    total = 1
    for index, size in enumerate(sizes):
        alone = size < 0 or size + 1 > max_bytes
        if index > start and (alone or index - start >= max_messages or total + size > max_bytes):
            runs.append((start, index))
            start, total = index, 1
        total += max(size, 0)
        if alone:
            runs.append((start, index + 1))
            start, total = index + 1, 1
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


#: Upper bounds of the entries-per-bundle histogram buckets (``+Inf`` follows).
SIZE_BUCKETS: Final = (2, 5, 10, 20, 50, 100, 200, 500, 1000)


class BundleStats:
    """Bundles sent and received, and how many entries they held (for /metrics)."""

    __slots__ = ("malformed", "received_sizes", "sent_sizes")

    def __init__(self) -> None:
        #: Per direction: a count per bucket of :data:`SIZE_BUCKETS` and one for
        #: larger, then the number of bundles and the sum of their entries.
        self.sent_sizes = [0] * (len(SIZE_BUCKETS) + 3)
        self.received_sizes = [0] * (len(SIZE_BUCKETS) + 3)
        #: Bundles refused whole (400): bad framing, count or stamp.
        self.malformed = 0

    @staticmethod
    def _count(sizes: list[int], entries: int) -> None:
        index = bisect.bisect_left(SIZE_BUCKETS, entries)
        sizes[index] += 1
        sizes[-2] += 1
        sizes[-1] += entries

    def sent(self, entries: int) -> None:
        self._count(self.sent_sizes, entries)

    def received(self, entries: int) -> None:
        self._count(self.received_sizes, entries)
