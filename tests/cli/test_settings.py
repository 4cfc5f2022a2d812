"""``dmq-gateway serve``'s options: the environment, precedence, and every error.

In-process: the parser and the settings model are pure, and every error is raised
before anything is bound, so ``cli.main`` returns without serving.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import pytest

from app import cli
from app.api.limits import ServeLimits
from app.dmq.config import LOOPBACK_NETWORKS, NodeConfig
from app.dmq.errors import ConfigError
from app.dmq.sip import SipUri
from app.gateway.config import DEFAULT_QUEUE_LIMIT, GatewayConfig
from app.gateway.hub import DEFAULT_QUEUE_BYTES
from app.settings import ServeSettings, env_name, flag_name, load

TOKEN = "s3cret-token"

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DMQ_* variable from the machine; the default state directory in tmp_path."""
    for name in list(os.environ):
        if name.startswith("DMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    return tmp_path


def config(*argv: str) -> GatewayConfig:
    return cli.settings_from_args(cli.build_parser().parse_args(["serve", *argv]))


def error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line ``serve`` prints for a bad option, checking its form and exit code."""
    code = cli.main(["serve", *argv])
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.startswith("dmq-gateway: error: ") and err.count("\n") == 1, err
    return err.removeprefix("dmq-gateway: error: ").rstrip("\n")


# ---------------------------------------------------------------------- defaults


def test_defaults(clean_env: Path) -> None:
    settings = config()
    node = settings.node
    assert node.server_address == SipUri.parse("sip:127.0.0.1:5060")
    assert node.notification_addresses == ()
    assert node.notification_channel == "notification_peer"
    assert node.multi_notify is False
    assert node.ping_interval == 60.0
    assert (node.timers.t1, node.timers.t2, node.timers.timer_f) == (0.5, 4.0, None)
    assert node.trusted == LOOPBACK_NETWORKS
    assert node.max_stream_message == 1_048_576
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8000)
    assert settings.api_tokens == ()
    assert settings.public_health is False
    assert settings.state_dir == clean_env / "dmq-gateway" / "127.0.0.1_5060"
    assert settings.queue_limit == 1000
    assert settings.ws_deflate is False
    assert (settings.log_level, settings.log_format) == ("info", "text")
    assert settings.drop_rate == 0.0
    assert settings.startup_peers == ()


# ---------------------------------------------------------------------- the environment


def test_every_kind_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        # text
        "DMQ_SERVER_ADDRESS": "sip:10.0.0.5:5070;transport=tcp",
        "DMQ_NOTIFICATION_CHANNEL": "membership",
        "DMQ_HTTP": "0.0.0.0:8080",
        "DMQ_STATE_DIR": str(tmp_path / "state"),
        "DMQ_LOG_LEVEL": "DEBUG",  # case does not matter
        "DMQ_LOG_FORMAT": "json",
        # numbers
        "DMQ_PING_INTERVAL": "2.5",
        "DMQ_T1": "0.1",
        "DMQ_T2": "1",
        "DMQ_TIMER_F": "7",
        "DMQ_MAX_TCP_MESSAGE": "2048",
        "DMQ_WS_QUEUE_LIMIT": "5",
        "DMQ_BUNDLE_MAX_MESSAGES": "7",
        "DMQ_BUNDLE_MAX_BYTES": "4096",
        "DMQ_DROP_RATE": "0.25",
        # lists: commas, spaces, or both
        "DMQ_NOTIFICATION_ADDRESS": "sip:10.0.0.6:5060,sip:10.0.0.7:5060",
        "DMQ_PEER": "htable, usrloc  dialog",
        "DMQ_TRUSTED": "10.0.0.0/24 192.168.1.0/24",
        "DMQ_API_TOKEN": f"{TOKEN},other-token-2",
        # flags
        "DMQ_MULTI_NOTIFY": "true",
        "DMQ_WS_DEFLATE": "1",
        "DMQ_PUBLIC_HEALTH": "yes",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = config()
    node = settings.node
    assert node.server_address == SipUri.parse("sip:10.0.0.5:5070;transport=tcp")
    assert node.notification_channel == "membership"
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8080)
    assert settings.state_dir == tmp_path / "state"
    assert (settings.log_level, settings.log_format) == ("debug", "json")
    assert node.ping_interval == 2.5
    assert (node.timers.t1, node.timers.t2, node.timers.timer_f) == (0.1, 1.0, 7.0)
    assert node.max_stream_message == 2048
    assert settings.queue_limit == 5
    assert (settings.bundle_max_messages, settings.bundle_max_bytes) == (7, 4096)
    assert settings.drop_rate == 0.25
    assert [str(uri) for uri in node.notification_addresses] == [
        "sip:10.0.0.6:5060",
        "sip:10.0.0.7:5060",
    ]
    assert settings.startup_peers == ("htable", "usrloc", "dialog")
    assert node.trusted == (
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("192.168.1.0/24"),
    )
    assert settings.api_tokens == (TOKEN, "other-token-2")
    assert (node.multi_notify, settings.ws_deflate, settings.public_health) == (True,) * 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *((v, True) for v in ("1", "true", "TRUE", "yes", "on", "On")),
        *((v, False) for v in ("0", "false", "no", "off", "OFF")),
    ],
)
def test_flags_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    for name in ("DMQ_MULTI_NOTIFY", "DMQ_WS_DEFLATE", "DMQ_PUBLIC_HEALTH"):
        monkeypatch.setenv(name, value)
    settings = config()
    assert (settings.node.multi_notify, settings.ws_deflate, settings.public_health) == (
        expected,
    ) * 3


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DMQ_PING_INTERVAL", "DMQ_PEER", "DMQ_MULTI_NOTIFY", "DMQ_TIMER_F"):
        monkeypatch.setenv(name, "")
    settings = config()
    assert settings.node.ping_interval == 60.0
    assert settings.startup_peers == ()
    assert settings.node.multi_notify is False
    assert settings.node.timers.timer_f is None


# ---------------------------------------------------------------------- precedence


def test_command_line_over_environment_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMQ_PING_INTERVAL", "5")
    monkeypatch.setenv("DMQ_T1", "0.2")
    monkeypatch.setenv("DMQ_PEER", "from-env-1,from-env-2")
    monkeypatch.setenv("DMQ_MULTI_NOTIFY", "on")
    monkeypatch.setenv("DMQ_LOG_LEVEL", "warning")
    settings = config("--ping-interval", "9", "--peer", "from-cli", "--no-multi-notify")
    assert settings.node.ping_interval == 9.0  # command line
    assert settings.node.timers.t1 == 0.2  # environment
    assert settings.node.timers.t2 == 4.0  # default
    # A repeatable option given on the command line replaces the environment's list.
    assert settings.startup_peers == ("from-cli",)
    assert settings.node.multi_notify is False
    assert settings.log_level == "warning"
    assert config("--multi-notify").node.multi_notify is True


def test_public_health_option() -> None:
    assert config("--public-health").public_health is True
    assert config().public_health is False


# ---------------------------------------------------------------------- every error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ping-interval", "soon"], "--ping-interval 'soon': must be a number"),
        (["--ping-interval", "nan"], "--ping-interval 'nan': must be a finite number"),
        (["--max-tcp-message", "1.5"], "--max-tcp-message '1.5': must be a whole number"),
        (["--ws-queue-limit", "lots"], "--ws-queue-limit 'lots': must be a whole number"),
        (
            ["--server-address", "10.0.0.5:5060"],
            "--server-address '10.0.0.5:5060': not a SIP URI ('10.0.0.5:5060' is not a sip: URI)",
        ),
        (
            ["--notification-address", "sip:127.0.0.1:5061", "--notification-address", "x"],
            "--notification-address 'x': not a SIP URI ('x' is not a sip: URI)",
        ),
        (
            ["--trusted", "10.0.0.0/33"],
            "--trusted '10.0.0.0/33': not a network in CIDR form, e.g. 10.0.0.0/24",
        ),
        (
            ["--server-address", "sip:10.0.0.5:5060"],
            "--server-address sip:10.0.0.5:5060 is not a loopback address, but only loopback "
            "is trusted: pass --trusted CIDR (repeatable) for the networks of your DMQ nodes",
        ),
        (
            ["--http", "0.0.0.0:8000"],
            "--http 0.0.0.0:8000 is reachable beyond this machine, but no --api-token is "
            "set: pass --api-token (or DMQ_API_TOKEN), or bind the API to 127.0.0.1",
        ),
        (["--http", "8000"], "--http '8000': must be HOST:PORT, e.g. 127.0.0.1:8000"),
        (
            ["--http", "localhost:70000"],
            "--http 'localhost:70000': must be HOST:PORT, e.g. 127.0.0.1:8000",
        ),
        (
            ["--api-token", TOKEN, "--api-token", "short"],
            "--api-token: a token must be at least 8 printable characters, no spaces",
        ),
        (
            ["--log-level", "verbose"],
            "--log-level 'verbose': must be debug, info, warning or error",
        ),
        (["--log-format", "xml"], "--log-format 'xml': must be text or json"),
        (["--drop-rate", "1"], "--drop-rate 1: must be at least 0 and below 1"),
        (["--drop-rate", "-0.1"], "--drop-rate -0.1: must be at least 0 and below 1"),
        (["--ws-queue-limit", "0"], "--ws-queue-limit 0: must be at least 1"),
        (["--bundle-max-messages", "0"], "--bundle-max-messages 0: must be 1 to 1000"),
        (["--bundle-max-bytes", "100"], "--bundle-max-bytes 100: must be 256 to 1048576"),
        (
            ["--peer", "notification_peer"],
            "--peer 'notification_peer': that is the notification channel (--notification-channel)",
        ),
        (
            ["--notification-channel", "members", "--peer", "members"],
            "--peer 'members': that is the notification channel (--notification-channel)",
        ),
        (
            ["--peer", "ok", "--peer", "bad peer"],
            "--peer 'bad peer': a peer id is 1-128 letters, digits or - _ . ! ~ * ' ( )",
        ),
        (["--t1", "-1"], "--t1 -1: must be a positive number of seconds"),
        (["--t2", "0"], "--t2 0: must be a positive number of seconds"),
    ],
)
def test_each_error_is_one_sentence_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert error(capsys, *argv) == message


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DMQ_PING_INTERVAL", "soon", "DMQ_PING_INTERVAL 'soon': must be a number"),
        ("DMQ_MAX_TCP_MESSAGE", "1k", "DMQ_MAX_TCP_MESSAGE '1k': must be a whole number"),
        (
            "DMQ_MULTI_NOTIFY",
            "maybe",
            "DMQ_MULTI_NOTIFY 'maybe': must be true or false (1, yes, on or 0, no, off)",
        ),
        ("DMQ_LOG_FORMAT", "xml", "DMQ_LOG_FORMAT 'xml': must be text or json"),
        (
            "DMQ_TRUSTED",
            "10.0.0.0/8, nowhere",
            "DMQ_TRUSTED 'nowhere': not a network in CIDR form, e.g. 10.0.0.0/24",
        ),
        ("DMQ_WS_QUEUE_LIMIT", "0", "DMQ_WS_QUEUE_LIMIT 0: must be at least 1"),
        (
            "DMQ_BUNDLE_MAX_MESSAGES",
            "1001",
            "DMQ_BUNDLE_MAX_MESSAGES 1001: must be 1 to 1000",
        ),
        ("DMQ_T1", "-1", "DMQ_T1 -1: must be a positive number of seconds"),
        (
            "DMQ_API_TOKEN",
            "short",
            "DMQ_API_TOKEN: a token must be at least 8 printable characters, no spaces",
        ),
    ],
)
def test_an_error_from_the_environment_names_the_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert error(capsys) == message
    if variable == "DMQ_MULTI_NOTIFY":
        return  # on the command line a flag takes no value
    # The same value on the command line names the option instead.
    option = flag_name(variable.removeprefix("DMQ_").lower())
    given = value.split(",")[-1].strip() if variable == "DMQ_TRUSTED" else value
    assert error(capsys, option, given) == message.replace(variable, option)


@pytest.mark.parametrize(
    ("argv", "start", "why"),
    [
        (["--server-address", "sip:127.0.0.1"], "--server-address sip:127.0.0.1", "port"),
        (
            ["--server-address", "sip:127.0.0.1:5060;transport=sctp"],
            "--server-address ",
            "udp, tcp or tls",
        ),
        (
            ["--notification-address", "sip:127.0.0.1:5061;transport=sctp"],
            "--notification-address sip:127.0.0.1:5061;transport=sctp",
            "transport",
        ),
        (["--notification-channel", "a b"], "--notification-channel 'a b'", "SIP user"),
        (["--ping-interval", "0.5"], "--ping-interval 0.5", "at least 1 second"),
        (["--t1", "1", "--t2", "0.5"], "--t2 0.5", "smaller"),
        (["--timer-f", "-2"], "--timer-f -2", "positive"),
        (["--max-tcp-message", "100"], "--max-tcp-message 100", "at least 1024"),
    ],
)
def test_core_errors_name_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], start: str, why: str
) -> None:
    """NodeConfig's own checks, through the real core, come out naming the option."""
    message = error(capsys, *argv)
    assert message.startswith(start), message
    assert why in message


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("server_address", SipUri.parse("sip:127.0.0.1"), "--server-address sip:127.0.0.1"),
        (
            "notification_addresses",
            SipUri.parse("sip:127.0.0.1:5061;transport=sctp"),
            "--notification-address sip:127.0.0.1:5061;transport=sctp",
        ),
        ("notification_channel", "a b", "--notification-channel 'a b'"),
        ("ping_interval", 0.5, "--ping-interval 0.5"),
        ("t1", -1.0, "--t1 -1"),
        ("t2", 0.25, "--t2 0.25"),
        ("timer_f", 0.0, "--timer-f 0"),
        ("max_stream_message", 100, "--max-tcp-message 100"),
        ("drop_rate", 1.5, "--drop-rate 1.5"),
        ("trusted", None, "--trusted"),
    ],
)
def test_core_fields_map_to_their_option(field: str, value: object, option: str) -> None:
    settings = load({})
    error = ConfigError("must be better", field=field, value=value)
    assert settings.describe(error) == f"{option}: must be better"


