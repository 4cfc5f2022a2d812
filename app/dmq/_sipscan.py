"""The native fast paths of the SIP codec are not built: this module stands in.

``_sipscan.c`` (built with the compiled core) replaces this module when present: the
import system prefers an extension to a source file of the same name, and
``DMQ_GATEWAY_CORE=pure`` imports only sources, so the pure-Python core never runs
native code. :mod:`app.dmq.sip` reads :data:`AVAILABLE` and, being False here, does
not call these functions; their signatures are the extension's, for the type checker.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

#: True in the extension.
AVAILABLE = False

ScanResult = tuple[
    str | None, str, int, str, list[tuple[str, str]], dict[str, str], list[str], bytes
]


def scan(data: bytes) -> ScanResult | None:
    """The message read in one pass, or None: parse it with the Python code."""
    return None


def parse_via(text: str, cls: type[T]) -> T | None:
    """``cls(transport, host, port, params)``, or None: parse it with the Python code."""
    return None


def parse_cseq(value: str) -> tuple[int, str] | None:
    """``(number, method)``, or None: parse it with the Python code."""
    return None
