"""Pytest-side companions of :class:`harness.gateway.Gateway`.

:func:`running` stops every gateway of a test however it ends, and
:func:`dump_logs_on_failure` prints what the gateways logged during a test that failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import pytest

from harness.gateway import Gateway


@contextlib.contextmanager
def running(gateways: Iterable[Gateway]) -> Iterator[None]:
    """Make sure every gateway is stopped on the way out, even when a test breaks."""
    try:
        yield
    finally:
        for gateway in gateways:
            with contextlib.suppress(Exception):
                gateway.stop(timeout=10)
            gateway.kill()


@contextlib.contextmanager
def dump_logs_on_failure(
    request: pytest.FixtureRequest, gateways: Callable[[], Iterable[Gateway]]
) -> Iterator[None]:
    """Around one test: if it failed, print what each gateway logged meanwhile.

    Printed in teardown, so pytest shows it in the failure report under
    "Captured stdout teardown". ``gateways`` is called at both ends, so gateways
    started during the test are included (from the start of their log).
    """
    failed_before = request.session.testsfailed
    marks = {id(g): g.log_size() for g in gateways()}
    yield
    if request.session.testsfailed == failed_before:
        return
    for gateway in gateways():
        text = gateway.log_text(marks.get(id(gateway), 0))
        print(f"\n===== {gateway.name} ({gateway.uri}, {gateway.url}) log during the test =====")
        print(text.rstrip() or "(nothing)")
