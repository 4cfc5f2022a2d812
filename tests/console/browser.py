"""Headless Chromium under Selenium, for the console's tests and its screenshots.

Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromedriver``) are used as
installed: the driver's path is handed to Selenium, so Selenium Manager is never asked
to find or download a browser or a driver (it could not: nothing is downloaded on
this machine or in CI), and ``SE_OFFLINE`` tells it so in case anything still calls it.

The browser logs every DevTools network event (``goog:loggingPrefs``), which is how a
test sees each request and WebSocket the page made, whatever the page's own code says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
)

#: A laptop screen.
WINDOW = (1366, 900)


def missing() -> str | None:
    """Why the browser tests can't run here, or None when they can."""
    if CHROMIUM is None:
        return "headless Chromium is not installed (apt-get install chromium)"
    if CHROMEDRIVER is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@contextmanager
def chromium(width: int = WINDOW[0], height: int = WINDOW[1]) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with a profile of its own, quit on exit."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        # What the browser loaded of its own at start is not the page's: dropped.
        driver.get("about:blank")
        driver.get_log("performance")
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


#: Schemes of requests that go over the network; ``chrome:`` (the browser's own start
#: page, before the test navigates) and ``data:`` never leave the browser.
NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:")


def network_urls(driver: Any) -> list[str]:
    """Every network URL the browser asked for since the last call: requests and
    WebSockets, from the DevTools network events (cached or refused ones included)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method = message.get("method")
        params = message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif method == "Network.webSocketCreated":
            urls.append(params["url"])
    return [url for url in urls if url.startswith(NETWORK_SCHEMES)]


def console_errors(driver: Any) -> list[str]:
    """What the page logged at level SEVERE (uncaught errors, refused loads)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
