"""``/v1/registrations``: every contact registered anywhere on the bus, from the
gateway's replica of Kamailio's ``usrloc`` peer (dmq_usrloc).

Reads only: the replica (:class:`~app.kamailio.registrations.RegistrationsMirror`) is
kept by what the Kamailio nodes replicate and bootstrapped with one sync request to one
node. A WebSocket ``GET /v1/registrations/changes`` streams ``register``, ``refresh``,
``unregister`` and ``expire`` events (key: the contact's ``ruid``; data: the contact)
with the subscribe path's offsets, resume and gap rules.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, WebSocket
from pydantic import Field

from app.api.problems import ProblemError
from app.api.routes.htable import SyncStatusOut
from app.api.schemas import OutModel, Problem
from app.kamailio.registrations import Registration, RegistrationsMirror
from app.kamailio.stream import ChangeStream
from app.kamailio.ws import NoSuchStream, serve_changes

router = APIRouter(prefix="/v1/registrations", tags=["registrations"])
ws_router = APIRouter(prefix="/v1/registrations")

CHANGES_PATH = "/v1/registrations/changes"
#: The longest AOR (or prefix, or cursor) the API takes.
MAX_AOR = 1024
NOT_RUNNING = "the usrloc mirror is not running (see --kamailio-mirrors)"


class ContactOut(OutModel):
    aor: str
    ruid: str = Field(description="the contact's unique record id (Kamailio's ruid)")
    contact: str = Field(description="the Contact URI")
    expires: int = Field(description="Unix time it expires at; 0: a permanent contact")
    received: str = Field(description="the source address it registered from, or ''")
    path: str
    callid: str
    cseq: int
    user_agent: str
    instance: str = Field(description="+sip.instance, or ''")
    q: float | None = Field(description="the q-value (0..1), null when the contact gave none")
    flags: int
    cflags: int
    methods: int = Field(description="bit set of accepted methods; 4294967295: all")
    reg_id: int
    server_id: int
    last_modified: int
    socket: str | None = Field(
        description="proto:ip:port it registered on, when nodes set replicate_socket_info"
    )
    node: str = Field(
        description="the node that told the replica last (the body does not say which node "
        "the contact registered on: after a sync, the donor)"
    )
    updated_at: float = Field(description="Unix time the replica last changed it")


class AorOut(OutModel):
    aor: str
    contacts: list[ContactOut] = Field(description="best q first, then latest expiry first")


class RegistrationsOut(OutModel):
    aors: int = Field(description="AORs in the replica")
    contacts: int = Field(description="contacts in the replica, all AORs")
    matched: int = Field(description="AORs starting with the prefix")
    items: list[AorOut]
    next: str | None = Field(description="pass as ?after= for the next page; null: last page")
    sync: SyncStatusOut


def _mirror(request: Request) -> RegistrationsMirror:
    mirrors = getattr(request.app.state, "mirrors", None)
    mirror = mirrors.get("usrloc") if mirrors is not None else None
    if not isinstance(mirror, RegistrationsMirror):
        raise ProblemError(404, NOT_RUNNING)
    return mirror


def _contacts(registrations: list[Registration]) -> list[ContactOut]:
    return [ContactOut.model_validate(r.to_json()) for r in registrations]


@router.get(
    "",
    operation_id="registrations_list",
    responses={404: {"model": Problem, "description": "the usrloc mirror is not running"}},
)
async def list_registrations(
    request: Request,
    prefix: Annotated[
        str, Query(max_length=MAX_AOR, description="AORs starting with (case-sensitive)")
    ] = "",
    after: Annotated[
        str | None, Query(max_length=MAX_AOR, description="the next of a previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="AORs per page")] = 100,
) -> RegistrationsOut:
    """Every AOR registered on the bus with its contacts, in AOR order, a page at a time."""
    mirror = _mirror(request)
    replica = mirror.replica
    page, cursor, matched = replica.page(prefix, after, limit)
    return RegistrationsOut(
        aors=replica.aor_count,
        contacts=len(replica),
        matched=matched,
        items=[AorOut(aor=aor, contacts=_contacts(contacts)) for aor, contacts in page],
        next=cursor,
        sync=SyncStatusOut.model_validate(mirror.bootstrap.status.as_dict()),
    )


@router.get(
    "/{aor}",
    operation_id="registrations_aor",
    responses={404: {"model": Problem, "description": "no contact of this AOR in the replica"}},
)
async def get_aor(
    aor: Annotated[
        str,
        Path(
            min_length=1,
            max_length=MAX_AOR,
            description="the AOR as Kamailio keys it: user, or user@domain with use_domain",
            examples=["alice"],
        ),
    ],
    request: Request,
) -> AorOut:
    """Every contact of one AOR, wherever on the bus it registered."""
    contacts = _mirror(request).replica.contacts_of(aor)
    if not contacts:
        raise ProblemError(404, f"no contact of AOR {aor!r} in the replica")
    return AorOut(aor=aor, contacts=_contacts(contacts))


@ws_router.websocket("/changes")
async def changes(websocket: WebSocket) -> None:
    """Stream register, refresh, unregister and expire events (``?since=N&epoch=E``)."""

    def stream_for() -> ChangeStream:
        mirrors = getattr(websocket.app.state, "mirrors", None)
        mirror = mirrors.get("usrloc") if mirrors is not None else None
        if not isinstance(mirror, RegistrationsMirror):
            raise NoSuchStream(NOT_RUNNING)
        return mirror.stream

    await serve_changes(websocket, stream_for)
