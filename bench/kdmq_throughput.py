"""KDMQ htable-set throughput: a real Kamailio node against ours, driven by sipp.

Run from the repository root::

    python -m bench.kdmq_throughput                      # every target
    python -m bench.kdmq_throughput --targets kamailio   # Kamailio only

The targets: Kamailio, our node with its durable history (``ours``: ``--history-store
sqlite``, every message a node takes written to SQLite before it answers) and with the
in-memory history (``ours-memory``: ``--history-store memory``), side by side in one
run; ``ratio_durable_over_memory`` is what durability costs. A ``dmq-gateway`` without
that option (history in memory only) runs as ``ours``, and ``ours-memory`` fails.
``ours-pure`` and ``ours-compiled`` are the in-memory node on each core, side by side:
the compiled core must be built (``make compiled``), and ``ours-pure`` runs the Python
sources beside it (``DMQ_GATEWAY_CORE=pure``); each run checks which core it got
(``dmq-gateway --version``), ``ratio_compiled_over_pure`` is what compiling gave.
``ours-mirror`` is the compiled node with no raw peer ``htable`` registered: the typed
htable mirror is then the peer, applies each set and answers it, the same work
Kamailio's htable module does (the other targets also keep every message in a raw
peer's history, for subscribers, which Kamailio does not).

For every target and every in-flight level (and every repeat), a fresh target is
started on a free loopback UDP port, sipp sends ``--requests`` KDMQ htable "set"
requests (bench/scenarios/kdmq_htable_set.xml, one request per sipp call, each with
its own key) keeping INFLIGHT requests outstanding, and the target is stopped.

How sipp keeps INFLIGHT requests outstanding (``--sipp-mode``):

* ``users`` (default): ``-users INFLIGHT -l INFLIGHT -m REQUESTS``. sipp opens
  INFLIGHT calls at once and opens a new one the moment one completes (closed loop),
  so the in-flight limit alone governs.
* ``rate``: ``-r 1000000 -l INFLIGHT -m REQUESTS``, i.e. "a high rate capped by the
  in-flight limit". Kept for comparison only: sipp opens rate-mode calls only when its
  clock advances, and that clock is CLOCK_MONOTONIC_COARSE (4 ms steps on a 250 Hz
  kernel), so this mode cannot exceed INFLIGHT calls per clock step: 16 000/s at 64
  in flight, whatever the target. It measures sipp, not the target.

What is measured, and how:

* ``completed`` / ``failed``: sipp's SuccessfulCall / FailedCall counters (final line
  of its ``-trace_stat`` file). A call completes on a 200; anything else, or no
  answer after sipp's UDP retransmissions, fails it.
* ``requests_per_s``: completed / (time from the first request sent to the last
  200 received), both taken from sipp's per-call ``-trace_rtt`` records; sipp's
  start-up and shut-down are not counted.
* ``p50_ms`` / ``p99_ms`` (and ``mean_ms``, ``max_ms``): nearest-rank percentiles of
  *every* call's response time from ``-trace_rtt`` (``-rtt_freq`` is chosen to divide
  the request count, so every call is written). sipp timestamps with its event-loop
  clock, which advances in coarse steps (4 ms on the 250 Hz kernel this was written
  on; the step seen in each run is reported as ``sipp_clock_step_ms``): "0" means
  "within one clock step", and sipp's own scheduling delay is included.
* ``probe_p50_ms`` / ``probe_p99_ms``: because of that coarseness, a second, precise
  measurement: while sipp runs, a probe thread in this process sends one extra htable
  set at a time (one every 2 ms plus its own response time: a few hundred per second,
  about 1 % of the load; each with a fresh key) from its own socket and times each 200
  with ``time.perf_counter_ns``. These are sampled (a few hundred per run, so p99
  rests on a handful of samples, and the probe thread itself competes for the CPUs)
  but not quantised; ``probe_samples`` and ``probe_lost`` say how many.
* sipp runs with ``-buff_size 4194304``: with the default 208 KB socket buffer sipp
  itself drops 200s at 256 in flight and the run measures sipp's retransmission
  timer (p99 about 500 ms) rather than the target. ``retransmissions`` and the
  target socket's kernel drop counter (``target_udp_drops``) are reported so that
  losses stay visible.
* ``target_cpu_s`` / ``sipp_cpu_s``: CPU time used by the target's process group and
  by sipp during the run, to tell a saturated target from a latency-bound one.

With ``--repeats N`` each level is run N times on a fresh target; the reported
figures are those of the median run by requests/s, every run is kept in ``runs``.

Writes ``OUT/kdmq-throughput.json`` and ``OUT/kdmq-throughput.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.common import (
    bench_gateway,
    group_cpu_seconds,
    percentile,
    register_peer,
    udp_drops,
)
from bench.common import machine_info as common_machine_info
from harness.kamailio import KamailioNode, kamailio_available, kamailio_version
from harness.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "bench" / "scenarios" / "kdmq_htable_set.xml"
HOST = "127.0.0.1"
SIPP_BUFFER = 4 * 1024 * 1024
TARGET_LABELS = {
    "kamailio": "Kamailio",
    "ours": "dmq-gateway (ours), durable history",
    "ours-memory": "dmq-gateway (ours), in-memory history",
    "ours-pure": "dmq-gateway (ours), in-memory history, pure-Python core",
    "ours-compiled": "dmq-gateway (ours), in-memory history, compiled core",
    "ours-mirror": "dmq-gateway (ours), htable mirror alone, compiled core",
}

#: The core each of these targets must run (``DMQ_GATEWAY_CORE``; see app/__init__.py).
CORES = {"ours-pure": "pure Python", "ours-compiled": "compiled", "ours-mirror": "compiled"}

#: The ``--history-store`` each of our targets runs with (ours: the durable default).
HISTORY_STORES = {
    "ours": "sqlite",
    "ours-memory": "memory",
    "ours-pure": "memory",
    "ours-compiled": "memory",
    "ours-mirror": "memory",
}

#: Targets that register no raw peer ``htable``: the typed htable mirror is the peer
#: and answers every set once it has applied it, which is all Kamailio's htable does
#: (the other targets also keep each message in a raw peer's history for subscribers).
MIRROR_ALONE = {"ours-mirror"}


def gateway_core(pure: bool) -> str:
    """The core ``dmq-gateway --version`` names, with or without ``DMQ_GATEWAY_CORE=pure``."""
    from harness.gateway import clean_env, gateway_command

    env = clean_env()
    if pure:
        env["DMQ_GATEWAY_CORE"] = "pure"
    out = subprocess.run(
        [*gateway_command(), "--version"], capture_output=True, text=True, timeout=60, env=env
    ).stdout
    match = re.search(r"\(core: ([^)]*)\)", out)
    return match.group(1) if match else "pure Python"


def history_store_supported() -> bool:
    """Whether this ``dmq-gateway serve`` has ``--history-store`` (older ones keep
    history in memory only, and know no such option)."""
    from harness.gateway import gateway_command

    out = subprocess.run(
        [*gateway_command(), "serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    return "--history-store" in out


# ---------------------------------------------------------------------- targets


class Target(Protocol):
    """A DMQ node under test, listening on HOST:port (UDP)."""

    port: int

    def cpu_seconds(self) -> float: ...

    def stop(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def after_run(self) -> dict[str, Any]: ...


class KamailioTarget:
    def __init__(self, workdir: Path, children: int) -> None:
        self.port = free_port()
        self.node = KamailioNode(workdir, self.port, children=children)

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.node.pid)

    def stop(self) -> None:
        self.node.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "version": kamailio_version(),
            "udp_children": self.node.children,
            "dmq_workers": self.node.dmq_workers or 2,
            "config": "examples/kamailio/kamailio.cfg (dmq + htable, ht=>size=8, -m 64 -M 8)",
        }

    def after_run(self) -> dict[str, Any]:
        stats = self.node.kamcmd("htable.stats")
        match = re.search(r"^\s*all:\s*(\d+)", stats, re.MULTILINE)
        return {
            "stored_items": int(match.group(1)) if match else None,
            "k1": self.node.htable_get("ht", "k1"),
        }


#: Options of ``dmq-gateway serve`` besides its addresses and state directory.
OURS_OPTIONS = "--peer htable"


class OursTarget:
    """Our node (:func:`bench.common.bench_gateway`), started in a session of its own."""

    def __init__(self, workdir: Path, options: str = OURS_OPTIONS, *, pure: bool = False) -> None:
        self.gateway = bench_gateway("ours", workdir, extra=shlex.split(options))
        if pure:
            # The Python sources even where the compiled core is built beside them.
            self.gateway.command_prefix = ("env", "DMQ_GATEWAY_CORE=pure")
        self.pure = pure
        self.gateway.start()
        self.port = self.gateway.sip_port

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.gateway.pid)

    def stop(self) -> None:
        self.gateway.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "command": " ".join(self.gateway.args[1:]),
            "python": sys.version.split()[0],
            "core": gateway_core(self.pure),
        }

    def after_run(self) -> dict[str, Any]:
        return {}


def _log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_answering(
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until HOST:port answers a KDMQ request (any SIP response will do).

    The probe goes to the peer id ``bench-probe``, which no node serves, so it changes
    no state (Kamailio answers 404).
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(0.2)
        local = sock.getsockname()[1]
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"target exited with code {proc.returncode} before answering on "
                    f"{HOST}:{port}; log tail:\n{_log_tail(log_path) if log_path else ''}"
                )
            sock.sendto(
                _kdmq("bench-probe", port, local, f"{uuid.uuid4().hex}@{HOST}"), (HOST, port)
            )
            try:
                data = sock.recv(65535)
                if data.startswith(b"SIP/2.0 "):
                    return
            except (TimeoutError, ConnectionRefusedError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"nothing answered on udp {HOST}:{port} within {timeout:g} s; log tail:\n"
                    f"{_log_tail(log_path) if log_path else ''}"
                )
            time.sleep(0.1)


def _kdmq(peer: str, port: int, local_port: int, call_id: str, body: str = "") -> bytes:
    """A KDMQ request to ``sip:PEER@HOST:port`` as a Kamailio node would send it."""
    payload = body.encode()
    lines = [
        f"KDMQ sip:{peer}@{HOST}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:16]}",
        f"From: <sip:{peer}@{HOST}:{local_port}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <sip:{peer}@{HOST}:{port}>",
        f"Call-ID: {call_id}",
        "CSeq: 10 KDMQ",
        "Max-Forwards: 1",
    ]
    if payload:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class LatencyProbe:
    """Times single htable sets (one outstanding at a time) against HOST:port."""

    def __init__(self, port: int, interval_s: float = 0.002, timeout_s: float = 1.0) -> None:
        self.port = port
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.samples: list[tuple[float, float]] = []  # (monotonic send time, latency ms)
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            local = sock.getsockname()[1]
            seq = 0
            while not self._stop.is_set():
                seq += 1
                call_id = f"{uuid.uuid4().hex}@{HOST}"
                msg = _kdmq(
                    "htable",
                    self.port,
                    local,
                    call_id,
                    json.dumps(
                        {
                            "action": 2,
                            "htname": "ht",
                            "cname": f"probe{seq}",
                            "type": 2,
                            "strval": "v",
                            "mode": 1,
                        },
                        separators=(",", ":"),
                    ),
                )
                sent_at = time.monotonic()
                t0 = time.perf_counter_ns()
                sock.sendto(msg, (HOST, self.port))
                deadline = t0 + int(self.timeout_s * 1e9)
                needle = f"Call-ID: {call_id}".encode()
                while True:
                    left = (deadline - time.perf_counter_ns()) / 1e9
                    if left <= 0:
                        self.lost += 1
                        break
                    sock.settimeout(left)
                    try:
                        data = sock.recv(65535)
                    except (TimeoutError, ConnectionRefusedError):
                        continue
                    if needle in data and data.startswith(b"SIP/2.0 200"):
                        self.samples.append((sent_at, (time.perf_counter_ns() - t0) / 1e6))
                        break
                self._stop.wait(self.interval_s)

    def latencies_between(self, start: float, end: float) -> list[float]:
        return sorted(ms for at, ms in self.samples if start <= at and at + ms / 1000 <= end)


# ------------------------------------------------------------------------- sipp


@dataclass
class RunResult:
    requests: int
    inflight: int
    completed: int
    failed: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    sipp_clock_step_ms: float | None
    probe_p50_ms: float | None
    probe_p99_ms: float | None
    probe_samples: int
    probe_lost: int
    retransmissions: int | None
    target_udp_drops: int | None
    sipp_exit_code: int
    sipp_wall_s: float
    window_s: float
    rtt_samples: int
    sipp_cpu_s: float
    target_cpu_s: float
    checks: dict[str, Any] = field(default_factory=dict)


def rtt_freq_for(requests: int, cap: int = 1000) -> int:
    """Largest divisor of ``requests`` not above ``cap``: sipp only writes full batches."""
    for freq in range(min(cap, requests), 0, -1):
        if requests % freq == 0:
            return freq
    return 1


def parse_stat_csv(path: Path) -> dict[str, str]:
    """Last line of sipp's ``-trace_stat`` file, keyed by the header's column names."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(lines) < 2:
        return {}
    names = lines[0].split(";")
    values = lines[-1].split(";")
    return dict(zip(names, values, strict=False))


