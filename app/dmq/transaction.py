"""RFC 3261 section 17 non-INVITE transactions, sans-IO.

Client transaction (section 17.1.2), one per request we send::

    TRYING --1xx--> PROCEEDING --final--> COMPLETED --Timer K--> TERMINATED
       |  \\__________ final ___________/^
       +-- Timer F or transport error: local 408 --> TERMINATED

Over UDP, Timer E retransmits the request at T1, 2*T1, 4*T1, ... capped at T2 (T2 at
once in PROCEEDING); over a reliable transport nothing is retransmitted and Timer K is 0.

Server transaction (section 17.2.2), one per request we receive::

    TRYING --final sent--> COMPLETED --Timer J--> TERMINATED

A retransmission that arrives in TRYING (the peer has not answered yet) is absorbed; in
COMPLETED it is answered with the cached final response. Either way it is **never
delivered twice** to a peer, which is where we differ from Kamailio's DMQ, whose
stateless replies make every UDP retransmission a new delivery.

The layer sends through a ``transmit(data, endpoint)`` callable and schedules through a
:class:`~app.dmq.timers.TimerQueue`; it has no clock of its own: every input carries
``now``, and a result callback is handed the ``now`` at which the result came.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from app.dmq.sip import SipRequest, SipResponse, Via, parse_cseq, via_param
from app.dmq.timers import TimerHandle, TimerQueue

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # without mypy, nothing is compiled and the mark means nothing

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls


#: RFC 3261 section 8.1.1.7: branches of RFC 3261 elements start with this cookie.
MAGIC_COOKIE = "z9hG4bK"


class Endpoint(NamedTuple):
    """Where a message came from or goes to.

    ``connection`` names an existing stream connection (opaque to the core, chosen by
    the driver); a response to a request that came over a stream goes back on it
    (RFC 3261 section 18.2.2).
    """

    transport: str
    host: str
    port: int
    connection: int | None = None

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


# A plain Python class even in the compiled core: a compiled one would store an ``int``
# given for a ``float`` field as a float, and the configuration's error sentences
# (``t1 -1: must be...``) would change. It is read at start only.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class TimerSettings:
    """SIP timer values in seconds (RFC 3261 table 4)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    #: Timer F; ``None`` means 64*T1 as RFC 3261 says (Kamailio's fr_timer, 30 s).
    timer_f: float | None = None

    @property
    def timer_f_value(self) -> float:
        return self.timer_f if self.timer_f is not None else 64 * self.t1

    @property
    def timer_j_value(self) -> float:
        """How long an answered request is remembered (RFC 3261: 64*T1 over UDP).

        Never shorter than Timer F: a sender may retransmit until its Timer F fires,
        and a retransmission that arrives after we forgot the request would be
        delivered a second time.
        """
        return max(64 * self.t1, self.timer_f_value)


class ClientState(enum.Enum):
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    TERMINATED = "terminated"


class ServerState(enum.Enum):
    TRYING = "trying"
    COMPLETED = "completed"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class FinalResult:
    """How a client transaction ended: the final response, or a local failure."""

    code: int
    reason: str
    response: SipResponse | None = None
    #: True when no response came before Timer F (a local 408).
    timed_out: bool = False
    #: True when the transport could not deliver the request (connection refused...).
    transport_error: bool = False

    def __init__(
        self,
        code: int,
        reason: str,
        response: SipResponse | None = None,
        timed_out: bool = False,
        transport_error: bool = False,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "response", response)
        object.__setattr__(self, "timed_out", timed_out)
        object.__setattr__(self, "transport_error", transport_error)

    @property
    def local(self) -> bool:
        """A failure generated here, not an answer from the other node."""
        return self.timed_out or self.transport_error


#: ``on_result(result, now)``: how a client transaction ended, and when.
ResultCallback = Callable[[FinalResult, float], None]
Transmit = Callable[[bytes, Endpoint], None]
#: How a final response is made again for a retransmitted request: what the node
#: answered, ``(code, reason, content_type, body, extra_header_lines)``, which together
#: with the request's own headers gives the response byte for byte (see
#: :data:`Rebuild`). Typed as a tuple of any length so that the compiled core keeps it
#: as the one Python object it was given: as a fixed-length tuple type it would be
#: unboxed and boxed again, a new tuple for every transaction that keeps it, where the
#: usual answer's recipe is meant to be one object shared by all of them.
Recipe = tuple[Any, ...]
#: Makes the final response of a recipe for a request (the node's response builder).
Rebuild = Callable[[SipRequest, Recipe], bytes]


