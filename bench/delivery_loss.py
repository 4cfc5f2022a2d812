"""Delivery under real loss: what a subscriber gets when the network drops packets.

Three gateways A, B, C on the hosts of a fault lab (network namespaces; nftables drops
packets between hosts at random, see harness/netns.py), ping every second, Timer F 2 s.
A broadcasts ``--count`` messages over HTTP with ``wait=false`` (one after the other),
then ``--count`` more with ``wait=true`` (``--concurrency`` at a time); a WebSocket
subscriber on B and one on C count, per phase: messages missed, missed and declared
lost by a ``gap`` frame, order inversions, duplicates (and, with ``wait=true``, the
node results that were not 200). Three conditions: 20% and 40% loss of UDP datagrams,
and 40% loss of TCP segments with the gateways on TCP.

An order inversion is a message that arrived after one whose POST started only once
its own POST had been answered: with several POSTs in flight only those pairs have an
order the gateway was told.

Each run is saved under its ``--label`` (``before``, ``after``...) in
``bench/results/delivery-loss.json``, beside the other labels' runs, and the chart
``delivery-loss.png`` shows every label side by side. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import RESULTS, machine_info, run_async
from harness.delivery import Subscriber, parse_body
from harness.labbus import LAB_TIMERS, PEER, LabBus, broadcast
from harness.netns import lab_unavailable

CONDITIONS: dict[str, dict[str, Any]] = {
    "udp-20": {"transport": "udp", "udp": 20, "tcp": 0},
    "udp-40": {"transport": "udp", "udp": 40, "tcp": 0},
    "tcp-40": {"transport": "tcp", "udp": 0, "tcp": 40},
}


#: SIP timer options per ``--timers``: the lab's fast ones, or none (the defaults).
TIMERS: dict[str, tuple[str, ...]] = {"lab": LAB_TIMERS, "default": ()}


def log(text: str) -> None:
    print(f"[delivery-loss] {text}", file=sys.stderr, flush=True)


def causal_inversions(arrival: list[int], posted: dict[int, tuple[float, float]]) -> int:
    """Messages that arrived after one whose POST started once theirs was answered."""
    count = 0
    latest_start_before = float("-inf")
    for n in arrival:
        start, end = posted[n]
        if end < latest_start_before:
            count += 1
        latest_start_before = max(latest_start_before, start)
    return count


def phase_counts(
    subscriber: Subscriber, numbers: range, posted: dict[int, tuple[float, float]], uri: str
) -> dict[str, Any]:
    arrival: list[int] = []
    for frame in subscriber.messages():
        parsed = parse_body(str(frame.get("body", "")))
        if parsed is not None and parsed[0] == "a" and parsed[1] in numbers:
            arrival.append(parsed[1])
    gaps = [g for g in subscriber.gaps() if uri in str(g.get("origin", ""))]
    declared = sum(
        max(0, int(g["to"]) - int(g["from"]) + 1) for g in gaps if "from" in g and "to" in g
    )
    # A gap frame names seq numbers, not our message numbers: the two are counted side by
    # side, not matched one to one.
    missed = len({n for n in numbers if n in posted} - set(arrival))
    return {
        "delivered": len(set(arrival)),
        "missed": missed,
        "gap_frames": len(gaps),
        "declared_lost": declared,
        "silently_missed": max(0, missed - declared),
        "inversions": causal_inversions([n for n in arrival if n in posted], posted),
        "duplicates": len(arrival) - len(set(arrival)),
    }


async def settle(
    subscribers: Sequence[Subscriber], total: int, quiet: float, limit: float
) -> float:
    """Wait until every subscriber has ``total`` message frames (or nothing new came
    for ``quiet`` s, or ``limit`` s passed); the seconds waited."""
    began = time.monotonic()
    last_change, last_seen = began, -1
    while True:
        seen = sum(len(s.messages()) + len(s.gaps()) for s in subscribers)
        now = time.monotonic()
        if seen != last_seen:
            last_change, last_seen = now, seen
        if all(len(s.messages()) >= total for s in subscribers):
            await asyncio.sleep(1.0)  # duplicates arriving late still count
            return round(time.monotonic() - began, 1)
        if now - last_change > quiet or now - began > limit:
            return round(now - began, 1)
        await asyncio.sleep(0.2)


async def run_condition(
    bus: LabBus, args: argparse.Namespace, cond: dict[str, Any]
) -> dict[str, Any]:
    a = bus["a"]
    subscribers = {name: Subscriber(bus[name].ws_url, PEER, token=bus.lab.token) for name in "bc"}
    for sub in subscribers.values():
        await sub.start()
    bus.lab.set_loss(udp=cond["udp"], tcp=cond["tcp"])
    result: dict[str, Any] = {}
    posted: dict[int, tuple[float, float]] = {}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
        for phase, wait, first in (("wait=false", False, 1), ("wait=true", True, args.count + 1)):
            numbers = range(first, first + args.count)
            failed, not_ok = 0, 0
            began = time.monotonic()
            pending = iter(numbers)

            async def worker(pending: Iterator[int], wait: bool) -> None:
                nonlocal failed, not_ok
                for n in pending:
                    start = time.monotonic()
                    try:
                        response = await broadcast(http, a, n, wait=wait)
                    except httpx.HTTPError:
                        failed += 1
                        continue
                    if response.status_code not in (200, 202):
                        failed += 1  # refused: the gateway never took it, nobody is owed it
                        continue
                    posted[n] = (start, time.monotonic())
                    if wait:
                        not_ok += sum(
                            1
                            for r in response.json().get("results", [])
                            if r.get("timeout") or r.get("code") != 200
                        )

            workers = 1 if not wait else args.concurrency
            await asyncio.gather(*(worker(pending, wait) for _ in range(workers)))
            send_s = time.monotonic() - began
            settle_s = await settle(
                list(subscribers.values()), first + args.count - 1, args.quiet, args.settle
            )
            result[phase] = {
                "posts_failed": failed,
                "node_results_not_200": not_ok if wait else None,
                "send_s": round(send_s, 1),
                "settle_s": settle_s,
                "subscribers": {
                    name: phase_counts(sub, numbers, posted, a.uri)
                    for name, sub in subscribers.items()
                },
            }
            log(f"  {phase}: {json.dumps(result[phase]['subscribers'])}")
        result["reorder"] = {name: await reorder_metrics(http, bus[name]) for name in "bc"}
        log(f"  reorder: {json.dumps(result['reorder'])}")
    for sub in subscribers.values():
        await sub.close()
    bus.lab.clear_loss()
    return result


async def reorder_metrics(http: httpx.AsyncClient, gateway: Any) -> dict[str, Any]:
    """How long a receiving gateway's holes took to fill (a histogram of the time from
    the first message held behind a missing one to its arrival), the gaps it declared,
    and the copies that came after their gap (what a longer reorder wait would have
    delivered)."""
    response = await http.get(f"{gateway.url}/metrics", headers=gateway.headers)
    response.raise_for_status()
    buckets: list[tuple[float, float]] = []
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "dmq_reorder_hole_fill_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name in (
                "dmq_reorder_hole_fill_seconds_count",
                "dmq_reorder_hole_fill_seconds_sum",
                "dmq_gaps_total",
                "dmq_reorder_late_total",
                "dmq_reorder_held_peak",
            ):
                found[sample.name] = sample.value
    buckets.sort()
    count = found.get("dmq_reorder_hole_fill_seconds_count", 0.0)
    # Holes that took longer than each bound: what a reorder wait of that length gives up.
    longer = {f"{bound:g}": int(count - cumulative) for bound, cumulative in buckets[:-1]}
    return {
        "holes_filled": int(count),
        "fill_mean_s": round(found.get("dmq_reorder_hole_fill_seconds_sum", 0.0) / count, 3)
        if count
        else None,
        "filled_later_than_s": longer,
        "gaps": int(found.get("dmq_gaps_total", 0)),
        "late_after_gap": int(found.get("dmq_reorder_late_total", 0)),
        "held_peak": int(found.get("dmq_reorder_held_peak", 0)),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--label", default="run", help="name this run is saved under")
    parser.add_argument("--count", type=int, default=1000, help="messages per phase")
    parser.add_argument("--concurrency", type=int, default=20, help="POSTs in flight (wait=true)")
    parser.add_argument("--quiet", type=float, default=8.0, help="s without news that end a phase")
    parser.add_argument("--settle", type=float, default=60.0, help="longest wait after a phase")
    parser.add_argument(
        "--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS)
    )
    parser.add_argument("--extra", default="", help="options added to every gateway")
    parser.add_argument(
        "--ping-interval", type=float, default=1.0, help="the gateways' ping interval (s)"
    )
    parser.add_argument(
        "--timers",
        choices=list(TIMERS),
        default="lab",
        help="SIP timers: lab (T1 0.1 s, T2 0.4 s, Timer F 2 s) or default (T1 0.5 s, "
        "T2 4 s, Timer F 32 s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    parser.add_argument(
        "--name",
        default="delivery-loss",
        help="results file name without .json/.png; under another name than "
        "delivery-loss the chart shows the hole-fill times instead (reorder-wait: the runs "
        "that chose the reorder defaults)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = lab_unavailable()
    if reason is not None:
        log(f"cannot run: {reason}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    saved: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    runs: dict[str, Any] = saved.get("runs", {})
    run: dict[str, Any] = {
        "machine": machine_info(),
        "parameters": {
            "count": args.count,
            "concurrency_wait_true": args.concurrency,
            "ping_interval_s": args.ping_interval,
            "timers": " ".join(TIMERS[args.timers]) or "defaults (T1 0.5 s, T2 4 s, Timer F 32 s)",
            "extra": args.extra,
        },
        "conditions": {},
    }
    code = 0
    for name in args.conditions:
        cond = CONDITIONS[name]
        log(f"{name}: {cond}")
        workdir = Path(tempfile.mkdtemp(prefix="delivery-loss-"))
        try:
            with LabBus(
                workdir,
                ["a", "b", "c"],
                transport=cond["transport"],
                extra=args.extra.split(),
                ping_interval=args.ping_interval,
                timers=TIMERS[args.timers],
            ) as bus:
                run["conditions"][name] = run_async(run_condition(bus, args, cond))
        except Exception as exc:
            code = 1
            run["conditions"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} FAILED: {exc}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    earlier = runs.get(args.label)
    if earlier is not None and set(args.conditions) != set(CONDITIONS):
        # Some conditions run again: the label's other conditions are kept.
        run["conditions"] = {**earlier.get("conditions", {}), **run["conditions"]}
    runs[args.label] = run
    saved = {
        "benchmark": "delivery-loss",
        "method": {
            "topology": "gateways A, B, C (dmq-gateway serve, peer htable) in three network "
            "namespaces on one bridge; B and C joined through A; ping 1 s, T1 0.1 s, T2 0.4 s, "
            "Timer F 2 s",
            "loss": "nftables 'numgen random mod 100 < P drop' on every host's way out, "
            "only for packets to another host (the HTTP/WebSocket traffic of the benchmark "
            "is never dropped)",
            "load": "HTTP POST broadcast on A: wait=false one at a time, then wait=true "
            "with --concurrency in flight",
            "missed": "accepted by A (202 or 200) and not received once nothing new came "
            "for --quiet s (or --settle s); a refused POST counts in posts_failed only",
            "inversions": "arrived before a message whose POST was answered before its own "
            "POST started",
        },
        "runs": runs,
    }
    json_path.write_text(json.dumps(saved, indent=2) + "\n")
    png_path = args.out / f"{args.name}.png"
    (plot if args.name == "delivery-loss" else plot_fills)(saved, png_path)
    log(f"wrote {json_path} and {png_path}")
    return code


#: What the chart shows, per subscriber and phase (mean of B and C), and its hatching.
METRICS = (
    ("silently_missed", ""),
    ("declared_lost", "//"),
    ("inversions", ".."),
    ("posts_failed", "xx"),
)


def plot(saved: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(saved["runs"])
    conditions = list(CONDITIONS)
    phases = ("wait=false", "wait=true")
    count = saved["runs"][labels[-1]]["parameters"]["count"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    width = 0.8 / max(1, len(labels) * len(METRICS))
    for ax, phase in zip(axes, phases, strict=True):
        for li, label in enumerate(labels):
            conds = saved["runs"][label]["conditions"]
            for si, (metric, hatch) in enumerate(METRICS):
                values = []
                for cond in conditions:
                    data = conds.get(cond, {}).get(phase, {})
                    if metric == "posts_failed":  # A refused them: not the subscribers'
                        values.append(data.get(metric) or 0)
                        continue
                    subs = data.get("subscribers", {})
                    values.append(sum(s.get(metric, 0) for s in subs.values()) / 2)
                offset = (li * len(METRICS) + si) * width - 0.4 + width / 2
                ax.bar(
                    [i + offset for i in range(len(conditions))],
                    values,
                    width,
                    label=f"{label}: {metric.replace('_', ' ')}",
                    hatch=hatch,
                    color=f"C{li}",
                    alpha=1.0 if not hatch else 0.5,
                )
        ax.set_xticks(range(len(conditions)), conditions)
        ax.set_title(f"{phase}: messages per subscriber (of {count})")
        ax.set_yscale("symlog")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Delivery through real packet loss: B's and C's subscribers (mean)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fills(saved: dict[str, Any], path: Path) -> None:
    """Holes filled later than each bound (mean of B and C), one line per label and
    condition: where a line reaches zero, a reorder wait that long gives up nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for label, run in saved["runs"].items():
        wait = "--reorder-wait" in run["parameters"].get("extra", "")
        for cond, data in run["conditions"].items():
            reorder = data.get("reorder") if isinstance(data, dict) else None
            if not reorder:
                continue
            bounds = [float(b) for b in next(iter(reorder.values()))["filled_later_than_s"]]
            means = [
                sum(r["filled_later_than_s"][f"{b:g}"] for r in reorder.values()) / len(reorder)
                for b in bounds
            ]
            gaps = sum(r["gaps"] for r in reorder.values())
            ax.plot(
                bounds,
                [max(m, 0.05) for m in means],
                marker="o",
                linestyle="-" if wait else "--",
                label=f"{label} {cond} (gaps: {gaps})",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (a reorder wait of that length)")
    ax.set_ylabel("holes filled later (mean of B and C; 0 drawn at 0.05)")
    ax.set_title("How long holes in a stamped stream took to fill under UDP loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
