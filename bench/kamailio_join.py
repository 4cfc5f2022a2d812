"""Joining a bus of Kamailio nodes that hold an htable and registrations: our mirrors next
to a Kamailio node.

Run from the repository root (as root: bytes are counted with a packet socket on lo)::

    make bench-kamailio-join             # the same, about a minute (part of make bench)
    python -m bench.kamailio_join        # 1, 2 and 3 Kamailio nodes, 3 000 keys, 300 contacts
    python -m bench.kamailio_join --nodes 1,3 --keys 1000 --contacts 0 --repeats 1

For each cluster size N, N Kamailio 5.6 nodes (harness/kamailio_state.cfg) form a bus;
the first is filled with ``--keys`` keys in table ``big`` (about 140 bytes each) and
``--contacts`` registrations (one contact per AOR, REGISTERed over UDP), and the others
get them from its syncs when they join. Then, ``--repeats`` times, one after the other
on the same cluster:

* ``ours``: a ``dmq-gateway serve`` with the htable and usrloc mirrors joins through the
  first node and bootstraps each replica with ONE sync request to ONE node;
* ``kamailio``: a fresh Kamailio node with the same configuration joins the same way;
  5.6 broadcasts its sync request and every node answers with its whole table.

What is measured, for each joiner:

* ``convergence_s``: from the first datagram the joiner sends (seen on lo) until its
  API says it holds every key and every contact (``GET /v1/htable`` and
  ``GET /v1/registrations`` for ours, which need the gateway's HTTP server up;
  ``htable.stats`` and ``usrloc:location_contacts`` over Kamailio's FIFO), polled every
  20 ms;
* ``last_answer_acked_s``: from the same first datagram until the joiner's 200 to the
  last sync answer it received (htable or usrloc) left (read on the wire, the same for
  both: Kamailio answers a message once it has applied it, the mirror once it has read
  it) - the chart shows this one;
* ``htable_bytes_in``: UDP payload bytes of KDMQ htable requests sent *to* the joiner
  (the sync answers, and any retransmission of them) during the join, and
  ``htable_messages_in``; ``donors``: how many nodes sent it sync answers;
  ``sync_requests_out``: htable sync requests the joiner sent (datagrams, so a
  retransmission counts); the same for usrloc (``usrloc_bytes_in``,
  ``usrloc_messages_in``, ``usrloc_donors``, ``usrloc_sync_requests_out``);
  ``all_bytes``: every UDP payload byte to or from the joiner in the window (membership
  and dialog sync requests included);
* the window ends 1.5 s after convergence, so that late duplicates are counted.

A joiner that left is removed from the remaining nodes at once (``dmq.remove``), so the
next one meets the same bus. The machine's load is recorded beside the figures (other
work on a shared machine slows both sides alike, but noisily). Results:
``bench/results/kamailio-join.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, bench_gateway, machine_info, rnd
from harness.kamailio import STATE_CONFIG, KamailioError, KamailioNode
from harness.ports import free_port
from harness.sip_phone import SipPhone, ul_dump
from harness.waiting import wait_until

TABLE = "big"
#: Seconds the measurement window stays open after convergence.
TAIL = 1.5
POLL = 0.02
ETH_P_ALL = 0x0003
PACKET_HOST = 0


@dataclass
class Traffic:
    """What a packet socket on lo saw to and from one UDP port."""

    port: int
    first_out: float | None = None
    all_bytes: int = 0
    htable_bytes_in: int = 0
    htable_messages_in: int = 0
    sync_requests_out: int = 0
    donors: set[int] = field(default_factory=set)
    usrloc_bytes_in: int = 0
    usrloc_messages_in: int = 0
    usrloc_sync_requests_out: int = 0
    usrloc_donors: set[int] = field(default_factory=set)
    #: Call-IDs of the sync answers received, and when the joiner's 200 to the last
    #: of them left (both Kamailio and the mirror answer a sync chunk once it is read).
    answers: set[bytes] = field(default_factory=set)
    last_answer_acked: float | None = None


class Sniffer:
    """Counts the UDP payloads to and from ``port`` on the loopback interface."""

    def __init__(self, port: int) -> None:
        self.traffic = Traffic(port)
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # SO_RCVBUFFORCE (root) beyond rmem_max: a 3-node sync is megabytes in a burst.
        self._sock.setsockopt(socket.SOL_SOCKET, 33, 64 * 1024 * 1024)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _run(self) -> None:
        t = self.traffic
        while not self._stop.is_set():
            try:
                data, address = self._sock.recvfrom(262144)
            except TimeoutError:
                continue
            if address[2] != PACKET_HOST or len(data) < 42:
                continue
            ip = data[14:]
            if ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 15) * 4
            source, destination = struct.unpack("!HH", ip[ihl : ihl + 4])
            if t.port not in (source, destination):
                continue
            payload = ip[ihl + 8 :]
            t.all_bytes += len(payload)
            if source == t.port:
                if t.first_out is None:
                    t.first_out = time.monotonic()
                if payload.startswith(b"KDMQ sip:htable@") and b'{"action":1' in payload:
                    t.sync_requests_out += 1
                elif payload.startswith(b"KDMQ sip:usrloc@") and b'{"action":3}' in payload:
                    t.usrloc_sync_requests_out += 1
                elif payload.startswith(b"SIP/2.0 200") and _call_id(payload) in t.answers:
                    t.last_answer_acked = time.monotonic()
            elif payload.startswith(b"KDMQ sip:htable@"):
                t.htable_bytes_in += len(payload)
                t.htable_messages_in += 1
                if b'{"cells"' in payload:
                    t.donors.add(source)
                    t.answers.add(_call_id(payload))
            elif payload.startswith(b"KDMQ sip:usrloc@"):
                t.usrloc_bytes_in += len(payload)
                t.usrloc_messages_in += 1
                if b'"ruid"' in payload:  # a contact (sync answers are all there is here)
                    t.usrloc_donors.add(source)
                    t.answers.add(_call_id(payload))


_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i):[ \t]*([^\r\n]+)", re.IGNORECASE)


def _call_id(payload: bytes) -> bytes:
    match = _CALL_ID.search(payload)
    return match.group(1).strip() if match else b""


def converge(
    count: Callable[[], tuple[int, int]],
    wanted: tuple[int, int],
    sniffer: Sniffer,
    timeout: float = 120.0,
) -> float:
    """Poll ``count`` (keys, contacts held) until it reaches ``wanted``; seconds from the
    joiner's first datagram."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            held = count()
        except Exception:  # the joiner not up yet
            held = (-1, -1)
        now = time.monotonic()
        if held[0] >= wanted[0] and held[1] >= wanted[1]:
            first = sniffer.traffic.first_out
            if first is None:
                raise RuntimeError("the joiner converged without sending a datagram")
            return now - first
        if now > deadline:
            raise RuntimeError(f"no convergence in {timeout} s (held {held} of {wanted})")
        time.sleep(POLL)