@dataclass(slots=True, eq=False)
class ClientTransaction:
    branch: str
    data: bytes
    destination: Endpoint
    on_result: ResultCallback
    state: ClientState = ClientState.TRYING
    interval: float = 0.0
    retransmissions: int = 0
    timer_e: TimerHandle | None = None
    timer_f: TimerHandle | None = None

    def __init__(
        self,
        branch: str,
        data: bytes,
        destination: Endpoint,
        on_result: ResultCallback,
        state: ClientState = ClientState.TRYING,
        interval: float = 0.0,
        retransmissions: int = 0,
        timer_e: TimerHandle | None = None,
        timer_f: TimerHandle | None = None,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.branch = branch
        self.data = data
        self.destination = destination
        self.on_result = on_result
        self.state = state
        self.interval = interval
        self.retransmissions = retransmissions
        self.timer_e = timer_e
        self.timer_f = timer_f


@dataclass(slots=True, eq=False)
class ServerTransaction:
    """A request waiting for its peer's answer (state TRYING).

    Once answered, the transaction lives on for Timer J only as its cached response
    in :attr:`TransactionLayer.completed`: at 10 000 requests/s Timer J (32 s) keeps
    some 300 000 of them, so they are kept as plain tuples that the garbage collector
    doesn't need to track.
    """

    key: str
    request: SipRequest
    source: Endpoint
    state: ServerState = ServerState.TRYING

    def __init__(
        self,
        key: str,
        request: SipRequest,
        source: Endpoint,
        state: ServerState = ServerState.TRYING,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.key = key
        self.request = request
        self.source = source
        self.state = state


@dataclass(slots=True)
class TransactionStats:
    """Counters a driver can export (Prometheus, logs)."""

    retransmissions_sent: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    retransmissions_absorbed: int = 0
    responses_resent: int = 0
    stray_responses: int = 0
    provisional_received: int = 0


def server_transaction_key(request: SipRequest, top_via: Via) -> str:
    """Match retransmissions to a server transaction (RFC 3261 section 17.2.3).

    RFC 3261 branches identify the transaction together with the sent-by and the
    method; for older (RFC 2543) peers fall back to Call-ID, CSeq, From tag and Via.
    """
    branch = via_param(top_via, "branch") or ""
    if branch.startswith(MAGIC_COOKIE):
        return f"{branch} {top_via.host}:{top_via.port or ''} {request.method}"
    headers = request.headers
    return "\n".join(
        (
            "2543",
            headers.get("call-id") or "",
            headers.get("cseq") or "",
            headers.get("from") or "",
            headers.get("via") or "",
        )
    )


class TransactionLayer:
    """All live transactions of one node, keyed for matching."""

    def __init__(
        self,
        timers: TimerQueue,
        settings: TimerSettings,
        transmit: Transmit,
        rebuild: Rebuild | None = None,
    ):
        self.timers = timers
        self.settings = settings
        self.transmit = transmit
        #: With it, an answered transaction keeps its response's recipe rather than
        #: its bytes (see :meth:`respond`).
        self.rebuild = rebuild
        self._timer_j_seconds = settings.timer_j_value
        self.clients: dict[str, ClientTransaction] = {}
        #: Server transactions whose peer has not answered yet.
        self.servers: dict[str, ServerTransaction] = {}
        #: Answered server transactions (COMPLETED, over UDP): key -> (final response
        #: or its recipe, transport, host, port, connection, Timer J deadline). A plain
        #: tuple of strings and numbers, which the cyclic collector stops tracking: at
        #: 1 000 requests a second Timer J keeps 32 000 of them, and a tracked object
        #: each would be walked by every full collection (a NamedTuple is always
        #: tracked).
        self.completed: dict[str, tuple[bytes | Recipe, str, str, int, int | None, float]] = {}
        #: (Timer J deadline, key) in deadline order: Timer J is the same for every
        #: transaction, so a FIFO is a priority queue here, swept by one timer.
        self._expiry: deque[tuple[float, str]] = deque()
        self._sweeper: TimerHandle | None = None
        #: Answered client transactions (COMPLETED, over UDP), absorbing retransmitted
        #: final responses for Timer K: branch -> (method, Timer K deadline). The
        #: transaction itself (its request, its result callback and all the callback
        #: holds: the operation, its results) is let go as soon as the final response
        #: is handed on, instead of living 5 s more in the collector's sight.
        self.absorbing: dict[str, tuple[str, float]] = {}
        self._k_expiry: deque[tuple[float, str]] = deque()
        self._k_sweeper: TimerHandle | None = None
        self.stats = TransactionStats()

    # ------------------------------------------------------------------ client side

    def send_request(
        self,
        branch: str,
        data: bytes,
        destination: Endpoint,
        now: float,
        on_result: ResultCallback,
        *,
        retransmit: bool = True,
    ) -> ClientTransaction:
        """Start a client transaction: send now, retransmit (UDP) until answered.

        ``retransmit=False`` sends a UDP request once (Timer F still ends the wait):
        for a request whose receiver does not absorb retransmissions and would do its
        work again for each copy (a Kamailio 5.6 node answering a sync request)."""
        ct = ClientTransaction(branch, data, destination, on_result)
        self.clients[branch] = ct
        if not destination.reliable and retransmit:
            ct.interval = self.settings.t1
            ct.timer_e = self.timers.call_at(now + ct.interval, self._timer_e, ct)
        ct.timer_f = self.timers.call_at(now + self.settings.timer_f_value, self._timer_f, ct)
        self.transmit(data, destination)
        return ct

    def _timer_e(self, now: float, ct: ClientTransaction) -> None:
        if ct.state not in (ClientState.TRYING, ClientState.PROCEEDING):
            return
        self.transmit(ct.data, ct.destination)
        ct.retransmissions += 1
        self.stats.retransmissions_sent += 1
        if ct.state is ClientState.TRYING:
            ct.interval = min(2 * ct.interval, self.settings.t2)
        else:
            ct.interval = self.settings.t2
        ct.timer_e = self.timers.call_at(now + ct.interval, self._timer_e, ct)

    def _timer_f(self, now: float, ct: ClientTransaction) -> None:
        if ct.state not in (ClientState.TRYING, ClientState.PROCEEDING):
            return
        self.stats.timeouts += 1
        self._terminate_client(ct)
        ct.on_result(FinalResult(408, "Request Timeout", timed_out=True), now)

    def _terminate_client(self, ct: ClientTransaction) -> None:
        ct.state = ClientState.TERMINATED
        for handle in (ct.timer_e, ct.timer_f):
            if handle is not None:
                handle.cancel()
        ct.timer_e = ct.timer_f = None
        if self.clients.get(ct.branch) is ct:
            del self.clients[ct.branch]

    def receive_response(self, response: SipResponse, top_via: Via, now: float) -> bool:
        """Hand a response to its client transaction; False when none matches."""
        branch = via_param(top_via, "branch") or ""
        ct = self.clients.get(branch)
        if ct is None:
            absorbing = self.absorbing.get(branch)
            if absorbing is not None and _cseq_method(response) in ("KDMQ", absorbing[0]):
                # Timer K absorbs retransmitted final responses.
                return True
            self.stats.stray_responses += 1
            return False
        method = _cseq_method(response)
        if method != "KDMQ" and method != _method_of(ct.data):
            self.stats.stray_responses += 1
            return False
        if response.code < 200:
            self.stats.provisional_received += 1
            if ct.state is ClientState.TRYING:
                ct.state = ClientState.PROCEEDING
            return True
        # Final response: stop E and F; over UDP linger for Timer K (T4), over a
        # reliable transport K is zero.
        for handle in (ct.timer_e, ct.timer_f):
            if handle is not None:
                handle.cancel()
        ct.timer_e = ct.timer_f = None
        del self.clients[ct.branch]
        if ct.destination.reliable:
            ct.state = ClientState.TERMINATED
        else:
            ct.state = ClientState.COMPLETED
            deadline = now + self.settings.t4
            self.absorbing[ct.branch] = (_method_of(ct.data), deadline)
            self._k_expiry.append((deadline, ct.branch))
            if self._k_sweeper is None:
                self._k_sweeper = self.timers.call_at(deadline, self._timer_k)
        ct.on_result(FinalResult(response.code, response.reason, response), now)
        return True

    def _timer_k(self, now: float) -> None:
        """Terminate every client transaction whose Timer K has fired (T4 is the same
        for all, so the FIFO is in deadline order)."""
        self._k_sweeper = None
        expiry = self._k_expiry
        absorbing = self.absorbing
        while expiry and expiry[0][0] <= now:
            deadline, branch = expiry.popleft()
            entry = absorbing.get(branch)
            if entry is not None and entry[1] == deadline:
                del absorbing[branch]
        if expiry:
            self._k_sweeper = self.timers.call_at(expiry[0][0], self._timer_k)

    def transport_error(self, destination: Endpoint, now: float) -> int:
        """The driver could not reach ``destination``: fail its pending requests.

        RFC 3261 section 17.1.4 says a transport error ends the transaction at once
        rather than waiting for Timer F.
        """
        failed = [
            ct
            for ct in self.clients.values()
            if ct.state in (ClientState.TRYING, ClientState.PROCEEDING)
            and ct.destination.transport == destination.transport
            and ct.destination.host == destination.host
            and ct.destination.port == destination.port
        ]
        for ct in failed:
            self.stats.transport_errors += 1
            self._terminate_client(ct)
            ct.on_result(FinalResult(408, "Request Timeout", transport_error=True), now)
        return len(failed)

    # ------------------------------------------------------------------ server side

    def receive_request(
        self, request: SipRequest, top_via: Via, source: Endpoint
    ) -> ServerTransaction | None:
        """Open a server transaction for a new request.

        Returns ``None`` for a retransmission, which this call has already dealt with
        (absorbed, or answered again from the cached final response).
        """
        key = server_transaction_key(request, top_via)
        done = self.completed.get(key)
        if done is not None:
            self.stats.responses_resent += 1
            response = done[0]
            if not isinstance(response, bytes):
                assert self.rebuild is not None  # a recipe is kept only with it
                response = self.rebuild(request, response)
            self.transmit(response, Endpoint(done[1], done[2], done[3], done[4]))
            return None
        if key in self.servers:
            self.stats.retransmissions_absorbed += 1
            return None
        st = ServerTransaction(key, request, source)
        self.servers[key] = st
        return st

    def respond(
        self,
        st: ServerTransaction,
        data: bytes,
        destination: Endpoint,
        now: float,
        recipe: Recipe | None = None,
    ) -> bool:
        """Send the final response of a server transaction and keep it for Timer J.

        With a ``recipe`` (and a :attr:`rebuild`), Timer J keeps the recipe instead of
        the response's bytes, and a retransmission is answered with the response
        rebuilt from its own headers, which are the original's: a retransmitted request
        is the same request. Most of a response is those headers copied, so this keeps
        about half the memory (at 20 000 requests a second Timer J holds 640 000
        answers), and the usual recipe (200, no body) is one object for them all."""
        if st.state is not ServerState.TRYING:
            return False
        st.state = ServerState.COMPLETED
        self.transmit(data, destination)
        if self.servers.get(st.key) is st:
            del self.servers[st.key]
        if destination.transport != "udp":  # reliable (the property costs a lookup)
            st.state = ServerState.TERMINATED
            return True
        deadline = now + self._timer_j_seconds
        transport, host, port, connection = destination
        kept: bytes | Recipe = data if recipe is None or self.rebuild is None else recipe
        self.completed[st.key] = (kept, transport, host, port, connection, deadline)
        self._expiry.append((deadline, st.key))
        if self._sweeper is None:
            self._sweeper = self.timers.call_at(deadline, self._timer_j)
        return True

    def _timer_j(self, now: float) -> None:
        """Terminate every server transaction whose Timer J has fired."""
        self._sweeper = None
        expiry = self._expiry
        completed = self.completed
        while expiry and expiry[0][0] <= now:
            deadline, key = expiry.popleft()
            entry = completed.get(key)
            if entry is not None and entry[5] == deadline:
                del completed[key]
        if expiry:
            self._sweeper = self.timers.call_at(expiry[0][0], self._timer_j)


def _cseq_method(response: SipResponse) -> str:
    try:
        return parse_cseq(response.headers.get("cseq") or "")[1]
    except ValueError:
        return ""


def _method_of(data: bytes) -> str:
    if data.startswith(b"KDMQ "):
        return "KDMQ"  # what the node sends, and a constant is cheaper than a decode
    return data[: data.find(b" ")].decode("ascii", "replace")
