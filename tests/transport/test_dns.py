"""Tests for app.transport.dns against a real (local, in-process) authoritative DNS server."""

import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import dns.asyncresolver
import dns.resolver
import pytest

from app.transport.dns import (
    DnsResolutionError,
    default_port,
    resolve_host,
    resolve_notification_targets,
)
from tests.transport.dns_server import DnsTestServer, Zone

StartServer = Callable[[Zone], Awaitable[DnsTestServer]]

CLUSTER_ZONE: Zone = {
    "_sip._udp.cluster.test": {
        "SRV": [
            "20 10 5070 backup.cluster.test.",
            "10 5 5060 node2.cluster.test.",
            "10 50 5062 node1.cluster.test.",
        ]
    },
    "node1.cluster.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "node2.cluster.test": {"A": ["192.0.2.2"]},
    "backup.cluster.test": {"AAAA": ["2001:db8::3"]},
    # The SRV set must win over the name's own address records.
    "cluster.test": {"A": ["198.51.100.99"]},
}


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[DnsTestServer] = []

    async def start(zone: Zone) -> DnsTestServer:
        server = DnsTestServer(zone)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


# --- the test server itself -------------------------------------------------------------


async def test_server_answers_nxdomain_nodata_and_records(start_server: StartServer) -> None:
    server = await start_server(CLUSTER_ZONE)
    resolver = server.resolver()
    answer = await resolver.resolve("node1.cluster.test", "A")
    assert [rdata.to_text() for rdata in answer] == ["192.0.2.1"]
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("node2.cluster.test", "AAAA")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal, not NXDOMAIN
        await resolver.resolve("_udp.cluster.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nowhere.cluster.test", "A")
    assert server.port != 53
    assert ("nowhere.cluster.test", "A") in server.queries


# --- multi_notify with SRV --------------------------------------------------------------


async def test_srv_targets_in_priority_then_weight_order(start_server: StartServer) -> None:
    server = await start_server(CLUSTER_ZONE)
    targets = await resolve_notification_targets(
        "cluster.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [
        ("192.0.2.1", 5062),  # priority 10, weight 50: A first ...
        ("2001:db8::1", 5062),  # ... then AAAA of the same target
        ("192.0.2.2", 5060),  # priority 10, weight 5
        ("2001:db8::3", 5070),  # priority 20
    ]
    assert server.queries[0] == ("_sip._udp.cluster.test", "SRV")


@pytest.mark.parametrize(
    ("transport", "srv_name"),
    [
        ("udp", "_sip._udp.svc.test"),
        ("UDP", "_sip._udp.svc.test"),
        ("tcp", "_sip._tcp.svc.test"),
        ("tls", "_sips._tcp.svc.test"),
        ("sctp", "_sip._sctp.svc.test"),
    ],
)
async def test_srv_owner_name_follows_transport(
    start_server: StartServer, transport: str, srv_name: str
) -> None:
    zone: Zone = {
        srv_name: {"SRV": ["0 0 7000 host.svc.test."]},
        "host.svc.test": {"A": ["192.0.2.70"]},
    }
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "svc.test", None, transport, multi_notify=True, resolver=server.resolver()
    )
    assert targets == [("192.0.2.70", 7000)]
    assert server.queries[0] == (srv_name, "SRV")


