"""``/v1/htable``: Kamailio's htables, read from the gateway's replica and written to
every node of the bus.

Writes are Kamailio's own htable actions, built by :mod:`app.kamailio.htable_codec`
and checked before anything is sent (a 422 names the field): ``PUT`` sends a SET
(action 2) and, with ``expires``, a SET_EXPIRE (action 3) once every node has answered
the SET; ``DELETE`` sends action 4; ``POST .../delete`` action 5 (regex) or 6 (prefix).
Kamailio nodes apply what they receive and forward nothing, so the gateway sends to
every node itself; each answer is in the response, as with ``broadcast?wait=true``.
The gateway applies its own write to its replica too, so what a client sets it can
read back at once.

Reads come from the replica (:class:`~app.kamailio.htable.HtableMirror`); a WebSocket
``GET /v1/htable/{table}/changes`` streams its changes with the subscribe path's
offsets, resume and gap rules.
"""

from __future__ import annotations

import bisect
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, WebSocket
from pydantic import Field, field_validator

from app.api.deps import GatewayDep
from app.api.problems import UNREADABLE_BODY, ProblemError
from app.api.routes.peers import RESERVED, TimeoutQuery, answer
from app.api.schemas import OutModel, Problem, SendResults, StrictModel
from app.kamailio.htable import MAX_NAME, PEER_ID, HtableMirror
from app.kamailio.htable_codec import (
    INT32_MAX,
    INT32_MIN,
    DeleteCell,
    HtableMessage,
    RemoveCells,
    SetCell,
    SetCellExpire,
    build,
    compile_regex,
)
from app.kamailio.ws import NoSuchStream, serve_changes

router = APIRouter(prefix="/v1/htable", tags=["htable"])
ws_router = APIRouter(prefix="/v1/htable")

CHANGES_PATH = "/v1/htable/{table}/changes"

_NAME_PATTERN = r"^[^\x00]+$"
Table = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME,
        pattern=_NAME_PATTERN,
        description="the htable's name, as in Kamailio's configuration",
        examples=["ht"],
    ),
]
Key = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME,
        pattern=_NAME_PATTERN,
        description="the key (cell name); may contain '/'",
        examples=["greeting"],
    ),
]

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character, which Kamailio cannot carry")
    return value


class HtableSetIn(StrictModel):
    """A value for one key of a table, on every node."""

    value: str | Int32 = Field(
        description="a string, or an integer that fits 32 bits (Kamailio's int)",
        examples=["hello", 42],
    )
    expires: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = Field(
        None,
        description="seconds until the key expires (a SET_EXPIRE after the SET); Kamailio "
        "applies it only in a table with autoexpire",
    )

    @field_validator("value")
    @classmethod
    def _value(cls, value: str | int) -> str | int:
        return _no_nul(value) if isinstance(value, str) else value


class HtableDeleteIn(StrictModel):
    """Delete every key whose name (or string value) matches, on every node."""

    match: Literal["regex", "prefix"] = Field(
        description="regex: a POSIX extended regex, case-insensitive (action 5); prefix: "
        "starts with, case-sensitive (action 6)"
    )
    on: Literal["name", "value"] = Field(
        "name", description="match key names, or string values (integers never match)"
    )
    pattern: Annotated[str, Field(min_length=1, max_length=4096)]

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _no_nul(value)


class CellOut(OutModel):
    key: str
    value: str | int
    type: Literal["str", "int"]
    expires: float | None = Field(description="Unix time it expires at; null: never")
    updated: float = Field(description="Unix time the replica last set it")
    source: str | None = Field(
        description="the node whose message set it; null: this gateway's own write"
    )


class TableOut(OutModel):
    table: str
    cells: int = Field(description="keys in the replica matching the prefix")
    keys: list[CellOut]
    next: str | None = Field(description="pass as ?after= for the next page; null: last page")


class TableSummary(OutModel):
    table: str
    cells: int
    autoexpire: int | None = Field(
        description="seconds, when declared with --htable-autoexpire; null otherwise"
    )
    expiring: bool = Field(description="its cells expire (declared, or seen in a sync)")


class SyncStatusOut(OutModel):
    state: Literal["waiting", "requesting", "synced", "failed"]
    donor: str | None = Field(description="the node whose sync answer bootstrapped the replica")
    requests_sent: int = Field(description="sync requests sent (each to one node, once)")
    asked: list[str]
    resyncs: int = Field(description="syncs after the bus came back from a partition")


class TablesOut(OutModel):
    tables: list[TableSummary]
    cells: int = Field(description="keys in the replica, all tables")
    sync: SyncStatusOut


class HtableWriteOut(OutModel):
    table: str
    key: str | None
    applied: int = Field(description="keys this gateway's replica changed for it")
    results: SendResults = Field(description="every node's answer to the action")
    expire: SendResults | None = Field(
        None, description="with expires: every node's answer to the SET_EXPIRE"
    )


WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "the htable mirror is not running"},
    503: {"model": Problem, "description": "the gateway is stopping"},
    **RESERVED,
}
#: A route with a JSON body may also meet a body that is not JSON at all.
BODY_WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {**WRITE_RESPONSES, **UNREADABLE_BODY}


def _mirror(request: Request | WebSocket) -> HtableMirror:
    mirrors = getattr(request.app.state, "mirrors", None)
    mirror = mirrors.get("htable") if mirrors is not None else None
    if not isinstance(mirror, HtableMirror):
        raise ProblemError(404, "the htable mirror is not running (see --kamailio-mirrors)")
    return mirror