def test_core_field_set_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DMQ_MAX_TCP_MESSAGE", "100")
    from_env = load({})
    error = ConfigError("must be at least 1024 bytes", field="max_stream_message", value=100)
    assert from_env.describe(error) == "DMQ_MAX_TCP_MESSAGE 100: must be at least 1024 bytes"
    from_cli = load({"max_tcp_message": "100"})
    assert from_cli.describe(error) == "--max-tcp-message 100: must be at least 1024 bytes"


def test_core_errors_without_a_field_or_option_stand_as_they_are() -> None:
    settings = load({})
    assert settings.describe(ConfigError("--t1 must be positive")) == "--t1 must be positive"
    # No option sets T4: the core's own wording stays.
    assert settings.describe(ConfigError("must be positive", field="t4", value=-1.0)) == (
        "t4 -1.0: must be positive"
    )


# ---------------------------------------------------------------------- help and version


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from app import __version__, core

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"dmq-gateway {__version__} (core: {core()})\n"


def test_serve_help_shows_every_option_with_its_default_and_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in ServeSettings.model_fields:
        assert flag_name(name) in text
        assert f"[env {env_name(name)}]" in text
    assert "(default: 60) [env DMQ_PING_INTERVAL]" in text
    assert "(default: 64*T1) [env DMQ_TIMER_F]" in text
    assert "(default: loopback) [env DMQ_TRUSTED]" in text
    assert "(default: off) [env DMQ_PUBLIC_HEALTH]" in text
    assert text.count("(default: ") == len(ServeSettings.model_fields)