async def test_srv_records_are_filtered_by_explicit_port(start_server: StartServer) -> None:
    server = await start_server(CLUSTER_ZONE)
    targets = await resolve_notification_targets(
        "cluster.test", 5060, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [("192.0.2.2", 5060)]


async def test_no_srv_record_on_the_port_falls_back_to_address_records(
    start_server: StartServer,
) -> None:
    server = await start_server(CLUSTER_ZONE)
    targets = await resolve_notification_targets(
        "cluster.test", 5999, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [("198.51.100.99", 5999)]


async def test_unresolvable_srv_targets_fall_back_to_address_records(
    start_server: StartServer,
) -> None:
    zone: Zone = {
        "_sip._udp.broken.test": {
            "SRV": ["10 10 5060 gone.broken.test.", "10 10 5060 ."],
        },
        "broken.test": {"AAAA": ["2001:db8::42"]},
    }
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "broken.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [("2001:db8::42", 5060)]
    # The "." target (service explicitly absent) is never looked up.
    looked_up = {name for name, rdtype in server.queries if rdtype in {"A", "AAAA"}}
    assert looked_up == {"gone.broken.test", "broken.test"}


# --- multi_notify without SRV -----------------------------------------------------------


async def test_without_srv_every_a_then_every_aaaa(start_server: StartServer) -> None:
    zone: Zone = {
        "flat.test": {
            "AAAA": ["2001:db8::10", "2001:db8::11"],
            "A": ["192.0.2.10", "192.0.2.11"],
        }
    }
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "flat.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [
        ("192.0.2.10", 5060),
        ("192.0.2.11", 5060),
        ("2001:db8::10", 5060),
        ("2001:db8::11", 5060),
    ]
    assert ("_sip._udp.flat.test", "SRV") in server.queries

    tls = await resolve_notification_targets(
        "flat.test", None, "tls", multi_notify=True, resolver=server.resolver()
    )
    assert {port for _address, port in tls} == {5061}
    explicit = await resolve_notification_targets(
        "flat.test", 5090, "tcp", multi_notify=True, resolver=server.resolver()
    )
    assert {port for _address, port in explicit} == {5090}


# --- single-node mode -------------------------------------------------------------------


async def test_single_mode_takes_one_address_ipv4_first_and_skips_srv(
    start_server: StartServer,
) -> None:
    server = await start_server(
        {
            **CLUSTER_ZONE,
            "v6only.test": {"AAAA": ["2001:db8::6", "2001:db8::7"]},
        }
    )
    resolver = server.resolver()
    assert await resolve_notification_targets(
        "node1.cluster.test", None, "udp", multi_notify=False, resolver=resolver
    ) == [("192.0.2.1", 5060)]
    assert await resolve_notification_targets(
        "v6only.test", 5070, "tcp", multi_notify=False, resolver=resolver
    ) == [("2001:db8::6", 5070)]
    # cluster.test has SRV records, but a single-node address ignores them.
    assert await resolve_notification_targets(
        "cluster.test", None, "tls", multi_notify=False, resolver=resolver
    ) == [("198.51.100.99", 5061)]
    assert all(rdtype != "SRV" for _name, rdtype in server.queries)


# --- IP literals ------------------------------------------------------------------------


@pytest.mark.parametrize("multi_notify", [False, True])
@pytest.mark.parametrize(
    ("host", "port", "transport", "expected"),
    [
        ("192.0.2.5", None, "udp", ("192.0.2.5", 5060)),
        ("192.0.2.5", 5080, "tcp", ("192.0.2.5", 5080)),
        ("2001:db8::5", None, "tls", ("2001:db8::5", 5061)),
        ("[2001:db8::5]", 5090, "udp", ("2001:db8::5", 5090)),
    ],
)
async def test_ip_literal_is_returned_without_dns(
    start_server: StartServer,
    host: str,
    port: int | None,
    transport: str,
    expected: tuple[str, int],
    multi_notify: bool,
) -> None:
    server = await start_server(CLUSTER_ZONE)
    targets = await resolve_notification_targets(
        host, port, transport, multi_notify=multi_notify, resolver=server.resolver()
    )
    assert targets == [expected]
    assert await resolve_host(host, resolver=server.resolver()) == [expected[0]]
    assert server.queries == []


# --- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("multi_notify", [False, True])
async def test_unknown_name_raises(start_server: StartServer, multi_notify: bool) -> None:
    server = await start_server(CLUSTER_ZONE)
    with pytest.raises(DnsResolutionError, match=r"nowhere\.test") as caught:
        await resolve_notification_targets(
            "nowhere.test", None, "udp", multi_notify=multi_notify, resolver=server.resolver()
        )
    assert caught.value.host == "nowhere.test"
    assert isinstance(caught.value.__cause__, dns.resolver.NXDOMAIN)
    with pytest.raises(DnsResolutionError):
        await resolve_host("nowhere.test", resolver=server.resolver())


async def test_unreachable_server_raises_resolution_error() -> None:
    # A port that was free a moment ago: queries get "connection refused" from the kernel.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.port = dead_port
    resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = 0.3
    with pytest.raises(DnsResolutionError) as caught:
        await resolve_notification_targets(
            "cluster.test", None, "udp", multi_notify=True, resolver=resolver
        )
    assert caught.value.__cause__ is not None


async def test_invalid_arguments_raise_value_error(start_server: StartServer) -> None:
    server = await start_server(CLUSTER_ZONE)
    resolver = server.resolver()
    with pytest.raises(ValueError, match="transport"):
        await resolve_notification_targets(
            "cluster.test", None, "ws", multi_notify=True, resolver=resolver
        )
    with pytest.raises(ValueError, match="limit"):
        await resolve_notification_targets(
            "cluster.test", None, "udp", multi_notify=True, resolver=resolver, limit=0
        )
    with pytest.raises(ValueError, match="port"):
        await resolve_notification_targets(
            "cluster.test", 70000, "udp", multi_notify=True, resolver=resolver
        )
    with pytest.raises(ValueError, match="empty"):
        await resolve_notification_targets("", None, "udp", multi_notify=True, resolver=resolver)
    assert server.queries == []


# --- cap and de-duplication -------------------------------------------------------------


async def test_srv_expansion_is_capped_at_thirty(start_server: StartServer) -> None:
    zone: dict[str, dict[str, list[str]]] = {
        "_sip._udp.big.test": {
            "SRV": [f"{i} 0 5060 n{i}.big.test." for i in range(40)],
        }
    }
    for i in range(40):
        zone[f"n{i}.big.test"] = {"A": [f"10.0.0.{i + 1}"]}
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "big.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [(f"10.0.0.{i + 1}", 5060) for i in range(30)]

    five = await resolve_notification_targets(
        "big.test", None, "udp", multi_notify=True, resolver=server.resolver(), limit=5
    )
    assert five == targets[:5]


async def test_address_expansion_is_capped_at_thirty(start_server: StartServer) -> None:
    zone: Zone = {
        "many.test": {
            "A": [f"10.1.0.{i}" for i in range(1, 26)],
            "AAAA": [f"2001:db8::{i:x}" for i in range(1, 26)],
        }
    }
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "many.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert len(targets) == 30
    assert targets[:25] == [(f"10.1.0.{i}", 5060) for i in range(1, 26)]
    assert targets[25:] == [(f"2001:db8::{i:x}", 5060) for i in range(1, 6)]


async def test_duplicates_are_removed_keeping_first_occurrence(start_server: StartServer) -> None:
    zone: Zone = {
        "_sip._udp.dup.test": {
            "SRV": [
                "10 10 5060 a.dup.test.",
                "20 10 5060 a.dup.test.",  # same target and port again
                "30 10 5060 b.dup.test.",  # b shares an address with a
                "40 10 5061 b.dup.test.",  # same address on another port is another peer
            ]
        },
        "a.dup.test": {"A": ["192.0.2.1"]},
        "b.dup.test": {"A": ["192.0.2.1", "192.0.2.2"]},
    }
    server = await start_server(zone)
    targets = await resolve_notification_targets(
        "dup.test", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets == [
        ("192.0.2.1", 5060),
        ("192.0.2.2", 5060),
        ("192.0.2.1", 5061),
        ("192.0.2.2", 5061),
    ]
    # Each distinct target is asked about once per address family.
    assert server.queries.count(("a.dup.test", "A")) == 1
    assert server.queries.count(("b.dup.test", "A")) == 1


# --- resolve_host -----------------------------------------------------------------------


async def test_resolve_host_lists_ipv4_first(start_server: StartServer) -> None:
    zone: Zone = {"both.test": {"AAAA": ["2001:db8::1"], "A": ["192.0.2.1", "192.0.2.9"]}}
    server = await start_server(zone)
    assert await resolve_host("both.test", resolver=server.resolver()) == [
        "192.0.2.1",
        "192.0.2.9",
        "2001:db8::1",
    ]


# --- system resolver (getaddrinfo) ------------------------------------------------------


async def test_localhost_resolves_through_getaddrinfo() -> None:
    single = await resolve_notification_targets("localhost", None, "udp", multi_notify=False)
    assert single == [("127.0.0.1", 5060)]

    addresses = await resolve_host("localhost")
    assert addresses[0] == "127.0.0.1"
    assert all(ipaddress.ip_address(address).is_loopback for address in addresses)

    multi = await resolve_notification_targets("localhost", 5090, "tcp", multi_notify=True)
    assert multi[0] == ("127.0.0.1", 5090)
    assert all(ipaddress.ip_address(address).is_loopback for address, _port in multi)


async def test_localhost_never_reaches_the_dns_server(start_server: StartServer) -> None:
    server = await start_server(CLUSTER_ZONE)
    targets = await resolve_notification_targets(
        "localhost", None, "udp", multi_notify=True, resolver=server.resolver()
    )
    assert targets[0] == ("127.0.0.1", 5060)
    assert server.queries == []


def test_default_port() -> None:
    assert default_port("udp") == 5060
    assert default_port("TCP") == 5060
    assert default_port("tls") == 5061
    with pytest.raises(ValueError):
        default_port("carrier-pigeon")
