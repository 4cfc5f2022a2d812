"""Kamailio 5.6 htable bodies (peer ``htable``): typed, parsed strictly, built exactly.

Every action of ``ht_dmq.c`` (5.6) has a class here; :func:`parse` reads a body into
one, :func:`build` writes one as Kamailio does (compact JSON, its field order), and
``build(parse(b)) == b`` for every body Kamailio 5.6 sends live (tests check this on
the captured bodies). What Kamailio checks, and what it lets through:

* The top level of an action may hold only ``action``, ``htname``, ``cname``, ``type``,
  ``strval``, ``intval``, ``mode``: any other field is answered 400 by a 5.6 node
  (master's ``last_modified`` included), and by :func:`parse`
  (:class:`MalformedBody`, kind ``field``).
* A body whose first field is ``cells`` is a sync answer; Kamailio only warns about
  unknown fields of a cell and skips a cell without ``htname`` or ``cname``: so does
  :func:`parse` (tolerant where Kamailio is).
* Numbers are C ``int``: ``intval`` and the others must be JSON integers in 32 bits
  (kind ``type`` / ``range`` otherwise); strings must be strings (Kamailio would read a
  number's ``valuestring`` as NULL), without NUL (C strings end there).
* ``type`` is a bit set: ``2`` (``AVP_VAL_STR``) means a string, anything without that
  bit an integer. A SET without the value its type names is stored by 5.6 as an empty
  (or uninitialised) value: :func:`parse` reads it as ``""`` or ``0``
  (:attr:`SetCell.value_missing`), never a crash.
* Duplicate keys: the last one wins, as in Kamailio's loop over the fields.
* Actions 7 and 8 (6.0+ ``ew``/``in`` removals, sent without a value) and any other
  action number are parsed as :class:`Unsupported`; a 5.6 node answers them 500
  ("unrecognized action").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

#: The bit of ``type`` that says the value is a string (``AVP_VAL_STR``).
AVP_VAL_STR = 2
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

#: The fields a 5.6 node accepts at the top level of an action.
ACTION_FIELDS = frozenset({"action", "htname", "cname", "type", "strval", "intval", "mode"})
#: The fields of a sync answer's cell (others are warned about, and ignored).
CELL_FIELDS = frozenset({"htname", "cname", "type", "strval", "intval", "expire"})


class Action(IntEnum):
    """``ht_dmq_action_t``."""

    NONE = 0
    SYNC = 1
    SET_CELL = 2
    SET_CELL_EXPIRE = 3
    DEL_CELL = 4
    RM_CELL_RE = 5
    RM_CELL_SW = 6
    RM_CELL_EW = 7  # 6.0+, sent without a value: nobody can apply it
    RM_CELL_IN = 8  # 6.0+, idem


class MalformedBody(ValueError):
    """A body Kamailio 5.6 would answer 400; ``kind`` is a short fixed word for
    metrics (``json``, ``shape``, ``field``, ``type``, ``range``, ``missing``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


Value = str | int


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Action 1: send me every cell of the replicated tables (5.8+: of ``htname``)."""

    htname: str | None = None


@dataclass(frozen=True, slots=True)
class SetCell:
    """Action 2: set ``cname`` of table ``htname`` to ``value``. ``mode`` is
    Kamailio's slot-locking flag (always 1 when a node sends it)."""

    htname: str
    cname: str
    value: Value
    mode: int = 1
    #: The body named a type but carried no value of it (5.6 stores an empty one).
    value_missing: bool = False


@dataclass(frozen=True, slots=True)
class SetCellExpire:
    """Action 3: the cell expires ``seconds`` from now (0: never). A 5.6 node applies
    it only to a table with ``autoexpire``; elsewhere it is a no-op."""

    htname: str
    cname: str
    seconds: int


@dataclass(frozen=True, slots=True)
class DeleteCell:
    """Action 4: delete one cell."""

    htname: str
    cname: str


@dataclass(frozen=True, slots=True)
class RemoveCells:
    """Actions 5 (``op="re"``, a POSIX extended regex, case-insensitive) and 6
    (``op="sw"``, starts with, case-sensitive): delete every cell whose name
    (``on="name"``, mode 0) or string value (``on="value"``, mode 1) matches."""

    htname: str
    op: Literal["re", "sw"]
    on: Literal["name", "value"]
    pattern: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    """An action a 5.6 node cannot replay (0, 7, 8 or unknown): it answers 500."""

    action: int
    htname: str | None = None


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell of a sync answer: ``expire`` is absolute (Unix seconds), 0 = never."""

    htname: str
    cname: str
    value: Value
    expire: int = 0


@dataclass(frozen=True, slots=True)
class SyncAnswer:
    """A sync answer chunk; ``skipped`` counts cells Kamailio too would skip."""

    cells: tuple[Cell, ...]
    skipped: int = 0


HtableMessage = (
    SyncRequest | SetCell | SetCellExpire | DeleteCell | RemoveCells | Unsupported | SyncAnswer
)


# ---------------------------------------------------------------------- parsing


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # srjson reads every number as a double
        else:
            raise MalformedBody("type", f"{name} must be an integer, not {_shown(value)}")
    if not INT32_MIN <= value <= INT32_MAX:
        raise MalformedBody("range", f"{name} {value} does not fit a 32-bit integer")
    return value


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise MalformedBody("type", f"{name} must be a string, not {_shown(value)}")
    if "\x00" in value:
        raise MalformedBody("type", f"{name} contains a NUL character")
    return value


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(fields: dict[str, Any], type_: int, where: str) -> tuple[Value, bool]:
    if type_ & AVP_VAL_STR:
        if "strval" in fields:
            return _str(f"{where}strval", fields["strval"]), False
        return "", True
    if "intval" in fields:
        return _int(f"{where}intval", fields["intval"]), False
    return 0, True


def _require(fields: dict[str, Any], action: int, *names: str) -> None:
    for name in names:
        if name not in fields:
            raise MalformedBody("missing", f"action {action} needs {name}")


_decode = json.JSONDecoder().decode


def _loads(body: bytes) -> Any:
    """``json.loads(body)``, without its encoding guess for what is surely UTF-8.

    json.loads reads bytes as UTF-16 or UTF-32 when a BOM or NULs in the first bytes
    say so; a body that opens with ``{`` followed by anything but a NUL is UTF-8 by
    that same guess, and is decoded here exactly as json.loads would decode it."""
    if body[:1] == b"{" and body[1:2] != b"\x00":
        return _decode(body.decode("utf-8", "surrogatepass"))
    return json.loads(body)


#: A JSON string without escapes or control characters (its bytes are its text), and
#: JSON integers: the usual SET, as Kamailio writes it (see :func:`read_set`).
_TEXT = rb'"([^"\\\x00-\x1f]*)"'
_NUMBER = rb"(-?(?:0|[1-9][0-9]{0,9}))"
_USUAL_SET = re.compile(
    rb'\{"action":2,"htname":'
    + _TEXT
    + rb',"cname":'
    + _TEXT
    + rb',"type":'
    + _NUMBER
    + rb',"(?:strval":'
    + _TEXT
    + rb'|intval":'
    + _NUMBER
    + rb'),"mode":'
    + _NUMBER
    + rb"\}[ \t\n\r]*"  # JSON's whitespace after the object (a line end, say)
)


def read_set(body: bytes) -> tuple[str, str, Value, int] | None:
    """The usual body, a SET as every Kamailio node writes it (compact, its field
    order, the value its type names, names without escapes; JSON whitespace may
    follow), as ``(htname, cname, value, mode)``, read by one regular expression;
    None for any other body, which :func:`parse` reads in full (and refuses saying
    why). What this returns is what the full reading gives (tests check it for bodies
    near this shape)."""
    match = _USUAL_SET.fullmatch(body)
    if match is None:
        return None
    htname, cname, type_text, text, number, mode_text = match.groups()
    type_ = int(type_text)
    mode = int(mode_text)
    if not (INT32_MIN <= type_ <= INT32_MAX and INT32_MIN <= mode <= INT32_MAX):
        return None
    try:
        value: Value
        if type_ & AVP_VAL_STR:
            if text is None:
                return None  # a string type with an integer: the value is missing
            value = text.decode("utf-8", "surrogatepass")
        else:
            if number is None:
                return None
            value = int(number)
            if not INT32_MIN <= value <= INT32_MAX:
                return None
        return (
            htname.decode("utf-8", "surrogatepass"),
            cname.decode("utf-8", "surrogatepass"),
            value,
            mode,
        )
    except UnicodeDecodeError:
        return None  # not UTF-8: the full reading says so


def parse(body: bytes) -> HtableMessage:
    """Read one htable body; raise :class:`MalformedBody` where Kamailio answers 400."""
    usual = read_set(body)
    if usual is not None:
        return SetCell(*usual)
    return read_full(body)


def read_full(body: bytes, loads: Callable[[bytes], Any] = _loads) -> HtableMessage:
    """Read one body field by field, without :func:`read_set`'s shortcut: what
    :func:`parse` does with every body the shortcut does not take. ``loads`` decodes
    the JSON (the tests give ``json.loads`` itself, to check that :func:`_loads` and
    the shortcut change no outcome: this module is compiled, so they cannot patch
    its functions)."""
    try:
        document = loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBody("json", f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not document:
        raise MalformedBody("shape", "the body must be a non-empty JSON object")
    if next(iter(document)) == "cells":
        return _parse_cells(document["cells"])
    unknown = sorted(set(document) - ACTION_FIELDS)
    if unknown:
        raise MalformedBody("field", f"unknown field {unknown[0]!r} (a 5.6 node answers 400)")
    action = _int("action", document.get("action", 0))
    htname = _str("htname", document["htname"]) if "htname" in document else None
    mode = _int("mode", document.get("mode", 0))
    type_ = _int("type", document.get("type", 0))
    cname = _str("cname", document["cname"]) if "cname" in document else None
    if action == Action.SYNC:
        return SyncRequest(htname)
    if action not in (
        Action.SET_CELL,
        Action.SET_CELL_EXPIRE,
        Action.DEL_CELL,
        Action.RM_CELL_RE,
        Action.RM_CELL_SW,
    ):
        return Unsupported(action, htname)
    _require(document, action, "htname")
    assert htname is not None
    if action == Action.SET_CELL:
        _require(document, action, "cname")
        assert cname is not None
        value, missing = _value(document, type_, "")
        return SetCell(htname, cname, value, mode, missing)
    if action == Action.SET_CELL_EXPIRE:
        _require(document, action, "cname", "intval")
        assert cname is not None
        return SetCellExpire(htname, cname, _int("intval", document["intval"]))
    if action == Action.DEL_CELL:
        _require(document, action, "cname")
        assert cname is not None
        return DeleteCell(htname, cname)
    _require(document, action, "strval")
    op: Literal["re", "sw"] = "re" if action == Action.RM_CELL_RE else "sw"
    on: Literal["name", "value"] = "value" if mode == 1 else "name"
    return RemoveCells(htname, op, on, _str("strval", document["strval"]))


def _parse_cells(cells: object) -> SyncAnswer:
    if not isinstance(cells, list):
        raise MalformedBody("shape", "cells must be an array")
    parsed: list[Cell] = []
    skipped = 0
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise MalformedBody("shape", f"cells[{index}] must be an object")
        where = f"cells[{index}]."
        htname = cell.get("htname")
        cname = cell.get("cname")
        if not isinstance(htname, str) or not isinstance(cname, str) or not htname or not cname:
            skipped += 1  # Kamailio skips a cell without both names
            continue
        type_ = _int(f"{where}type", cell.get("type", 0))
        value, _ = _value(cell, type_, where)
        expire = _int(f"{where}expire", cell.get("expire", 0))
        parsed.append(
            Cell(_str(f"{where}htname", htname), _str(f"{where}cname", cname), value, expire)
        )
    return SyncAnswer(tuple(parsed), skipped)


# ---------------------------------------------------------------------- building


def _typed(value: Value) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"an htable value is a string or an integer, not {value!r}")
    if isinstance(value, str):
        return {"type": AVP_VAL_STR, "strval": _checked_str("value", value)}
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"value {value} does not fit a 32-bit integer")
    return {"type": 0, "intval": value}


def _checked_str(name: str, value: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character, which Kamailio cannot carry")
    return value


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def build(message: HtableMessage) -> bytes:
    """The body Kamailio 5.6 sends for ``message`` (compact, its field order).

    Raises ValueError for what Kamailio could not carry (an integer beyond 32 bits, a
    NUL in a string, an action it cannot replay)."""
    if isinstance(message, SyncRequest):
        document: dict[str, Any] = {"action": int(Action.SYNC)}
        if message.htname:
            document["htname"] = _checked_str("htname", message.htname)
        return _dump(document)
    if isinstance(message, SetCell):
        return _dump(
            {
                "action": int(Action.SET_CELL),
                "htname": _checked_str("htname", message.htname),
                "cname": _checked_str("cname", message.cname),
                **_typed(message.value),
                "mode": message.mode,
            }
        )
    if isinstance(message, SetCellExpire):
        if not INT32_MIN <= message.seconds <= INT32_MAX:
            raise ValueError(f"expires {message.seconds} does not fit a 32-bit integer")
        return _dump(
            {
                "action": int(Action.SET_CELL_EXPIRE),
                "htname": _checked_str("htname", message.htname),
                "cname": _checked_str("cname", message.cname),
                "type": 0,
                "intval": message.seconds,
                "mode": 0,
            }
        )
    if isinstance(message, DeleteCell):
        return _dump(
            {
                "action": int(Action.DEL_CELL),
                "htname": _checked_str("htname", message.htname),
                "cname": _checked_str("cname", message.cname),
                "mode": 0,
            }
        )
    if isinstance(message, RemoveCells):
        action = Action.RM_CELL_RE if message.op == "re" else Action.RM_CELL_SW
        return _dump(
            {
                "action": int(action),
                "htname": _checked_str("htname", message.htname),
                "type": AVP_VAL_STR,
                "strval": _checked_str("pattern", message.pattern),
                "mode": 1 if message.on == "value" else 0,
            }
        )
    if isinstance(message, SyncAnswer):
        cells = []
        for cell in message.cells:
            cells.append(
                {
                    "htname": _checked_str("htname", cell.htname),
                    "cname": _checked_str("cname", cell.cname),
                    **_typed(cell.value),
                    "expire": cell.expire,
                }
            )
        return _dump({"cells": cells})
    raise ValueError(f"action {message.action} cannot be replayed by a Kamailio 5.6 node")


# ---------------------------------------------------------------------- matching


def compile_regex(pattern: str) -> re.Pattern[str]:
    """A removal regex as Kamailio compiles it (``REG_EXTENDED|REG_ICASE|REG_NEWLINE``),
    in Python's dialect (close to POSIX ERE for the patterns people write); raises
    re.error for one that does not compile."""
    return re.compile(pattern, re.IGNORECASE | re.MULTILINE)


def matches(message: RemoveCells, name: str, value: Value, regex: re.Pattern[str] | None) -> bool:
    """Whether a removal deletes the cell ``name`` holding ``value`` (values are
    matched only when they are strings, as in Kamailio)."""
    if message.on == "value":
        if not isinstance(value, str):
            return False
        subject = value
    else:
        subject = name
    if message.op == "sw":
        return subject.startswith(message.pattern)
    assert regex is not None
    return regex.search(subject) is not None