@pytest.mark.parametrize("command", ["nodes", "peers", "broadcast", "send", "subscribe"])
def test_client_help_shows_defaults_and_variables(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: http://127.0.0.1:8000) [env DMQ_URL]" in text
    assert "[env DMQ_API_TOKEN]" in text
    if command in ("broadcast", "send"):
        assert "application/json if the body parses as JSON" in text


# ---------------------------------------------------------------------- bounds


BOUND_OPTIONS = [
    "--tcp-max-header",
    "--tcp-max-connections",
    "--tcp-max-connections-per-source",
    "--tcp-idle-timeout",
    "--tcp-message-timeout",
    "--tcp-write-buffer",
    "--tcp-max-buffered",
    "--dns-max-lookups",
    "--http-max-connections",
    "--http-header-timeout",
    "--http-keep-alive-timeout",
    "--http-max-header",
    "--http-max-body",
    "--ws-max-frame",
    "--ws-max-frames-per-second",
    "--dns-timeout",
    "--dns-negative-ttl",
    "--refusal-log-interval",
]


@pytest.mark.parametrize("flag", BOUND_OPTIONS)
def test_a_bound_must_be_positive(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert error(capsys, flag, "0") == f"{flag} 0: must be positive"


def test_a_bound_from_the_environment_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMQ_HTTP_MAX_BODY", "-5")
    assert error(capsys) == "DMQ_HTTP_MAX_BODY -5: must be positive"
    monkeypatch.setenv("DMQ_HTTP_MAX_BODY", "lots")
    assert error(capsys) == "DMQ_HTTP_MAX_BODY 'lots': must be a whole number"


def test_bounds_reach_the_driver_and_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMQ_TCP_IDLE_TIMEOUT", "30")
    settings = load({"tcp_max_connections": "9", "ws_max_frame": "1024", "max_tcp_message": "9000"})
    limits = settings.limits()
    assert limits.transport.max_connections == 9
    assert limits.transport.idle_timeout == 30.0
    assert limits.transport.max_connections_per_source == 32  # the default
    assert limits.api.ws_max_frame == 1024
    assert limits.api.max_message_body == 9000  # a broadcast may carry one TCP message
    assert limits.api.max_body == 65_536


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ws-queue-bytes", "1023"], "--ws-queue-bytes 1023: must be at least 1024 bytes"),
        (["--ws-queue-bytes", "4k"], "--ws-queue-bytes '4k': must be a whole number"),
        (["--max-nodes", "0"], "--max-nodes 0: must be a whole number, at least 1"),
        (
            ["--max-new-nodes-per-list", "0"],
            "--max-new-nodes-per-list 0: must be a whole number, at least 1",
        ),
        (
            ["--max-new-nodes-per-second", "0"],
            "--max-new-nodes-per-second 0: must be a positive, finite number",
        ),
        (
            ["--outbox-max-messages", "-1"],
            "--outbox-max-messages -1: must be a whole number, 0 or more",
        ),
        (["--outbox-max-bytes", "-1"], "--outbox-max-bytes -1: must be a whole number, 0 or more"),
        (
            ["--outbox-max-age", "0"],
            "--outbox-max-age 0: must be a positive, finite number of seconds",
        ),
        (["--outbox-window", "0"], "--outbox-window 0: must be a whole number, at least 1"),
        (
            ["--max-in-flight-per-node", "0"],
            "--max-in-flight-per-node 0: must be a whole number, at least 1",
        ),
        (["--dns-negative-ttl", "inf"], "--dns-negative-ttl 'inf': must be a finite number"),
        (["--refusal-log-interval", "-1"], "--refusal-log-interval -1: must be positive"),
    ],
)
def test_each_bound_error_is_one_sentence_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert error(capsys, *argv) == message


