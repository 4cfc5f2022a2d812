"""Small probes run inside a lab's hosts: count UDP datagrams, try a TCP connection.

Each is a ``python -c`` program started with ``ip netns exec`` (or in the root
namespace, where the test process is), so what they measure is what the kernel did.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from harness.netns import Host

RECEIVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
seen = set()
sock.settimeout(float(sys.argv[3]))
try:
    while True:
        data = sock.recv(2048)
        if data == b"end":
            sock.settimeout(0.5)
            continue
        seen.add(data)
except socket.timeout:
    pass
print(len(seen), flush=True)
"""

SENDER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def send(data):
    try:
        sock.sendto(data, (host, port))
    except PermissionError:  # dropped on the way out by the lab's rules
        pass
for n in range(count):
    send(b"%d" % n)
    if n % 50 == 49:
        time.sleep(0.005)
for _ in range(20):
    send(b"end")
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(1)
"""

LISTENER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    srv.accept()[0].close()
"""


def _in(host: Host | None, args: Sequence[str]) -> list[str]:
    return list(args) if host is None else host.command(args)


def udp_received(src: Host | None, dst: Host, count: int, port: int = 40000) -> int:
    """How many of ``count`` distinct datagrams from ``src`` (None: the root namespace)
    reach ``dst``, sent a few at a time so that no socket buffer overflows."""
    receiver = subprocess.Popen(
        _in(dst, [sys.executable, "-c", RECEIVER, dst.address, str(port), "2"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(
            _in(src, [sys.executable, "-c", SENDER, dst.address, str(port), str(count)]),
            check=True,
            timeout=60,
        )
        out, _ = receiver.communicate(timeout=30)
        return int(out.strip())
    finally:
        receiver.kill()
        receiver.wait()


class Listener:
    """A TCP listener on ``host`` that accepts and closes every connection."""

    def __init__(self, host: Host, port: int = 40001) -> None:
        self.host, self.port = host, port
        self.proc = subprocess.Popen(
            host.command([sys.executable, "-c", LISTENER, host.address, str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def reachable_from(self, src: Host | None, timeout: float = 1.0) -> bool:
        res = subprocess.run(
            _in(
                src,
                [sys.executable, "-c", CONNECT, self.host.address, str(self.port), str(timeout)],
            ),
            capture_output=True,
            timeout=30,
            check=False,
        )
        return res.returncode == 0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
