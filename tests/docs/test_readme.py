"""The README's quick start, run exactly as written.

The block after the ``quick start`` marker in README.md is extracted and run with bash
in the repository, so the README can never drift from the code: if a command, an
option or an output it shows changes, this test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- quick start: tests/docs/test_readme.py runs this block as written -->"


def quick_start_block() -> str:
    text = (ROOT / "README.md").read_text()
    _, found, rest = text.partition(MARKER)
    assert found, f"README.md has no {MARKER!r} marker"
    match = re.match(r"\s*```sh\n(.*?)\n```", rest, re.DOTALL)
    assert match, "the quick-start marker is not followed by a ```sh block"
    return match.group(1)


def demo_ports_free() -> bool:
    import socket

    for port in (5070, 5072, 5074, 8070, 8071, 8072):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


def test_the_quick_start_shows_a_message_flowing() -> None:
    if not demo_ports_free():
        pytest.fail("a demo gateway is already running on the demo's ports: make demo-stop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMQ_")}
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", quick_start_block()],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["make", "-s", "demo-stop"], cwd=ROOT, env=env, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # The subscriber on B printed the broadcast made on A...
    assert re.search(r'^#1 from sip:127\.0\.0\.1:5070 .*\{"hello": "bus"\}$', done.stdout, re.M), (
        output
    )
    # ...and the waited broadcast shows both other nodes answering 200.
    results = re.findall(r"^(sip:127\.0\.0\.1:507[24])\s+200\s+OK", done.stdout, re.M)
    assert sorted(results) == ["sip:127.0.0.1:5072", "sip:127.0.0.1:5074"], output
    assert "to resume: dmq-gateway subscribe demo --since 1 --epoch " in done.stderr, output