def test_a_core_bound_from_the_environment_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMQ_WS_QUEUE_BYTES", "100")
    assert error(capsys) == "DMQ_WS_QUEUE_BYTES 100: must be at least 1024 bytes"
    monkeypatch.delenv("DMQ_WS_QUEUE_BYTES")
    monkeypatch.setenv("DMQ_MAX_NODES", "0")
    assert error(capsys) == "DMQ_MAX_NODES 0: must be a whole number, at least 1"


def test_every_bound_reaches_where_it_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMQ_WS_QUEUE_BYTES", "65536")
    monkeypatch.setenv("DMQ_OUTBOX_MAX_AGE", "30")
    settings = load(
        {
            "dns_timeout": "1.5",
            "dns_negative_ttl": "2",
            "refusal_log_interval": "60",
            "max_nodes": "8",
            "max_new_nodes_per_list": "4",
            "max_new_nodes_per_second": "0.5",
            "outbox_max_messages": "0",
            "outbox_max_bytes": "1000",
            "outbox_window": "2",
            "max_in_flight_per_node": "3",
        }
    )
    limits = settings.limits()
    assert limits.api.ws_queue_bytes == 65_536
    transport = limits.transport
    assert (transport.dns_timeout, transport.dns_negative_ttl) == (1.5, 2.0)
    assert transport.log_interval == 60.0
    node = settings.gateway_config().node
    assert (node.max_nodes, node.max_new_nodes_per_list) == (8, 4)
    assert node.max_new_nodes_per_second == 0.5
    assert (node.outbox_max_messages, node.outbox_max_bytes) == (0, 1000)
    assert node.outbox_max_age == 30.0
    assert (node.outbox_window, node.max_in_flight_per_node) == (2, 3)


