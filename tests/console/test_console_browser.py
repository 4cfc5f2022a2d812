"""The web console in a real browser, against real gateways.

Headless Chromium (Debian's ``chromium``, driven by Selenium through Debian's
``chromedriver``) opens the console of gateway A of a three-gateway bus (A, B, C on
loopback, pings every :data:`PING` s, Timer F 1 s) and is used as an operator would:
what it shows must be what the gateways hold, and what it does must reach them. The
page is plain JavaScript: only a browser can tell whether it works.

Without Chromium or its driver the tests are skipped with the reason, except with
``CI=true``, where that fails the run (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest

from harness.gateway import Gateway
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.console import bodies, browser

T = TypeVar("T")

#: Seconds between pings on the test bus. A node that misses one is `disabled` until
#: the next one, so this is how long the page has to show it before it is removed.
PING = 2.0
#: Timer F of the harness's fast timers (``FAST_TIMERS``).
TIMER_F = 1.0
#: The page reads the API once a second.
POLL = 1.0
#: Headroom for a loaded machine (2 cores shared with other test runs) on top of what
#: the protocol allows; it bounds how long a test waits, it measures no speed.
SLACK = 10.0
TOKEN = "console-token-1234"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    reason = browser.missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


class Bus:
    """Three gateways, A first; each holds the other two as active."""

    def __init__(self, workdir: Path) -> None:
        self.a = Gateway("a", workdir, ping_interval=PING)
        self.b = Gateway("b", workdir, notify=[self.a], ping_interval=PING)
        self.c = Gateway("c", workdir, notify=[self.a], ping_interval=PING)
        self.gateways = [self.a, self.b, self.c]
        self.workdir = workdir

    def nodes(self, gateway: Gateway) -> dict[str, str]:
        """URI -> status, as ``gateway`` holds its node list."""
        response = httpx.get(
            f"{gateway.url}/v1/nodes", headers=gateway.headers, timeout=5, trust_env=False
        )
        response.raise_for_status()
        return {node["uri"]: node["status"] for node in response.json()}

    def complete(self) -> bool:
        for gateway in self.gateways:
            nodes = self.nodes(gateway)
            others = [g.uri for g in self.gateways if g is not gateway]
            if any(nodes.get(uri) != "active" for uri in others):
                return False
        return True


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    made = Bus(tmp_path_factory.mktemp("console-bus"))
    with running(made.gateways):
        for gateway in made.gateways:
            gateway.start()
        eventually(made.complete, 20, "the three gateways to see each other active")
        yield made


@pytest.fixture
def page(bus: Bus, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A browser on A's console, once it shows A's node list."""
    with dump_logs_on_failure(request, lambda: bus.gateways), browser.chromium() as driver:
        driver.get(f"{bus.a.url}/")
        eventually(lambda: row(driver, "#nodes-body", bus.b.uri), 15, "B on the page")
        yield driver


def eventually(condition: Callable[[], T], timeout: float, what: str) -> T:
    """``condition()`` once it is truthy (exceptions count as not yet), or fail."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # the page or a gateway in the middle of a change
            value, last = None, exc  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} ({last!r})")
        time.sleep(0.1)


def by_css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def row(driver: Any, body: str, key: str) -> Any | None:
    """The row of ``body`` whose ``data-node`` or ``data-peer`` is ``key``."""
    for tr in all_css(driver, f"{body} tr"):
        if key in (tr.get_attribute("data-node"), tr.get_attribute("data-peer")):
            return tr
    return None


def put_peer(gateway: Gateway, peer: str) -> None:
    response = httpx.put(
        f"{gateway.url}/v1/peers/{peer}",
        json={},
        headers=gateway.headers,
        timeout=5,
        trust_env=False,
    )
    assert response.status_code in (200, 201), response.text


def choose(driver: Any, selector: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_css(driver, selector)).select_by_value(value)


def fill(driver: Any, selector: str, text: str) -> None:
    field = by_css(driver, selector)
    field.clear()
    field.send_keys(text)


# ---------------------------------------------------------------------------- tests


def test_every_request_stays_on_the_gateways_origin(bus: Bus, tmp_path: Path) -> None:
    """Loaded, polling and tailing, the page asks nothing of any other origin: the
    DevTools network events (every request and WebSocket, refused ones included) and
    the page's own resource timing agree."""
    put_peer(bus.a, "origin-check")
    with browser.chromium() as driver:
        driver.get(f"{bus.a.url}/")
        eventually(lambda: row(driver, "#peers-body", "origin-check"), 15, "the peer listed")
        choose(driver, "#tail-peer", "origin-check")
        by_css(driver, "#tail-start").click()
        eventually(
            lambda: "listening to origin-check" in by_css(driver, "#tail-status").text,
            15,
            "the tail to subscribe",
        )
        time.sleep(2 * POLL)  # a few polling rounds
        urls = browser.network_urls(driver)
        timed = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        errors = browser.console_errors(driver)
    origin = urlsplit(bus.a.url).netloc
    assert urls, "no network event was recorded"
    foreign = [u for u in [*urls, *timed] if urlsplit(u).netloc != origin]
    assert all(u.startswith(browser.NETWORK_SCHEMES) for u in timed), timed
    assert not foreign, f"requests that left {origin}: {foreign}"
    paths = {urlsplit(u).path for u in urls}
    # What the page is made of and what it reads, all seen: the check is not vacuous.
    for expected in (
        "/",
        "/console/console.js",
        "/console/console.css",
        "/v1/nodes",
        "/v1/peers",
        "/v1/health",
        "/metrics",
        "/v1/peers/origin-check/subscribe",
    ):
        assert expected in paths, f"{expected} not requested; saw {sorted(paths)}"
    # The Kamailio section asks whether the typed API exists; on a gateway without it
    # the browser logs that 404, which is the answer, not a fault of the page.
    errors = [e for e in errors if not ("/v1/htable " in e and "status of 404" in e)]
    assert not errors, errors


