"""The core's dataclasses built per message write their ``__init__`` out (setup.py,
"Explicit __init__"): the one the dataclass decorator writes is interpreted even in the
compiled core, five to fourteen times slower than a compiled one.

These tests hold each written ``__init__`` to what the decorator would have written (the
same parameters in the same order, the same defaults, a fresh object for each
``default_factory``, frozen classes still frozen), run on both cores, and on the
compiled core check that each is compiled. A dataclass added to a compiled module must
be named here either way, so that one built per message is not missed.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections import deque
from collections.abc import Hashable
from typing import Any

import pytest

import app
from app.dmq.events import Delivery, SendOperation
from app.dmq.peers import PeerReply
from app.dmq.sip import Headers, SipRequest, SipResponse, SipUri
from app.dmq.timers import TimerQueue
from app.dmq.transaction import ClientState, Endpoint, ServerState, ServerTransaction

#: Built for every message (or every cell of a sync): their ``__init__`` is written out.
PER_MESSAGE = {
    "app.dmq.sip": ("SipRequest", "SipResponse"),
    "app.dmq.node": ("_Lane", "_Pending"),
    "app.dmq.events": ("NodeResult", "SendOperation", "SendCompleted"),
    "app.dmq.outbox": ("OutboxMessage",),
    "app.dmq.peers": ("PeerReply",),
    "app.dmq.transaction": ("FinalResult", "ClientTransaction", "ServerTransaction"),
    "app.kamailio.htable_codec": ("SetCell", "SetCellExpire", "DeleteCell", "Cell"),
}
#: Built once, per node or per peer: the decorator's ``__init__`` is good enough.
RARE = {
    "app.dmq.sip": (),
    "app.dmq.node": ("NodeStats", "_Parked"),
    "app.dmq.events": (
        "NodeStatusChanged",
        "OutboxDropped",
        "PeerReplyTimedOut",
        "HostLookupNeeded",
    ),
    "app.dmq.nodes": ("Node", "NodeLine", "ParsedNodeList"),
    "app.dmq.outbox": ("Outbox",),
    "app.dmq.peers": ("Peer",),
    "app.dmq.transaction": ("TimerSettings", "TransactionStats"),
    "app.kamailio.htable_codec": ("SyncRequest", "RemoveCells", "Unsupported", "SyncAnswer"),
    "app.kamailio.replica": (),
}

COMPILED_CORE = app.core() == "compiled" and os.environ.get(app.CORE_ENV) != "pure"


def _classes(table: dict[str, tuple[str, ...]]) -> list[type[Any]]:
    return [
        getattr(importlib.import_module(module), name)
        for module, names in table.items()
        for name in names
    ]


def _values(cls: type[Any]) -> list[object]:
    """A value for each field of ``cls``, in order, none equal to its default (the
    compiled classes check each value's type)."""
    endpoint = Endpoint("udp", "127.0.0.1", 5060)
    request = SipRequest("KDMQ", "sip:p@127.0.0.1", Headers([("x-test", "1")]), b"b")
    timer = TimerQueue().call_at(5.0, lambda: None)
    table: dict[str, list[object]] = {
        "SipRequest": ["KDMQ", "sip:p@h", Headers([("x-test", "1")]), b"body"],
        "SipResponse": [404, "Not Here", Headers([("x-test", "1")]), b"body"],
        "_Lane": [3, deque([(object(), object())])],
        "_Pending": [
            ServerTransaction("k", request, endpoint), request, "p", endpoint, 2.5, 1.5
        ],
        "OutboxMessage": [9, "p", b"body", "text/plain", ("X-A: 1",), 2, 3.5, 40],
        "PeerReply": [486, "Busy Here", "text/plain", b"body"],
        "FinalResult": [
            408, "Request Timeout", SipResponse(408, "Request Timeout"), True, True
        ],
        "ClientTransaction": [
            "z9hG4bKx", b"data", endpoint, lambda result, now: None,
            ClientState.COMPLETED, 0.5, 2, timer, timer,
        ],
        "ServerTransaction": ["k", request, endpoint, ServerState.COMPLETED],
        "SetCell": ["ht", "key", 42, 0, True],
        "SetCellExpire": ["ht", "key", 60],
        "DeleteCell": ["ht", "key"],
        "Cell": ["ht", "key", "value", 1_900_000_000],
        "NodeResult": [
            SipUri.parse("sip:127.0.0.1:5061"), 408, "Request Timeout", b"b", "text/plain",
            True, True, Delivery.QUEUED,
        ],
        "SendOperation": [4, "p", (SipUri.parse("sip:127.0.0.1:5061"),), [object()]],
        "SendCompleted": [SendOperation(1, "p", ())],
    }  # fmt: skip
    return table[cls.__name__]


def test_every_dataclass_of_the_compiled_modules_is_named() -> None:
    modules = set(PER_MESSAGE) | set(RARE)
    found = {
        f"{module}.{name}"
        for module in modules
        for name, value in vars(importlib.import_module(module)).items()
        if inspect.isclass(value) and value.__module__ == module and dataclasses.is_dataclass(value)
    }
    named = {f"{m}.{n}" for table in (PER_MESSAGE, RARE) for m, ns in table.items() for n in ns}
    assert found == named


@pytest.mark.parametrize("cls", _classes(PER_MESSAGE), ids=lambda c: c.__name__)
def test_written_init_takes_the_fields_as_the_generated_one_would(cls: type[Any]) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    values = _values(cls)
    positional = cls(*values)
    by_name = cls(**{f.name: v for f, v in zip(fields, values, strict=True)})
    for f, value in zip(fields, values, strict=True):
        # (the compiled core unboxes numbers: equal and of the same type, not the same)
        for made in (positional, by_name):
            assert getattr(made, f.name) == value and type(getattr(made, f.name)) is type(value)
    assert repr(positional) == repr(by_name)
    # dataclasses.replace goes through __init__ with every field by name.
    assert dataclasses.replace(positional) is not positional
    required = [v for f, v in zip(fields, values, strict=True) if _required(f)]
    least = cls(*required)
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert getattr(least, f.name) == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            first, second = getattr(least, f.name), getattr(cls(*required), f.name)
            assert type(first) is type(f.default_factory())
            assert first is not second, f"{f.name} is shared between instances"
    params = cls.__dataclass_params__
    if params.frozen:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(positional, fields[0].name, values[0])
        if all(isinstance(value, Hashable) for value in values):
            assert hash(positional) == hash(by_name)


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


@pytest.mark.skipif(COMPILED_CORE, reason="the signature of a compiled __init__ is not read")
@pytest.mark.parametrize("cls", _classes(PER_MESSAGE), ids=lambda c: c.__name__)
def test_written_init_has_the_generated_signature(cls: type[Any]) -> None:
    init = cls.__dict__["__init__"]
    assert init.__code__.co_filename.endswith(".py"), "the decorator wrote this __init__"
    parameters = list(inspect.signature(init).parameters.values())[1:]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, f in zip(parameters, fields, strict=True):
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        if f.default is not dataclasses.MISSING:
            assert parameter.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert parameter.default is None, f.name
        else:
            assert parameter.default is inspect.Parameter.empty, f.name


@pytest.mark.skipif(not COMPILED_CORE, reason="only on the compiled core")
@pytest.mark.parametrize("cls", _classes(PER_MESSAGE), ids=lambda c: c.__name__)
def test_written_init_is_compiled(cls: type[Any]) -> None:
    assert not inspect.isfunction(cls.__dict__["__init__"]), "an interpreted __init__"


def test_peer_reply_still_checks_its_code_and_reason() -> None:
    with pytest.raises(ValueError, match="final status code"):
        PeerReply(180)
    with pytest.raises(ValueError, match="single line"):
        PeerReply(200, "OK\r\nX: y")
    assert PeerReply() == PeerReply(200, "OK", None, b"")
