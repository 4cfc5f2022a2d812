"""A tiny authoritative UDP DNS server for tests.

The resolution code is tested against real DNS packets on a real socket rather than a mocked
resolver, so that what is checked is what dnspython does with actual answers: NXDOMAIN versus
an empty answer, record ordering, EDNS sizes. The server listens on 127.0.0.1 on a free port,
answers from a zone given as a dict, and records every question it receives so tests can
assert which queries were (or were not) sent.

Zone format: ``{owner name: {record type: [rdata text, ...]}}``, for example::

    {
        "_sip._udp.cluster.test": {"SRV": ["10 50 5060 node1.cluster.test."]},
        "node1.cluster.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    }

Owner names are taken as absolute. A name that is in the zone but lacks the asked type, or
that only exists as the parent of a zone name (an "empty non-terminal"), gets an empty NOERROR
answer; any other name gets NXDOMAIN.
"""

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Mapping[str, Mapping[str, Sequence[str]]]

_CLASSIC_UDP_SIZE = 512
"""Largest UDP answer allowed to a client that did not announce a size with EDNS."""


class DnsTestServer:
    """Serve ``zone`` over UDP on 127.0.0.1 until :meth:`stop` (or the ``async with`` ends)."""

    def __init__(
        self, zone: Zone, *, ttl: int = 60, shuffle: bool = True, delay: float = 0.0
    ) -> None:
        """Load ``zone``; ``shuffle`` rotates RRset order per answer, as real servers do;
        ``delay`` holds every answer back that many seconds, like a slow DNS server."""
        self._shuffle = shuffle
        self.delay = delay
        #: Answers sent so far (with a delay, fewer than the queries for a while).
        self.answered = 0
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        for owner, types in zone.items():
            name = dns.name.from_text(owner)
            node = self._records.setdefault(name, {})
            for type_text, texts in types.items():
                rrset = dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, type_text, texts)
                node[rrset.rdtype] = rrset
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        """Every question received, as ``(name without final dot, type)``, in arrival order."""

    async def start(self) -> None:
        """Bind a free UDP port on loopback and start answering."""
        loop = asyncio.get_running_loop()
        transport, _protocol = await loop.create_datagram_endpoint(
            lambda: _DnsProtocol(self), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])

    async def stop(self) -> None:
        """Close the socket; safe to call twice."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> "DnsTestServer":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """Return a resolver that asks only this server.

        EDNS with a 4096-byte buffer is enabled because the server only speaks UDP: answers
        with dozens of records do not fit the classic 512 bytes, and without EDNS the resolver
        would retry over TCP, which nothing here serves.
        """
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.port = self.port
        resolver.nameservers = ["127.0.0.1"]
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        resolver.use_edns(0, 0, 4096)
        return resolver

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """Build the authoritative response to one query message."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        question = query.question[0]
        self.queries.append(
            (
                question.name.to_text(omit_final_dot=True),
                dns.rdatatype.to_text(question.rdtype),
            )
        )
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        node = self._records.get(question.name)
        if node is not None:
            rrset = node.get(question.rdtype)
            if rrset is not None:
                response.answer.append(rrset)
        elif not any(name.is_subdomain(question.name) for name in self._records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def wire_answer(self, data: bytes) -> bytes | None:
        """Answer a raw datagram, or return None for one that is not a DNS query.

        An answer too big for the client's buffer is sent empty with the TC flag, as a real
        server does, rather than silently cut.
        """
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        response = self.answer(query)
        max_size = query.payload if query.edns >= 0 else _CLASSIC_UDP_SIZE
        try:
            return response.to_wire(max_size=max_size, want_shuffle=self._shuffle)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=max_size)


class _DnsProtocol(asyncio.DatagramProtocol):
    """Feed each datagram to the server and send its answer back to the sender."""

    def __init__(self, server: DnsTestServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not inherit from DatagramTransport,
        # so an isinstance check would reject it; create_datagram_endpoint guarantees the kind.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.wire_answer(data)
        if reply is None:
            return
        if self._server.delay:
            asyncio.get_running_loop().call_later(self._server.delay, self._send, reply, addr)
        else:
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._server.answered += 1
            self._transport.sendto(reply, addr)
