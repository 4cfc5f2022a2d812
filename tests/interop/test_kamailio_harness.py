"""The Kamailio harness itself: two real nodes form a bus and replicate htable."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.kamailio import (
    EXAMPLE_CONFIG,
    KAMAILIO,
    KamailioNodeFactory,
    Transport,
    _binary,
    parse_kamcmd_output,
)
from harness.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_two_kamailio_nodes_form_a_bus_and_replicate_htable(
    kamailio_node: KamailioNodeFactory, transport: Transport
) -> None:
    a = kamailio_node(transport=transport)
    a.htable_sets("ht", "before", "set-before-b-started")
    b = kamailio_node(transport=transport, notification_addresses=[a.server_address])
    assert a.pid != b.pid
    expected_proto = "tcp" if transport == "tcp" else "*"

    def bus_formed() -> bool:
        return a.knows("127.0.0.1", b.port) and b.knows("127.0.0.1", a.port)

    wait_until(bus_formed, 10, f"{a.server_address} and {b.server_address} to list each other")
    for node, other in ((a, b), (b, a)):
        nodes = node.list_nodes()
        assert len(nodes) == 2, nodes
        (me,) = (n for n in nodes if n["local"])
        (peer,) = (n for n in nodes if not n["local"])
        assert (me["port"], me["status"]) == (node.port, "active")
        assert peer["host"] == peer["resolved_ip"] == "127.0.0.1"
        assert (peer["port"], peer["status"], peer["proto"]) == (
            other.port,
            "active",
            expected_proto,
        )

    # B's htable asked for a full sync when it joined.
    wait_until(lambda: b.htable_get("ht", "before") == "set-before-b-started", 5, "initial sync")

    a.htable_sets("ht", "greeting", "hello world")
    a.htable_seti("ht", "counter", 42)
    a.htable_seti("ht", "negative", -5)  # not taken for a kamcmd option
    a.htable_sets("ht", "123", "s:456")  # numeric-looking key, "s:"-prefixed value, kept as is
    wait_until(lambda: b.htable_get("ht", "greeting") == "hello world", 5, "string replication")
    wait_until(lambda: b.htable_get("ht", "counter") == 42, 5, "integer replication")
    wait_until(lambda: b.htable_get("ht", "negative") == -5, 5, "negative integer replication")
    wait_until(lambda: b.htable_get("ht", "123") == "s:456", 5, "numeric-looking key")
    assert b.htable_get("ht", "no-such-key") is None

    b.htable_delete("ht", "greeting")
    wait_until(lambda: a.htable_get("ht", "greeting") is None, 5, "delete replication")

    a_pid = a.pid
    a.stop()
    a.stop()  # idempotent
    assert not a.running
    # the whole process group is gone, forked children included
    wait_until(lambda: not _group_exists(a_pid), 5, f"process group {a_pid} to disappear")
    assert "Listening on" in b.log_text()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_parse_kamcmd_output_handles_nested_structs_and_arrays() -> None:
    text = (
        "{\n\tentry: 18\n\tsize: 1\n\tslot: {\n\t\t{\n\t\t\tname: cnt\n\t\t\tvalue: 42\n"
        "\t\t\ttype: int\n\t\t}\n\t}\n}\n{\n\thost: 127.0.0.1\n\titem: {\n\t\tname: x\n\t}\n}\n"
        "plain\n"
    )
    assert parse_kamcmd_output(text) == [
        {"entry": "18", "size": "1", "slot": [{"name": "cnt", "value": "42", "type": "int"}]},
        {"host": "127.0.0.1", "item": {"name": "x"}},
        "plain",
    ]


@pytest.mark.usefixtures("kamailio_required")
def test_the_example_configuration_is_valid_as_shipped() -> None:
    """``kamailio -c`` accepts examples/kamailio/kamailio.cfg with its own defaults,
    as a user starts it (the tests run it with -A defines)."""
    result = subprocess.run(
        [_binary(KAMAILIO), "-c", "-f", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "config file ok" in output
    assert "]:5060" in output.partition("Listening on")[2], output
