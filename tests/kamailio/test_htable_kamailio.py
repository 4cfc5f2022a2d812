"""The htable mirror and /v1/htable against real Kamailio 5.6 nodes.

Kamailio runs harness/kamailio_state.cfg (htable with enable_dmq and dmq_init_sync;
tables ht, hx with autoexpire 300, big); the gateway is a real ``dmq-gateway serve``
process. What a client PUTs is read back with ``kamcmd htable.get`` on every Kamailio
node; what Kamailio's RPC and script functions change shows up in the replica and in
the change stream; a gateway started after a node holds 3 000 keys converges to
``htable.dump`` with one sync request; a malformed body is answered 400.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from app.cli import main
from harness.gateway import Gateway
from harness.kamailio import STATE_CONFIG, KamailioNode
from harness.ports import free_port
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running

pytestmark = [
    pytest.mark.interop,
    pytest.mark.usefixtures("kamailio_required"),
    pytest.mark.timeout(120),
]

JOIN_TIMEOUT = 15.0


@pytest.fixture
def kamailio_required() -> None:
    from tests.interop.conftest import require_kamailio

    require_kamailio()


def kamailio(workdir: Path, *, notify: str | None = None) -> KamailioNode:
    return KamailioNode(
        workdir,
        free_port(),
        notification_addresses=[notify] if notify else [],
        config=STATE_CONFIG,
        children=2,
        fr_timer_ms=2000,
    )


def mirror_gateway(name: str, workdir: Path, notify: str) -> Gateway:
    return Gateway(
        name,
        workdir,
        notify=[notify],
        ping_interval=5.0,
        extra=["--htable-autoexpire", "hx=300", "--kamailio-mirrors", "htable"],
    )


def metric(http: httpx.Client, pattern: str) -> float:
    """The sum of the /metrics samples whose line matches ``pattern``."""
    text = http.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and re.search(pattern, line)
    )


def htable_requests_sent(http: httpx.Client) -> float:
    return metric(http, r'^dmq_kamailio_mirror\{mirror="htable",what="sync_requests_sent"\}')


class Bus:
    """Two Kamailio nodes and a gateway, each listing the others active."""

    def __init__(self, k1: KamailioNode, k2: KamailioNode, gateway: Gateway) -> None:
        self.k1, self.k2, self.gateway = k1, k2, gateway
        self.http = httpx.Client(base_url=gateway.url, timeout=15, trust_env=False)

    def formed(self) -> bool:
        nodes = self.http.get("/v1/nodes").json()
        active = {n["port"] for n in nodes if not n["local"] and n["status"] == "active"}
        return {self.k1.port, self.k2.port} <= active and all(
            k.knows("127.0.0.1", self.gateway.sip_port) for k in (self.k1, self.k2)
        )

    def value(self, table: str, key: str) -> Any:
        response = self.http.get(f"/v1/htable/{table}/{key}")
        return response.json()["value"] if response.status_code == 200 else None

    def changes(self, table: str) -> ClientConnection:
        return connect(f"{self.gateway.ws_url}/v1/htable/{table}/changes", open_timeout=5)


@pytest.fixture(scope="module")
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    from tests.interop.conftest import require_kamailio

    require_kamailio()
    workdir = tmp_path_factory.mktemp("htable-bus")
    k1 = kamailio(workdir / "k1")
    k2 = kamailio(workdir / "k2", notify=k1.server_address)
    gateway = mirror_gateway("gateway", workdir, k1.server_address)
    try:
        with running([gateway]), dump_logs_on_failure(request, lambda: [gateway]):
            gateway.start()
            bus = Bus(k1, k2, gateway)
            try:
                wait_until(bus.formed, JOIN_TIMEOUT, "the gateway and both Kamailio nodes")
                yield bus
            finally:
                bus.http.close()
    finally:
        k2.stop()
        k1.stop()


def next_change(
    ws: ClientConnection, key: str, timeout: float = 5.0, event: str | None = None
) -> dict[str, Any]:
    """The next change frame of ``key`` (of ``event``, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        wanted = event is None or frame.get("event") == event
        if frame["type"] == "change" and frame["key"] == key and wanted:
            return frame  # type: ignore[no-any-return]


def test_a_put_is_readable_with_kamcmd_on_every_kamailio_node(bus: Bus) -> None:
    response = bus.http.put("/v1/htable/ht/from-api", json={"value": "hello kamailio"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]["results"]
    assert sorted((r["node"], r["code"]) for r in results) == sorted(
        [(bus.k1.server_address, 200), (bus.k2.server_address, 200)]
    )
    bus.http.put("/v1/htable/ht/count", json={"value": -42})
    for k in (bus.k1, bus.k2):
        assert k.htable_get("ht", "from-api") == "hello kamailio"
        assert k.htable_get("ht", "count") == -42
    assert bus.value("ht", "from-api") == "hello kamailio"
    # Deleted everywhere.
    assert bus.http.delete("/v1/htable/ht/count").status_code == 200
    for k in (bus.k1, bus.k2):
        assert k.htable_get("ht", "count") is None


def _gone(node: KamailioNode, table: str, key: str) -> bool:
    return node.htable_get(table, key) is None


def test_a_put_with_expires_disappears_when_kamailios_does(bus: Bus) -> None:
    with bus.changes("hx") as ws:
        response = bus.http.put("/v1/htable/hx/short", json={"value": "brief", "expires": 2})
        assert response.json()["expire"]["results"][0]["code"] == 200
        assert bus.k2.htable_get("hx", "short") == "brief"
        # The SET, then the SET_EXPIRE (a set of the same value with its new expiry).
        assert next_change(ws, "short")["data"]["expires"] > time.time() + 200
        expires = next_change(ws, "short")["data"]["expires"]
        assert expires == pytest.approx(time.time() + 2, abs=3)
        expired = next_change(ws, "short", timeout=10)
        assert expired["event"] == "expire" and expired["from"] is None
        assert time.time() >= expires - 0.01
    # Kamailio drops the expired cell at its htable timer's next tick (timer_interval
    # 1 s), which can come up to a second after the replica hid it.
    for node in (bus.k1, bus.k2):
        wait_until(partial(_gone, node, "hx", "short"), 3, "Kamailio to expire hx=>short", 0.1)
    assert bus.value("hx", "short") is None


def test_kamailio_rpc_and_script_changes_reach_the_replica_and_the_stream(bus: Bus) -> None:
    with bus.changes("ht") as ws:
        bus.k2.htable_sets("ht", "rpc-key", "from kamcmd")
        change = next_change(ws, "rpc-key")
        assert change["event"] == "set" and change["from"] == bus.k2.server_address
        assert change["data"] == {"value": "from kamcmd", "type": "str", "expires": None}
        assert bus.value("ht", "rpc-key") == "from kamcmd"

        bus.k1.htable_seti("ht", "rpc-int", 17)
        assert next_change(ws, "rpc-int")["data"]["value"] == 17

        bus.k2.htable_delete("ht", "rpc-key")
        assert next_change(ws, "rpc-key")["event"] == "delete"
        assert bus.value("ht", "rpc-key") is None

        for key in ("tmp_a", "tmp_b", "pre_1"):
            bus.k1.htable_sets("ht", key, "old-x")
            next_change(ws, key)
        bus.k1.htable_rm("re", "name", "^tmp_")  # sht_rm_name_re
        assert {next_change(ws, "tmp_a")["event"], next_change(ws, "tmp_b")["event"]} == {"delete"}
        bus.k2.htable_rm("sw", "value", "old-")  # sht_rm_value(..., "sw", ...)
        assert next_change(ws, "pre_1")["event"] == "delete"
        bus.k1.htable_sets("hx", "ttl", "v")
        bus.k1.htable_setex("hx", "ttl", 1)  # replicated as action 3
    wait_until(lambda: bus.value("hx", "ttl") is None, 5, "the replica to expire hx=>ttl")
    # Kamailio drops an expired cell at its htable timer's next tick (timer_interval):
    # up to that long after the replica, which hides it as soon as it is past.
    wait_until(lambda: bus.k1.htable_get("hx", "ttl") is None, 3, "Kamailio to expire hx=>ttl", 0.1)


def test_a_malformed_body_is_400_and_the_replica_is_intact(bus: Bus) -> None:
    bus.k1.htable_sets("ht", "intact", "yes")
    wait_until(lambda: bus.value("ht", "intact") == "yes", 5, "the replica to get the key")
    before = metric(bus.http, r'^dmq_kdmq_received_total\{code="400",peer="htable"\}')
    # master's last_modified field: every 5.6 node (and the mirror) answers 400
    bus.k2.dmq_broadcast(
        "htable",
        '{"action":2,"htname":"ht","cname":"intact","type":2,"strval":"no","mode":1,'
        '"last_modified":1796118594000}',
    )
    wait_until(
        lambda: (
            metric(bus.http, r'^dmq_kdmq_received_total\{code="400",peer="htable"\}') == before + 1
        ),
        5,
        "the gateway to answer 400",
    )
    kind = metric(
        bus.http,
        r'^dmq_kamailio_malformed_total\{kind="field",mirror="htable",sender="'
        + re.escape(bus.k2.server_address),
    )
    assert kind >= 1
    assert bus.value("ht", "intact") == "yes"
    assert bus.k1.htable_get("ht", "intact") == "yes"  # Kamailio refused it too


def cli(capsys: pytest.CaptureFixture[str], bus: Bus, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--url", bus.gateway.url])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_htable_cli_sets_gets_lists_and_deletes(
    bus: Bus, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DMQ_URL", "DMQ_API_TOKEN", "DMQ_CA", "DMQ_CERT"):
        monkeypatch.delenv(name, raising=False)
    code, out, _ = cli(capsys, bus, "htable", "set", "ht", "cli-n", "41", "--int")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ACTION", "NODE", "CODE", "REASON"]
    assert sorted(line.split()[1:3] for line in lines[1:]) == sorted(
        [[bus.k1.server_address, "200"], [bus.k2.server_address, "200"]]
    )
    assert bus.k2.htable_get("ht", "cli-n") == 41
    assert cli(capsys, bus, "htable", "get", "ht", "cli-n")[1] == "41\n"
    code, out, _ = cli(capsys, bus, "htable", "get", "ht", "cli-n", "--json")
    assert json.loads(out)["value"] == 41 and json.loads(out)["type"] == "int"
    code, out, _ = cli(capsys, bus, "htable", "ls", "ht", "--prefix", "cli-")
    assert out.splitlines() == ["KEY    VALUE     EXPIRES", "cli-n  41 (int)  never"]
    code, out, _ = cli(capsys, bus, "htable", "ls")
    assert code == 0 and out.splitlines()[0].split() == ["TABLE", "KEYS", "EXPIRING"]
    assert "sync: synced from" in out
    code, out, _ = cli(capsys, bus, "htable", "del", "ht", "--prefix", "cli-")
    assert code == 0 and bus.k1.htable_get("ht", "cli-n") is None
    assert sorted(line.split()[1:3] for line in out.splitlines()[1:]) == sorted(
        [[bus.k1.server_address, "200"], [bus.k2.server_address, "200"]]
    )
    code, _, err = cli(capsys, bus, "htable", "get", "ht", "cli-n")
    assert code == 1 and "no key 'cli-n'" in err
    code, _, err = cli(capsys, bus, "htable", "set", "ht", "k", "2147483648", "--int")
    assert code == 1 and "body.value" in err
    assert bus.k1.htable_get("ht", "k") is None


def test_the_htable_cli_speaks_json_too(
    bus: Bus, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each htable command with --json prints what the API answered, as the other
    commands do: the per-node results of a write, the tables, a page of keys."""
    for name in ("DMQ_URL", "DMQ_API_TOKEN", "DMQ_CA", "DMQ_CERT"):
        monkeypatch.delenv(name, raising=False)
    nodes = sorted([bus.k1.server_address, bus.k2.server_address])
    code, out, _ = cli(capsys, bus, "htable", "set", "ht", "cli-j", "hello", "--json")
    written = json.loads(out)
    assert code == 0 and (written["table"], written["key"]) == ("ht", "cli-j")
    assert sorted(r["node"] for r in written["results"]["results"]) == nodes
    assert {r["code"] for r in written["results"]["results"]} == {200}
    assert bus.k2.htable_get("ht", "cli-j") == "hello"
    code, out, _ = cli(capsys, bus, "htable", "ls", "--json")
    listing = json.loads(out)
    assert code == 0 and listing["sync"]["state"] == "synced"
    assert {t["table"]: t["cells"] for t in listing["tables"]}["ht"] >= 1
    code, out, _ = cli(capsys, bus, "htable", "ls", "ht", "--prefix", "cli-j", "--json")
    page = json.loads(out)
    assert code == 0 and [(c["key"], c["value"]) for c in page["keys"]] == [("cli-j", "hello")]
    code, out, _ = cli(capsys, bus, "htable", "del", "ht", "cli-j", "--json")
    deleted = json.loads(out)
    assert code == 0 and sorted(r["node"] for r in deleted["results"]["results"]) == nodes
    assert bus.k1.htable_get("ht", "cli-j") is None and bus.k2.htable_get("ht", "cli-j") is None


def test_a_late_gateway_converges_on_3000_keys_with_one_sync_request(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    seed = kamailio(tmp_path / "seed")
    other = kamailio(tmp_path / "other", notify=seed.server_address)
    try:
        seed.fill_htable(3000, "key-")
        seed.htable_seti("big", "number", 123456)
        # The second node syncs from the seed at its join: both hold the table.
        wait_until(lambda: len(other.htable_dump("big")) == 3001, 20, "the second node's sync")
        expected = seed.htable_dump("big")
        assert len(expected) == 3001
        gateway = mirror_gateway("late", tmp_path, seed.server_address)
        with running([gateway]), dump_logs_on_failure(request, lambda: [gateway]):
            gateway.start()
            http = httpx.Client(base_url=gateway.url, timeout=15, trust_env=False)
            with http:

                def replica() -> dict[str, str | int]:
                    cells: dict[str, str | int] = {}
                    after = None
                    while True:
                        params: dict[str, Any] = {"limit": 1000}
                        if after is not None:
                            params["after"] = after
                        page = http.get("/v1/htable/big", params=params).json()
                        cells.update({k["key"]: k["value"] for k in page["keys"]})
                        after = page["next"]
                        if after is None:
                            return cells

                wait_until(lambda: len(replica()) == 3001, 20, "the replica to converge")
                assert replica() == expected
                status = http.get("/v1/htable").json()["sync"]
                assert status["state"] == "synced" and status["requests_sent"] == 1
                assert status["donor"] in (seed.server_address, other.server_address)
                # Exactly one htable request left the gateway: the one sync request.
                assert htable_requests_sent(http) == 1
                assert metric(http, r'^dmq_kdmq_sent_total\{code="200",peer="htable"\}') == 1
    finally:
        other.stop()
        seed.stop()
