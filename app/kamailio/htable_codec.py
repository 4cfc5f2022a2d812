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
import types
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Literal

from app.dmq import _sipscan

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

    def __init__(
        self, htname: str, cname: str, value: Value, mode: int = 1, value_missing: bool = False
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "htname", htname)
        object.__setattr__(self, "cname", cname)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "value_missing", value_missing)


@dataclass(frozen=True, slots=True)
class SetCellExpire:
    """Action 3: the cell expires ``seconds`` from now (0: never). A 5.6 node applies
    it only to a table with ``autoexpire``; elsewhere it is a no-op."""

    htname: str
    cname: str
    seconds: int

    def __init__(self, htname: str, cname: str, seconds: int) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "htname", htname)
        object.__setattr__(self, "cname", cname)
        object.__setattr__(self, "seconds", seconds)


@dataclass(frozen=True, slots=True)
class DeleteCell:
    """Action 4: delete one cell."""

    htname: str
    cname: str

    def __init__(self, htname: str, cname: str) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "htname", htname)
        object.__setattr__(self, "cname", cname)


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

    def __init__(self, htname: str, cname: str, value: Value, expire: int = 0) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "htname", htname)
        object.__setattr__(self, "cname", cname)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "expire", expire)


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


def read_set(body: bytes) -> tuple[str, str, Value, int] | None:
    """The usual body, a SET as every Kamailio node writes it (compact, its field
    order, the value its type names, names without escapes; JSON whitespace may
    follow), as ``(htname, cname, value, mode)``; None for any other body, which
    :func:`parse` reads in full (and refuses saying why). What this returns is what the
    full reading gives (tests check it for bodies near this shape).

    With the native codec (``app/dmq/_sipscan.c``, built with the compiled core), its
    ``scan_set`` reads it in one pass (0.2 us against 1.6 us for :func:`_scan_set`
    compiled, a third of the htable mirror's cost per message). Compiled without it,
    one scan of the body's bytes reads it (:func:`_scan_set`, a quarter of the cost of
    a regular expression there); as Python, one regular expression does
    (:func:`_match_set`, six times faster than a scan in Python). All find the same
    parts, checked and decoded as :func:`_usual_set` does (tests compare them on every
    build)."""
    if _NATIVE:
        return _sipscan.scan_set(body)
    if _SCANNED:
        return _scan_set(body)
    return _match_set(body)


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


def _match_set(body: bytes) -> tuple[str, str, Value, int] | None:
    """:func:`read_set` by one regular expression."""
    match = _USUAL_SET.fullmatch(body)
    if match is None:
        return None
    htname, cname, type_text, text, number, mode_text = match.groups()
    return _usual_set(
        htname,
        cname,
        int(type_text),
        text,
        None if number is None else int(number),
        int(mode_text),
    )


# The same SET for the scan: these literals, in this order, around its names, type,
# value and mode.
_SET_OPEN = b'{"action":2,"htname":"'
_SET_CNAME = b'","cname":"'
_SET_TYPE = b'","type":'
_SET_STRVAL = b',"strval":"'
_SET_INTVAL = b',"intval":'
_SET_MODE_AFTER_TEXT = b'","mode":'
_SET_MODE = b',"mode":'
#: Digits a number of the usual SET has at most (a C int has 10).
_MAX_DIGITS = 10
_QUOTE: Final = 0x22  # "
_BACKSLASH: Final = 0x5C
_MINUS: Final = 0x2D
_ZERO: Final = 0x30
_NINE: Final = 0x39


def _literal(body: bytes, at: int, text: bytes) -> bool:
    """Whether ``body`` holds ``text`` at ``at``."""
    if at + len(text) > len(body):
        return False
    return all(body[at + index] == text[index] for index in range(len(text)))


def _text_end(body: bytes, at: int) -> int:
    """Where the JSON string whose text starts at ``at`` closes (its ``"``), when that
    text has no escape and no control character (its bytes are then its text); -1
    otherwise."""
    for index in range(at, len(body)):
        byte = body[index]
        if byte == _QUOTE:
            return index
        if byte == _BACKSLASH or byte < 0x20:
            return -1
    return -1


