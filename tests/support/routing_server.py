"""A real routing API on 127.0.0.1 that answers the lookup contract and misbehaves on demand.

Contract: ``POST <url>`` with ``{"ids": ["b1", ...]}`` answers 200 with
``{"results": [{"id": "b1", "routed": true}, ...]}``, every distinct requested id exactly once.

Why a real server and not a mock: the cleanup tool must fail safe when the routing API hangs,
resets the connection, dribbles its body or answers nonsense, and only a socket reproduces how
the HTTP client (timeouts, connection pool, framing) reacts to those.

Typical use::

    with RoutingServer(token="s3cret") as server:
        server.set_routed({"b1"})
        server.add_fault("status", code=503, retry_after=1, times=1)
        server.add_fault("hang", match=lambda ids: "b170" in ids)
        ...  # point the client at server.url

Every wait in here is bounded (by the stop Event, a poll interval or a hard cap), so a test that
forgets the server, or a client that never gives up, cannot hang the suite.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Literal, Self, get_args

HOST = "127.0.0.1"
DEFAULT_PATH = "/v1/routes/lookup"
# How often a hanging handler checks whether its client has given up.
HANG_POLL_SECONDS = 0.02
# A hang ends by itself after this long, so a client without a timeout still gets unstuck.
MAX_HANG_SECONDS = 60.0
# stop() gives the serving and handler threads this long, in total, to finish.
STOP_JOIN_SECONDS = 2.0
# Requests larger than this are refused rather than read into memory.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class FaultKind(StrEnum):
    """What an injected fault does to the answer (see `RoutingServer.add_fault`)."""

    HANG = "hang"
    STATUS = "status"
    RESET = "reset"
    DRIP = "drip"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    EMPTY = "empty"
    NULL = "null"
    HTML = "html"
    MISSING_ID = "missing_id"
    EXTRA_ID = "extra_id"
    DUPLICATE_ID = "duplicate_id"
    CONTRADICTORY_ID = "contradictory_id"
    MISTYPED = "mistyped"
    WRONG_RESULTS_KEY = "wrong_results_key"


MistypeHow = Literal["routed_string", "routed_int", "id_int", "results_dict", "missing_routed"]
TruncatedLength = Literal["actual", "full"]
IdsPredicate = Callable[[list[str]], bool]

_MISTYPE_HOWS: frozenset[str] = frozenset(get_args(MistypeHow))
_TRUNCATED_LENGTHS: frozenset[str] = frozenset(get_args(TruncatedLength))
# Which optional add_fault keywords each kind understands; anything else is a test bug.
_FAULT_PARAMS: dict[FaultKind, frozenset[str]] = {
    FaultKind.STATUS: frozenset({"code", "retry_after", "body"}),
    FaultKind.DRIP: frozenset({"interval"}),
    FaultKind.TRUNCATED: frozenset({"content_length"}),
    FaultKind.MISSING_ID: frozenset({"id"}),
    FaultKind.EXTRA_ID: frozenset({"id", "routed"}),
    FaultKind.DUPLICATE_ID: frozenset({"id"}),
    FaultKind.CONTRADICTORY_ID: frozenset({"id"}),
    FaultKind.MISTYPED: frozenset({"how"}),
    FaultKind.WRONG_RESULTS_KEY: frozenset({"key"}),
}
_HTML_ERROR_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>\n"
)
_ZERO_LINGER = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class RecordedRequest:
    """One POST the server received, recorded before it was answered (or not answered)."""

    path: str
    # The ids as the client sent them (duplicates kept); empty when the body broke the contract.
    ids: tuple[str, ...]
    # Header names are lower-cased so lookups need not guess the client's spelling.
    headers: dict[str, str]
    body: bytes
    # time.monotonic() when the request was read.
    received_at: float
    # "ok", "unauthorized", "bad_request", or the FaultKind value that answered.
    kind: str


@dataclass
class _Fault:
    kind: FaultKind
    match: IdsPredicate | None
    remaining: int | None
    code: int = 500
    retry_after: str | None = None
    body: bytes | None = None
    interval: float = 0.05
    content_length: TruncatedLength = "actual"
    how: MistypeHow = "routed_string"
    target_id: str | None = None
    extra_routed: bool = True
    key: str = "routes"


class RoutingServer:
    """The routing API on 127.0.0.1, served by a ThreadingHTTPServer in a background thread.

    Ids in `routed` answer ``routed: true``, all others ``false``. Faults are tried in the order
    they were added; the first whose `match` accepts the batch answers it instead.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        auth_header: str = "Authorization",
        auth_prefix: str = "Bearer ",
        path: str = DEFAULT_PATH,
        latency: float = 0.0,
        routed: Iterable[str] = (),
    ) -> None:
        self.token = token
        self.auth_header = auth_header
        self.auth_prefix = auth_prefix
        self.path = path
        # Seconds added before every answer; read per request, so benchmarks may change it live.
        self.latency = latency
        # Replaced wholesale by set_routed, so handlers never see a half-updated set.
        self.routed: set[str] = set(routed)
        self.requests: list[RecordedRequest] = []
        # Exceptions the handlers raised other than a client going away: a bug in this server.
        self.errors: list[BaseException] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._port is not None:
            raise RuntimeError("a RoutingServer starts once; make a new one")
        httpd = _HTTPServer(self)
        self._httpd = httpd
        self._port = httpd.server_port
        # serve_forever checks for shutdown() once per poll interval; short keeps stop() quick.
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"routing-server-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every connection, even hanging or dripping ones. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        self._stopping.set()  # releases hang, drip and latency waits
        httpd.shutdown()  # serve_forever is running in `thread`, so this returns within a poll
        httpd.abort_connections()  # wakes handlers blocked reading an idle keep-alive connection
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for worker in (thread, *httpd.handler_threads()):
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"

    # -- state -------------------------------------------------------------------------------

    def set_routed(self, ids: Iterable[str]) -> None:
        self.routed = set(ids)

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least `count` requests were recorded; False if `timeout` ran out first.

        Lets a test act while a faulty request is in flight without sleeping and hoping.
        """
        with self._recorded:
            return self._recorded.wait_for(lambda: len(self.requests) >= count, timeout)

    def add_fault(
        self,
        kind: FaultKind | str,
        *,
        match: IdsPredicate | Literal["all"] | None = None,
        times: int | None = None,
        code: int | None = None,
        retry_after: float | str | None = None,
        body: str | bytes | None = None,
        interval: float | None = None,
        content_length: TruncatedLength | None = None,
        how: MistypeHow | None = None,
        id: str | None = None,  # shadows the builtin to match the contract's field name
        routed: bool | None = None,
        key: str | None = None,
    ) -> None:
        """Answer matching batches with `kind` instead of the normal answer.

        match: a predicate on the requested ids (as sent), or "all"/None for every batch.
        times: how many answers the fault takes over before normal answers resume (None: all).

        Kinds and their keywords:
          hang: accept the request and never answer (until the client leaves or stop()).
          status: `code` (required), `retry_after` (Retry-After header), `body` (default: JSON).
          reset: close with TCP RST (SO_LINGER 0), no response.
          drip: 200 and the true Content-Length, then the body one byte every `interval` s.
          truncated: the JSON cut in half; `content_length` "actual" (framing matches the cut
            body) or "full" (declares the whole body, sends half, closes).
          malformed: 200 application/json whose body is not JSON.
          empty: 200 with an empty body.  null: 200 with body ``null``.
          html: 200 text/html error page.
          missing_id: drop `id` (default: the first requested id) from results.
          extra_id: add `id` (default "unrequested-build") with `routed` (default True).
          duplicate_id / contradictory_id: repeat `id` (default: the first requested id) with
            the same / the opposite routed value.
          mistyped: `how` (required): "routed_string" ("true"/"false"), "routed_int" (1/0),
            "id_int" (digits of the id as an integer, "b170" -> 170), "results_dict"
            ({"b1": true, ...}), "missing_routed" (entries without the routed key).
          wrong_results_key: the list under `key` (default "routes") instead of "results".
        """
        fault_kind = FaultKind(kind)
        given = {
            name
            for name, value in (
                ("code", code),
                ("retry_after", retry_after),
                ("body", body),
                ("interval", interval),
                ("content_length", content_length),
                ("how", how),
                ("id", id),
                ("routed", routed),
                ("key", key),
            )
            if value is not None
        }
        unexpected = given - _FAULT_PARAMS.get(fault_kind, frozenset())
        if unexpected:
            raise TypeError(f"a {fault_kind} fault takes no {', '.join(sorted(unexpected))}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for always")
        fault = _Fault(
            kind=fault_kind,
            match=None if match == "all" else match,
            remaining=times,
            target_id=id,
        )
        if fault_kind is FaultKind.STATUS:
            if code is None or not 100 <= code <= 599:
                raise ValueError("a status fault needs a code between 100 and 599")
            fault.code = code
            if retry_after is not None:
                fault.retry_after = (
                    f"{retry_after:g}" if isinstance(retry_after, float) else str(retry_after)
                )
            if body is not None:
                fault.body = body.encode() if isinstance(body, str) else body
        if interval is not None:
            if interval <= 0:
                raise ValueError("interval must be positive")
            fault.interval = interval
        if content_length is not None:
            if content_length not in _TRUNCATED_LENGTHS:
                raise ValueError(f"content_length must be one of {sorted(_TRUNCATED_LENGTHS)}")
            fault.content_length = content_length
        if fault_kind is FaultKind.MISTYPED:
            if how is None or how not in _MISTYPE_HOWS:
                raise ValueError(f"a mistyped fault needs how= one of {sorted(_MISTYPE_HOWS)}")
            fault.how = how
        if routed is not None:
            fault.extra_routed = routed
        if key is not None:
            fault.key = key
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- used by the request handler ---------------------------------------------------------

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        return headers.get(self.auth_header.lower()) == f"{self.auth_prefix}{self.token}"

    def _take_fault(self, ids: list[str]) -> _Fault | None:
        """The first fault matching `ids`, counting one use of it."""
        with self._lock:
            for fault in self._faults:
                if fault.match is not None and not fault.match(list(ids)):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _record(self, request: RecordedRequest) -> None:
        with self._recorded:
            self.requests.append(request)
            self._recorded.notify_all()


class _HTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connections so stop() can cut them all."""

    daemon_threads = True
    # The stock server_close() joins handler threads without a time limit; stop() bounds it.
    block_on_close = False
    # Benchmarks open many connections at once; the default backlog of 5 would drop SYNs.
    request_queue_size = 128

    def __init__(self, owner: RoutingServer) -> None:
        self.owner = owner
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        super().__init__((HOST, 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn); nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.socket.getsockname()[1]

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        with self._conn_lock:
            if isinstance(request, socket.socket):
                self._connections.add(request)
            self._handlers = [t for t in self._handlers if t.is_alive()]
            handler = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"routing-server-{self.server_port}-conn",
                daemon=True,
            )
            self._handlers.append(handler)
            handler.start()

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        # A reset fault set SO_LINGER 0: skip the graceful FIN so that close() sends a bare RST.
        if isinstance(request, socket.socket) and _zero_linger(request):
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def close_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        # Under the lock so abort_connections() never touches a closed (maybe reused) descriptor.
        with self._conn_lock:
            if isinstance(request, socket.socket):
                self._connections.discard(request)
            super().close_request(request)

    def abort_connections(self) -> None:
        with self._conn_lock:
            for connection in self._connections:
                # OSError: the peer already tore the connection down.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def handler_threads(self) -> list[threading.Thread]:
        with self._conn_lock:
            return list(self._handlers)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        error = sys.exc_info()[1]
        # Clients giving up (timeouts, resets) and stop() cutting sockets are expected.
        if error is None or isinstance(error, ConnectionError):
            return
        self.owner.errors.append(error)
        super().handle_error(request, client_address)


