"""Fixtures of the fault tests: a lab of network namespaces (harness/netns.py).

A machine where namespaces or nftables rules cannot be made skips these tests with the
reason, except with ``CI=true``: there the environment is broken, and the tests fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import pytest

from harness.netns import Lab, lab_unavailable

LabFactory = Callable[[Sequence[str]], Lab]


def require_lab() -> None:
    reason = lab_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"no fault lab: {reason}; CI=true, so this is an error, not a skip")
    pytest.skip(f"no fault lab: {reason}")


@pytest.fixture(scope="session")
def lab_required() -> None:
    require_lab()


@pytest.fixture
def make_lab(lab_required: None) -> Iterator[LabFactory]:
    """``make_lab(["a", "b"])``: a started lab, torn down after the test however it ends."""
    labs: list[Lab] = []

    def make(hosts: Sequence[str]) -> Lab:
        lab = Lab(hosts)
        labs.append(lab)
        return lab.start()

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.close()
