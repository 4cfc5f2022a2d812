"""NodeConfig refuses each bad setting with a ConfigError naming its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings

SERVER = SipUri.parse("sip:127.0.0.1:5060")


def build(**settings: Any) -> NodeConfig:
    settings.setdefault("server_address", SERVER)
    return NodeConfig(**settings)


CASES = [
    (
        {"server_address": SipUri.parse("sip:127.0.0.1:5060;transport=sctp")},
        "server_address",
        "server_address sip:127.0.0.1:5060;transport=sctp: the transport must be udp, tcp or tls",
    ),
    (
        {"server_address": SipUri.parse("sip:127.0.0.1")},
        "server_address",
        "server_address sip:127.0.0.1: give the port explicitly, because other nodes "
        "match us by the exact host:port we announce",
    ),
    (
        {"server_address": SipUri.parse("sip:dmq@127.0.0.1:5060")},
        "server_address",
        "server_address sip:dmq@127.0.0.1:5060: a node address has no user part",
    ),
    (
        {"notification_addresses": (SipUri.parse("sip:127.0.0.1:5061;transport=sctp"),)},
        "notification_addresses",
        "notification_addresses sip:127.0.0.1:5061;transport=sctp: "
        "the transport must be udp, tcp or tls",
    ),
    (
        {"notification_channel": ""},
        "notification_channel",
        "notification_channel '': must be a non-empty SIP user name "
        "(letters, digits, - _ . ! ~ * ' ( ))",
    ),
    (
        {"notification_channel": "a b"},
        "notification_channel",
        "notification_channel 'a b': must be a non-empty SIP user name "
        "(letters, digits, - _ . ! ~ * ' ( ))",
    ),
    ({"ping_interval": 0.5}, "ping_interval", "ping_interval 0.5: must be at least 1 second"),
    (
        {"ping_interval": math.nan},
        "ping_interval",
        "ping_interval nan: must be at least 1 second",
    ),
    (
        {"timers": TimerSettings(t1=-1)},
        "t1",
        "t1 -1: must be a positive, finite number of seconds",
    ),
    (
        {"timers": TimerSettings(t1=0.5, t2=0.0)},
        "t2",
        "t2 0.0: must be a positive, finite number of seconds",
    ),
    (
        {"timers": TimerSettings(t4=math.inf)},
        "t4",
        "t4 inf: must be a positive, finite number of seconds",
    ),
    (
        {"timers": TimerSettings(t1=2.0, t2=1.0)},
        "t2",
        "t2 1.0: must not be smaller than t1 (2 s), the first retransmission interval",
    ),
    (
        {"timers": TimerSettings(timer_f=0.0)},
        "timer_f",
        "timer_f 0.0: must be a positive, finite number of seconds",
    ),
    (
        {"max_stream_message": 1000},
        "max_stream_message",
        "max_stream_message 1000: must be at least 1024 bytes",
    ),
]


@pytest.mark.parametrize(("settings", "field", "message"), CASES)
def test_a_bad_setting_names_its_field(settings: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(**settings)
    assert caught.value.field == field
    assert str(caught.value) == message
    assert "--" not in str(caught.value), "fields, not command-line options"


def test_the_error_carries_the_value_and_the_bare_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        build(timers=TimerSettings(t1=-1))
    assert (caught.value.field, caught.value.value, caught.value.reason) == (
        "t1",
        -1,
        "must be a positive, finite number of seconds",
    )


def test_good_settings_are_accepted() -> None:
    config = build(
        notification_addresses=(SipUri.parse("sip:127.0.0.1:5061;transport=tcp"),),
        ping_interval=1,
        timers=TimerSettings(t1=0.05, t2=0.05, t4=1, timer_f=1),
        max_stream_message=1024,
    )
    assert config.timers.timer_f_value == 1
