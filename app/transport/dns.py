"""Asynchronous DNS resolution of DMQ notification peers.

Kamailio's dmq module is told about other nodes through a ``notification_address`` SIP URI.
With ``multi_notify=0`` that URI names exactly one node, so its host is resolved to a single
address. With ``multi_notify=1`` the URI names a *set* of nodes: the host's SIP SRV records
(or, without any, all of its A and AAAA records) each become a separate peer to notify. This
module reproduces that behaviour so a node here builds the same peer list that a Kamailio node
with the same configuration would build.

Everything goes through asyncio: SRV, A and AAAA queries use dnspython's asyncio resolver, and
plain address look-ups without an explicit resolver use ``loop.getaddrinfo`` (which runs in the
loop's executor), so resolving a slow or dead name never stalls the event loop that is also
carrying SIP traffic. ``getaddrinfo`` is used in that case, rather than dnspython, because it is
what honours ``/etc/hosts`` and the rest of the system's name service configuration: names such
as ``localhost`` or container host names only exist there.

A caller (a test, or an operator who wants DMQ discovery on a dedicated DNS server) can pass its
own ``dns.asyncresolver.Resolver``; every query, address records included, then goes to it.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

__all__ = [
    "DEFAULT_SIPS_PORT",
    "DEFAULT_SIP_PORT",
    "DEFAULT_TARGET_LIMIT",
    "DnsResolutionError",
    "default_port",
    "resolve_host",
    "resolve_notification_targets",
]

DEFAULT_SIP_PORT = 5060
"""Port used for udp, tcp and sctp when neither the URI nor an SRV record gives one (RFC 3261)."""

DEFAULT_SIPS_PORT = 5061
"""Port used for tls when neither the URI nor an SRV record gives one (RFC 3261)."""

DEFAULT_TARGET_LIMIT = 30
"""Most peers one notification address expands to in ``multi_notify`` mode.

A misconfigured or hostile zone could otherwise make one node notify an unbounded number of
addresses on start-up.
"""

# SRV owner-name prefix for each SIP transport (RFC 3263 section 4.1). TLS is "sips over tcp".
_SRV_PREFIXES: dict[str, str] = {
    "udp": "_sip._udp",
    "tcp": "_sip._tcp",
    "tls": "_sips._tcp",
    "sctp": "_sip._sctp",
}

_T = TypeVar("_T")


class DnsResolutionError(Exception):
    """A host name gave no usable address at all.

    Raised instead of returning an empty list so that a mistyped notification address is
    reported at configuration time rather than silently producing a node with no peers. The
    last underlying resolver error, if any, is chained as ``__cause__`` for diagnosis.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(f"DNS resolution of {host!r} returned no usable address.")


def default_port(transport: str) -> int:
    """Return the SIP port to use for ``transport`` when nothing else gives one.

    Raises ValueError for a transport SIP has no SRV naming for, because guessing would send
    DMQ traffic to the wrong service.
    """
    key = _transport_key(transport)
    return DEFAULT_SIPS_PORT if key == "tls" else DEFAULT_SIP_PORT