def parse_rtt_csv(path: Path) -> tuple[list[float], float, float | None]:
    """From ``-trace_rtt``: response times (ms), first send to last 200 (s), clock step (ms)."""
    rtts: list[float] = []
    stamps: set[float] = set()
    first_send = math.inf
    last_recv = -math.inf
    for line in path.read_text(errors="replace").splitlines()[1:]:
        cols = line.split(";")
        if len(cols) < 2:
            continue
        try:
            done, rtt = float(cols[0]), float(cols[1])
        except ValueError:
            continue
        rtts.append(rtt)
        stamps.add(done)
        first_send = min(first_send, done - rtt)
        last_recv = max(last_recv, done)
    window = (last_recv - first_send) / 1000.0 if rtts else 0.0
    ordered = sorted(stamps)
    steps = [b - a for a, b in itertools.pairwise(ordered) if b - a > 1e-6]
    step = round(min(steps), 3) if steps else None
    return rtts, window, step


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def run_sipp(
    target: Target,
    requests: int,
    inflight: int,
    workdir: Path,
    probe: bool = True,
    mode: str = "users",
) -> RunResult:
    sipp = shutil.which("sipp")
    if sipp is None:
        raise RuntimeError("sipp is not installed (apt-get install sip-tester)")
    workdir.mkdir(parents=True, exist_ok=True)
    stat_file = workdir / "stat.csv"
    timeout_s = max(30, requests // 1000)
    cmd = [
        sipp,
        "-sf",
        str(SCENARIO),
        "-i",
        HOST,
        "-p",
        str(free_port()),
        "-t",
        "u1",
        "-m",
        str(requests),
        "-l",
        str(inflight),
        *(
            # closed loop: a new call the moment one completes (see the module docstring)
            ["-users", str(inflight)]
            if mode == "users"
            else ["-r", "1000000", "-rp", "1000"]  # rate far above any target, capped by -l
        ),
        "-buff_size",
        str(SIPP_BUFFER),
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(stat_file),
        "-fd",
        "1",
        "-trace_rtt",
        "-rtt_freq",
        str(rtt_freq_for(requests)),
        "-timeout",
        f"{timeout_s}s",
        "-timeout_error",
        f"{HOST}:{target.port}",
    ]
    cpu0 = target.cpu_seconds()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    prober = LatencyProbe(target.port) if probe else None
    started = time.monotonic()
    if prober is not None:
        prober.start()
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout_s + 30, check=False
        )
    finally:
        finished = time.monotonic()
        if prober is not None:
            prober.stop()
    wall = finished - started
    # probes from sipp's start-up (first 50 ms) or after it exited did not see the load
    probed = prober.latencies_between(started + 0.05, finished) if prober else []
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = target.cpu_seconds()
    (workdir / "sipp.out").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)

    stats = parse_stat_csv(stat_file) if stat_file.exists() else {}
    rtt_files = sorted(workdir.glob("*_rtt.csv"))
    rtts, window, step = parse_rtt_csv(rtt_files[-1]) if rtt_files else ([], 0.0, None)
    rtts.sort()
    completed = _int(stats.get("SuccessfulCall(C)"))
    failed = _int(stats.get("FailedCall(C)"))
    if completed is None or failed is None:
        raise RuntimeError(
            f"sipp exited with {proc.returncode} and wrote no statistics; stderr:\n"
            f"{proc.stderr[-2000:]}\nstdout tail:\n{proc.stdout[-2000:]}"
        )
    if window <= 0 or len(rtts) != completed:
        window = wall  # fall back to wall time (includes sipp start-up) if the trace is short
    return RunResult(
        requests=requests,
        inflight=inflight,
        completed=completed,
        failed=failed,
        requests_per_s=round(completed / window, 1) if window > 0 else 0.0,
        p50_ms=percentile(rtts, 50),
        p99_ms=percentile(rtts, 99),
        mean_ms=round(statistics.fmean(rtts), 3) if rtts else None,
        max_ms=rtts[-1] if rtts else None,
        sipp_clock_step_ms=step,
        probe_p50_ms=_round(percentile(probed, 50)),
        probe_p99_ms=_round(percentile(probed, 99)),
        probe_samples=len(probed),
        probe_lost=prober.lost if prober else 0,
        retransmissions=_int(stats.get("Retransmissions(C)")),
        target_udp_drops=udp_drops(target.port),
        sipp_exit_code=proc.returncode,
        sipp_wall_s=round(wall, 3),
        window_s=round(window, 3),
        rtt_samples=len(rtts),
        sipp_cpu_s=round(
            (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime), 3
        ),
        target_cpu_s=round(cpu1 - cpu0, 3),
    )