def test_the_options_defaults_are_the_bounds_defaults() -> None:
    """One default per bound: the option's is the one the code applies when built
    without options (tests, the library), so the README's table holds for both."""
    limits, node = ServeLimits(), NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5060"))
    defaults = {name: f.get_default() for name, f in ServeSettings.model_fields.items()}
    pairs = {
        "tcp_max_connections": limits.transport.max_connections,
        "tcp_max_connections_per_source": limits.transport.max_connections_per_source,
        "tcp_idle_timeout": limits.transport.idle_timeout,
        "tcp_message_timeout": limits.transport.message_timeout,
        "tcp_max_header": limits.transport.max_head,
        "tcp_write_buffer": limits.transport.write_high_water,
        "tcp_max_buffered": limits.transport.max_buffered,
        "dns_max_lookups": limits.transport.max_dns_lookups,
        "dns_timeout": limits.transport.dns_timeout,
        "dns_negative_ttl": limits.transport.dns_negative_ttl,
        "refusal_log_interval": limits.transport.log_interval,
        "http_max_connections": limits.api.max_connections,
        "http_header_timeout": limits.api.header_timeout,
        "http_keep_alive_timeout": limits.api.keep_alive_timeout,
        "http_max_header": limits.api.max_head,
        "http_max_body": limits.api.max_body,
        "max_tcp_message": limits.api.max_message_body,
        "ws_max_frame": limits.api.ws_max_frame,
        "ws_max_frames_per_second": limits.api.ws_frames_per_second,
        "ws_queue_bytes": limits.api.ws_queue_bytes,
        "ws_queue_limit": DEFAULT_QUEUE_LIMIT,
        "bundle_max_messages": GatewayConfig(node=node).bundle_max_messages,
        "bundle_max_bytes": GatewayConfig(node=node).bundle_max_bytes,
        "max_nodes": node.max_nodes,
        "max_new_nodes_per_list": node.max_new_nodes_per_list,
        "max_new_nodes_per_second": node.max_new_nodes_per_second,
        "outbox_max_messages": node.outbox_max_messages,
        "outbox_max_bytes": node.outbox_max_bytes,
        "outbox_max_age": node.outbox_max_age,
        "outbox_window": node.outbox_window,
        "max_in_flight_per_node": node.max_in_flight_per_node,
    }
    assert {name: defaults[name] for name in pairs} == pairs
    assert limits.api.ws_queue_bytes == DEFAULT_QUEUE_BYTES  # the hub's own default


