"""Several cores for one host: N DMQ nodes side by side, each loaded by its own sipp.

Run from the repository root (the compiled core built, or ``--core pure``)::

    python -m bench.multicore --nodes 1,2 --requests 20000 [--peer mirror] [--repeats 3]

One node is one process, and its sans-IO core runs on one core at a time (the GIL).
The cheapest correct way to use more cores is more nodes: each ``dmq-gateway serve``
owns its SIP port and node identity, joins the bus like any Kamailio node, and shares
nothing with the others, so nothing new can go wrong between them (no shared state,
no lock, no new protocol). What this measures is the host's aggregate capacity: for
N in ``--nodes``, N fresh nodes (in-memory history, peer ``htable`` registered through
the API) each take ``--requests`` KDMQ htable sets from their own sipp in the closed
loop (``--inflight`` outstanding), all at once; the aggregate is the sum of the nodes'
rates (each over its own first-request..last-200 window) and, more conservatively,
every completed request over the longest sipp wall time.

What it does not give: a broadcast from Kamailio reaches every node on the bus, so N
nodes each do the work of every broadcast; more nodes scale the traffic addressed to
them (sends, HTTP and WebSocket clients spread over them), not the ingest of one
broadcast stream. Splitting one node across processes (HTTP workers sharing a port
with ``SO_REUSEPORT``, one DMQ process behind them over a local socket) keeps one
identity on the bus but adds a hop per message and a second protocol to keep correct;
it pays only when the HTTP and WebSocket side, not the DMQ core, is what saturates.

sipp runs on the same cores as the nodes (about a third of the CPU at these rates),
so on a 2-core machine N=2 measures contention as much as scaling. Writes
``OUT/NAME.json`` and its chart, ``OUT/NAME.png`` (``--name``, by default ``multicore``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import kdmq_throughput as kdmq
from bench.common import cpu_pressure

REPO = Path(__file__).resolve().parent.parent


def run_nodes(count: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """``count`` fresh nodes, each driven by its own sipp at the same time."""
    target_args = kdmq.parse_args(["--targets", args.target, "--sipp-mode", "users"])
    targets: list[kdmq.Target] = []
    results: list[kdmq.RunResult | None] = [None] * count
    errors: list[str] = []
    try:
        for i in range(count):
            workdir = scratch / f"n{count}-{i}"
            if workdir.exists():
                shutil.rmtree(workdir)  # an earlier repeat's
            targets.append(kdmq.start_target(args.target, workdir, target_args))

        def drive(index: int) -> None:
            try:
                results[index] = kdmq.run_sipp(
                    targets[index],
                    args.requests,
                    args.inflight,
                    scratch / f"n{count}-{index}" / "sipp",
                    probe=False,
                    mode="users",
                )
            except Exception as exc:  # reported with the run, never silently dropped
                errors.append(f"node {index}: {exc}")

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(count)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        for target in targets:
            target.stop()
    done = [r for r in results if r is not None]
    completed = sum(r.completed for r in done)
    longest = max((r.sipp_wall_s for r in done), default=0.0)
    return {
        "nodes": count,
        "completed": completed,
        "failed": sum(r.failed for r in done) + (count - len(done)) * args.requests,
        "aggregate_requests_per_s": round(sum(r.requests_per_s for r in done), 1),
        "completed_over_longest_sipp_wall_per_s": round(completed / longest, 1) if longest else 0,
        "per_node_requests_per_s": [r.requests_per_s for r in done],
        "target_cpu_s": [r.target_cpu_s for r in done],
        "wall_s": round(wall, 3),
        "errors": errors,
        "runs": [asdict(r) for r in done],
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """One bar per node count: each node's rate stacked, the aggregate and its scaling
    over the first count on top, every repeat's aggregate as a dot beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    top = 0.0
    for x, level in enumerate(levels):
        bottom = 0.0
        for index, rate in enumerate(level["per_node_requests_per_s"]):
            ax.bar(x, rate, 0.55, bottom=bottom, color=("#c44e52", "#dd8452")[index % 2])
            bottom += rate
        runs = [run["aggregate_requests_per_s"] for run in level.get("repeats", [level])]
        ax.plot([x + 0.36] * len(runs), runs, "k.", markersize=6)
        top = max([top, bottom, *runs])
        scaling = report["scaling_over_first"][x]
        ax.annotate(
            f"{level['aggregate_requests_per_s']:,.0f} req/s"
            + (f"\n{scaling:.2f}x one node" if scaling is not None and x else ""),
            (x, bottom * 1.02),
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
        )
    ax.set_xticks(range(len(levels)), [f"{level['nodes']} node(s)" for level in levels])
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_ylim(0, top * 1.3 if top else 1)
    ax.set_ylabel("KDMQ htable sets per second, all nodes (each node one colour)")
    ax.grid(axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(
        f"Independent nodes on one host ({report['target']}, {report['core']} core), each "
        f"with its own sipp, {report['inflight_per_node']} in flight\n"
        f"median of {report['repeats']} run(s) (dots: every run); "
        f"{m.get('nproc')} CPUs shared with the sipps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.multicore",
        description="Aggregate KDMQ throughput of N nodes on one host, each with its own sipp.",
    )
    parser.add_argument("--nodes", default="1,2", help="comma-separated node counts")
    parser.add_argument("--requests", type=int, default=20000, help="requests per node")
    parser.add_argument("--inflight", type=int, default=64, help="sipp in-flight limit per node")
    parser.add_argument(
        "--core",
        choices=("compiled", "pure"),
        default="compiled",
        help="which core the nodes run (compiled needs make compiled)",
    )
    parser.add_argument(
        "--peer",
        choices=("raw", "mirror"),
        default="raw",
        help="raw: a raw peer htable keeps every message (in memory) besides the htable "
        "mirror; mirror: the mirror alone is the peer, as Kamailio's htable (compiled only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of every node count, the counts taking turns; the median is reported",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--name",
        default="multicore",
        help="results file name, without .json/.png (multicore-mirror for --peer mirror)",
    )
    args = parser.parse_args(argv)
    try:
        args.node_counts = [int(x) for x in str(args.nodes).split(",") if x.strip()]
    except ValueError:
        parser.error(f"--nodes must be comma-separated whole numbers, not {args.nodes!r}")
    if not args.node_counts or min(args.node_counts) < 1 or args.requests < 1:
        parser.error("--nodes and --requests must be positive")
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    if args.peer == "mirror":
        if args.core != "compiled":
            parser.error("--peer mirror runs the compiled core")
        args.target = "ours-mirror"
    else:
        args.target = "ours-compiled" if args.core == "compiled" else "ours-pure"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="multicore-bench-"))
    report: dict[str, Any] = {
        "benchmark": "kdmq-multicore-nodes",
        "requests_per_node": args.requests,
        "inflight_per_node": args.inflight,
        "core": args.core,
        "target": args.target,
        "repeats": args.repeats,
        "machine": kdmq.machine_info(),
        "load_average_before": list(os.getloadavg()),
        "cpu_pressure_before": cpu_pressure(),
        "levels": [],
    }
    failures = 0
    try:
        repeats: dict[int, list[dict[str, Any]]] = {count: [] for count in args.node_counts}
        for repeat in range(args.repeats):
            for count in args.node_counts:
                level = run_nodes(count, args, scratch)
                failures += level["failed"] + len(level["errors"])
                repeats[count].append(level)
                print(
                    f"  run {repeat + 1}/{args.repeats}, {count} node(s): "
                    f"{level['aggregate_requests_per_s']:,.0f} req/s aggregate "
                    f"({level['per_node_requests_per_s']}), {level['completed']} ok, "
                    f"{level['failed']} failed, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        for count in args.node_counts:
            # The run with the median aggregate stands for the count, every run beside it.
            runs = sorted(repeats[count], key=lambda level: level["aggregate_requests_per_s"])
            median = dict(runs[len(runs) // 2])
            median["repeats"] = repeats[count]
            report["levels"].append(median)
        base = report["levels"][0]["aggregate_requests_per_s"] if report["levels"] else 0
        report["scaling_over_first"] = [
            round(level["aggregate_requests_per_s"] / base, 3) if base else None
            for level in report["levels"]
        ]
        report["load_average_after"] = list(os.getloadavg())
        path = args.out / f"{args.name}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path} and its chart")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
