"""JSON as Kamailio's srjson writes and reads it, shared by the typed codecs.

srjson prints compact JSON with integral numbers as integers and non-ASCII text as raw
UTF-8, which is what ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)``
gives; reading keeps every key/value pair in order, duplicates included, because a
Kamailio 5.6 dialog body repeats keys (the codec decides which duplicates it accepts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


class BodyError(ValueError):
    """A body that is not what Kamailio 5.6 sends for this peer; ``detail`` says why
    (a mirror answers 400 to it) and ``kind`` is a short fixed word for metrics:
    ``json``, ``shape``, ``field``, ``missing``, ``duplicate``, ``type``, ``range``,
    ``action``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Pairs(list[tuple[str, Any]]):
    """A JSON object read with its pairs in order, duplicate keys kept."""


def loads(body: bytes) -> Any:
    """Parse ``body`` (UTF-8 JSON) keeping duplicate keys; raise BodyError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(
            "json", f"the body is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=Pairs, parse_constant=_no_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BodyError("json", f"the body is not JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise BodyError("json", f"the body is not JSON: {name} is not a JSON value")


def dumps_pairs(pairs: Iterable[tuple[str, Any]]) -> str:
    """Compact JSON of an object given as pairs (a key may repeat, as srjson allows)."""
    parts = [f"{_dump(key)}:{_value(value)}" for key, value in pairs]
    return "{" + ",".join(parts) + "}"


def _value(value: Any) -> str:
    if isinstance(value, RawObject):
        return dumps_pairs(value.pairs)
    return _dump(value)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class RawObject:
    """A nested object to write with :func:`dumps_pairs` (pairs in this order)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: Iterable[tuple[str, Any]]) -> None:
        self.pairs = list(pairs)


def fields(obj: Any, what: str, *, repeatable: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The pairs of a JSON object as a dict; a repeated key is refused unless it is in
    ``repeatable`` (then the last value wins, as in Kamailio's parsers)."""
    if not isinstance(obj, Pairs):
        raise BodyError("shape", f"{what} must be a JSON object, not {_kind(obj)}")
    out: dict[str, Any] = {}
    for key, value in obj:
        if key in out and key not in repeatable:
            raise BodyError("duplicate", f"{what}: key {key!r} appears more than once")
        out[key] = value
    return out


def exact_keys(
    found: dict[str, Any], required: Iterable[str], what: str, optional: Iterable[str] = ()
) -> None:
    """Refuse a missing required key or any key outside ``required`` and ``optional``."""
    required = list(required)
    allowed = set(required) | set(optional)
    missing = [k for k in required if k not in found]
    if missing:
        raise BodyError("missing", f"{what}: missing {', '.join(repr(k) for k in missing)}")
    unknown = [k for k in found if k not in allowed]
    if unknown:
        raise BodyError(
            "field",
            f"{what}: unknown field {', '.join(repr(k) for k in unknown)} "
            "(Kamailio 5.6 does not send it)",
        )


def integer(found: dict[str, Any], key: str, what: str, low: int, high: int) -> int:
    value = found[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BodyError("type", f"{what}: {key!r} must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise BodyError("range", f"{what}: {key!r} = {value} is out of range ({low}..{high})")
    return value


def string(found: dict[str, Any], key: str, what: str) -> str:
    value = found[key]
    if not isinstance(value, str):
        raise BodyError("type", f"{what}: {key!r} must be a string, not {_kind(value)}")
    if "\x00" in value:  # srjson's strings end at the first NUL
        raise BodyError("type", f"{what}: {key!r} holds a NUL character")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
