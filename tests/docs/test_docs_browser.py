"""``/docs`` and ``/redoc`` render in a real browser with no network beyond the gateway.

Headless Chromium (Debian's ``chromium``) loads each page from a real gateway and the
rendered DOM must hold every operation: Swagger UI and ReDoc are scripts, so a page
whose assets failed to load stays an empty shell. This machine reaches no CDN, so a
page that still pointed at one would fail here exactly as it would on a closed network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.gateway import Gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "headless Chromium is not installed (apt-get install chromium)"

#: Every route of the API, as each page shows it once rendered.
SWAGGER_PATHS = ("/v1/health", "/v1/nodes", "/v1/peers/{peer_id}/broadcast", "/metrics")
REDOC_TITLES = ("Get Health", "List Nodes", "Broadcast", "Get Metrics")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    served = Gateway("docs", tmp_path_factory.mktemp("docs")).start()
    try:
        yield served
    finally:
        served.stop()


def rendered(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_swagger_ui_renders_every_operation(gateway: Gateway, tmp_path: Path) -> None:
    dom = rendered(f"{gateway.url}/docs", tmp_path)
    for path in SWAGGER_PATHS:
        assert f'data-path="{path}"' in dom, f"{path} is not on the rendered /docs page"


def test_redoc_renders_every_operation(gateway: Gateway, tmp_path: Path) -> None:
    dom = rendered(f"{gateway.url}/redoc", tmp_path)
    for title in REDOC_TITLES:
        assert title in dom, f"{title!r} is not on the rendered /redoc page"