async def _send(gateway: GatewayDep, message: HtableMessage, timeout: float | None) -> SendResults:
    dispatch = await gateway.broadcast(
        PEER_ID, build(message), "application/json", wait=True, timeout=timeout
    )
    results, _ = answer(dispatch)
    assert isinstance(results, SendResults)
    return results


@router.get("", operation_id="htable_tables")
async def list_tables(request: Request) -> TablesOut:
    """The tables the replica holds, their key counts, and how its sync went."""
    mirror = _mirror(request)
    replica = mirror.replica
    now = mirror.clock()
    tables = [
        TableSummary(
            table=name,
            cells=sum(1 for _ in replica.keys(name, now)),
            autoexpire=replica.autoexpire.get(name),
            expiring=replica.has_autoexpire(name),
        )
        for name in sorted(replica.tables)
    ]
    return TablesOut(
        tables=tables,
        cells=sum(t.cells for t in tables),
        sync=SyncStatusOut.model_validate(mirror.bootstrap.status.as_dict()),
    )


@router.get("/{table}", operation_id="htable_table")
async def get_table(
    table: Table,
    request: Request,
    prefix: Annotated[str, Query(max_length=MAX_NAME, description="keys starting with")] = "",
    after: Annotated[
        str | None, Query(max_length=MAX_NAME, description="the next of a previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="keys per page")] = 100,
) -> TableOut:
    """A table's keys and values from the replica, in key order, a page at a time."""
    mirror = _mirror(request)
    now = mirror.clock()
    keys = sorted(k for k in mirror.replica.keys(table, now) if k.startswith(prefix))
    start = 0
    if after is not None:
        start = bisect.bisect_right(keys, after)
    page = keys[start : start + limit]
    out = [
        _cell(key, entry)
        for key in page
        if (entry := mirror.replica.get(table, key, now)) is not None
    ]
    more = start + limit < len(keys)
    return TableOut(table=table, cells=len(keys), keys=out, next=page[-1] if more else None)


def _cell(key: str, entry: Any) -> CellOut:
    return CellOut(
        key=key,
        value=entry.value,
        type="str" if isinstance(entry.value, str) else "int",
        expires=entry.expires or None,
        updated=round(entry.updated, 3),
        source=entry.sender,
    )


@router.get(
    "/{table}/{key:path}",
    operation_id="htable_get",
    responses={404: {"model": Problem, "description": "no such key in the replica"}},
)
async def get_key(table: Table, key: Key, request: Request) -> CellOut:
    """One key's value from the replica."""
    mirror = _mirror(request)
    entry = mirror.replica.get(table, key, mirror.clock())
    if entry is None:
        raise ProblemError(404, f"no key {key!r} in table {table!r} of the replica")
    return _cell(key, entry)


@router.put("/{table}/{key:path}", operation_id="htable_set", responses=BODY_WRITE_RESPONSES)
async def set_key(
    table: Table,
    key: Key,
    body: HtableSetIn,
    request: Request,
    gateway: GatewayDep,
    timeout: TimeoutQuery = None,
) -> HtableWriteOut:
    """Set a key on every node (action 2; with expires, then action 3), and in the
    replica; every node's answer to each."""
    mirror = _mirror(request)
    set_cell = SetCell(table, key, body.value)
    results = await _send(gateway, set_cell, timeout)
    applied = mirror.apply(set_cell, None)
    expire = None
    if body.expires is not None:
        set_expire = SetCellExpire(table, key, body.expires)
        expire = await _send(gateway, set_expire, timeout)
        applied += mirror.apply(set_expire, None)
    return HtableWriteOut(table=table, key=key, applied=applied, results=results, expire=expire)


@router.delete("/{table}/{key:path}", operation_id="htable_delete", responses=WRITE_RESPONSES)
async def delete_key(
    table: Table, key: Key, request: Request, gateway: GatewayDep, timeout: TimeoutQuery = None
) -> HtableWriteOut:
    """Delete a key on every node (action 4), and in the replica."""
    mirror = _mirror(request)
    message = DeleteCell(table, key)
    results = await _send(gateway, message, timeout)
    return HtableWriteOut(
        table=table, key=key, applied=mirror.apply(message, None), results=results, expire=None
    )


@router.post(
    "/{table}/delete", operation_id="htable_delete_matching", responses=BODY_WRITE_RESPONSES
)
async def delete_matching(
    table: Table,
    body: HtableDeleteIn,
    request: Request,
    gateway: GatewayDep,
    timeout: TimeoutQuery = None,
) -> HtableWriteOut:
    """Delete every key whose name (or string value) matches a regex (action 5) or
    starts with a prefix (action 6), on every node and in the replica."""
    mirror = _mirror(request)
    if body.match == "regex":
        try:
            compile_regex(body.pattern)
        except Exception as exc:  # re.error, and RecursionError on absurd patterns
            raise ProblemError(422, f"body.pattern: not a regex: {exc}") from None
    message = RemoveCells(table, "re" if body.match == "regex" else "sw", body.on, body.pattern)
    results = await _send(gateway, message, timeout)
    return HtableWriteOut(
        table=table, key=None, applied=mirror.apply(message, None), results=results, expire=None
    )


@ws_router.websocket("/{table}/changes")
async def changes(websocket: WebSocket, table: str) -> None:
    """Stream a table's changes: set, delete, expire (``?since=N&epoch=E`` resumes)."""

    def stream_for() -> Any:
        mirrors = getattr(websocket.app.state, "mirrors", None)
        mirror = mirrors.get("htable") if mirrors is not None else None
        if not isinstance(mirror, HtableMirror):
            raise NoSuchStream("the htable mirror is not running (see --kamailio-mirrors)")
        return mirror.stream_for(table)

    await serve_changes(websocket, stream_for)