def result(traffic: Traffic, seconds: float, **extra: Any) -> dict[str, Any]:
    acked = None
    if traffic.last_answer_acked is not None and traffic.first_out is not None:
        acked = traffic.last_answer_acked - traffic.first_out
    return {
        "convergence_s": rnd(seconds),
        "last_answer_acked_s": rnd(acked),
        "htable_bytes_in": traffic.htable_bytes_in,
        "htable_messages_in": traffic.htable_messages_in,
        "donors": len(traffic.donors),
        "sync_requests_out": traffic.sync_requests_out,
        "usrloc_bytes_in": traffic.usrloc_bytes_in,
        "usrloc_messages_in": traffic.usrloc_messages_in,
        "usrloc_donors": len(traffic.usrloc_donors),
        "usrloc_sync_requests_out": traffic.usrloc_sync_requests_out,
        "all_bytes": traffic.all_bytes,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        **extra,
    }


def forget(nodes: Sequence[KamailioNode], port: int) -> None:
    """Drop a joiner that left from every node's list (dmq.remove)."""
    for node in nodes:
        for known in node.peers():
            if known["port"] == port:
                node.dmq_remove(f"sip:127.0.0.1:{port}")


def measure_ours(
    cluster: Sequence[KamailioNode], wanted: tuple[int, int], workdir: Path
) -> dict[str, Any]:
    gateway = bench_gateway(
        f"gw-{time.monotonic_ns()}",
        workdir,
        notify=[cluster[0].server_address],
        extra=["--kamailio-mirrors", "htable,usrloc"],
    )
    http = httpx.Client(base_url=gateway.url, timeout=10, trust_env=False)

    def count() -> tuple[int, int]:
        tables = http.get("/v1/htable").json()["tables"]
        keys = next((t["cells"] for t in tables if t["table"] == TABLE), 0)
        return keys, http.get("/v1/registrations", params={"limit": 1}).json()["contacts"]

    try:
        with Sniffer(gateway.sip_port) as sniffer:
            gateway.spawn()
            seconds = converge(count, wanted, sniffer)
            time.sleep(TAIL)
        expected = cluster[0].htable_dump(TABLE)
        replica: dict[str, Any] = {}
        after = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after is not None:
                params["after"] = after
            page = http.get(f"/v1/htable/{TABLE}", params=params).json()
            replica.update({k["key"]: k["value"] for k in page["keys"]})
            after = page["next"]
            if after is None:
                break
        sync = http.get("/v1/htable").json()["sync"]
        contacts = replica_contacts(http)
        usrloc_sync = http.get("/v1/registrations", params={"limit": 1}).json()["sync"]
        return result(
            sniffer.traffic,
            seconds,
            replica_equals_dump=replica == expected,
            bootstrap_requests=sync["requests_sent"],
            contacts_equal_ul_dump=contacts == ul_dump(cluster[0]),
            usrloc_bootstrap_requests=usrloc_sync["requests_sent"],
        )
    finally:
        http.close()
        gateway.stop()
        forget(cluster, gateway.sip_port)


