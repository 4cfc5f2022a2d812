"""SIGTERM to a real ``dmq-gateway serve`` with a request and a subscription in flight."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from harness.gateway import Gateway
from harness.waiting import wait_until


def test_sigterm_answers_waiting_requests_503_and_closes_subscriptions_1012(
    tmp_path: Path,
) -> None:
    # A long Timer F, and a node that is active but whose subscriber never answers
    # (a node that is not active would get the message through its outbox, at once
    # reported as queued): the send waits until the stop.
    served = Gateway("a", tmp_path, extra=["--timer-f", "30"]).start()
    other = Gateway("b", tmp_path, notify=[served], extra=["--timer-f", "30"])
    try:
        other.start()
        url = served.url
        silent = other.uri
        wait_until(
            lambda: any(
                n["uri"] == silent and n["status"] == "active"
                for n in httpx.get(f"{url}/v1/nodes").json()
            ),
            10,
            "gateway a holds b as active",
        )
        assert (
            httpx.put(
                f"{other.url}/v1/peers/p", json={"reply": "subscriber", "reply_timeout": 25}
            ).status_code
            == 201
        )
        assert httpx.put(f"{url}/v1/peers/p", json={}).status_code == 201
        with (
            connect(f"{other.ws_url}/v1/peers/p/subscribe", proxy=None) as mute,
            connect(f"{served.ws_url}/v1/peers/p/subscribe", proxy=None) as ws,
        ):
            assert json.loads(mute.recv(5))["type"] == "subscribed"
            assert json.loads(ws.recv(5))["type"] == "subscribed"

            answer: dict[str, Any] = {}

            def wait_for_results() -> None:
                response = httpx.post(
                    f"{url}/v1/peers/p/send",
                    params={"node": silent, "wait": "true"},
                    content=b"{}",
                    timeout=20,
                )
                answer.update(
                    status=response.status_code,
                    type=response.headers["content-type"],
                    body=response.json(),
                )

            waiting = threading.Thread(target=wait_for_results)
            waiting.start()
            time.sleep(0.3)  # the request is in the gateway, waiting for Timer F
            assert served.proc is not None
            assert waiting.is_alive()
            signalled = time.monotonic()
            os.kill(served.proc.pid, signal.SIGTERM)
            served.proc.wait(10)
            exit_seconds = time.monotonic() - signalled
            waiting.join(5)

            assert answer["status"] == 503, answer
            assert answer["type"] == "application/problem+json"
            assert "stopping" in answer["body"]["detail"]
            try:
                ws.recv(5)
                raise AssertionError("the subscription got a frame instead of a close")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                assert closed.rcvd.code == 1012
                assert "since=0" in closed.rcvd.reason
        log = served.log_text()
        assert "Traceback" not in log and "CancelledError" not in log, log
        print(f"SIGTERM to exit with a request pending: {exit_seconds:.3f} s")
    finally:
        served.stop()
        other.stop()