def _number(body: bytes, at: int) -> tuple[int, int]:
    """The JSON integer at ``at`` (no fraction or exponent, at most ten digits) and
    where it ends; an end of -1 when there is none. What follows it is the caller's to
    check: a digit there means a longer number, which no 32-bit integer has."""
    size = len(body)
    negative = at < size and body[at] == _MINUS
    if negative:
        at += 1
    if at >= size or not _ZERO <= body[at] <= _NINE:
        return 0, -1
    if body[at] == _ZERO:
        return 0, at + 1  # JSON has no leading zero: a digit after it ends the match
    value = 0
    end = at
    while end < size and end - at < _MAX_DIGITS and _ZERO <= body[end] <= _NINE:
        value = value * 10 + body[end] - _ZERO
        end += 1
    return (-value if negative else value), end


def _scan_set(body: bytes) -> tuple[str, str, Value, int] | None:
    """:func:`read_set` by one scan of the body's bytes."""
    if not body.startswith(_SET_OPEN):
        return None
    htname_at = len(_SET_OPEN)
    htname_end = _text_end(body, htname_at)
    if htname_end < 0 or not _literal(body, htname_end, _SET_CNAME):
        return None
    cname_at = htname_end + len(_SET_CNAME)
    cname_end = _text_end(body, cname_at)
    if cname_end < 0 or not _literal(body, cname_end, _SET_TYPE):
        return None
    type_, at = _number(body, cname_end + len(_SET_TYPE))
    if at < 0:
        return None
    text: bytes | None = None
    number: int | None = None
    if _literal(body, at, _SET_STRVAL):
        text_at = at + len(_SET_STRVAL)
        text_end = _text_end(body, text_at)
        if text_end < 0 or not _literal(body, text_end, _SET_MODE_AFTER_TEXT):
            return None
        text = body[text_at:text_end]
        at = text_end + len(_SET_MODE_AFTER_TEXT)
    elif _literal(body, at, _SET_INTVAL):
        number, at = _number(body, at + len(_SET_INTVAL))
        if at < 0 or not _literal(body, at, _SET_MODE):
            return None
        at += len(_SET_MODE)
    else:
        return None
    mode, at = _number(body, at)
    if at < 0 or not _literal(body, at, b"}"):
        return None
    for index in range(at + 1, len(body)):
        byte = body[index]
        if byte != 0x20 and byte != 0x09 and byte != 0x0A and byte != 0x0D:
            return None  # anything but JSON's whitespace after the object
    return _usual_set(
        body[htname_at:htname_end], body[cname_at:cname_end], type_, text, number, mode
    )


def _usual_set(
    htname: bytes, cname: bytes, type_: int, text: bytes | None, number: int | None, mode: int
) -> tuple[str, str, Value, int] | None:
    """The parts of a usual SET checked and decoded as the full reading would: None
    where it would read them otherwise (or refuse them)."""
    if not (INT32_MIN <= type_ <= INT32_MAX and INT32_MIN <= mode <= INT32_MAX):
        return None
    try:
        value: Value
        if type_ & AVP_VAL_STR:
            if text is None:
                return None  # a string type with an integer: the value is missing
            value = text.decode("utf-8", "surrogatepass")
        else:
            if number is None or not INT32_MIN <= number <= INT32_MAX:
                return None
            value = number
        return (
            htname.decode("utf-8", "surrogatepass"),
            cname.decode("utf-8", "surrogatepass"),
            value,
            mode,
        )
    except UnicodeDecodeError:
        return None  # not UTF-8: the full reading says so


#: Whether this module runs compiled (mypyc makes its functions built-in ones, not
#: Python functions): :func:`read_set` scans then, and matches as Python.
_SCANNED: Final = not isinstance(_scan_set, types.FunctionType)
#: Whether the native codec reads the usual SET (see :func:`read_set`).
_NATIVE: Final = _sipscan.AVAILABLE


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