def replica_contacts(http: httpx.Client) -> dict[str, str]:
    """ruid -> AOR of every contact in the gateway's replica, page by page."""
    held: dict[str, str] = {}
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after is not None:
            params["after"] = after
        page = http.get("/v1/registrations", params=params).json()
        for item in page["items"]:
            held.update({contact["ruid"]: item["aor"] for contact in item["contacts"]})
        after = page["next"]
        if after is None:
            return held


def kamailio_counts(node: KamailioNode) -> tuple[int, int]:
    """Keys of table ``big`` and contacts a Kamailio node holds (JSON-RPC)."""
    stats = node.jsonrpc("htable.stats")
    keys = next((int(t["all"]) for t in stats if t["name"] == TABLE), 0)
    lines = node.jsonrpc("stats.get_statistics", "usrloc:")  # "usrloc:NAME = N" each
    (line,) = [x for x in lines if str(x).startswith("usrloc:location_contacts ")]
    return keys, int(str(line).rsplit("=", 1)[1])


def measure_kamailio(
    cluster: Sequence[KamailioNode], wanted: tuple[int, int], workdir: Path
) -> dict[str, Any]:
    joiner, port = _joiner(cluster, workdir)

    def count() -> tuple[int, int]:
        return kamailio_counts(joiner)

    try:
        with Sniffer(port) as sniffer:
            started = time.monotonic()
            try:
                joiner.start()
            except KamailioError as exc:
                if "already in use" not in str(exc):
                    raise
                # Another process took the port between free_port() and the bind:
                # measure the next joiner instead (this one sent nothing).
                joiner, port = _joiner(cluster, workdir)
                sniffer.traffic.port = port
                joiner.start()
            seconds = converge(count, wanted, sniffer)
            if sniffer.traffic.first_out is not None and sniffer.traffic.first_out < started:
                raise RuntimeError("traffic counted before the joiner started")
            time.sleep(TAIL)
        return result(sniffer.traffic, seconds)
    finally:
        joiner.stop()
        forget(cluster, port)


def _joiner(cluster: Sequence[KamailioNode], workdir: Path) -> tuple[KamailioNode, int]:
    port = free_port()
    node = KamailioNode(
        workdir / f"joiner-{time.monotonic_ns()}",
        port,
        notification_addresses=[cluster[0].server_address],
        config=STATE_CONFIG,
        children=2,
        autostart=False,
    )
    return node, port


