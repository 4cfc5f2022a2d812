"""The console's page and files as HTTP serves them, from a real gateway with a token.

The page must load without the token (it asks for it), while every route of the API
still refuses a request without one; the page and its files carry a policy that keeps
the browser to the gateway's own origin, and nothing but the console's own files is
served from its prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.routes import console
from harness.gateway import Gateway

TOKEN = "console-http-token"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway("console-http", tmp_path_factory.mktemp("console-http"), tokens=[TOKEN])
    served.start()
    try:
        yield served
    finally:
        served.stop()


def get(gateway: Gateway, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", timeout=10, trust_env=False, **kwargs)  # type: ignore[arg-type]


def test_the_page_loads_without_the_token(gateway: Gateway) -> None:
    page = get(gateway, "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # The page names every file it loads, each from the console's own prefix, relative
    # to the page (so that it works under a reverse proxy's sub-path too).
    files = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert len(files) == len(console.FILES), files
    for name in files:
        assert name.startswith(console.ASSETS[1:] + "/"), name
        asset = get(gateway, "/" + name)
        assert asset.status_code == 200, name
        assert asset.content, name


def test_every_file_carries_the_same_origin_policy(gateway: Gateway) -> None:
    for path in ("/", *(f"{console.ASSETS}/{name}" for name in console.FILES)):
        response = get(gateway, path)
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "connect-src 'self'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"


def test_files_have_their_types(gateway: Gateway) -> None:
    assert get(gateway, "/console/console.js").headers["content-type"].startswith("text/javascript")
    assert get(gateway, "/console/console.css").headers["content-type"].startswith("text/css")


def test_only_the_console_files_are_served(gateway: Gateway) -> None:
    for path in ("/console/index.html", "/console/..%2Fapp.py", "/console/nothing.js"):
        response = get(gateway, path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
        assert "import" not in response.text


def test_the_api_still_needs_the_token(gateway: Gateway) -> None:
    """Opening / and /console/ opened nothing else: every other path is still 401."""
    for path in ("/v1/nodes", "/v1/peers", "/metrics", "/docs", "/openapi.json", "/console"):
        assert get(gateway, path).status_code == 401, path
    assert get(gateway, "/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"}).is_success


def test_the_page_is_not_in_the_api_document(gateway: Gateway) -> None:
    document = get(gateway, "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert "/" not in document["paths"]
    assert not [p for p in document["paths"] if p.startswith(console.ASSETS)]


def test_the_files_ship_with_the_package() -> None:
    """Every file the route serves is where the installed package keeps it, and the
    package data of pyproject.toml takes each of them into a wheel."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for name in ("index.html", *console.FILES):
        assert (console.CONSOLE_DIR / name).is_file(), name
        suffix = name.rsplit(".", 1)[1]
        assert f'"console/*.{suffix}"' in pyproject, name