# ------------------------------------------------------------------------ driver


def start_target(name: str, workdir: Path, args: argparse.Namespace) -> Target:
    if name == "kamailio":
        target: Target = KamailioTarget(workdir, children=args.kamailio_children)
        try:
            wait_answering(target.port, 15.0)
        except BaseException:
            target.stop()
            raise
        return target
    if name in HISTORY_STORES:
        if not args.history_store_supported:
            if name == "ours-memory":
                raise RuntimeError("this dmq-gateway has no --history-store option")
            return OursTarget(workdir, args.ours_options)
        # A --peer peer keeps its history in memory whatever the store: both targets
        # register htable through the API instead, with the same settings.
        options = args.ours_options.replace("--peer htable", "").strip()
        pure = name == "ours-pure"
        if name in CORES and gateway_core(pure) != CORES[name]:
            raise RuntimeError(f"{name} needs the {CORES[name]} core: build it with make compiled")
        target = OursTarget(workdir, f"{options} --history-store {HISTORY_STORES[name]}", pure=pure)
        if name in MIRROR_ALONE:
            if "--kamailio-mirrors" in options:
                target.stop()
                raise RuntimeError(f"{name} runs the default mirrors: drop --kamailio-mirrors")
            return target
        try:
            register_peer(target.gateway, "htable", history=1000)
        except BaseException:
            target.stop()
            raise
        return target
    raise ValueError(f"unknown target {name!r}")