def test_the_page_shows_every_node_and_this_one_marked(bus: Bus, page: Any) -> None:
    for gateway in bus.gateways:
        tr = eventually(lambda g=gateway: row(page, "#nodes-body", g.uri), 10, gateway.name)
        assert tr.get_attribute("data-status") == "active"
        assert ("this node" in tr.text) == (gateway is bus.a)
    transport = by_css(page, f'#nodes-body tr[data-node="{bus.b.uri}"] td:nth-child(3)').text
    assert transport == "UDP"


def test_a_node_added_on_the_page_is_in_the_node_list(bus: Bus, page: Any) -> None:
    # It pings A only once a minute: removed from A, it does not come back meanwhile.
    lone = Gateway("lone", bus.workdir, ping_interval=60)
    with running([lone]):
        lone.start()
        fill(page, "#node-uri-input", lone.uri)
        by_css(page, "#node-form button[type=submit]").click()
        eventually(lambda: "Added" in by_css(page, "#node-form-result").text, 15, "Added")
        assert lone.uri in bus.nodes(bus.a)
        eventually(lambda: row(page, "#nodes-body", lone.uri), 10, "the new node on the page")
        # And removed through the page (confirmed in the browser's dialog).
        by_css(page, f'#nodes-body tr[data-node="{lone.uri}"] button').click()
        page.switch_to.alert.accept()
        eventually(lambda: lone.uri not in bus.nodes(bus.a), 10, "the node removed from A")
        # A rejected URI says why, from the API's own problem detail.
        fill(page, "#node-uri-input", "sip:")
        by_css(page, "#node-form button[type=submit]").click()
        result = eventually(
            lambda: by_css(page, "#node-form-result.bad").text, 10, "the refusal shown"
        )
        assert result.startswith("422"), result
        assert "uri" in result, result


def test_a_killed_gateway_turns_disabled_on_the_page(bus: Bus, page: Any) -> None:
    """SIGKILL: the node says nothing; A's next ping goes unanswered for Timer F, and
    the page, which reads A every second, shows the change as it happens (the row is
    highlighted and the change is listed, which stays after A removes the node)."""
    doomed = Gateway("doomed", bus.workdir, notify=[bus.a], ping_interval=PING)
    with running([doomed]):
        doomed.start()
        eventually(lambda: bus.nodes(bus.a).get(doomed.uri) == "active", 15, "doomed active")
        eventually(lambda: row(page, "#nodes-body", doomed.uri), 10, "doomed on the page")
        doomed.kill()
        killed = time.monotonic()
        bound = PING + TIMER_F + POLL + SLACK
        eventually(
            lambda: all_css(
                page, f'#node-events li[data-node="{doomed.uri}"][data-status="disabled"]'
            ),
            bound,
            "the page to list the node as disabled",
        )
        noticed = time.monotonic() - killed
        print(f"disabled on the page {noticed:.1f} s after SIGKILL (ping {PING}, F {TIMER_F})")
        # Removed at the next missed ping: struck through, then gone.
        eventually(
            lambda: all_css(
                page, f'#node-events li[data-node="{doomed.uri}"][data-status="removed"]'
            ),
            bound + PING,
            "the page to list the node as removed",
        )


