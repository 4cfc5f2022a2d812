"""``/v1/dialogs``: the calls up on the bus, from the gateway's replica of Kamailio's
``dialog`` peer (the dialog module with ``enable_dmq``).

Reads only. What the replica cannot know (:mod:`app.kamailio.dialogs`): no body says
which node owns a dialog (``origin`` is the node we first heard it from), and it holds
only dialogs created (or changed by a profile) since the gateway joined: a dialog sync
in Kamailio 5.6 makes every node asked broadcast every dialog to every node, so the
gateway asks one node for one only with ``--dialog-sync``. A WebSocket
``GET /v1/dialogs/changes`` streams ``created``, ``state``, ``removed`` and
``expired`` events (key: the dialog's id; data: the dialog, with ``previous`` for a
state change) with the subscribe path's offsets, resume and gap rules.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, WebSocket
from pydantic import Field

from app.api.problems import ProblemError
from app.api.schemas import OutModel, Problem
from app.kamailio.dialog import DialogState
from app.kamailio.dialogs import Dialog, DialogsMirror
from app.kamailio.stream import ChangeStream
from app.kamailio.ws import NoSuchStream, serve_changes

router = APIRouter(prefix="/v1/dialogs", tags=["dialogs"])
ws_router = APIRouter(prefix="/v1/dialogs")

CHANGES_PATH = "/v1/dialogs/changes"
MAX_ID = 1024
NOT_RUNNING = "the dialog mirror is not running (see --kamailio-mirrors)"

StateName = Literal["unconfirmed", "early", "confirmed_na", "confirmed", "deleted"]


class LegOut(OutModel):
    tag: str
    cseq: str
    route_set: str
    contact: str


class ProfileOut(OutModel):
    name: str
    value: str | None = None
    puid: str | None = None
    expires: int | None = None
    flags: int | None = None


class DialogOut(OutModel):
    id: str = Field(description="h_entry:h_id@origin: the replica's name for the dialog")
    origin: str = Field(
        description="the node the replica first heard of it from: its owner for a dialog "
        "seen live, maybe a relay for one learnt from a sync answer (no body says)"
    )
    h_entry: int
    h_id: int
    callid: str
    from_uri: str
    to_uri: str
    req_uri: str
    state: str = Field(description="unconfirmed, early, confirmed_na, confirmed or deleted")
    init_ts: int = Field(description="Unix time the dialog was created")
    start_ts: int = Field(description="Unix time it was confirmed; 0 before")
    lifetime: int = Field(description="seconds it may last once confirmed (0: not said yet)")
    caller: LegOut | None
    callee: LegOut | None
    vars: dict[str, str]
    profiles: list[ProfileOut]
    seen_from: list[str] = Field(description="every node that sent something about it")
    updated_at: float


class DialogSyncOut(OutModel):
    state: Literal["off", "waiting", "requesting", "synced", "failed"] = Field(
        description="off unless --dialog-sync: no dialog sync is asked for by default"
    )
    donor: str | None = Field(description="the node asked that answered the sync")
    requests_sent: int = Field(description="sync requests sent (each to one node, once)")
    asked: list[str]
    resyncs: int = Field(description="syncs after the bus came back from a partition")


class DialogsOut(OutModel):
    total: int = Field(description="dialogs matching the filter (live ones by default)")
    counts: dict[str, int] = Field(description="dialogs held in each state")
    items: list[DialogOut]
    next: str | None = Field(description="pass as ?after= for the next page; null: last page")
    sync: DialogSyncOut


def _mirror(request: Request) -> DialogsMirror:
    mirrors = getattr(request.app.state, "mirrors", None)
    mirror = mirrors.get("dialog") if mirrors is not None else None
    if not isinstance(mirror, DialogsMirror):
        raise ProblemError(404, NOT_RUNNING)
    return mirror


def _out(dialog: Dialog) -> DialogOut:
    return DialogOut.model_validate(dialog.to_json())


@router.get(
    "",
    operation_id="dialogs_list",
    responses={404: {"model": Problem, "description": "the dialog mirror is not running"}},
)
async def list_dialogs(
    request: Request,
    state: Annotated[
        StateName | None,
        Query(description="only dialogs in this state (default: every live one)"),
    ] = None,
    after: Annotated[
        str | None, Query(max_length=MAX_ID, description="the next of a previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="dialogs per page")] = 100,
) -> DialogsOut:
    """The dialogs up on the bus (every state but deleted, unless ``state`` says),
    in id order, a page at a time, and how many are held in each state."""
    mirror = _mirror(request)
    replica = mirror.replica
    chosen = replica.dialogs(DialogState[state.upper()] if state is not None else None)
    start = 0
    if after is not None:
        start = sum(1 for d in chosen if d.id <= after)  # sorted by id
    page = chosen[start : start + limit]
    more = start + limit < len(chosen)
    return DialogsOut(
        total=len(chosen),
        counts=replica.counts(),
        items=[_out(d) for d in page],
        next=page[-1].id if more and page else None,
        sync=DialogSyncOut.model_validate(mirror.sync_status.as_dict()),
    )


@router.get(
    "/{dialog_id}",
    operation_id="dialogs_get",
    responses={404: {"model": Problem, "description": "no such dialog in the replica"}},
)
async def get_dialog(
    dialog_id: Annotated[
        str,
        Path(
            min_length=1,
            max_length=MAX_ID,
            description="h_entry:h_id@origin, as listed",
            examples=["2502:1058@sip:127.0.0.1:5060"],
        ),
    ],
    request: Request,
) -> DialogOut:
    """One dialog of the replica."""
    found = _mirror(request).replica.find(dialog_id)
    if found is None:
        raise ProblemError(404, f"no dialog {dialog_id!r} in the replica")
    return _out(found)


@ws_router.websocket("/changes")
async def changes(websocket: WebSocket) -> None:
    """Stream created, state, removed and expired events (``?since=N&epoch=E``)."""

    def stream_for() -> ChangeStream:
        mirrors = getattr(websocket.app.state, "mirrors", None)
        mirror = mirrors.get("dialog") if mirrors is not None else None
        if not isinstance(mirror, DialogsMirror):
            raise NoSuchStream(NOT_RUNNING)
        return mirror.stream

    await serve_changes(websocket, stream_for)