def bench_level(
    name: str,
    inflight: int,
    mode: str,
    args: argparse.Namespace,
    scratch: Path,
    reps: Sequence[int] | None = None,
    runs: list[RunResult] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``reps`` (every repeat by default) of one target at one level, adding to
    ``runs``; summarise all of ``runs`` (the median run by requests per second)."""
    runs = [] if runs is None else runs
    described: dict[str, Any] = {}
    for rep in range(args.repeats) if reps is None else reps:
        workdir = scratch / f"{mode}-{name}-{inflight}-{rep}"
        target = start_target(name, workdir / "target", args)
        try:
            if not described:
                described = target.describe()
            result = run_sipp(
                target,
                args.requests,
                inflight,
                workdir / "sipp",
                probe=not args.no_probe,
                mode=mode,
            )
            result.checks = target.after_run()
        finally:
            target.stop()
        runs.append(result)
        print(
            f"  {mode:5s} {name:8s} inflight={inflight:<4d} run {rep + 1}/{args.repeats}: "
            f"{result.completed} ok, {result.failed} failed, {result.requests_per_s:,.0f} req/s, "
            f"p50/p99 {result.p50_ms}/{result.p99_ms} ms (sipp), "
            f"{result.probe_p50_ms}/{result.probe_p99_ms} ms (probe), "
            f"retrans {result.retransmissions}, target cpu {result.target_cpu_s}s, "
            f"sipp cpu {result.sipp_cpu_s}s",
            flush=True,
        )
    ranked = sorted(runs, key=lambda r: r.requests_per_s)
    median = ranked[(len(ranked) - 1) // 2]
    summary: dict[str, Any] = {
        key: getattr(median, key)
        for key in (
            "requests",
            "inflight",
            "completed",
            "failed",
            "requests_per_s",
            "p50_ms",
            "p99_ms",
            "probe_p50_ms",
            "probe_p99_ms",
        )
    }
    summary["failed_all_runs"] = sum(r.failed for r in runs)
    # CPU per request is what durability costs with the machine's load taken out: a
    # request rate on a shared, loaded machine swings with the other processes.
    cpu = sorted(1e6 * r.target_cpu_s / r.completed for r in runs if r.completed and r.target_cpu_s)
    summary["target_cpu_us_per_request"] = round(cpu[(len(cpu) - 1) // 2], 1) if cpu else None
    summary["requests_per_s_all_runs"] = [r.requests_per_s for r in runs]
    summary["runs"] = [asdict(r) for r in runs]
    return summary, described


def machine_info() -> dict[str, Any]:
    """The common description, plus the versions of Kamailio and sipp."""
    info = common_machine_info()
    info["kamailio"] = kamailio_version() if kamailio_available() else None
    sipp = shutil.which("sipp")
    if sipp:
        out = subprocess.run([sipp, "-v"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"SIPp v?(\S+)", out)
        info["sipp"] = match.group(1).rstrip(".,") if match else out.strip()
    else:
        info["sipp"] = None
    return info


MODE_TITLES = {
    "users": "closed loop (sipp -users N): the server's capacity",
    "rate": "rate mode (sipp -r 1000000 -l N): bounded by sipp's 4 ms clock",
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels: list[int] = report["inflight_levels"]
    modes = list(report["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 5.8), dpi=110)
    if len(modes) == 1:
        axes = [axes]
    colours = {
        "kamailio": "#4c72b0",
        "ours": "#dd8452",
        "ours-memory": "#55a868",
        "ours-pure": "#8172b3",
        "ours-compiled": "#c44e52",
        "ours-mirror": "#937860",
    }
    for ax, mode in zip(axes, modes, strict=True):
        data = report["modes"][mode]
        targets = [t for t in data["targets"] if data["targets"][t]["levels"]]
        width = 0.8 / max(1, len(targets))
        top = 0.0
        for i, name in enumerate(targets):
            per_level = data["targets"][name]["levels"]
            values = [per_level.get(str(lv), {}).get("requests_per_s", 0.0) for lv in levels]
            top = max([top, *values])
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(levels))]
            bars = ax.bar(
                xs, values, width, label=data["targets"][name]["label"], color=colours.get(name)
            )
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=2, fontsize=8)
        for j, lv in enumerate(levels):
            ratio = data["ratio_ours_over_kamailio"].get(str(lv))
            durable = data.get("ratio_durable_over_memory", {}).get(str(lv))
            notes = [f"ours/Kamailio = {ratio:.2f}x"] if ratio is not None else []
            notes += [f"durable/in-memory = {durable:.2f}x"] if durable is not None else []
            by_cpu = data.get("ratio_durable_over_memory_by_cpu", {}).get(str(lv))
            notes += [f"(by CPU per request: {by_cpu:.2f}x)"] if by_cpu is not None else []
            for core in CORES:
                value = data.get(f"ratio_{core.replace('-', '_')}_over_kamailio", {}).get(str(lv))
                notes += [f"{core}/Kamailio = {value:.2f}x"] if value is not None else []
            if notes:
                ax.annotate(
                    "\n".join(notes), (j, top * 1.08), ha="center", fontsize=9, fontweight="bold"
                )
        ax.set_xticks(range(len(levels)), [f"{lv} in flight" for lv in levels])
        ax.set_ylabel("completed KDMQ htable sets per second")
        ax.set_ylim(0, top * 1.35 if top else 1)
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=10)
        if targets:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(
        f"KDMQ htable set throughput, UDP loopback, {report['requests']:,} requests per run, "
        f"median of {report['repeats']} run(s)\n"
        f"{m.get('nproc')} CPUs, {m.get('kamailio') or 'Kamailio ?'}, sipp {m.get('sipp') or '?'}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kdmq_throughput",
        description="KDMQ htable-set throughput of Kamailio and of our node, driven by sipp.",
    )
    parser.add_argument("--requests", type=int, default=40000, help="requests per run")
    parser.add_argument(
        "--inflight", default="64,256", help="comma-separated in-flight limits (sipp -l)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--targets",
        default="kamailio,ours,ours-memory",
        help="comma-separated: kamailio, ours (durable history: --history-store sqlite), "
        "ours-memory (--history-store memory), ours-pure and ours-compiled (in-memory "
        "history on the pure-Python core and on the compiled one: make compiled first), "
        "ours-mirror (compiled, no raw peer: the htable mirror alone answers, like "
        "Kamailio's htable)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per target and level; the median is reported"
    )
    parser.add_argument(
        "--kamailio-children", type=int, default=8, help="Kamailio UDP workers (its default: 8)"
    )
    parser.add_argument(
        "--sipp-mode",
        default="users,rate",
        help="comma-separated: how sipp keeps INFLIGHT requests outstanding, users "
        "(closed loop) and/or rate (see the module docstring)",
    )
    parser.add_argument(
        "--ours-options",
        default=OURS_OPTIONS,
        help="options of our node's dmq-gateway serve, besides its addresses and state "
        "directory (default: %(default)s)",
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="no precise latency probe next to sipp"
    )
    parser.add_argument("--keep-raw", action="store_true", help="keep sipp and target files")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="run the targets' repeats in turn (1, 2, 1, 2...) rather than one target's "
        "repeats in a row, so that a loaded machine's swings fall on every target alike",
    )
    parser.add_argument(
        "--name",
        default="kdmq-throughput",
        help="results file name, without .json/.png (e.g. kdmq-durable for a run of ours "
        "and ours-memory alone, leaving the Kamailio comparison's file as it is)",
    )
    args = parser.parse_args(argv)
    args.inflight_levels = [int(x) for x in str(args.inflight).split(",") if x.strip()]
    args.target_names = [t.strip() for t in str(args.targets).split(",") if t.strip()]
    args.modes = [m.strip() for m in str(args.sipp_mode).split(",") if m.strip()]
    args.history_store_supported = history_store_supported()
    for mode in args.modes:
        if mode not in ("users", "rate"):
            parser.error(f"unknown --sipp-mode {mode!r} (choose from users, rate)")
    for name in args.target_names:
        if name not in TARGET_LABELS:
            parser.error(f"unknown target {name!r} (choose from {', '.join(TARGET_LABELS)})")
    if args.requests < 1 or args.repeats < 1 or not args.inflight_levels:
        parser.error("--requests, --repeats and --inflight must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not SCENARIO.exists():
        print(f"missing scenario {SCENARIO}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kdmq-bench-"))
    report: dict[str, Any] = {
        "benchmark": "kdmq-htable-set-throughput",
        "requests": args.requests,
        "inflight_levels": args.inflight_levels,
        "repeats": args.repeats,
        "method": {
            "load": "sipp bench/scenarios/kdmq_htable_set.xml, UDP, one KDMQ per call, "
            "-buff_size 4194304; mode users: -users INFLIGHT -l INFLIGHT (closed loop: the "
            "server's capacity); mode rate: -r 1000000 -l INFLIGHT (bounded by sipp's coarse "
            "clock, at most INFLIGHT calls per 4 ms step)",
            "requests_per_s": "completed / (first request sent .. last 200 received), "
            "from sipp -trace_rtt",
            "latency": "p50_ms/p99_ms: nearest-rank percentiles of every call's response "
            "time from sipp -trace_rtt, quantised to sipp's clock step (sipp_clock_step_ms, "
            "4 ms here; 0 = within one step); probe_p50_ms/probe_p99_ms: one extra htable "
            "set at a time (~1 % of the load) timed with perf_counter_ns while sipp runs (sampled, "
            "not quantised)",
            "summary": "median run by requests_per_s; all runs under 'runs'",
        },
        "machine": machine_info(),
        "history_store_option": args.history_store_supported,
        "interleaved": args.interleave,
        "modes": {},
    }
    errors = 0
    try:
        for mode in args.modes:
            data: dict[str, Any] = {
                "targets": {},
                "ratio_ours_over_kamailio": {},
                "ratio_durable_over_memory": {},
            }
            report["modes"][mode] = data
            order = [
                (name, inflight, None)
                for name in args.target_names
                for inflight in args.inflight_levels
            ]
            if args.interleave:
                order = [
                    (name, inflight, rep)
                    for inflight in args.inflight_levels
                    for rep in range(args.repeats)
                    for name in args.target_names
                ]
            done: dict[tuple[str, int], list[RunResult]] = {}
            for name, inflight, one in order:
                entry = data["targets"].setdefault(
                    name, {"label": TARGET_LABELS[name], "levels": {}}
                )
                if str(inflight) in entry.get("errors", {}):
                    continue
                try:
                    summary, described = bench_level(
                        name,
                        inflight,
                        mode,
                        args,
                        scratch,
                        reps=None if one is None else [one],
                        runs=done.setdefault((name, inflight), []),
                    )
                except Exception as exc:
                    errors += 1
                    entry.setdefault("errors", {})[str(inflight)] = str(exc)
                    print(f"  {mode} {name} inflight={inflight}: FAILED: {exc}", file=sys.stderr)
                    continue
                entry["levels"][str(inflight)] = summary
                entry.setdefault("target", described)
            kam = data["targets"].get("kamailio", {}).get("levels", {})
            ours = data["targets"].get("ours", {}).get("levels", {})
            memory = data["targets"].get("ours-memory", {}).get("levels", {})
            for inflight in args.inflight_levels:
                k = kam.get(str(inflight), {}).get("requests_per_s")
                o = ours.get(str(inflight), {}).get("requests_per_s")
                data["ratio_ours_over_kamailio"][str(inflight)] = (
                    round(o / k, 3) if k and o is not None else None
                )
                mem = memory.get(str(inflight), {}).get("requests_per_s")
                data["ratio_durable_over_memory"][str(inflight)] = (
                    round(o / mem, 3) if mem and o is not None else None
                )
                # By CPU per request: memory's cost over durable's (1.0: no cost).
                o_cpu = ours.get(str(inflight), {}).get("target_cpu_us_per_request")
                mem_cpu = memory.get(str(inflight), {}).get("target_cpu_us_per_request")
                data.setdefault("ratio_durable_over_memory_by_cpu", {})[str(inflight)] = (
                    round(mem_cpu / o_cpu, 3) if mem_cpu and o_cpu else None
                )
                for core in CORES:
                    levels = data["targets"].get(core, {}).get("levels", {})
                    c = levels.get(str(inflight), {}).get("requests_per_s")
                    data.setdefault(f"ratio_{core.replace('-', '_')}_over_kamailio", {})[
                        str(inflight)
                    ] = round(c / k, 3) if k and c is not None else None
                pure = data["targets"].get("ours-pure", {}).get("levels", {})
                comp = data["targets"].get("ours-compiled", {}).get("levels", {})
                p = pure.get(str(inflight), {}).get("requests_per_s")
                c = comp.get(str(inflight), {}).get("requests_per_s")
                data.setdefault("ratio_compiled_over_pure", {})[str(inflight)] = (
                    round(c / p, 3) if p and c is not None else None
                )
        report["loadavg_at_end"] = list(os.getloadavg())
        json_path = args.out / f"{args.name}.json"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        png_path = args.out / f"{args.name}.png"
        plot(report, png_path)
        print(f"wrote {json_path} and {png_path}")
    finally:
        if args.keep_raw:
            print(f"raw files kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
