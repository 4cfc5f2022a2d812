"""``make screenshots``: the console's pictures in the README, taken the way the tests
drive it.

Three real gateways on loopback (A, B, C), a few peers, traffic from B and C for long
enough that the sparklines have a shape, and headless Chromium on A's console at a
laptop's size. Writes ``docs/console-overview.png`` (the top of the page),
``docs/console-peers.png``, ``docs/console-traffic.png`` (a live tail and a broadcast's
answers), ``docs/console-kamailio.png`` (htable keys, an AOR and dialogs, from Kamailio's
own bodies sent by B) and ``docs/console-bus.png`` (C killed, shown disabled as it
happens).

Run from the top of the repository: ``python -m tests.console.screenshots [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.console import bodies, browser

ROOT = Path(__file__).resolve().parents[2]
#: Seconds of traffic before the pictures are taken (the sparklines' width).
WARM_UP = 40.0

PEERS = {
    "htable": "Kamailio htable replication",
    "presence": "presentity updates",
    "demo": "",
}


def _put_peer(gateway: Gateway, peer: str, description: str) -> None:
    httpx.put(
        f"{gateway.url}/v1/peers/{peer}",
        json={"description": description},
        timeout=5,
        trust_env=False,
    ).raise_for_status()


def _kdmq(sender: Gateway, peer: str, body: bytes, node: str | None = None) -> None:
    query = f"?node={node}" if node else ""
    httpx.post(
        f"{sender.url}/v1/peers/{peer}/{'send' if node else 'broadcast'}{query}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=5,
        trust_env=False,
    ).raise_for_status()


def _kamailio_state(b: Gateway, a: Gateway) -> None:
    """What Kamailio nodes would have replicated: a few htable keys, registrations, a call."""
    for key, value in (("blocked:+3312345", "fraud"), ("route:emergency", "sip:112@psap")):
        _kdmq(b, "htable", bodies.htable_set("routing", key, value))
    for user, agent in (("alice", "Linphone/5.2"), ("bob", "Zoiper 5"), ("carol", "Yealink T54W")):
        _kdmq(b, "usrloc", bodies.registration(user, f"sip:{user}@192.0.2.10:5060", agent))
    for body in bodies.dialog_call():
        _kdmq(b, "dialog", body, node=a.uri)


def _traffic(sender: Gateway, peer: str, stop: threading.Event, base: float) -> None:
    """Broadcasts from ``sender`` at a rate that swells and ebbs around ``base``/s."""
    count = 0
    started = time.monotonic()
    with httpx.Client(timeout=5, trust_env=False) as client:
        while not stop.is_set():
            count += 1
            elapsed = time.monotonic() - started
            body = {
                "action": 2,
                "htname": "ht",
                "cname": f"call-{count}",
                "type": 2,
                "strval": f"caller {count}",
                "mode": 1,
            }
            client.post(
                f"{sender.url}/v1/peers/{peer}/broadcast",
                content=json.dumps(body),
                headers={"content-type": "application/json"},
            )
            rate = base * (1.2 + math.sin(elapsed / 6))
            stop.wait(1 / max(rate, 0.5))


def _wait(driver: Any, script: str, what: str, timeout: float = 20) -> Any:
    return wait_until(lambda: driver.execute_script(script), timeout, what, interval=0.2)


def take(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="console-shots-") as work:
        workdir = Path(work)
        a = Gateway("a", workdir, ping_interval=3)
        b = Gateway("b", workdir, notify=[a], ping_interval=3)
        c = Gateway("c", workdir, notify=[a], ping_interval=3)
        gateways = [a, b, c]
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            for gateway in gateways:
                gateway.start()
            for gateway in gateways:
                for peer, description in PEERS.items():
                    _put_peer(gateway, peer, description)
            wait_until(lambda: (a.health() or {}).get("active_nodes") == 2, 20, "the bus to form")
            for sender, peer, base in (
                (b, "htable", 6.0),
                (c, "presence", 2.0),
                (a, "htable", 3.0),
            ):
                thread = threading.Thread(target=_traffic, args=(sender, peer, stop, base))
                thread.start()
                threads.append(thread)
            with browser.chromium(1366, 900) as driver:
                driver.get(f"{a.url}/")
                _wait(
                    driver,
                    "return document.querySelectorAll('#peers-body tr[data-peer]').length === 3",
                    "peers",
                )
                print(f"gathering {WARM_UP:g} s of traffic for the sparklines", file=sys.stderr)
                time.sleep(WARM_UP)
                driver.execute_script(
                    "const s = document.getElementById('tail-peer'); s.value = 'htable';"
                    "document.getElementById('tail-start').click();"
                )
                _wait(
                    driver, "return document.querySelectorAll('#tail-list li').length >= 4", "tail"
                )
                driver.execute_script(
                    "const f = document.getElementById('send-form');"
                    "f.elements.peer.value = 'demo';"
                    'f.elements.body.value = \'{"greeting": "hello from the console"}\';'
                    "f.querySelector('button[type=submit]').click();"
                )
                _wait(
                    driver,
                    "return document.querySelector('#send-result table') !== null",
                    "results",
                )
                driver.execute_script("document.getElementById('tail-pause').click()")
                driver.execute_script("window.scrollTo(0, 0)")
                time.sleep(0.5)
                written.append(_shot(driver, out / "console-overview.png"))
                written.append(_section(driver, "peers", out / "console-peers.png"))
                written.append(_section(driver, "traffic", out / "console-traffic.png"))
                _kamailio_state(b, a)
                driver.execute_script(
                    "document.querySelector('#kam-aor').value = 'alice';"
                    "document.querySelector('#kam-registrations form button').click();"
                )
                _wait(
                    driver,
                    "const b = document.querySelector("
                    "'#kam-htable tr[data-table=\"routing\"] button');"
                    "if (b) b.click(); return b !== null",
                    "the routing table",
                )
                _wait(
                    driver,
                    "return document.querySelector('#kam-htable tr[data-key]') !== null && "
                    "document.querySelector('#kam-dialogs tr[data-state]') !== null && "
                    "document.querySelector('#kam-registrations .kam-aor tbody tr') !== null && "
                    "document.querySelector('[data-count=\"aors\"]').textContent === '3' && "
                    "document.querySelector('[data-count=\"dialogs\"]').textContent === '1' && "
                    "document.querySelectorAll('#kam-htable tr[data-key]').length === 2",
                    "the Kamailio state on the page",
                )
                written.append(_section(driver, "kamailio", out / "console-kamailio.png"))
                stop.set()
                c.kill()
                _wait(
                    driver,
                    f'return document.querySelector(\'#nodes-body tr[data-node="{c.uri}"]'
                    '[data-status="disabled"]\') !== null',
                    "C disabled on the page",
                )
                written.append(_section(driver, "bus", out / "console-bus.png"))
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
            for gateway in gateways:
                try:
                    gateway.stop(timeout=10)
                finally:
                    gateway.kill()
    return written


def _shot(driver: Any, path: Path) -> Path:
    driver.save_screenshot(str(path))
    return path


def _section(driver: Any, section: str, path: Path) -> Path:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, section)
    size = driver.get_window_size()
    # The browser draws only what fits its window: one as tall as the section for it.
    chrome = size["height"] - driver.execute_script("return window.innerHeight")
    height = element.size["height"] + 80 + chrome
    if height > size["height"]:
        driver.set_window_size(size["width"], height)
    driver.execute_script("arguments[0].scrollIntoView()", element)
    time.sleep(0.5)
    element.screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args(argv)
    reason = browser.missing()
    if reason is not None:
        print(f"cannot take the screenshots: {reason}", file=sys.stderr)
        return 1
    for path in take(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