def start_cluster(size: int, wanted: tuple[int, int], workdir: Path) -> list[KamailioNode]:
    keys, contacts = wanted
    seed = KamailioNode(workdir / "k1", free_port(), config=STATE_CONFIG, children=2)
    seed.fill_htable(keys)
    phone = SipPhone(seed)
    try:
        phone.register([f"user{i:05d}" for i in range(contacts)], 3600, timeout=60)
    finally:
        phone.close()
    nodes = [seed]
    for index in range(2, size + 1):
        node = KamailioNode(
            workdir / f"k{index}",
            free_port(),
            notification_addresses=[seed.server_address],
            config=STATE_CONFIG,
            children=2,
        )
        nodes.append(node)

        def synced(node: KamailioNode = node) -> bool:
            held = kamailio_counts(node)
            return held[0] >= keys and held[1] >= contacts

        wait_until(synced, 60, f"k{index} to sync {keys} keys and {contacts} contacts")
    wait_until(
        lambda: all(len(n.active_peers()) == size - 1 for n in nodes), 30, "the cluster to form"
    )
    return nodes


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(name: str) -> float | None:
        values = [r[name] for r in runs if r.get(name) is not None]
        return rnd(statistics.median(values)) if values else None

    return {
        name: median(name)
        for name in (
            "convergence_s",
            "last_answer_acked_s",
            "htable_bytes_in",
            "htable_messages_in",
            "donors",
            "sync_requests_out",
            "usrloc_bytes_in",
            "usrloc_messages_in",
            "usrloc_donors",
            "usrloc_sync_requests_out",
            "all_bytes",
        )
    }


def chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [c["nodes"] for c in data["clusters"]]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.38
    for offset, who, colour in (
        (-width / 2, "ours", "tab:blue"),
        (width / 2, "kamailio", "tab:orange"),
    ):
        kb = [c[who]["median"]["htable_bytes_in"] / 1000 for c in data["clusters"]]
        usrloc_kb = [(c[who]["median"]["usrloc_bytes_in"] or 0) / 1000 for c in data["clusters"]]
        secs = [c[who]["median"]["last_answer_acked_s"] for c in data["clusters"]]
        xs = [s + offset for s in sizes]
        label = "gateway (one donor)" if who == "ours" else "Kamailio 5.6 (every node donates)"
        left.bar(xs, kb, width, label=label, color=colour)
        middle.bar(xs, usrloc_kb, width, label=label, color=colour)
        right.bar(xs, secs, width, label=label, color=colour)
    left.set_title(f"htable sync bytes to the joiner ({data['keys']} keys)")
    left.set_xlabel("Kamailio nodes on the bus")
    left.set_ylabel("KB (UDP payload)")
    middle.set_title(f"usrloc sync bytes to the joiner ({data['contacts']} contacts)")
    middle.set_xlabel("Kamailio nodes on the bus")
    middle.set_ylabel("KB (UDP payload)")
    right.set_title("join to the last sync answer read")
    right.set_xlabel("Kamailio nodes on the bus")
    right.set_ylabel("seconds (median)")
    for axis in (left, middle, right):
        axis.set_xticks(sizes)
        axis.legend(fontsize=8)
    load = data["machine"]["loadavg_at_start"][0]
    fig.suptitle(f"Joining a Kamailio DMQ bus (load average at start {load:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3", help="cluster sizes (default: 1,2,3)")
    parser.add_argument("--keys", type=int, default=3000, help="keys held (default: 3000)")
    parser.add_argument(
        "--contacts", type=int, default=300, help="registrations held (default: 300)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="joins of each (default: 2)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "kamailio-join.json", help="the JSON result"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")]
    data: dict[str, Any] = {
        "benchmark": "kamailio_join",
        "keys": args.keys,
        "contacts": args.contacts,
        "table": TABLE,
        "repeats": args.repeats,
        "machine": machine_info(),
        "clusters": [],
    }
    with tempfile.TemporaryDirectory(prefix="kamailio-join-") as scratch:
        for size in sizes:
            workdir = Path(scratch) / f"n{size}"
            wanted = (args.keys, args.contacts)
            cluster = start_cluster(size, wanted, workdir)
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            try:
                for _ in range(args.repeats):
                    ours.append(measure_ours(cluster, wanted, workdir))
                    print(f"{size} nodes, ours:     {json.dumps(ours[-1])}", flush=True)
                    theirs.append(measure_kamailio(cluster, wanted, workdir))
                    print(f"{size} nodes, kamailio: {json.dumps(theirs[-1])}", flush=True)
            finally:
                for node in reversed(cluster):
                    node.stop()
            data["clusters"].append(
                {
                    "nodes": size,
                    "ours": {"runs": ours, "median": summary(ours)},
                    "kamailio": {"runs": theirs, "median": summary(theirs)},
                }
            )
    data["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    chart(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