def test_every_option_is_in_the_readme_with_its_variable() -> None:
    """The README's option tables name every option of ``serve``, its variable, and
    (for the bounds) its default as ``--help`` shows it."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `--")]
    for name, field in ServeSettings.model_fields.items():
        flag = re.compile(f"`{flag_name(name)}[ `]")
        row = next((r for r in rows if flag.search(r.split("|")[1])), None)
        assert row is not None, f"{flag_name(name)} is not in the README's option tables"
        assert env_name(name) in row, row
        default = field.get_default()
        if isinstance(default, int | float) and not isinstance(default, bool):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"`{shown}`" in row.split("|")[3], (name, row)


def test_api_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n  file-token-1  \n\nfile-token-2\n")
    path.chmod(0o640)  # the group may read it (a service's group): accepted
    config = load({"api_token_file": str(path), "api_token": [TOKEN]}).gateway_config()
    assert config.api_tokens == (TOKEN, "file-token-1", "file-token-2")
    path.chmod(0o604)
    assert error(capsys, "--api-token-file", str(path)) == (
        f"--api-token-file {str(path)!r}: every user of this machine may read it (mode "
        f"0604); make it private: chmod o-rwx {path}"
    )
    path.chmod(0o600)
    path.write_text("# nothing\n\n")
    assert error(capsys, "--api-token-file", str(path)) == (
        f"--api-token-file {str(path)!r}: holds no token (one a line)"
    )
    path.write_text("short\n")
    assert error(capsys, "--api-token-file", str(path)) == (
        f"--api-token-file {str(path)!r}: a token must be at least 8 printable characters, "
        "no spaces"
    )
    missing = tmp_path / "missing"
    assert error(capsys, "--api-token-file", str(missing)) == (
        f"--api-token-file {str(missing)!r}: cannot read it (No such file or directory)"
    )