def _zero_linger(connection: socket.socket) -> bool:
    try:
        linger = connection.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(_ZERO_LINGER))
    except OSError:
        return False
    onoff, seconds = struct.unpack("ii", linger)
    return bool(onoff) and seconds == 0


def _parse_ids(raw: bytes) -> list[str] | None:
    """The ids of a contract-conforming request body, else None."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    ids = document.get("ids")
    if not isinstance(ids, list):
        return None
    strings = [item for item in ids if isinstance(item, str)]
    return strings if len(strings) == len(ids) else None


def _digits_as_int(build_id: str) -> int:
    return int("".join(char for char in build_id if char.isdigit()) or "0")


def _document(fault: _Fault | None, ids: list[str], routed: set[str]) -> object:
    """The JSON answer for `ids`, bent by the shape faults."""
    distinct = list(dict.fromkeys(ids))  # the contract lists each id once
    results: list[dict[str, object]] = [{"id": i, "routed": i in routed} for i in distinct]
    if fault is None:
        return {"results": results}
    target = fault.target_id if fault.target_id is not None else next(iter(distinct), None)
    match fault.kind:
        case FaultKind.MISSING_ID:
            results = [entry for entry in results if entry["id"] != target]
        case FaultKind.EXTRA_ID:
            extra = fault.target_id if fault.target_id is not None else "unrequested-build"
            results.append({"id": extra, "routed": fault.extra_routed})
        case FaultKind.DUPLICATE_ID if target is not None:
            results.append({"id": target, "routed": target in routed})
        case FaultKind.CONTRADICTORY_ID if target is not None:
            results.append({"id": target, "routed": target not in routed})
        case FaultKind.MISTYPED:
            return _mistype(fault.how, distinct, routed)
        case FaultKind.WRONG_RESULTS_KEY:
            return {fault.key: results}
    return {"results": results}


def _mistype(how: MistypeHow, ids: list[str], routed: set[str]) -> object:
    match how:
        case "routed_string":
            return {"results": [{"id": i, "routed": str(i in routed).lower()} for i in ids]}
        case "routed_int":
            return {"results": [{"id": i, "routed": int(i in routed)} for i in ids]}
        case "id_int":
            return {"results": [{"id": _digits_as_int(i), "routed": i in routed} for i in ids]}
        case "results_dict":
            return {"results": {i: i in routed for i in ids}}
        case "missing_routed":
            return {"results": [{"id": i} for i in ids]}


class _Handler(http.server.BaseHTTPRequestHandler):
    # Keep-alive like a real API, so the client's connection pool is exercised too.
    protocol_version = "HTTP/1.1"
    # Drip must put each byte on the wire when it is written, not when Nagle decides.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request access log; `RoutingServer.requests` records requests."""

    def do_POST(self) -> None:
        owner = self.server.owner
        raw = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        ids = _parse_ids(raw) if raw is not None else None
        fault: _Fault | None = None
        if not owner._authorized(headers):
            kind = "unauthorized"
        elif ids is None:
            kind = "bad_request"
        else:
            fault = owner._take_fault(ids)
            kind = fault.kind.value if fault is not None else "ok"
        owner._record(
            RecordedRequest(
                path=self.path,
                ids=tuple(ids or ()),
                headers=headers,
                body=raw or b"",
                received_at=time.monotonic(),
                kind=kind,
            )
        )
        if owner.latency > 0:
            owner._stopping.wait(owner.latency)
        if kind == "unauthorized":
            self._send(401, b'{"error": "unauthorized"}', extra={"WWW-Authenticate": "Bearer"})
        elif ids is None:
            self._send(400, b'{"error": "expected {\\"ids\\": [string, ...]}"}')
            # The request may not have been read whole; the connection cannot be trusted.
            self.close_connection = True
        else:
            self._answer(fault, ids, owner.routed)

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        if not 0 <= length <= MAX_REQUEST_BYTES:
            return None
        return self.rfile.read(length)

    def _answer(self, fault: _Fault | None, ids: list[str], routed: set[str]) -> None:
        normal = json.dumps(_document(None, ids, routed)).encode()
        if fault is None:
            self._send(200, normal)
            return
        match fault.kind:
            case FaultKind.HANG:
                self._hang()
            case FaultKind.STATUS:
                body = fault.body
                if body is None:
                    body = json.dumps({"error": f"injected status {fault.code}"}).encode()
                extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self._send(fault.code, body, extra=extra)
            case FaultKind.RESET:
                # With linger 0, close() discards the connection with RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ZERO_LINGER)
                self.close_connection = True
            case FaultKind.DRIP:
                self._drip(normal, fault.interval)
            case FaultKind.TRUNCATED:
                cut = normal[: len(normal) // 2]
                if fault.content_length == "actual":
                    self._send(200, cut)
                else:
                    self._send_head(200, len(normal))
                    self.wfile.write(cut)
                    self.close_connection = True
            case FaultKind.MALFORMED:
                # Python's repr of the answer: what a server that forgot json.dumps would send.
                self._send(200, repr(_document(None, ids, routed)).encode())
            case FaultKind.EMPTY:
                self._send(200, b"")
            case FaultKind.NULL:
                self._send(200, b"null")
            case FaultKind.HTML:
                self._send(200, _HTML_ERROR_PAGE, content_type="text/html; charset=utf-8")
            case _:
                self._send(200, json.dumps(_document(fault, ids, routed)).encode())

    def _hang(self) -> None:
        """Answer nothing until the client leaves, the server stops, or MAX_HANG_SECONDS pass."""
        stopping = self.server.owner._stopping
        deadline = time.monotonic() + MAX_HANG_SECONDS
        while time.monotonic() < deadline and not stopping.wait(HANG_POLL_SECONDS):
            if self._client_gone():
                break
        self.close_connection = True

    def _client_gone(self) -> bool:
        # A non-blocking peek (not select(), which breaks past 1024 descriptors in benchmarks).
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False  # nothing to read: the client is still waiting
        except ConnectionError:
            return True
        return peeked == b""  # EOF: the client closed its end

    def _drip(self, body: bytes, interval: float) -> None:
        stopping = self.server.owner._stopping
        self._send_head(200, len(body))
        for offset in range(len(body)):
            if stopping.wait(interval):
                self.close_connection = True
                return
            self.wfile.write(body[offset : offset + 1])

    def _send_head(
        self,
        status: int,
        length: int,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self._send_head(status, len(body), content_type=content_type, extra=extra)
        self.wfile.write(body)
