"""CPU per KDMQ request inside the sans-IO node, with no sockets and no other process.

Run from the repository root::

    python -m bench.node_cpu                 # both cores (the compiled one if built)
    python -m bench.node_cpu --cores pure    # the Python sources only

sipp's closed loop (bench/kdmq_throughput.py) measures the whole node with its socket,
event loop and kernel, and on a machine shared with other work its figures move with
the load. This measures only what the core costs: a :class:`~app.dmq.node.DmqNode`
with a peer that answers 200 is handed ``--requests`` KDMQ htable "set" requests,
byte for byte what the sipp scenario sends (a fresh branch, tag, Call-ID and key per
request), by calling :meth:`~app.dmq.node.DmqNode.receive` in a loop and taking the
answers with ``datagrams_to_send`` as the UDP driver does, timers run every 256
requests. The figure is process CPU time (``time.process_time``) per request, so it
does not depend on how busy the other cores are; with ``--repeats N`` the median of N
is reported (the minimum beside it).

Each core runs in its own interpreter (``DMQ_GATEWAY_CORE=pure`` for the sources), so
that both are measured in one run. ``--baseline DIR`` adds the compiled core of another
checkout (built there with ``make compiled``, or ``DMQ_GATEWAY_COMPILE=1 python setup.py
build_ext --inplace``), run by this interpreter, and with ``--rounds N`` every core
takes its turn N times (the median of all its runs is reported), so that a change is
measured against what it changed on the same machine at the same load. Writes
``OUT/node-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PORT = 5099
SIPP_PORT = 5098


def request(number: int) -> bytes:
    """The sipp scenario's request number ``number``, as sipp would send it."""
    fields = f'"action":2,"htname":"ht","cname":"k{number}","type":2,"strval":"v","mode":1'
    body = ("{" + fields + "}").encode()
    lines = [
        f"KDMQ sip:htable@{HOST}:{PORT} SIP/2.0",
        f"Via: SIP/2.0/UDP {HOST}:{SIPP_PORT};branch=z9hG4bK-4242-{number}-0",
        f"From: <sip:htable@{HOST}:{SIPP_PORT}>;tag=4242SIPpTag00{number}",
        f"To: <sip:htable@{HOST}:{PORT}>",
        f"Call-ID: {number}-4242@{HOST}",
        "CSeq: 10 KDMQ",
        "Max-Forwards: 1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def measure(requests: int, repeats: int) -> dict[str, Any]:
    """Run in this interpreter: CPU microseconds per request, one figure per repeat."""
    import gc

    import app
    from app.dmq.config import NodeConfig
    from app.dmq.node import DmqNode
    from app.dmq.peers import PeerMessage, PeerReply
    from app.dmq.sip import SipUri
    from app.dmq.transaction import Endpoint

    ok = PeerReply()

    def handler(message: PeerMessage) -> PeerReply:
        return ok

    figures: list[float] = []
    answered = 0
    for _ in range(repeats):
        node = DmqNode(NodeConfig(server_address=SipUri.parse(f"sip:{HOST}:{PORT}")))
        node.register_peer("htable", handler)
        node.start(0.0)
        node.datagrams_to_send()
        source = Endpoint("udp", HOST, SIPP_PORT)
        datagrams = [request(number) for number in range(requests)]
        gc.collect()
        gc.freeze()
        now = 1.0
        started = time.process_time()
        for index, data in enumerate(datagrams):
            node.receive(data, source, now)
            answered += len(node.datagrams_to_send())
            if index & 255 == 255:
                now += 0.01
                node.handle_timer(now)
        figures.append((time.process_time() - started) / requests * 1e6)
        gc.unfreeze()
    if answered != requests * repeats:
        raise SystemExit(f"{answered} answers to {requests * repeats} requests")
    return {
        "core": app.core(),
        "requests": requests,
        "repeats": repeats,
        "us_per_request": round(statistics.median(figures), 2),
        "us_per_request_min": round(min(figures), 2),
        "runs_us": [round(f, 2) for f in figures],
    }


def run_core(core: str, requests: int, repeats: int, tree: Path = REPO) -> dict[str, Any]:
    """One child interpreter measuring ``core`` (pure or compiled) of the checkout at
    ``tree`` (its sources come first on the path, ahead of the installed package)."""
    env = dict(os.environ)
    if core == "pure":
        env["DMQ_GATEWAY_CORE"] = "pure"
    else:
        env.pop("DMQ_GATEWAY_CORE", None)
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-m", "bench.node_cpu", "--child", str(requests), str(repeats)]
    out = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    if core == "compiled" and result["core"] != "compiled":
        raise SystemExit(f"the compiled core is not built in {tree} (make compiled)")
    return result


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One core's rounds as one result: the median and minimum of all its runs."""
    figures = [figure for run in runs for figure in run["runs_us"]]
    return {
        **runs[0],
        "repeats": len(figures),
        "us_per_request": round(statistics.median(figures), 2),
        "us_per_request_min": round(min(figures), 2),
        "runs_us": figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:
        print(json.dumps(measure(int(args_list[1]), int(args_list[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", default="pure,compiled")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout whose compiled core is measured beside these ('baseline')",
    )
    parser.add_argument(
        "--baseline-label", default="", help="what the baseline is (e.g. its commit)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="turns each core takes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(args_list)
    report: dict[str, Any] = {"load_before": Path("/proc/loadavg").read_text().split()[:3]}
    targets: list[tuple[str, str, Path]] = [(core, core, REPO) for core in args.cores.split(",")]
    if args.baseline is not None:
        targets.append(("baseline", "compiled", args.baseline.resolve()))
        report["baseline_tree"] = str(args.baseline.resolve())
        report["baseline_label"] = args.baseline_label
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    for _ in range(args.rounds):
        for name, core, tree in targets:
            runs[name].append(run_core(core, args.requests, args.repeats, tree))
    for name, _, _ in targets:
        report[name] = merge(runs[name])
        print(f"{name}: {report[name]['us_per_request']} us/request", file=sys.stderr)
    report["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "node-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
