"""The web console in Firefox too: the page reads the API, tails a peer over the
WebSocket and reports no script error in headless Firefox (Debian's ``firefox-esr``,
driven over WebDriver BiDi). The full set of behaviours is in
``test_console_browser.py`` (Chromium); this checks that nothing in the page is
Chromium-only.

Without Firefox the test is skipped with the reason, except with ``CI=true``
(``.ci/run`` installs ``firefox-esr``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from harness.gateway import Gateway
from tests.api.gateway_procs import running
from tests.console import firefox

T = TypeVar("T")
MISSING = "Firefox is not installed (apt-get install firefox-esr)"

pytestmark = pytest.mark.timeout(180)


def eventually(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def test_the_console_works_in_firefox(tmp_path: Path) -> None:
    if firefox.FIREFOX is None:
        if os.environ.get("CI") == "true":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    a = Gateway("a", tmp_path)
    b = Gateway("b", tmp_path, notify=[a])
    with running([a, b]), firefox.firefox() as browser:
        a.start()
        b.start()
        for gateway in (a, b):
            httpx.put(
                f"{gateway.url}/v1/peers/fx", json={}, timeout=5, trust_env=False
            ).raise_for_status()
        browser.navigate(f"{a.url}/")
        eventually(
            lambda: browser.evaluate(
                f"document.querySelector('#nodes-body tr[data-node=\"{b.uri}\"]') !== null"
            ),
            20,
            "B on the page",
        )
        assert browser.evaluate("document.querySelectorAll('#health-cards .card').length") >= 10
        eventually(
            lambda: browser.evaluate("document.getElementById('tail-peer').value") == "fx",
            10,
            "the peer in the tail's list",
        )
        browser.evaluate("document.getElementById('tail-start').click()")
        eventually(
            lambda: (
                "listening to fx"
                in browser.evaluate("document.getElementById('tail-status').textContent")
            ),
            10,
            "the tail subscribed",
        )
        marker = uuid.uuid4().hex
        httpx.post(
            f"{b.url}/v1/peers/fx/broadcast?wait=true",
            content=f'{{"marker": "{marker}"}}',
            headers={"content-type": "application/json"},
            timeout=10,
            trust_env=False,
        ).raise_for_status()
        shown = eventually(
            lambda: browser.evaluate("document.getElementById('tail-list').textContent"),
            10,
            "the message in the tail",
        )
        assert marker in shown
        assert f'"marker": "{marker}"' in shown  # pretty-printed
        assert browser.evaluate("document.querySelectorAll('#peers-body svg').length") == 1
        assert not browser.errors(), browser.errors()