def test_a_broadcast_from_another_gateway_is_in_the_live_tail(bus: Bus, page: Any) -> None:
    peer = "console-tail"
    for gateway in bus.gateways:
        put_peer(gateway, peer)
    eventually(lambda: row(page, "#peers-body", peer), 10, "the peer on the page")
    choose(page, "#tail-peer", peer)
    by_css(page, "#tail-start").click()
    eventually(lambda: "listening to" in by_css(page, "#tail-status").text, 15, "subscribed")

    marker = uuid.uuid4().hex
    response = httpx.post(
        f"{bus.b.url}/v1/peers/{peer}/broadcast?wait=true",
        content=json.dumps({"marker": marker, "n": 1}),
        headers={"content-type": "application/json"},
        timeout=10,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    item = eventually(
        lambda: next((li for li in all_css(page, "#tail-list li") if marker in li.text), None),
        10,
        "the message in the tail",
    )
    assert bus.b.uri in item.text  # from B
    pre = item.find_element("css selector", "pre").text
    assert json.loads(pre) == {"marker": marker, "n": 1}
    assert pre.startswith('{\n  "marker"'), pre  # pretty-printed

    # Paused: what arrives is held, counted, and shown on resume.
    by_css(page, "#tail-pause").click()
    second = uuid.uuid4().hex
    httpx.post(
        f"{bus.c.url}/v1/peers/{peer}/broadcast?wait=true",
        content=json.dumps({"marker": second}),
        headers={"content-type": "application/json"},
        timeout=10,
        trust_env=False,
    ).raise_for_status()
    eventually(lambda: "1 waiting" in by_css(page, "#tail-pause").text, 10, "1 held")
    assert second not in by_css(page, "#tail-list").text
    by_css(page, "#tail-pause").click()
    eventually(lambda: second in by_css(page, "#tail-list").text, 5, "shown on resume")


def test_a_broadcast_from_the_page_shows_each_nodes_answer(bus: Bus, page: Any) -> None:
    peer = "console-send"
    for gateway in bus.gateways:
        put_peer(gateway, peer)
    fill(page, '#send-form input[name="peer"]', peer)
    fill(page, '#send-form textarea[name="body"]', '{"from": "the console"}')
    by_css(page, "#send-form button[type=submit]").click()
    table = eventually(lambda: by_css(page, "#send-result table"), 15, "the results table")
    for gateway in (bus.b, bus.c):
        tr = table.find_element("css selector", f'tr[data-node="{gateway.uri}"]')
        assert "delivered" in tr.text and "200" in tr.text, tr.text
    # Nodes killed by earlier tests may still be targets (their outboxes are kept for
    # their return): the summary counts what the table shows.
    rows = table.find_elements("css selector", "tbody tr")
    delivered = [tr for tr in rows if "delivered" in tr.text and " 200 " in f" {tr.text} "]
    summary = by_css(page, "#send-result .summary").text
    assert summary.startswith(f"{len(delivered)} of {len(rows)} node(s) answered 2xx"), summary
    queued = [tr for tr in rows if "queued" in tr.text]
    if queued:
        assert f"{len(queued)} queued" in summary, summary
    # B holds the message the page sent.
    held = httpx.get(f"{bus.b.url}/v1/peers/{peer}", timeout=5, trust_env=False).json()
    assert held["offset"] >= 1


def test_peers_register_update_and_unregister_from_the_page(bus: Bus, page: Any) -> None:
    peer = "console-form"
    by_css(page, "#peer-editor summary").click()
    fill(page, '#peer-form input[name="peer_id"]', peer)
    fill(page, '#peer-form input[name="history"]', "50")
    by_css(page, "#peer-form button[type=submit]").click()
    eventually(lambda: "Registered" in by_css(page, "#peer-form-result").text, 10, "registered")
    got = httpx.get(f"{bus.a.url}/v1/peers/{peer}", timeout=5, trust_env=False).json()
    assert got["history"] == 50
    tr = eventually(lambda: row(page, "#peers-body", peer), 10, "the peer listed")
    assert "0 / 50" in tr.text

    fill(page, '#peer-form input[name="description"]', "made by the console test")
    by_css(page, "#peer-form button[type=submit]").click()
    eventually(lambda: "Updated" in by_css(page, "#peer-form-result").text, 10, "updated")
    got = httpx.get(f"{bus.a.url}/v1/peers/{peer}", timeout=5, trust_env=False).json()
    assert got["description"] == "made by the console test"

    # A value the API refuses: its 422 names the field.
    fill(page, '#peer-form input[name="reply_timeout"]', "1000")
    choose(page, '#peer-form select[name="reply"]', "subscriber")
    by_css(page, "#peer-form button[type=submit]").click()
    refused = eventually(lambda: by_css(page, "#peer-form-result.bad").text, 10, "refusal")
    assert refused.startswith("422") and "reply_timeout" in refused, refused

    by_css(page, f'#peers-body tr[data-peer="{peer}"] button.danger').click()
    page.switch_to.alert.accept()
    eventually(
        lambda: (
            httpx.get(f"{bus.a.url}/v1/peers/{peer}", timeout=5, trust_env=False).status_code == 404
        ),
        10,
        "the peer unregistered",
    )


def test_health_shows_the_metrics_counters(bus: Bus, page: Any) -> None:
    """The cards read the same counters as /metrics: a subscriber the test connects
    shows up in the WebSocket clients card."""
    from websockets.sync.client import connect

    put_peer(bus.a, "console-health")

    def card(key: str) -> str:
        return str(by_css(page, f'#health-cards [data-metric="{key}"] .value').text)

    before = int(card("ws-clients"))
    with connect(f"{bus.a.ws_url}/v1/peers/console-health/subscribe") as ws:
        json.loads(ws.recv(timeout=5))  # subscribed
        eventually(lambda: int(card("ws-clients")) == before + 1, 10, "one more client")
    assert card("active-nodes") == "2 of 2"
    assert by_css(page, "#node-status").text == "active"


def test_a_wrong_token_is_refused_with_a_message(tmp_path: Path) -> None:
    guarded = Gateway("guarded", tmp_path, tokens=[TOKEN])
    with running([guarded]), browser.chromium() as driver:
        guarded.start()
        driver.get(f"{guarded.url}/")
        prompt = eventually(lambda: by_css(driver, "#auth:not([hidden])"), 15, "the prompt")
        assert "needs an API token" in prompt.text

        fill(driver, "#auth-token", "not-the-token")
        by_css(driver, "#auth-form button").click()
        message = eventually(
            lambda: (
                by_css(driver, "#auth-message").text
                if "refused" in by_css(driver, "#auth-message").text
                else None
            ),
            10,
            "the refusal",
        )
        assert "the API token is not valid" in message
        assert by_css(driver, "#auth").is_displayed()

        fill(driver, "#auth-token", TOKEN)
        by_css(driver, "#auth-form button").click()
        eventually(lambda: row(driver, "#nodes-body", guarded.uri), 10, "the node list")
        assert not by_css(driver, "#auth").is_displayed()

        # Kept for the tab: a reload asks nothing, and the WebSocket takes it too.
        put_peer(guarded, "guarded-peer")
        driver.refresh()
        eventually(lambda: row(driver, "#peers-body", "guarded-peer"), 10, "peers after reload")
        assert not by_css(driver, "#auth").is_displayed()
        by_css(driver, "#tail-start").click()
        eventually(
            lambda: "listening to guarded-peer" in by_css(driver, "#tail-status").text,
            10,
            "the tail subscribed with the token",
        )


# ---------------------------------------------------------------------------- Kamailio


def kdmq(sender: Gateway, peer: str, body: bytes, node: str | None = None) -> None:
    """``body`` on ``peer`` from ``sender``, to every node or to ``node``: what a
    Kamailio node's module sends, byte for byte; every answer 200."""
    path = f"send?node={node}" if node else "broadcast"
    response = httpx.post(
        f"{sender.url}/v1/peers/{peer}/{path}{'&' if node else '?'}wait=true",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    # The gateways of the bus answer; a node killed by an earlier test may be a target
    # too (its outbox is kept for its return), with the message queued.
    results = {r["node"]: r for r in response.json()["results"]}
    answered = [r for r in results.values() if r["outcome"] == "delivered"]
    assert answered and all(r["code"] == 200 for r in answered), results
    if node:
        assert results[node]["code"] == 200, results


def test_kamailio_state_on_the_page(bus: Bus, page: Any) -> None:
    """What Kamailio nodes replicate (htable, usrloc, dialog bodies as they send them,
    here from gateway B) is browsable on A's page; a key set and deleted on the page
    reaches the other gateways' copies."""
    kdmq(bus.b, "htable", bodies.htable_set("ht", "greeting", "hello"))
    button = eventually(
        lambda: by_css(page, '#kam-htable tr[data-table="ht"] button'), 15, "table ht listed"
    )
    button.click()
    cell = eventually(
        lambda: by_css(page, '#kam-htable tr[data-key="greeting"]'), 10, "the key greeting"
    )
    assert "hello" in cell.text and bus.b.uri in cell.text

    # Set from the page: every gateway's copy has it.
    form = "#kam-htable form.kam-write"
    fill(page, f'{form} input[name="table"]', "ht")
    fill(page, f'{form} input[name="key"]', "from-console")
    fill(page, f'{form} input[name="value"]', "42")
    by_css(page, f'{form} input[name="integer"]').click()
    by_css(page, f"{form} button[type=submit]").click()
    result = eventually(
        lambda: "Set from-console" in by_css(page, "#kam-write-result").text, 10, "set"
    )
    assert result
    # Every node's answer, counted (a node killed by an earlier test may be a target too).
    assert "node(s) answered 2xx" in by_css(page, "#kam-write-result").text

    def held(gateway: Gateway) -> Any:
        response = httpx.get(f"{gateway.url}/v1/htable/ht/from-console", timeout=5, trust_env=False)
        return response.json()["value"] if response.status_code == 200 else None

    eventually(lambda: held(bus.b) == 42 and held(bus.c) == 42, 10, "42 on B and C")
    row_ = eventually(
        lambda: by_css(page, '#kam-htable tr[data-key="from-console"]'), 10, "the new key"
    )
    # Deleted from the page, on every node.
    eventually(lambda: row_.find_element("css selector", "button").click() or True, 5, "delete")
    page.switch_to.alert.accept()
    eventually(lambda: held(bus.b) is None and held(bus.c) is None, 10, "deleted on B and C")

    # A registration from a Kamailio registrar: looked up by AOR.
    aor = f"carol-{uuid.uuid4().hex[:6]}"
    kdmq(bus.b, "usrloc", bodies.registration(aor, f"sip:{aor}@127.0.0.1:6004"))
    fill(page, "#kam-aor", aor)
    by_css(page, "#kam-registrations form button").click()
    contact = eventually(
        lambda: by_css(page, "#kam-registrations .kam-aor tbody tr"), 10, "the contact"
    )
    assert f"sip:{aor}@127.0.0.1:6004" in contact.text and bus.b.uri in contact.text
    fill(page, "#kam-aor", "nobody-here")
    by_css(page, "#kam-registrations form button").click()
    eventually(
        lambda: "not registered anywhere" in by_css(page, "#kam-registrations .kam-aor").text,
        10,
        "the unknown AOR said so",
    )

    # A call set up on a Kamailio node: counted by state.
    for body in bodies.dialog_call():
        kdmq(bus.b, "dialog", body, node=bus.a.uri)
    eventually(
        lambda: by_css(page, '#kam-dialogs tr[data-state="confirmed"] td.num').text == "1",
        15,
        "one confirmed dialog",
    )


def test_without_the_kamailio_api_the_page_says_so(tmp_path: Path) -> None:
    bare = Gateway("bare", tmp_path, extra=["--kamailio-mirrors", "none"])
    with running([bare]), browser.chromium() as driver:
        bare.start()
        driver.get(f"{bare.url}/")
        for part, mirror in (
            ("kam-htable", "htable"),
            ("kam-registrations", "usrloc"),
            ("kam-dialogs", "dialog"),
        ):
            box = eventually(
                lambda p=part: by_css(driver, f'#{p}[data-state="unavailable"]'), 15, part
            )
            assert "Not available on this gateway" in box.text, box.text
            assert mirror in box.text, box.text


def test_tailing_a_subscriber_mode_peer_asks_first(bus: Bus, page: Any) -> None:
    """The tail never answers; on a reply=subscriber peer it would turn every 480 into
    a 408 after the reply timeout, so the page asks before it subscribes."""
    response = httpx.put(
        f"{bus.a.url}/v1/peers/console-answered",
        json={"reply": "subscriber", "reply_timeout": 0.5},
        timeout=5,
        trust_env=False,
    )
    assert response.status_code in (200, 201), response.text
    eventually(lambda: row(page, "#peers-body", "console-answered"), 10, "the peer listed")
    choose(page, "#tail-peer", "console-answered")
    by_css(page, "#tail-start").click()
    alert = page.switch_to.alert
    assert "never answers" in alert.text
    alert.dismiss()
    time.sleep(POLL)
    assert "listening to" not in by_css(page, "#tail-status").text
    peer = httpx.get(f"{bus.a.url}/v1/peers/console-answered", timeout=5, trust_env=False)
    assert peer.json()["subscribers"] == 0