async def resolve_notification_targets(
    host: str,
    port: int | None,
    transport: str,
    *,
    multi_notify: bool,
    resolver: dns.asyncresolver.Resolver | None = None,
    limit: int = DEFAULT_TARGET_LIMIT,
) -> list[tuple[str, int]]:
    """Expand a notification address's host into the ``(address, port)`` peers to notify.

    ``host`` may be an IP literal (IPv6 with or without brackets), which is used as is without
    any DNS traffic: a literal can only ever name one node.

    Without ``multi_notify`` the name stands for one node: its lowest IPv4 address, else its
    lowest IPv6 address, is returned with ``port`` (or the transport's default port).

    With ``multi_notify`` the name stands for a cluster:

    1. The SIP SRV records for ``transport`` are looked up (``_sip._udp``, ``_sip._tcp``,
       ``_sips._tcp`` or ``_sip._sctp``). If ``port`` is given, only records with that port
       count, so one SRV set can describe several clusters on different ports. Each remaining
       target's A, then AAAA, addresses are returned with the record's port, in priority order
       (lowest first) and, within a priority, by descending weight. The order is deterministic
       rather than RFC 2782's weighted shuffle because every peer is notified anyway; only a
       stable order matters, so that the same zone always gives the same peer list.
    2. If no SRV record is usable, or none of their targets resolves, every A and then every
       AAAA address of ``host`` itself is returned with ``port`` or the default port.

    Pairs are de-duplicated (two SRV records may point at the same box) and capped at
    ``limit``. A failed step (NXDOMAIN, no answer, timeout, unreachable server) only moves on
    to the next; DnsResolutionError is raised when nothing resolved at all.

    RFC 6761 ``localhost`` names are never sent to DNS: they are resolved through
    ``getaddrinfo`` whatever ``resolver`` is, because a DNS server would at best answer
    NXDOMAIN for them and at worst time out.
    """
    key = _transport_key(transport)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    plain_port = port or default_port(key)

    literal = _ip_literal(host)
    if literal is not None:
        return [(literal, plain_port)]
    if not host:
        raise ValueError("host must not be empty")

    local = _is_localhost(host)
    if local:
        resolver = None
    errors: list[BaseException] = []

    if not multi_notify:
        # A before AAAA, and AAAA only when there is no A: IPv4 is what DMQ peers listen on
        # in most deployments, and one address is all a single-node address may yield.
        for family in (socket.AF_INET, socket.AF_INET6):
            found = await _addresses(host, family, resolver, errors)
            if found:
                return [(found[0], plain_port)]
        raise _failure(host, errors)

    if not local:
        records = await _srv_records(host, key, resolver, errors)
        if port:
            records = [record for record in records if int(record.port) == port]
        if records:
            pairs = await _srv_targets(records, resolver, errors)
            if pairs:
                return _unique(pairs)[:limit]

    addresses = await _all_addresses(host, resolver, errors)
    if not addresses:
        raise _failure(host, errors)
    return _unique((address, plain_port) for address in addresses)[:limit]


async def resolve_host(
    host: str, *, resolver: dns.asyncresolver.Resolver | None = None
) -> list[str]:
    """Return every address of ``host``, IPv4 ones first, without duplicates.

    This is what lets the node notice that a peer given by name and a peer given by address
    (for instance its own ``server_address``) are the same node, so it neither notifies itself
    nor keeps two entries for one peer. An IP literal returns itself (brackets removed) without
    DNS traffic. Address records come from ``resolver`` when one is given and from
    ``getaddrinfo`` otherwise, as for :func:`resolve_notification_targets`.

    Raises DnsResolutionError when the name has no address, so a caller cannot mistake "does
    not resolve" for "is a different node".
    """
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    if not host:
        raise ValueError("host must not be empty")
    if _is_localhost(host):
        resolver = None
    errors: list[BaseException] = []
    addresses = await _all_addresses(host, resolver, errors)
    if not addresses:
        raise _failure(host, errors)
    return addresses


def _transport_key(transport: str) -> str:
    """Normalise a transport name; SIP transport tokens are case-insensitive."""
    key = transport.strip().lower()
    if key not in _SRV_PREFIXES:
        known = ", ".join(sorted(_SRV_PREFIXES))
        raise ValueError(f"unsupported SIP transport {transport!r} (expected one of {known})")
    return key


def _ip_literal(host: str) -> str | None:
    """Return ``host`` without brackets if it is an IPv4/IPv6 literal, else None.

    Brackets are accepted because SIP URIs write IPv6 hosts as ``[2001:db8::1]`` and a caller
    may pass the URI's host part unchanged.
    """
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return None
    return candidate


