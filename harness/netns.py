"""A lab of network namespaces where real faults happen: datagram loss, TCP segment loss
and partitions, made by the kernel (nftables), not simulated in the code under test.

Each host of a :class:`Lab` is a network namespace with one veth into a bridge in the
root namespace. The hosts have addresses in a private /24 (``.2``, ``.3``, ...); the
bridge has ``.1``, so the test process, in the root namespace, reaches every host's
HTTP and WebSocket API directly. Faults are nftables rules in a table of our own in each
host's namespace, matching only traffic between hosts: anything to or from the bridge's
address (the test's own HTTP and WebSocket traffic) is never dropped.

Typical use::

    with Lab(["a", "b"]) as lab:
        a, b = lab.hosts["a"], lab.hosts["b"]
        gateway = Gateway("a", tmp, **a.gateway_options(), notify=[...])
        lab.set_loss(udp=20)            # 20% of UDP datagrams between hosts dropped
        lab.partition(b)                # b can reach nobody, nobody reaches b
        lab.heal(b)

Programs run in a host with :meth:`Host.command` (``ip netns exec NS ...``). Names are
unique per process and lab (the pid is in them), and everything is torn down when the
``with`` block ends, however it ends, and at interpreter exit for a lab that was never
closed. Making a lab needs root (CAP_NET_ADMIN), ``ip`` and ``nft``: :func:`lab_unavailable`
says why it cannot be made, for a test to skip (or fail in CI) with that reason.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["Host", "Lab", "LabError", "lab_unavailable"]

#: The table each host's namespace gets; the lab touches nothing else.
TABLE = "dmqlab"

#: Third octets tried for a lab's 10.231.N.0/24 network (one not on any interface yet).
_NET_PREFIX = "10.231"

_labs: set[Lab] = set()
_labs_lock = threading.Lock()
_counter = itertools.count(1)


class LabError(RuntimeError):
    """A namespace, link or nftables rule could not be made or removed."""


def _tool(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def _run(args: Sequence[str], stdin: str | None = None) -> str:
    res = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=20, check=False
    )
    if res.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def lab_unavailable() -> str | None:
    """Why a lab cannot be made here (a sentence), or None when it can.

    Tries the real thing: a throwaway namespace with an nftables table in it.
    """
    ip, nft = _tool("ip"), _tool("nft")
    if ip is None:
        return "ip (iproute2) is not installed (apt-get install iproute2)"
    if nft is None:
        return "nft is not installed (apt-get install nftables)"
    probe = f"dmqprobe{os.getpid()}"
    try:
        _run([ip, "netns", "add", probe])
    except LabError as exc:
        return f"cannot create a network namespace (root or CAP_NET_ADMIN needed): {exc}"
    try:
        _run([ip, "netns", "exec", probe, nft, "add", "table", "ip", TABLE])
    except LabError as exc:
        return f"cannot make nftables rules in a network namespace: {exc}"
    finally:
        with contextlib.suppress(LabError):
            _run([ip, "netns", "del", probe])
    return None


@dataclass(eq=False)
class Host:
    """One host of a lab: a network namespace with one address on the lab's /24."""

    name: str
    netns: str
    address: str
    lab: Lab = field(repr=False)

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    @property
    def command_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns)

    def gateway_options(self) -> dict[str, object]:
        """Keyword arguments that put a :class:`harness.gateway.Gateway` on this host.

        Its API listens on the host's address, so it needs a token; the lab's /24 is
        trusted so that the other hosts' KDMQ requests are accepted.
        """
        return {
            "host": self.address,
            "command_prefix": self.command_prefix,
            "tokens": (self.lab.token,),
            "extra": ("--trusted", str(self.lab.network)),
        }

    def nft(self, script: str) -> None:
        """Apply an nftables script in this host's namespace, atomically."""
        _run(self.command(["nft", "-f", "-"]), stdin=script)

    def ruleset(self) -> str:
        return _run(self.command(["nft", "list", "table", "ip", TABLE]))


