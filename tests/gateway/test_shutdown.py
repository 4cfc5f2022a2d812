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
from harness.ports import free_port


def test_sigterm_answers_waiting_requests_503_and_closes_subscriptions_1012(
    tmp_path: Path,
) -> None:
    # A long Timer F: the send to a node that never answers waits until the stop.
    served = Gateway("a", tmp_path, extra=["--timer-f", "30"]).start()
    try:
        url = served.url
        silent = f"sip:127.0.0.1:{free_port()}"
        assert httpx.post(f"{url}/v1/nodes", json={"uri": silent}).status_code == 201
        assert httpx.put(f"{url}/v1/peers/p", json={}).status_code == 201
        with connect(f"{served.ws_url}/v1/peers/p/subscribe", proxy=None) as ws:
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