def _is_localhost(host: str) -> bool:
    """Tell whether ``host`` is an RFC 6761 loopback name that DNS must not be asked about."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def _failure(host: str, errors: Sequence[BaseException]) -> DnsResolutionError:
    """Build the final error, chaining the last resolver error so its cause is not lost."""
    error = DnsResolutionError(host)
    if errors:
        error.__cause__ = errors[-1]
    return error


def _unique(items: Iterable[_T]) -> list[_T]:
    """Drop repeats while keeping first-seen order, which carries the SRV preference."""
    return list(dict.fromkeys(items))


async def _srv_records(
    host: str,
    transport: str,
    resolver: dns.asyncresolver.Resolver | None,
    errors: list[BaseException],
) -> list[SRV]:
    """Return the usable SIP SRV records of ``host``, most preferred first.

    Records whose target is the root name are dropped: RFC 2782 uses them to say a service is
    absent there, so they can never be a peer.
    """
    name = f"{_SRV_PREFIXES[transport]}.{host}"
    try:
        active = resolver or dns.asyncresolver.get_default_resolver()
        answer = await active.resolve(name, dns.rdatatype.SRV)
    except dns.exception.DNSException as exc:
        errors.append(exc)
        return []
    records = [
        record for record in answer if isinstance(record, SRV) and record.target != dns.name.root
    ]
    records.sort(
        key=lambda r: (int(r.priority), -int(r.weight), r.target.to_text().lower(), int(r.port))
    )
    return records


async def _srv_targets(
    records: Sequence[SRV],
    resolver: dns.asyncresolver.Resolver | None,
    errors: list[BaseException],
) -> list[tuple[str, int]]:
    """Resolve SRV targets concurrently and pair each address with its record's port.

    Each distinct target is looked up once even when several records name it, and the
    result keeps the records' order.
    """
    targets = _unique(record.target for record in records)
    results = await asyncio.gather(
        *(_all_addresses(target, resolver, errors) for target in targets)
    )
    by_target = dict(zip(targets, results, strict=True))
    return [
        (address, int(record.port)) for record in records for address in by_target[record.target]
    ]


async def _all_addresses(
    host: str | dns.name.Name,
    resolver: dns.asyncresolver.Resolver | None,
    errors: list[BaseException],
) -> list[str]:
    """Return all IPv4 then all IPv6 addresses of ``host``, both families queried at once."""
    ipv4, ipv6 = await asyncio.gather(
        _addresses(host, socket.AF_INET, resolver, errors),
        _addresses(host, socket.AF_INET6, resolver, errors),
    )
    return _unique([*ipv4, *ipv6])


async def _addresses(
    host: str | dns.name.Name,
    family: socket.AddressFamily,
    resolver: dns.asyncresolver.Resolver | None,
    errors: list[BaseException],
) -> list[str]:
    """Return the addresses of one family for ``host``; an empty list when there are none.

    Failures are recorded in ``errors`` instead of raised, because for the callers a missing
    record is a normal step on the way to the next kind of record.
    """
    if resolver is None:
        return await _system_addresses(host, family, errors)
    rdtype = dns.rdatatype.A if family == socket.AF_INET else dns.rdatatype.AAAA
    try:
        answer = await resolver.resolve(host, rdtype)
    except dns.exception.DNSException as exc:
        errors.append(exc)
        return []
    return _sorted_addresses(
        str(record.address) for record in answer if isinstance(record, A | AAAA)
    )


async def _system_addresses(
    host: str | dns.name.Name, family: socket.AddressFamily, errors: list[BaseException]
) -> list[str]:
    """Look ``host`` up through the system's name service (``/etc/hosts``, NSS, DNS).

    IPv4-mapped IPv6 results are dropped: some C libraries synthesise them for names that only
    have IPv4 addresses, and they would duplicate the IPv4 entry under another spelling.
    """
    name = host.to_text(omit_final_dot=True) if isinstance(host, dns.name.Name) else host
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, family=family, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        errors.append(exc)
        return []
    found: list[str] = []
    for info_family, _type, _proto, _canon, sockaddr in infos:
        if info_family != family:
            continue
        address = str(sockaddr[0])
        if family == socket.AF_INET6 and ipaddress.IPv6Address(address).ipv4_mapped is not None:
            continue
        found.append(address)
    return _sorted_addresses(found)


def _sorted_addresses(addresses: Iterable[str]) -> list[str]:
    """De-duplicate addresses of one family and put them in numeric order.

    DNS servers rotate the records of an RRset on every answer, and ``getaddrinfo`` reorders by
    local policy. Sorting makes the peer list, and which addresses survive the ``limit`` cap,
    the same on every node and every restart; nothing is lost, because DMQ notifies all of them.
    """
    return sorted(set(addresses), key=ipaddress.ip_address)