class Lab:
    """Hosts in network namespaces around one bridge, with faults made by nftables.

    ``hosts`` are names; each becomes a :class:`Host` in :attr:`hosts`, in order,
    with addresses ``.2``, ``.3``, ... The bridge (``.1``) is :attr:`gateway_address`
    seen from the hosts and the test process's own address on the lab network.
    """

    #: Token every gateway of the lab is given (their API listens on a real interface).
    token = "lab-token-not-secret"

    def __init__(self, hosts: Iterable[str]) -> None:
        names = list(hosts)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a lab needs distinct host names, not {names!r}")
        if len(names) > 200:
            raise ValueError("a lab has at most 200 hosts")
        self.seq = next(_counter)
        self.tag = f"{os.getpid():x}{self.seq}"
        self.bridge = f"dmqbr{self.tag}"
        if len(self.bridge) > 15:
            raise LabError(f"interface name {self.bridge} is longer than 15 characters")
        self.network = ipaddress.IPv4Network("0.0.0.0/32")
        self.bridge_address = ""
        self._names = names
        self.hosts: dict[str, Host] = {}
        self._made: list[tuple[str, ...]] = []  # undo commands, last first
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def _pick_network(self) -> ipaddress.IPv4Network:
        used = _run(["ip", "-4", "-o", "addr", "show"])
        start = (os.getpid() + self.seq * 7) % 250
        for third in range(250):
            octet = (start + third) % 250 + 1
            net = ipaddress.IPv4Network(f"{_NET_PREFIX}.{octet}.0/24")
            if f" {_NET_PREFIX}.{octet}." not in used:
                return net
        raise LabError(f"no free /24 under {_NET_PREFIX}.0.0/16")

    def start(self) -> Self:
        with _labs_lock:
            _labs.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.network = self._pick_network()
        addresses = list(self.network.hosts())
        self.bridge_address = str(addresses[0])
        prefix = self.network.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._made.append(("ip", "link", "del", self.bridge))
        _run(["ip", "addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for index, name in enumerate(self._names):
            netns = f"dmq{self.tag}-{name}"
            outside = f"dmqv{self.tag}h{index}"
            if len(outside) > 15:
                raise LabError(f"interface name {outside} is longer than 15 characters")
            _run(["ip", "netns", "add", netns])
            self._made.append(("ip", "netns", "del", netns))
            _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", f"{outside}i"])
            self._made.append(("ip", "link", "del", outside))
            _run(["ip", "link", "set", f"{outside}i", "netns", netns])
            _run(["ip", "link", "set", outside, "master", self.bridge, "up"])
            inside = ["ip", "netns", "exec", netns, "ip"]
            _run([*inside, "link", "set", f"{outside}i", "name", "eth0"])
            address = str(addresses[index + 1])
            _run([*inside, "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
            _run([*inside, "link", "set", "eth0", "up"])
            _run([*inside, "link", "set", "lo", "up"])
            host = Host(name, netns, address, self)
            host.nft(self._base_table())
            self.hosts[name] = host

    def _base_table(self) -> str:
        """Base chains that jump to one chain per kind of fault, each flushed on its own.

        Only traffic on the lab's interface whose other end is another host is looked
        at: loopback and the bridge's address (the test process) pass untouched.
        Loss is applied once per packet, on the way into its receiver: a packet an
        output hook drops is reported to its sender (``EPERM`` from the send), which a
        lossy network never does, and a sender that tries a refused datagram again at
        once (the UDP driver after a ``sendmmsg`` stops) would lose less than asked.
        """
        net, bridge = self.network, self.bridge_address
        return f"""
table ip {TABLE} {{
    chain loss {{ }}
    chain cut_out {{ }}
    chain cut_in {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        oifname "lo" accept
        ip daddr {bridge} accept
        ip daddr != {net} accept
        jump cut_out
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "lo" accept
        ip saddr {bridge} accept
        ip saddr != {net} accept
        jump cut_in
        jump loss
    }}
}}
"""

    def close(self) -> None:
        """Remove every namespace, link and rule of this lab (idempotent, never raises).

        Processes still running in a namespace keep it alive only as long as they run;
        the caller stops them first (the lab does not know their pids).
        """
        if self._closed:
            return
        self._closed = True
        for undo in reversed(self._made):
            with contextlib.suppress(LabError, OSError, subprocess.SubprocessError):
                _run(undo)
        self._made.clear()
        with _labs_lock:
            _labs.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # ------------------------------------------------------------------ faults

    def _targets(self, hosts: Iterable[Host | str] | None) -> list[Host]:
        if hosts is None:
            return list(self.hosts.values())
        return [h if isinstance(h, Host) else self.hosts[h] for h in hosts]

    def set_loss(
        self, udp: int = 0, tcp: int = 0, hosts: Iterable[Host | str] | None = None
    ) -> None:
        """Drop ``udp`` % of UDP datagrams and ``tcp`` % of TCP segments between hosts.

        Each packet is dropped at random (nftables ``numgen random``) on the way into
        ``hosts`` (every host by default), so every link between two of them loses
        about that share in each direction. 0 and 0 remove the loss.
        """
        for pct, what in ((udp, "udp"), (tcp, "tcp")):
            if not 0 <= pct <= 100:
                raise ValueError(f"{what} loss must be a percentage from 0 to 100, not {pct}")
        rules = [f"flush chain ip {TABLE} loss"]
        for pct, proto in ((udp, "udp"), (tcp, "tcp")):
            if pct:
                rules.append(
                    f"add rule ip {TABLE} loss meta l4proto {proto} "
                    f"numgen random mod 100 < {pct} drop"
                )
        for host in self._targets(hosts):
            host.nft("\n".join(rules) + "\n")

    def clear_loss(self) -> None:
        self.set_loss(0, 0)

    def partition(self, host: Host | str, peers: Iterable[Host | str] | None = None) -> None:
        """Cut ``host`` off from ``peers`` (every other host by default), both ways.

        Rules go in ``host``'s namespace: nothing it sends to them leaves, nothing
        they send reaches it; its API (the bridge's address) still answers.
        """
        (target,) = self._targets([host])
        others = [h for h in self._targets(peers) if h is not target]
        if not others:
            raise ValueError(f"nothing to cut {target.name} off from")
        addresses = ", ".join(h.address for h in others)
        target.nft(
            f"add rule ip {TABLE} cut_out ip daddr {{ {addresses} }} drop\n"
            f"add rule ip {TABLE} cut_in ip saddr {{ {addresses} }} drop\n"
        )

    def heal(self, host: Host | str | None = None) -> None:
        """Undo :meth:`partition` for ``host`` (every host by default)."""
        targets = self._targets(None if host is None else [host])
        for target in targets:
            target.nft(f"flush chain ip {TABLE} cut_out\nflush chain ip {TABLE} cut_in\n")


@atexit.register
def _close_leftovers() -> None:  # pragma: no cover - safety net only
    with _labs_lock:
        labs = list(_labs)
    for lab in labs:
        lab.close()
